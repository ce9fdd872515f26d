"""Continual pre-training with replay, end to end through torchrun: a blend of new-domain
data with a share of old-domain data (--data-path 0.75 NEW 0.25 OLD), logged against a
named validation set per domain; each dataset's position saved and resumed exactly, on the
same layout and on another; the tokenizer check of a blend.

References: the sample counts worked out by hand from the weights, an uninterrupted run,
and the same run on another TP x DP layout."""

import json
import sysconfig
from pathlib import Path

import pytest

from sat_dist.data.indexed import IndexedDatasetWriter, token_dtype
from sat_dist.data.tokenizer import load_tokenizer, tokenizer_record, write_tokenizer_record
from tests.launchers import _flags, digest, scalars, torchrun


def _write(prefix: Path, files, tok) -> str:
    with IndexedDatasetWriter(prefix, token_dtype(tok.vocab_size)) as w:
        for f in files:
            w.add_document(tok.encode(f.read_text(errors="replace")) + [tok.eos_id])
        w.finalize()
    return str(prefix)


@pytest.fixture(scope="module")
def domains(corpus, tmp_path_factory):
    """new: the corpus (80 stdlib modules); old: 40 other modules; a held-out set of each."""
    d = tmp_path_factory.mktemp("domains")
    tok = load_tokenizer(corpus["tok"])
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out = {"new": corpus["data"], "old": _write(d / "old", files[80:120], tok),
           "new_val": _write(d / "new_val", files[120:126], tok), "old_val": _write(d / "old_val", files[126:132], tok),
           "dir": d}
    return out


def _replay_flags(corpus, domains, **over):
    f = {"data-path": None, "split": "100,0,0", "sat-schedule": "dense", "train-iters": 6, "eval-iters": 2,
         "eval-interval": 3}
    f.update(over)
    blend = ["--data-path", "0.75", domains["new"], "0.25", domains["old"],
             "--valid-data-path", f"new={domains['new_val']}", f"old={domains['old_val']}"]
    return _flags(corpus, **f) + blend


@pytest.fixture(scope="module")
def replay_run(corpus, domains, tmp_path_factory):
    d = tmp_path_factory.mktemp("replay")
    r = torchrun(2, _replay_flags(corpus, domains, save=d / "ckpt",
                                  **{"save-interval": 3, "tensorboard-dir": d / "tb"}))
    return d, r.stdout


def test_replay_blend_counts_and_per_domain_validation(domains, replay_run):
    d, out = replay_run
    # Global batch 8 at 0.75/0.25: 6 + 2 samples every step, by the rule (floor, extra to the
    # dataset furthest behind) worked out by hand: 0.75*8 and 0.25*8 are whole.
    m = json.loads((d / "ckpt" / "iter_0000006" / "sat_dist.json").read_text())
    assert m["data_positions"]["consumed"] == {domains["new"]: 36, domains["old"]: 12}
    assert m["consumed_samples"] == 48
    m3 = json.loads((d / "ckpt" / "iter_0000003" / "sat_dist.json").read_text())
    assert m3["data_positions"]["consumed"] == {domains["new"]: 18, domains["old"]: 6}
    for name in ("new", "old"):
        v = scalars(d / "tb", f"lm loss validation/{name}")
        assert sorted(v) == [3, 6] and all(x > 0 for x in v.values())
    assert "training blend: 0.75" in out and "0.25" in out


def test_replay_resumes_exactly_same_layout_and_another(corpus, domains, replay_run, tmp_path):
    ref = scalars(replay_run[0] / "tb", "lm loss")
    # Same layout (TP 1 x DP 2): bit-exact.
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    torchrun(2, _replay_flags(corpus, domains, save=ckpt, **{"exit-interval": 3, "tensorboard-dir": tb}))
    torchrun(2, _replay_flags(corpus, domains, save=ckpt, load=ckpt, **{"tensorboard-dir": tb}))
    got = scalars(tb, "lm loss")
    for step in (4, 5, 6):
        assert got[step] == ref[step], step
    # One rank (DP 1, four micro-batches per step) from the DP-2 checkpoint at iteration 3:
    # the same samples from each dataset, so the same losses up to summation order.
    one = tmp_path / "one"
    (one / "ckpt").mkdir(parents=True)
    import shutil

    shutil.copytree(ckpt / "iter_0000003", one / "ckpt" / "iter_0000003")
    (one / "ckpt" / "latest").write_text("iter_0000003\n")
    r = torchrun(1, _replay_flags(corpus, domains, save=one / "ckpt", load=one / "ckpt",
                                  **{"tensorboard-dir": one / "tb"}))
    assert "TP 1 x DP 2 -> TP 1 x DP 1" in r.stdout
    got = scalars(one / "tb", "lm loss")
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step


def test_blend_of_two_tokenizers_is_one_clear_error(corpus, domains, tmp_path, capsys):
    """Datasets that record different tokenizers: refused before any rank starts work."""
    from sat_dist.data.tokenizer import train_sentencepiece

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[140:170]
    other_tok = train_sentencepiece(files, tmp_path / "other", vocab_size=600)
    other = _write(tmp_path / "other_data", files, load_tokenizer(other_tok))
    write_tokenizer_record(other, tokenizer_record(other_tok))
    write_tokenizer_record(tmp_path / "mine", tokenizer_record(corpus["tok"]))
    mine = tmp_path / "mine"
    for suffix in (".bin", ".idx"):
        (tmp_path / f"mine{suffix}").write_bytes(Path(domains["old"] + suffix).read_bytes())
    before = digest(tmp_path)
    from sat_dist.train.main import main

    def error_of(flags):
        assert main([str(a) for a in flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        return err

    err = error_of(_flags(corpus, **{"data-path": None}) + ["--data-path", "0.5", str(mine), "0.5", other])
    assert "--data-path: the blend's datasets were made with different tokenizers" in err
    # A dataset's record against --tokenizer-model.
    assert f"--data-path {other}: made with tokenizer other.model" in error_of(_flags(corpus, **{"data-path": other}))
    assert digest(tmp_path) == before


def test_train_and_test_data_paths_read_whole_blends(corpus, domains, hf_init, tmp_path):
    """--train-data-path (a blend, no split) trains; --test-data-path is evaluated once at the
    end as `lm loss test`. At --lr 0 from the HF weights the logged test loss must equal
    transformers' mean loss on the samples the contract names: the test set's first
    2 micro-batches x 2 x DP 2 samples, in its order (shuffled as split 2)."""
    import torch
    from transformers import LlamaForCausalLM

    from sat_dist.config import TrainConfig
    from sat_dist.data.packing import build_whole_dataset
    from tests.reference import rank_micro_batches

    flags = _flags(corpus, **{"data-path": None, "hf-checkpoint": hf_init, "model-config": None, "lr": 0,
                              "min-lr": 0, "lr-warmup-iters": 0, "train-iters": 2, "sat-schedule": "dense",
                              "save": tmp_path / "ckpt", "tensorboard-dir": tmp_path / "tb"})
    flags += ["--train-data-path", "0.75", domains["new"], "0.25", domains["old"],
              "--test-data-path", domains["new_val"]]
    r = torchrun(2, flags)
    assert "test at iteration 2 | lm loss test:" in r.stdout
    m = json.loads((tmp_path / "ckpt" / "iter_0000002" / "sat_dist.json").read_text())
    assert m["data_positions"]["consumed"] == {domains["new"]: 12, domains["old"]: 4}
    eos = load_tokenizer(corpus["tok"]).eos_id
    test = build_whole_dataset(domains["new_val"], 64, eos, TrainConfig().seed, None, "test", 2)
    hf = LlamaForCausalLM.from_pretrained(hf_init).float().eval()
    losses = []
    with torch.no_grad():
        for rank in (0, 1):
            for ids, labels in rank_micro_batches(test, 0, 8, 2, rank, 2):
                logits = hf(ids).logits
                losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    want = float(torch.stack(losses).mean())
    assert scalars(tmp_path / "tb", "lm loss test")[2] == pytest.approx(want, abs=2e-5)
