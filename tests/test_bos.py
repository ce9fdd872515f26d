"""BOS at document starts, as Megatron-LM's Llama preprocessing and transformers'
`tokenizer(text)` lay documents out: tools/preprocess_data.py (and the default corpus) start
every document with the tokenizer's BOS, exactly once; --no-bos leaves it out; the dataset's
PREFIX.tokenizer.json says which; a blend of datasets with and without BOS is refused.

References: transformers' tokenizers (built offline from a SentencePiece model trained here,
and from `tokenizers` objects) and sentencepiece's own encode with add_bos."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sat_dist.data.indexed import IndexedDatasetReader
from sat_dist.data.tokenizer import (
    Tokenizer,
    document_ids,
    load_tokenizer,
    read_tokenizer_record,
    record_bos,
    tokenizer_record,
    train_sentencepiece,
)
from sat_dist.errors import SatDistError

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "tools" / "preprocess_data.py"

DOCS = [
    "def f(x):\n    return x + 1\n",
    "  leading spaces\n\ttab\tseparated\n\n\ntrailing  ",
    "Ünïcödé ✓ — «quotes» 漢字\r\nline two\r\n",
    "x",
]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("bos")
    train = d / "train_text.txt"
    train.write_text("".join(p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))) + "".join(DOCS))
    docs = d / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in DOCS))
    return {"dir": d, "train": train, "docs": docs}


def _byte_level_bpe(train: Path, specials: list[str], post_processor):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([train.read_text()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = post_processor
    return tok


@pytest.fixture(scope="module")
def tokenizers(texts) -> dict:
    """{kind: (tokenizer file for preprocess_data, transformers' reference encode, BOS expected)}.

    sentencepiece: a Llama-2-layout .model (unk 0, bos 1, eos 2), against sentencepiece's
      encode(add_bos=True) (what Megatron-LM's Llama-2 tokenizer does);
    llama2-hf: transformers' LlamaTokenizer converted from that model, with add_bos_token (as
      Llama-2's tokenizer_config.json says), saved as tokenizer.json + tokenizer_config.json
      (the conversion splits runs of spaces otherwise than sentencepiece: compared with
      transformers reading the same files);
    llama3-hf: a byte-level BPE whose post-processor puts <|begin_of_text|> first, no config;
    bos-is-eos: a byte-level BPE (GPT-2, SmolLM2) whose BOS is its EOS <|endoftext|>: no BOS."""
    import sentencepiece as spm
    from tokenizers import processors
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    d = texts["dir"]
    sp_dir = d / "sp"
    sp_model = train_sentencepiece([texts["train"]], sp_dir / "tok", vocab_size=500)
    (sp_dir / "tokenizer.model").write_bytes(sp_model.read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    LlamaTokenizer.from_pretrained(str(sp_dir), add_bos_token=True).save_pretrained(str(d / "llama2"))
    llama2_hf = AutoTokenizer.from_pretrained(str(d / "llama2"))

    (d / "llama3").mkdir()
    bot = "<|begin_of_text|>"
    l3 = _byte_level_bpe(texts["train"], [bot, "<|end_of_text|>"], processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bot} $A", pair=f"{bot} $A {bot} $B", special_tokens=[(bot, 0)])]))
    l3.save(str(d / "llama3" / "tokenizer.json"))
    llama3_hf = PreTrainedTokenizerFast(tokenizer_file=str(d / "llama3" / "tokenizer.json"))

    (d / "gpt2").mkdir()
    _byte_level_bpe(texts["train"], ["<|endoftext|>"], processors.ByteLevel(trim_offsets=False)).save(
        str(d / "gpt2" / "tokenizer.json"))
    (d / "gpt2" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                                  "eos_token": "<|endoftext|>"}))
    gpt2_hf = PreTrainedTokenizerFast(tokenizer_file=str(d / "gpt2" / "tokenizer.json"))
    return {
        "sentencepiece": (sp_model, lambda t: sp.encode(t, add_bos=True), True),
        "llama2-hf": (d / "llama2" / "tokenizer.json", lambda t: llama2_hf(t)["input_ids"], True),
        "llama3-hf": (d / "llama3" / "tokenizer.json", lambda t: llama3_hf(t)["input_ids"], True),
        "bos-is-eos": (d / "gpt2" / "tokenizer.json", lambda t: gpt2_hf(t)["input_ids"], False),
    }


def _preprocess(tok_path, docs: Path, prefix: Path, *extra: str) -> list[list[int]]:
    spec = importlib.util.spec_from_file_location("preprocess_data", CLI)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--input", str(docs), "--tokenizer-model", str(tok_path), "--output-prefix", str(prefix),
            "--append-eod", *extra]
    assert mod.main(argv) == 0
    r = IndexedDatasetReader(prefix)
    return [r[i].tolist() for i in range(len(r))]


@pytest.mark.parametrize("kind", ["sentencepiece", "llama2-hf", "llama3-hf", "bos-is-eos"])
def test_documents_are_transformers_ids_then_eos(kind, tokenizers, texts, tmp_path):
    tok_path, reference, has_bos = tokenizers[kind]
    tok = load_tokenizer(tok_path)
    assert tok.add_bos == has_bos
    got = _preprocess(tok_path, texts["docs"], tmp_path / "d")
    assert got == [reference(t) + [tok.eos_id] for t in DOCS]
    for ids in got:
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        if has_bos:  # exactly one BOS, first
            assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
        else:  # bos-is-eos: that token only at the end, as EOS
            assert tok.bos_id == tok.eos_id
    record = read_tokenizer_record(tmp_path / "d")
    assert record["bos"] is has_bos and record.get("bos_id") == (tok.bos_id if has_bos else None)
    assert record["vocab_sha256"] == tokenizer_record(tok_path)["vocab_sha256"]  # the tokenizer's identity


@pytest.mark.parametrize("kind", ["sentencepiece", "llama2-hf"])
def test_no_bos_gives_none(kind, tokenizers, texts, tmp_path):
    tok_path, _, _ = tokenizers[kind]
    tok = load_tokenizer(tok_path)
    if kind == "sentencepiece":  # through worker processes: the flag reaches them
        prefix = tmp_path / "d"
        res = subprocess.run([sys.executable, str(CLI), "--input", str(texts["docs"]), "--tokenizer-model",
                              str(tok_path), "--output-prefix", str(prefix), "--append-eod", "--no-bos",
                              "--workers", "2"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "bos none" in res.stdout
        r = IndexedDatasetReader(prefix)
        got = [r[i].tolist() for i in range(len(r))]
    else:
        got = _preprocess(tok_path, texts["docs"], tmp_path / "d", "--no-bos")
    assert got == [tok.encode(t) + [tok.eos_id] for t in DOCS]
    assert all(tok.bos_id not in ids for ids in got)
    assert read_tokenizer_record(tmp_path / "d")["bos"] is False


def test_what_the_tokenizer_files_say_is_followed(tokenizers, tmp_path):
    """A tokenizer.json's post-processor decides, as in transformers (whose tokenizer(text) is
    compared); without one, tokenizer_config.json's "add_bos_token": false means no BOS."""
    from tokenizers import Tokenizer as HFTok
    from transformers import AutoTokenizer

    src = tokenizers["llama2-hf"][0].parent
    cfg = json.loads((src / "tokenizer_config.json").read_text())

    def folder(name, config, post_processor=True):
        f = tmp_path / name
        f.mkdir()
        hf = HFTok.from_file(str(src / "tokenizer.json"))
        if not post_processor:
            hf.post_processor = None
        hf.save(str(f / "tokenizer.json"))
        (f / "tokenizer_config.json").write_text(json.dumps(config))
        return f

    for name, config, post, bos in [("template", dict(cfg, add_bos_token=False), True, True),
                                    ("none", dict(cfg, add_bos_token=False), False, False),
                                    ("unsaid", cfg, False, True)]:
        tok = load_tokenizer(folder(name, config, post) / "tokenizer.json")
        assert tok.bos_id == 1 and tok.add_bos is bos, name
        assert document_ids(tok, DOCS[0])[:1] == ([1] if bos else tok.encode(DOCS[0])[:1]), name
        if post:
            assert document_ids(tok, DOCS[0]) == AutoTokenizer.from_pretrained(str(tmp_path / name))(DOCS[0])[
                "input_ids"] + [2]


class _Adds(Tokenizer):
    """A tokenizer whose encode already starts with BOS (as a post-processor would)."""

    path, vocab_size, eos_id, bos_id, add_bos = "fake", 10, 2, 1, True

    def encode(self, text):
        return [1] + [5] * len(text)


def test_exactly_one_bos_never_two(tokenizers):
    assert document_ids(_Adds(), "abc") == [1, 5, 5, 5, 2]
    assert document_ids(_Adds(), "abc", bos=False, eod=False) == [1, 5, 5, 5]  # encode's own, untouched
    tok = load_tokenizer(tokenizers["llama2-hf"][0])
    assert tok.bos_id not in tok.encode("hi")  # encode adds no special tokens
    ids = document_ids(tok, "<s>hi")  # a literal <s> is BOS for the HF tokenizer: no second one
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert document_ids(tok, "") == [tok.bos_id, tok.eos_id]


def test_records_without_bos_mean_no_bos(tmp_path):
    assert record_bos({"vocab_sha256": "x"}) is False
    assert record_bos({"vocab_sha256": "x", "bos": True}) is True
    (tmp_path / "d.tokenizer.json").write_text(json.dumps({"vocab_sha256": "x", "bos": "yes"}))
    with pytest.raises(SatDistError) as e:
        read_tokenizer_record(tmp_path / "d")
    assert '"bos" is \'yes\', not true or false' in str(e.value) and "\n" not in str(e.value)


def test_blend_of_bos_and_no_bos_is_refused(corpus, texts, tmp_path, capsys):
    """Through the training entry point: one line, before any rank starts work, naming both
    datasets and the fix. A dataset made before the "bos" key (no BOS) blends with --no-bos."""
    from sat_dist.train.main import check_tokenizers, main
    from tests.launchers import _flags

    with_bos, without = tmp_path / "with_bos", tmp_path / "without"
    _preprocess(corpus["tok"], texts["docs"], with_bos)
    _preprocess(corpus["tok"], texts["docs"], without, "--no-bos")
    assert main(_flags(corpus, **{"data-path": None}) + ["--data-path", "0.5", str(with_bos), "0.5", str(without)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err == (f"error: --data-path: the blend mixes datasets whose documents start with BOS ({with_bos}) and "
                   f"datasets whose documents do not ({without}), as their PREFIX.tokenizer.json records say; re-run "
                   f"tools/preprocess_data.py for one of them (it adds BOS by default, --no-bos leaves it out) so "
                   f"that all agree")

    old = tmp_path / "old"  # made before the key existed: its record has no "bos"
    for suffix in (".bin", ".idx"):
        Path(f"{old}{suffix}").write_bytes(Path(f"{without}{suffix}").read_bytes())
    record = json.loads(Path(f"{without}.tokenizer.json").read_text())
    del record["bos"]
    Path(f"{old}.tokenizer.json").write_text(json.dumps(record))
    run_tok = tokenizer_record(corpus["tok"])
    check_tokenizers("--data-path", [str(old), str(without)], run_tok, corpus["tok"])  # both without BOS
    with pytest.raises(SatDistError, match=rf"start with BOS \({with_bos}\) and datasets whose documents do not "
                                           rf"\({old}\)"):
        check_tokenizers("--data-path", [str(with_bos), str(old)], run_tok, corpus["tok"])


def test_default_corpus_starts_documents_with_bos(monkeypatch, tmp_path):
    from sat_dist.data import default_corpus

    monkeypatch.setattr(default_corpus, "MAX_BYTES", 100_000)
    monkeypatch.setattr(default_corpus, "VOCAB_SIZE", 600)
    prefix, tok_path = default_corpus.prepare_default_data(tmp_path, log=lambda msg: None)
    tok = load_tokenizer(tok_path)
    files = [f for f in default_corpus.stdlib_files() if f.read_text(encoding="utf-8", errors="replace").strip()]
    r = IndexedDatasetReader(prefix)
    assert len(r) == len(files)
    assert r[0].tolist() == [tok.bos_id] + tok.encode(files[0].read_text(encoding="utf-8", errors="replace")) + [
        tok.eos_id]
    assert all(r[i][0] == tok.bos_id and r[i][-1] == tok.eos_id and (r[i] == tok.bos_id).sum() == 1
               for i in range(len(r)))
    record = read_tokenizer_record(prefix)
    assert record["bos"] is True and record["bos_id"] == tok.bos_id == 1
    assert record["vocab_sha256"] == tokenizer_record(tok_path)["vocab_sha256"]
