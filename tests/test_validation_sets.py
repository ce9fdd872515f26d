"""Named validation sets (--valid-data-path NAME=PREFIX ...) and SAT's fidelity reporting in
a real run: logged validation losses against transformers' mean loss on the same samples,
the executed-FLOPs scalar against per-step keep fractions, the console's effective rates."""

import sysconfig
from pathlib import Path

import pytest
import torch

from sat_dist.data.indexed import IndexedDatasetWriter, token_dtype
from sat_dist.data.tokenizer import load_tokenizer
from sat_dist.errors import SatDistError
from sat_dist.train.arguments import parse_args, run_definition, valid_data_sets
from tests.launchers import _flags, scalars, torchrun
from tests.test_fidelity import _hand_flops

SEQ = 64


# ---------------------------------------------------------------- parsing
def test_entries_become_named_sets():
    assert valid_data_sets(None) == {}
    assert valid_data_sets(["code=/d/code", "prose=/d/prose", "/d/held"]) == {
        "valid/code": "/d/code", "valid/prose": "/d/prose", "valid": "/d/held"}
    assert valid_data_sets(["x=/d/a=b"]) == {"valid/x": "/d/a=b"}  # only the first '=' splits


@pytest.mark.parametrize("entries,msg", [
    (["=/d/code"], "empty name before '='"),
    (["code="], "no dataset prefix after '='"),
    (["a=/d/x", "a=/d/y"], "got the name 'a' twice (/d/x, /d/y)"),
    (["/d/x", "/d/y"], "got two prefixes without a name"),
    (["a/b=/d/x"], "name 'a/b' may hold only letters"),
])
def test_malformed_entries_are_one_line(entries, msg):
    with pytest.raises(SatDistError) as e:
        valid_data_sets(entries)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_validation_sets_are_not_part_of_the_run_definition(corpus):
    base = ["--data-path", corpus["data"], "--tokenizer-model", corpus["tok"]]
    a = parse_args(base)
    b = parse_args(base + ["--valid-data-path", "code=/d/code", "/d/held"])
    assert b.train.valid_data_path == ["code=/d/code", "/d/held"]
    assert run_definition(a, _tiny()) == run_definition(b, _tiny())  # a resume may add or drop sets


def _tiny():
    from sat_dist.config import ModelConfig
    from sat_dist.train.arguments import MODEL_CONFIG_DIR

    return ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")


# ---------------------------------------------------------------- a real run
def _write_set(path: Path, tokens: list[int]) -> str:
    with IndexedDatasetWriter(path, token_dtype(1000)) as w:
        w.add_document(tokens)
        w.finalize()
    return str(path)


@pytest.fixture(scope="module")
def run(corpus, hf_init, tmp_path_factory):
    """TP=1 x DP=2, 6 steps of the SAT ladder at --lr 0 (so the weights stay the HF initial
    ones and transformers can compute the expected validation loss), validating every 3
    steps on: the split (no bare prefix), a bare prefix, and two named sets of 4 and 8
    samples (eval-iters 2 x micro 2 x DP 2 = 8: the small one is evaluated whole, with one
    micro-batch per rank)."""
    d = tmp_path_factory.mktemp("valid_sets")
    tok = load_tokenizer(corpus["tok"])
    text = "".join(f.read_text() for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[80:90])
    ids = tok.encode(text)
    # One document ending with EOS: 4 * 64 + 1 and 8 * 64 + 1 stream tokens, 4 and 8 samples.
    sets = {"small": ids[:4 * SEQ] + [tok.eos_id], "prose": ids[5000:5000 + 8 * SEQ] + [tok.eos_id]}
    prefixes = {name: _write_set(d / name, toks) for name, toks in sets.items()}
    flags = _flags(corpus, **{"hf-checkpoint": hf_init, "model-config": None, "lr": 0, "min-lr": 0,
                              "lr-warmup-iters": 0, "eval-interval": 3, "log-interval": 3,
                              "tensorboard-dir": d / "tb"})
    flags += ["--valid-data-path", f"small={prefixes['small']}", f"prose={prefixes['prose']}", prefixes["small"]]
    r = torchrun(2, flags)
    return {"tb": d / "tb", "out": r.stdout, "sets": sets, "prefixes": prefixes, "dir": d}


def _hf_mean_loss(hf_init, tokens: list[int]) -> float:
    """Mean per-token loss of transformers' model over every SEQ-token sample of the stream."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_init).float().eval()
    stream = torch.tensor(tokens)
    n = (len(tokens) - 1) // SEQ
    samples = torch.stack([stream[k * SEQ:k * SEQ + SEQ + 1] for k in range(n)])
    with torch.no_grad():
        logits = model(samples[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), samples[:, 1:].flatten()))


def test_named_sets_log_transformers_mean_loss(run, hf_init):
    for name in ("small", "prose"):
        want = _hf_mean_loss(hf_init, run["sets"][name])
        loss = scalars(run["tb"], f"lm loss validation/{name}")
        ppl = scalars(run["tb"], f"lm loss validation ppl/{name}")
        assert sorted(loss) == [3, 6] and sorted(ppl) == [3, 6]
        for step in (3, 6):
            assert loss[step] == pytest.approx(want, abs=2e-5), (name, step)
            assert ppl[step] == pytest.approx(torch.tensor(want).exp().item(), rel=1e-4)
    # the bare prefix is the run's validation set, under the unnamed tags
    assert scalars(run["tb"], "lm loss validation") == scalars(run["tb"], "lm loss validation/small")


def test_console_names_the_sets_and_what_they_evaluate(run):
    out = run["out"]
    assert "lm loss validation/small: " in out and "lm loss validation ppl/prose: " in out
    assert ("validation set small: " in out and "4 samples of 64 tokens; 1 micro-batch of 2 per DP rank per "
            "evaluation (fewer than --eval-iters 2: the set has 4 samples)" in out)
    assert "validation set prose: " in out and "8 samples of 64 tokens; 2 micro-batches of 2 per DP rank" in out


def test_console_shows_keep_counts_and_effective_rates(run):
    out = run["out"]
    # tiny-test per partition: 2 KV groups, 128 MLP channels (align 16); 6 steps skip 0.075
    assert ("SAT keep counts per TP partition: rung rates attn/mlp "
            "0.3/0.3 -> attn 1/2 groups, mlp 96/128 channels (omitted 0.500/0.250); "
            "0.225/0.225 -> attn 2/2 groups, mlp 96/128 channels (omitted 0.000/0.250); "
            "0.15/0.15 -> attn 2/2 groups, mlp 112/128 channels (omitted 0.000/0.125); "
            "0/0 -> attn 2/2 groups, mlp 128/128 channels (omitted 0.000/0.000)") in out
    lines = [line for line in out.splitlines() if line.startswith(" iteration ")]
    assert "SAT omitted attn/mlp: 0.500/0.250 " in lines[0]  # nominal 0.30/0.30 at step 3
    assert "SAT omitted attn/mlp: 0.000/0.000 " in lines[1]  # step 6, dense


def test_executed_flops_sum_the_intervals_steps(run):
    tb = run["tb"]
    attn, mlp = scalars(tb, "sat/effective-omission-rate-attn"), scalars(tb, "sat/effective-omission-rate-mlp")
    assert [round(mlp[s], 6) for s in range(1, 7)] == [0.25, 0.25, 0.25, 0.25, 0.125, 0.0]
    executed, model = scalars(tb, "throughput/executed-tflops-per-gpu"), scalars(tb, "throughput/model-tflops-per-gpu")
    assert sorted(executed) == [3, 6]
    for last in (3, 6):
        steps = range(last - 2, last + 1)
        want = sum(_hand_flops(1 - attn[s], 1 - mlp[s]) for s in steps) / (3 * _hand_flops(1, 1))
        # Both scalars divide by the same time: their ratio is the FLOP ratio. (Step 6 is
        # dense: applying its fractions to the interval would give 1.)
        assert executed[last] / model[last] == pytest.approx(want, rel=1e-5), last
    assert executed[6] / model[6] < 0.99


def test_skip_train_evaluates_the_imported_model_only(run, corpus, hf_init):
    """--skip-train (Megatron's flag): the validation sets of the starting model at
    iteration 0, no training step, nothing saved."""
    d = run["dir"] / "skip"
    flags = _flags(corpus, **{"hf-checkpoint": hf_init, "model-config": None, "tensorboard-dir": d / "tb",
                              "save": d / "ckpt", "eval-iters": 4})  # 4 x micro 2 x DP 1: all 8 samples
    r = torchrun(1, flags + ["--skip-train", "--valid-data-path", f"prose={run['prefixes']['prose']}"])
    loss = scalars(d / "tb", "lm loss validation/prose")
    assert list(loss) == [0]
    assert loss[0] == pytest.approx(_hf_mean_loss(hf_init, run["sets"]["prose"]), abs=2e-5)
    assert not [line for line in r.stdout.splitlines() if line.startswith(" iteration ")]  # no training step
    assert "saved checkpoint" not in r.stdout
    assert not (d / "ckpt").exists() or not any((d / "ckpt").iterdir())
