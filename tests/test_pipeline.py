"""The training pipeline end to end, through the real launchers (torchrun, deepspeed).

References: an uninterrupted run (exact resume), another parallel layout of the same
initial weights (TP x DP with ZeRO-3), transformers' loss on the exported model, and the
TensorBoard files read back with tensorboard's own reader.
"""

import shutil
import subprocess

import pytest
import torch

from sat_dist.data.tokenizer import load_tokenizer
from tests.launchers import BIN, PRETRAIN, REPO, _env, _flags, _port, scalars, torchrun
from tests.reference import rank_micro_batches


@pytest.fixture(scope="module")
def uninterrupted(reference_run):
    return reference_run[:2]


def test_tensorboard_scalars_and_console(uninterrupted):
    d, out = uninterrupted
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(d / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    expected = {"lm loss", "learning-rate", "grad-norm", "throughput/tokens-per-sec", "iteration-time",
                "throughput/model-tflops-per-gpu", "throughput/executed-tflops-per-gpu",
                "sat/omission-rate-mlp", "sat/omission-rate-attn", "sat/kept-units-mlp",
                "sat/kept-units-attn", "sat/effective-omission-rate-mlp", "memory/max-rss-bytes",
                "lm loss validation", "lm loss validation ppl"}
    assert expected <= tags, expected - tags
    assert sorted(scalars(d / "tb", "lm loss")) == [1, 2, 3, 4, 5, 6]
    assert sorted(scalars(d / "tb", "lm loss validation")) == [3, 6]
    # ladder over 6 steps (sparse 0.6, 3 rungs, dense 0.1 -> at least the last step): 0.3 x3,
    # then 0.3 * 3/4, 2/4 over the two steps left, then dense; kept channels of 128 rounded
    # to the nearest multiple of the align of 16 (89.6 -> 96, 99.2 -> 96, 108.8 -> 112)
    mlp_rate = scalars(d / "tb", "sat/omission-rate-mlp")
    assert [round(mlp_rate[i], 4) for i in range(1, 7)] == [0.3, 0.3, 0.3, 0.225, 0.15, 0.0]
    kept = scalars(d / "tb", "sat/kept-units-mlp")
    assert [kept[i] for i in range(1, 7)] == [96, 96, 96, 96, 112, 128]
    effective = scalars(d / "tb", "sat/effective-omission-rate-mlp")
    assert effective[1] == pytest.approx(1 - 96 / 128)
    assert scalars(d / "tb", "sat/kept-units-attn")[1] == 1  # 2 KV groups * 0.7 -> 1
    executed = scalars(d / "tb", "throughput/executed-tflops-per-gpu")
    model = scalars(d / "tb", "throughput/model-tflops-per-gpu")
    assert all(executed[i] < model[i] for i in range(1, 6)) and executed[6] == pytest.approx(model[6])
    assert "iteration        6/       6" in out and "ETA" in out and "tokens/s" in out
    # only rank 0 writes events
    assert len(list((d / "tb").glob("events.out.tfevents.*"))) == 1


def test_exact_resume_after_interruption(corpus, uninterrupted, tmp_path):
    a, _ = uninterrupted
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    common = {"save": ckpt, "tensorboard-dir": tb, "eval-interval": 3}
    torchrun(2, _flags(corpus, **common, **{"exit-interval": 3}))
    assert (ckpt / "latest").read_text().strip() == "iter_0000003"
    torchrun(2, _flags(corpus, load=ckpt, **common))
    ref, got = scalars(a / "tb", "lm loss"), scalars(tb, "lm loss")
    for step in (4, 5, 6):
        assert got[step] == ref[step], (step, got[step], ref[step])  # bit-exact, fp32 CPU
    assert scalars(tb, "lm loss validation")[6] == scalars(a / "tb", "lm loss validation")[6]


def test_deepspeed_launcher(corpus, tmp_path):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()), PRETRAIN,
           *_flags(corpus, save=tmp_path / "ckpt", **{"train-iters": 2})]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "iteration        2/       2" in r.stdout
    assert (tmp_path / "ckpt" / "iter_0000002" / "sat_dist.json").is_file()


def test_tp2_dp2_zero3_matches_tp1_dp2_and_exports_to_transformers(corpus, hf_init, tmp_path):
    """Same HF initial weights, dense: TP=2 x DP=2 under ZeRO-3 trains like TP=1 x DP=2
    (losses and gradient norms: the norm counts TP shards once and replicated norms once).
    The TP=2 checkpoint, exported, gives transformers the validation loss the run logged."""
    runs = {}
    for name, n, tp in (("tp1", 2, 1), ("tp2", 4, 2)):
        tb = tmp_path / name / "tb"
        torchrun(n, _flags(corpus, **{"hf-checkpoint": hf_init, "model-config": None, "train-iters": 3,
                                      "tensor-model-parallel-size": tp, "sat-schedule": "dense",
                                      "tensorboard-dir": tb, "save": tmp_path / name / "ckpt"}))
        runs[name] = tb
    for tag in ("lm loss", "grad-norm", "lm loss validation"):
        a, b = scalars(runs["tp1"], tag), scalars(runs["tp2"], tag)
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=2e-5, abs=2e-5), (tag, k)

    from transformers import LlamaForCausalLM

    from sat_dist.data.packing import build_packed_datasets
    from tools.export_hf import export

    out = export(str(tmp_path / "tp2" / "ckpt"), str(tmp_path / "hf_out"))
    model = LlamaForCausalLM.from_pretrained(out).float().eval()
    tok = load_tokenizer(corpus["tok"])
    valid = build_packed_datasets(corpus["data"], 64, tok.eos_id, 1234, "90,10,0")["valid"]
    losses = []
    with torch.no_grad():
        for ids, labels in rank_micro_batches(valid, 0, 2 * 2 * 2, 2, 0, 1):  # eval-iters 2 x micro 2 x DP 2
            logits = model(ids).logits
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    hf_loss = float(torch.stack(losses).mean())
    assert hf_loss == pytest.approx(scalars(runs["tp2"], "lm loss validation")[3], abs=1e-4)


def test_export_refuses_to_overwrite(uninterrupted, tmp_path):
    from tools.export_hf import main as export_main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_main(["--load", str(uninterrupted[0] / "ckpt"), "--output", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "mine"
    shutil.rmtree(out)
    assert export_main(["--load", str(uninterrupted[0] / "ckpt"), "--output", str(out)]) == 0
    assert (out / "config.json").is_file()


def test_export_errors_name_the_checkpoint_problem(uninterrupted, tmp_path, capsys):
    """Each unusable checkpoint gives exit code 2 and one line naming --load and the problem."""
    from tools.export_hf import main as export_main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(uninterrupted[0] / "ckpt", ckpt)

    def error(*extra):
        capsys.readouterr()
        assert export_main(["--load", str(ckpt), "--output", str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: --load {ckpt}"), err
        assert not (tmp_path / "out").exists()
        return err

    assert "no complete checkpoint iter_0000099" in error("--iteration", "99")
    (ckpt / "iter_0000004" / "state_tp00_dp001.pt").unlink()
    assert "iter_0000004/state_tp00_dp001.pt is missing; the checkpoint is damaged" in error("--iteration", "4")
    f = ckpt / "iter_0000006" / "state_tp00_dp000.pt"
    f.write_bytes(f.read_bytes()[:1000])
    assert "state_tp00_dp000.pt has 1000 bytes, the manifest records" in error()  # the latest
    shutil.rmtree(ckpt)
    assert "no such directory" in error()


def test_recompute_zero1_and_bf16_train_like_the_reference(corpus, reference_run, tmp_path):
    """Activation recompute under ZeRO-3 (re-deriving SAT's selection, with its DP all-reduce,
    in the backward pass) computes the reference's losses; ZeRO-1 in bf16 stays within bf16
    rounding of them."""
    ref = reference_run[2]
    tb = tmp_path / "recompute"
    torchrun(2, _flags(corpus, **{"recompute-activations": True, "tensorboard-dir": tb}))
    got = scalars(tb, "lm loss")
    for step in range(1, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    tb16 = tmp_path / "bf16"
    torchrun(2, _flags(corpus, **{"bf16": True, "ds_config": REPO / "configs" / "ds_zero1.json",
                                  "tensorboard-dir": tb16}))
    got16 = scalars(tb16, "lm loss")
    for step in range(1, 7):
        assert got16[step] == pytest.approx(ref[step], abs=3e-2), step
