"""Data pipeline: tokenizers, the indexed format, packing/shuffling/resume/DP slicing, the CLI.

References are independent of the code under test: hand-built token lists, megatron-core's
own IndexedDataset reader and builder, and the source texts themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sat_dist.data.blend import BlendedDataset, DataPosition
from sat_dist.data.indexed import IndexedDatasetReader, IndexedDatasetWriter, token_dtype
from sat_dist.data.packing import TokenStream, build_packed_datasets, parse_split, split_sample_ranges
from sat_dist.data.tokenizer import load_tokenizer, train_sentencepiece
from sat_dist.errors import SatDistError

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "tools" / "preprocess_data.py"

DOCS = [  # what a code corpus looks like: indentation, tabs, CRLF, blank lines, non-ASCII
    "def f(x):\n    return x + 1\n",
    "  leading spaces\n\ttab\tseparated\n\n\ntrailing  ",
    "Ünïcödé ✓ 𝔘 — «quotes» 漢字\r\nline two\r\n",
    "import os\nprint(os.getcwd())  # 12345 67890\n",
    "x",
]


def _one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "sub" / "deeper").mkdir(parents=True)
    paths = [d / "a.txt", d / "sub" / "b.txt", d / "sub" / "deeper" / "c.txt", d / "d.txt"]
    for p, text in zip(paths, DOCS):
        p.write_bytes(text.encode())  # bytes: keep the \r\n
    (d / "sub" / "skip.py").write_text("not matched by --glob\n")
    (d / ".hidden.txt").write_text("hidden files are skipped\n")
    (d / "e.jsonl").write_text(json.dumps({"text": DOCS[4]}) + "\n\n"
                               + json.dumps({"text": DOCS[0], "id": 7}) + "\n")
    # Some real text so the tokenizers learn merges; the json package exists everywhere.
    train = d.parent / "train_text.txt"
    train.write_text("".join(p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py")))
                     + "".join(DOCS))
    return d


@pytest.fixture(scope="module")
def sp_model(corpus) -> Path:
    return train_sentencepiece([corpus.parent / "train_text.txt"], corpus.parent / "sp",
                               vocab_size=1000)


@pytest.fixture(scope="module")
def hf_json(corpus) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([(corpus.parent / "train_text.txt").read_text()], trainer)
    out = corpus.parent / "hf" / "tokenizer.json"
    out.parent.mkdir()
    tok.save(str(out))
    return out


def write_docs(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
        w.finalize()
    return str(prefix)


# ---------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("backend", ["sentencepiece", "hf"])
def test_tokenizer_round_trip(backend, sp_model, hf_json):
    tok = load_tokenizer(sp_model if backend == "sentencepiece" else hf_json)
    for text in DOCS + [" ", ""]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_id]) == text  # special tokens do not print
    if backend == "sentencepiece":
        assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (1000, 2, 1)
    else:
        assert (tok.eos_id, tok.bos_id) == (0, 1)  # found by name: <|endoftext|>, <s>


def test_hf_eos_from_tokenizer_config(hf_json, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(hf_json.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<s>"}}))
    assert load_tokenizer(folder).eos_id == 1  # a directory works; the config wins


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(SatDistError) as e:
        load_tokenizer(tmp_path / "nope.model")
    _one_line_error(e, "nope.model", "not found")
    for name in ("bad.model", "tokenizer.json"):
        (tmp_path / name).write_text("{garbage")
        with pytest.raises(SatDistError) as e:
            load_tokenizer(tmp_path / name)
        _one_line_error(e, tmp_path / name)


# ---------------------------------------------------------------- indexed format

def test_token_dtype_rule():
    assert token_dtype(8000) == np.uint16 and token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32 and token_dtype(128256) == np.int32


def test_indexed_matches_megatron_core_both_ways(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=n) for n in (5, 1, 0, 300, 17)]
    # ours -> megatron's reader (int32 and uint16)
    for dtype in (np.int32, np.uint16):
        want = [d % 65000 if dtype == np.uint16 else d for d in docs]
        prefix = write_docs(tmp_path / f"ours_{np.dtype(dtype).name}", want, dtype)
        theirs = IndexedDataset(prefix)
        assert theirs.index.dtype == dtype and len(theirs) == len(want)
        for i, d in enumerate(want):
            np.testing.assert_array_equal(theirs[i], d)
    # megatron's builder -> ours, including a document made of two sequences
    prefix = str(tmp_path / "megatron")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    b.add_document(docs[0], [5])
    b.add_document(np.concatenate([docs[3], docs[4]]), [300, 17])
    b.finalize(prefix + ".idx")
    ours = IndexedDatasetReader(prefix)
    assert len(ours) == 2 and ours.num_tokens == 322
    np.testing.assert_array_equal(ours[0], docs[0])
    np.testing.assert_array_equal(ours[1], np.concatenate([docs[3], docs[4]]))


def _corrupt(kind: str, prefix: str):
    """Damage a good dataset; return the name of the file the message must cite."""
    bin_p, idx_p = prefix + ".bin", prefix + ".idx"
    if kind == "missing_bin":
        os.remove(bin_p)
        return bin_p
    if kind == "missing_idx":
        os.remove(idx_p)
        return idx_p
    if kind == "truncated_bin":
        os.truncate(bin_p, os.path.getsize(bin_p) - 3)
        return bin_p
    if kind == "longer_bin":
        with open(bin_p, "ab") as f:
            f.write(b"\0\0")
        return bin_p
    if kind == "truncated_idx":
        os.truncate(idx_p, os.path.getsize(idx_p) - 8)
        return idx_p
    if kind == "empty_idx":
        os.truncate(idx_p, 0)
        return idx_p
    if kind == "float_dtype":
        with open(idx_p, "r+b") as f:
            f.seek(17)  # after 9 magic bytes and the u64 version
            f.write(bytes([7]))  # float32
        return idx_p
    if kind == "bad_magic":
        with open(idx_p, "r+b") as f:
            f.write(b"NOTANIDX!")
        return idx_p
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_bin", "missing_idx", "truncated_bin", "longer_bin",
                                  "truncated_idx", "empty_idx", "float_dtype", "bad_magic"])
def test_reader_reports_damaged_files(kind, tmp_path):
    prefix = write_docs(tmp_path / "ds", [[1, 2, 3], [4, 5]])
    culprit = _corrupt(kind, prefix)
    with pytest.raises(SatDistError) as e:
        IndexedDatasetReader(prefix)
    _one_line_error(e, culprit)
    if kind == "truncated_bin":
        _one_line_error(e, "shorter than .idx says", "truncated", "preprocess_data.py")


def test_reader_rejects_empty_and_mismatched_vocab(tmp_path):
    for docs in ([], [[], []]):
        prefix = write_docs(tmp_path / f"empty{len(docs)}", docs)
        with pytest.raises(SatDistError) as e:
            IndexedDatasetReader(prefix)
        _one_line_error(e, prefix, "empty dataset")
    prefix = write_docs(tmp_path / "ok", [[1, 2, 900]])
    with pytest.raises(SatDistError) as e:
        IndexedDatasetReader(prefix, vocab_size=100_000)  # uint16 cannot hold that vocabulary
    _one_line_error(e, "uint16", "100000")
    with pytest.raises(SatDistError) as e:
        IndexedDatasetReader(prefix).check_token_range(500)
    _one_line_error(e, prefix + ".bin", "900")


def test_writer_refuses_overflow_and_keeps_old_output(tmp_path):
    prefix = write_docs(tmp_path / "ds", [[1, 2, 3]])
    before = {p: Path(p).read_bytes() for p in (prefix + ".bin", prefix + ".idx", prefix + ".doclast.npz")}
    with pytest.raises(SatDistError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([7, 8])
            w.add_document([70000])  # does not fit uint16: must fail, not wrap
    assert {p: Path(p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.doclast.npz", "ds.idx"]  # no temp files left


# ---------------------------------------------------------------- packing

EOS = 0
PACK_DOCS = [[5, 6, 7], [8, 9, EOS], [], [10], list(range(11, 40)), [41, 42, 43, 44, EOS], [45]]


def hand_samples(docs, eos, s):
    """The reference: EOS after each document not already ending in it, cut every s tokens."""
    stream = []
    for d in docs:
        stream += d + ([] if d and d[-1] == eos else [eos])
    return [stream[k * s:k * s + s + 1] for k in range((len(stream) - 1) // s)], stream


@pytest.fixture
def packed_prefix(tmp_path):
    return write_docs(tmp_path / "pack", PACK_DOCS)


def test_stream_and_samples_match_hand_built(packed_prefix):
    s = 4
    want, stream = hand_samples(PACK_DOCS, EOS, s)
    ts = TokenStream(IndexedDatasetReader(packed_prefix), EOS)
    assert ts.num_tokens == len(stream)
    for start in range(len(stream)):
        for count in (1, 3, len(stream) - start):
            if start + count <= len(stream):
                assert ts.read(start, count).tolist() == stream[start:start + count]
    ds = build_packed_datasets(packed_prefix, s, EOS, seed=3, split="1")["train"]
    assert len(ds) == len(want)
    perm = ds.permutation(0)
    assert sorted(perm.tolist()) == list(range(len(want)))
    for g in range(len(ds)):
        assert ds.sample(g).tolist() == want[perm[g]]


def test_permutation_deterministic_by_seed(packed_prefix):
    def order(seed, epoch=0):
        ds = build_packed_datasets(packed_prefix, 1, EOS, seed=seed, split="1")["train"]
        return ds.permutation(epoch).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1, epoch=0) != order(1, epoch=1)


def _at(ds, consumed):
    """One dataset as the training loop reads it (a blend of one) and its position after
    `consumed` samples."""
    blend = BlendedDataset.single(ds, "d")
    return blend, blend.start(DataPosition({"d": consumed}, {"d": 0}, {"d": 1.0}))


def _batches(ds, consumed, G, mb, dp_rank=0, dp_size=1):
    blend, pos = _at(ds, consumed)
    return blend.step_batches(pos, G, mb, dp_rank=dp_rank, dp_size=dp_size)


def _run_steps(ds, first_step, steps, G, mb, dp_rank=0, dp_size=1):
    out = []
    for step in range(first_step, first_step + steps):
        out.append([(x.clone(), y.clone()) for x, y in _batches(ds, step * G, G, mb, dp_rank, dp_size)])
    return out


def test_resume_from_consumed_samples_continues_exactly(packed_prefix):
    G, mb = 4, 2
    def fresh():  # a new process: nothing cached, only seed and consumed_samples carried over
        return build_packed_datasets(packed_prefix, 2, EOS, seed=5, split="1")["train"]

    full = _run_steps(fresh(), 0, 14, G, mb)
    n = len(fresh())
    assert 14 * G > 2 * n  # the run crosses two epoch boundaries, one inside a step
    resumed = _run_steps(fresh(), 5, 9, G, mb)
    for a, b in zip(full[5:], resumed, strict=True):
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # no replay, no skip: epoch 0 serves every sample exactly once, in permuted order
    want, _ = hand_samples(PACK_DOCS, EOS, 2)
    served = [row.tolist() + [int(lbl[-1])]  # a sample = input + its last label
              for step in full for x, y in step for row, lbl in zip(x, y)]
    assert sorted(served[:n]) == sorted(want)


@pytest.mark.parametrize("dp_size,mb", [(2, 1), (2, 2), (4, 1)])
def test_dp_ranks_union_is_the_global_batch(packed_prefix, dp_size, mb):
    G = 8
    ds = build_packed_datasets(packed_prefix, 3, EOS, seed=9, split="1")["train"]
    for step in range(3):
        single = torch.cat([x for x, _ in _batches(ds, step * G, G, G)])  # [G, seq]
        ranks_x, ranks_y = [], []
        for r in range(dp_size):
            for x, y in _batches(ds, step * G, G, mb, dp_rank=r, dp_size=dp_size):
                assert x.shape == (mb, 3) and x.dtype == torch.long
                ranks_x.append(x)
                ranks_y.append(y)
        assert torch.equal(torch.cat(ranks_x), single)
        rows = [ds.sample(g) for g in range(step * G, (step + 1) * G)]
        assert torch.equal(torch.cat(ranks_y), torch.tensor(np.stack(rows))[:, 1:])
    with pytest.raises(SatDistError):
        next(_batches(ds, 0, G, 3, dp_rank=0, dp_size=2))  # 3 does not divide 4


def test_split_sizes_and_disjoint_ranges(tmp_path):
    assert parse_split("969,30,1") == [969, 30, 1] and parse_split("98,2") == [98, 2, 0]
    assert [b - a for a, b in split_sample_ranges(1000, [969, 30, 1])] == [969, 30, 1]
    assert split_sample_ranges(10, [1, 1, 1]) == [(0, 3), (3, 7), (7, 10)]
    for bad in ("", "a,b", "0,1", "1,-1", "1,2,3,4"):
        with pytest.raises(SatDistError) as e:
            parse_split(bad)
        _one_line_error(e, "data.split")

    prefix = write_docs(tmp_path / "big", [list(range(1, 400)), list(range(1, 602))])
    ds = build_packed_datasets(prefix, 10, EOS, split="90,8,2")
    total = (401 + 603 - 1) // 10
    assert total == 100
    assert {k: len(v) for k, v in ds.items()} == {"train": 90, "valid": 8, "test": 2}
    ranges = [set(range(v.first_sample, v.first_sample + len(v))) for v in ds.values()]
    assert set.union(*ranges) == set(range(total)) and sum(map(len, ranges)) == total
    assert "test" not in build_packed_datasets(prefix, 10, EOS, split="98,2")
    with pytest.raises(SatDistError) as e:
        build_packed_datasets(prefix, 10, EOS, split="999,1,0")  # valid rounds to 0 samples
    _one_line_error(e, "valid split", "0 of 100")


# ---------------------------------------------------------------- CLI

def _cli_module():
    spec = importlib.util.spec_from_file_location("preprocess_data", CLI)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _decoded_docs(prefix, tok, eod):
    r = IndexedDatasetReader(prefix)
    out = []
    for i in range(len(r)):
        ids = r[i].tolist()
        if eod:
            assert ids[-1] == tok.eos_id
            ids = ids[:-1]
        out.append(tok.decode(ids))
    return out


# sorted walk of corpus/ with *.txt (hidden file and skip.py excluded), then e.jsonl's lines
EXPECTED_ORDER = [DOCS[0], DOCS[3], DOCS[1], DOCS[2], DOCS[4], DOCS[0]]


def test_cli_sentencepiece_round_trip_with_workers(corpus, sp_model, tmp_path):
    prefix = tmp_path / "out" / "sp"
    res = subprocess.run([sys.executable, str(CLI), "--input", str(corpus), str(corpus / "e.jsonl"),
                          "--glob", "*.txt", "--tokenizer-model", str(sp_model),
                          "--output-prefix", str(prefix), "--workers", "2", "--append-eod"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "6 documents" in res.stdout
    assert _decoded_docs(str(prefix), load_tokenizer(sp_model), eod=True) == EXPECTED_ORDER


def test_cli_hf_round_trip_in_process(corpus, hf_json, tmp_path, capsys):
    prefix = str(tmp_path / "hf")
    rc = _cli_module().main(["--input", str(corpus), str(corpus / "e.jsonl"), "--glob", "*.txt",
                             "--tokenizer-model", str(hf_json), "--output-prefix", prefix])
    assert rc == 0, capsys.readouterr().err
    assert _decoded_docs(prefix, load_tokenizer(hf_json), eod=False) == EXPECTED_ORDER


def test_cli_bad_json_is_exit_2_and_keeps_old_output(corpus, sp_model, tmp_path):
    prefix = write_docs(tmp_path / "keep", [[1, 2, 3]])
    before = {p: Path(p).read_bytes() for p in (prefix + ".bin", prefix + ".idx")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    res = subprocess.run([sys.executable, str(CLI), "--input", str(bad), "--tokenizer-model",
                          str(sp_model), "--output-prefix", prefix, "--workers", "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{bad}:2" in lines[0], res.stderr
    assert {p: Path(p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "keep.bin", "keep.doclast.npz", "keep.idx"]


@pytest.mark.parametrize("case", ["missing_input", "no_match", "missing_key", "bad_tokenizer"])
def test_cli_bad_input_is_one_line_exit_2(case, corpus, sp_model, tmp_path, capsys):
    args = {"--input": [str(corpus)], "--tokenizer-model": [str(sp_model)],
            "--output-prefix": [str(tmp_path / "o")], "--glob": ["*.txt"]}
    needle = {"missing_input": "nowhere", "no_match": "*.rs", "missing_key": "e.jsonl:1",
              "bad_tokenizer": "broken.model"}[case]
    if case == "missing_input":
        args["--input"] = [str(tmp_path / "nowhere")]
    elif case == "no_match":
        args["--glob"] = ["*.rs"]
    elif case == "missing_key":
        args["--input"] = [str(corpus / "e.jsonl")]
        args["--json-key"] = ["content"]
    else:
        (tmp_path / "broken.model").write_bytes(b"\x00garbage")
        args["--tokenizer-model"] = [str(tmp_path / "broken.model")]
    argv = [tok for k, v in args.items() for tok in [k, *v]]
    assert _cli_module().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not list(tmp_path.glob("o.*"))
