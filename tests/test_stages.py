"""Stage transitions of continual pre-training from a sat_dist checkpoint, with Megatron-LM's
flags, end to end through torchrun (2 ranks, TP=1 x DP=2, ZeRO-3, tiny-test model):

  plain --load                      refuses any change of the run definition, naming the
                                    flag that would allow it;
  --override-opt_param-scheduler    continues the iteration count, data and Adam; the LR is
                                    the new flags' schedule at the iteration, and a new SAT
                                    schedule spans [checkpoint iteration, --train-iters);
  --finetune                        weights only: iteration, data, Adam, LR and SAT from 0;
  --no-load-optim / --no-load-rng   Adam afresh / the RNG not restored.

References are hand-written: Megatron's LR formula at each logged iteration, the SAT ladder's
rates at each step of the stage, and for the weights the stage-1 model's own validation loss
or another run's saved tensors. One stage-1 checkpoint (iteration 4 of 6) serves every test.
"""

import json
import math

import pytest
import torch

from tests.launchers import _flags, digest, scalars, torchrun

# The SAT ladder over a stage of T steps with these: steps [0, T/2) at r, then r/2 until
# ceil(3T/4), then dense (for T = 4: r, r, r/2, 0).
SAT = {"sat-sparse-fraction": 0.5, "sat-ladder-steps": 1, "sat-dense-fraction": 0.25}
STAGE1 = {"train-iters": 6, "exit-interval": 4, "lr": 1e-3, "min-lr": 1e-4, "lr-warmup-iters": 1,
          "lr-decay-style": "cosine", **SAT}


@pytest.fixture(scope="module")
def stage1(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("stage1")
    torchrun(2, _flags(corpus, save=d / "ckpt", **STAGE1, **{"tensorboard-dir": d / "tb"}))
    assert (d / "ckpt" / "latest").read_text().strip() == "iter_0000004"
    return d


def _manifest(ckpt, iteration):
    return json.loads((ckpt / f"iter_{iteration:07d}" / "sat_dist.json").read_text())


def _params(ckpt, iteration, key="param"):
    out = {}
    for f in sorted((ckpt / f"iter_{iteration:07d}").glob("state_*.pt")):
        for name, entry in torch.load(f, weights_only=False)["tensors"].items():
            out[name] = entry[key]
    return out


def _main(argv, capsys):
    from sat_dist.train.main import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


def test_plain_resume_refuses_a_new_schedule_and_names_the_flag(corpus, stage1, capsys):
    ckpt = stage1 / "ckpt"
    before = digest(stage1)
    rc, err = _main(_flags(corpus, load=ckpt, save=ckpt, **{**STAGE1, "lr": 5e-4}), capsys)
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "--lr 0.001 (this run: 0.0005)" in err and "pass --override-opt_param-scheduler" in err
    rc, err = _main(_flags(corpus, load=ckpt, save=ckpt, **{**STAGE1, "seed": 7}), capsys)
    assert rc == 2 and "--seed 1234 (this run: 7)" in err and "--finetune" in err, err
    rc, err = _main(_flags(corpus, load=ckpt, save=ckpt, **STAGE1, finetune=True), capsys)
    assert rc == 2 and "drop --finetune to resume the stage from its own checkpoints" in err, err
    assert digest(stage1) == before


def _both_runs(d, tag):
    """{iteration: value} of a stage run in two launches (TensorBoard in d/tb1 and d/tb2)."""
    return {**scalars(d / "tb1", tag), **scalars(d / "tb2", tag)}


def test_override_starts_a_new_stage_at_the_checkpoint_iteration(corpus, stage1, tmp_path):
    """LR 5e-4 -> 5e-5, linear, no warmup, 8 iterations; SAT MLP rate 0.5. The LR at iteration
    i is the new formula at i (not restarted); the SAT ladder runs over iterations 4-8. A stop
    at 6 and a plain resume (same flags) continue the same stage."""
    stage2 = {**SAT, "train-iters": 8, "lr": 5e-4, "min-lr": 5e-5, "lr-warmup-iters": 0,
              "lr-decay-style": "linear", "sat-omission-mlp": 0.5}
    ckpt = tmp_path / "ckpt"
    r = torchrun(2, _flags(corpus, load=stage1 / "ckpt", save=ckpt, **stage2, **{
        "override-opt_param-scheduler": True, "exit-interval": 6, "tensorboard-dir": tmp_path / "tb1"}))
    assert "resumed from" in r.stdout and "at iteration 4" in r.stdout
    assert "a new stage begins at iteration 4" in r.stdout
    assert _manifest(ckpt, 6)["stage_start_iteration"] == 4
    r = torchrun(2, _flags(corpus, load=ckpt, save=ckpt, **stage2, **{"tensorboard-dir": tmp_path / "tb2"}))
    assert "at iteration 6" in r.stdout and "new stage" not in r.stdout
    assert _manifest(ckpt, 8)["stage_start_iteration"] == 4
    lr, mlp = _both_runs(tmp_path, "learning-rate"), _both_runs(tmp_path, "sat/omission-rate-mlp")
    assert sorted(lr) == [5, 6, 7, 8]
    for i in lr:
        assert lr[i] == pytest.approx(5e-5 + (5e-4 - 5e-5) * (1 - i / 8), rel=1e-6), i
    # logged after the step: iteration i ran step i - 1, the stage's step i - 1 - 4
    assert [mlp[i] for i in (5, 6, 7, 8)] == pytest.approx([0.5, 0.5, 0.25, 0.0])


def test_finetune_loads_the_weights_only_and_its_stage_resumes(corpus, stage1, tmp_path):
    """--finetune: iterations restart at 1, the LR is the new flags' formula from step 0
    (warmup 2 from 0, then cosine to iteration 4) and SAT's ladder starts again. Step 0 runs
    at LR 0 (the warmup's start), so the validation after it sees the stage-1 weights: its
    loss must be stage 1's final one. Stopped at 2, the stage resumes without --finetune."""
    stage2 = {**SAT, "train-iters": 4, "lr": 5e-4, "min-lr": 5e-5, "lr-warmup-iters": 2,
              "lr-decay-style": "cosine", "eval-interval": 1}
    ckpt = tmp_path / "ckpt"
    r = torchrun(2, _flags(corpus, load=stage1 / "ckpt", save=ckpt, **stage2, **{
        "finetune": True, "exit-interval": 2, "tensorboard-dir": tmp_path / "tb1"}))
    assert "for --finetune" in r.stdout and "iteration        1/       4 | consumed samples:          8" in r.stdout
    m = _manifest(ckpt, 2)
    assert (m["iteration"], m["consumed_samples"], m["stage_start_iteration"]) == (2, 16, 0)
    assert m["optimizer_step"] == 2  # Adam started afresh, not at stage 1's 4
    ref_valid = scalars(stage1 / "tb", "lm loss validation")[4]
    assert scalars(tmp_path / "tb1", "lm loss validation")[1] == pytest.approx(ref_valid, rel=1e-6)
    r = torchrun(2, _flags(corpus, load=ckpt, save=ckpt, **stage2, **{"tensorboard-dir": tmp_path / "tb2"}))
    assert "resumed from" in r.stdout and "at iteration 2" in r.stdout
    lr, mlp = _both_runs(tmp_path, "learning-rate"), _both_runs(tmp_path, "sat/omission-rate-mlp")
    assert sorted(lr) == [1, 2, 3, 4]
    want = {1: 5e-4 / 2, 2: 5e-4, 3: 5e-5 + (5e-4 - 5e-5) * 0.5, 4: 5e-5}  # cosine at r = 1/2, 1
    for i in lr:
        assert lr[i] == pytest.approx(want[i], rel=1e-6), i
    assert [mlp[i] for i in (1, 2, 3, 4)] == pytest.approx([0.3, 0.3, 0.15, 0.0])


def test_no_load_optim_and_no_load_rng(corpus, stage1, tmp_path):
    """One step (iteration 5) after a full resume, --no-load-optim and --no-load-rng. Without
    the Adam state the update differs (fresh moments, bias correction from step 1) and the LR
    schedule starts again at its step 0 (Megatron's --no-load-optim). Without the RNG state nothing
    changes: the model has no dropout and SAT's selection is seeded by --seed and the
    iteration, not by the global generators, so the RNG does not influence training."""
    runs = {}
    for name, extra in (("full", {}), ("optim", {"no-load-optim": True}), ("rng", {"no-load-rng": True})):
        d = tmp_path / name
        r = torchrun(2, _flags(corpus, load=stage1 / "ckpt", save=d / "ckpt", **{**STAGE1, "exit-interval": 5},
                               **extra, **{"tensorboard-dir": d / "tb"}))
        runs[name] = (_params(d / "ckpt", 5), _params(d / "ckpt", 5, "exp_avg"),
                      scalars(d / "tb", "learning-rate")[5], _manifest(d / "ckpt", 5), r.stdout)
    full, optim, rng = runs["full"], runs["optim"], runs["rng"]
    assert all(torch.equal(full[0][k], rng[0][k]) for k in full[0])
    assert all(torch.equal(full[1][k], rng[1][k]) for k in full[1])
    assert any(not torch.equal(full[0][k], optim[0][k]) for k in full[0])
    # Logged after step 5: the next step's LR. Full resume: cosine at (5 - 1) / (6 - 1) of the
    # decay; --no-load-optim: the schedule's step 1, the end of its 1-step warmup.
    assert full[2] == rng[2] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 0.8)), rel=1e-6)
    assert optim[2] == pytest.approx(1e-3, rel=1e-6)
    assert (full[3]["optimizer_step"], optim[3]["optimizer_step"]) == (5, 1)
    assert optim[3]["consumed_samples"] == full[3]["consumed_samples"] == 40
    # The RNG flag cannot show in the losses (above); the resume says which state it skipped.
    assert "not loaded from the checkpoint: RNG state" in rng[4]
    assert "not loaded from the checkpoint: Adam state" in optim[4] and "not loaded" not in full[4]
    assert all(not torch.equal(full[1][k], optim[1][k]) for k in full[1])  # moments from zero


def test_checkpoints_saved_before_the_new_lr_keys_resume(stage1):
    """A manifest from before --lr-warmup-init, --lr-decay-iters and the WSD keys (and
    rope_scaling) compares with the values those runs had: init 0, decay to --train-iters,
    no WSD, plain RoPE; one that differs still differs."""
    from sat_dist.checkpoint.state import definition_changes

    m = _manifest(stage1 / "ckpt", 4)
    now = dict(m["run_definition"])
    old = {k: v for k, v in now.items() if k not in ("lr-warmup-init", "lr-decay-iters", "lr-wsd-decay-iters",
                                                     "lr-wsd-decay-style", "rope_scaling")}
    assert len(old) == len(now) - 5 and now["lr-decay-iters"] == now["train-iters"] == 6
    assert definition_changes({**m, "run_definition": old}, now) == []
    assert definition_changes({**m, "run_definition": old}, {**now, "lr-decay-iters": 5}) == ["lr-decay-iters"]
