"""Checkpoints under ZeRO-1 and ZeRO-2: exact resume, and conversion between stages and
layouts (the checkpoint is per parameter, in the model's own layout, whatever the stage).

References: the uninterrupted run of the same stage (exact), and for a stage change the
uninterrupted run of the saving stage (to fp32 reordering: stages reduce gradients in
different orders)."""

import json
import shutil

import pytest

from tests.launchers import REPO, _flags, scalars, torchrun

# a sparse start, then dense (layouts then compute the same function: see test_faults)
SAT = {"sat-sparse-fraction": 0.25, "sat-ladder-steps": 1, "sat-dense-fraction": 0.5, "train-iters": 6}


def _config(tmp_path, stage: int) -> str:
    path = tmp_path / f"ds_zero{stage}.json"
    ds = json.loads((REPO / "configs" / "ds_zero1.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.fixture(scope="module")
def zero1_run(corpus, tmp_path_factory):
    """ZeRO-1, TP 1 x DP 2, uninterrupted, saving at 2 and 4 (and the end)."""
    d = tmp_path_factory.mktemp("zero1")
    torchrun(2, _flags(corpus, **SAT, **{"ds_config": _config(d, 1), "save": d / "ckpt", "save-interval": 2,
                                          "tensorboard-dir": d / "tb"}))
    return d, scalars(d / "tb", "lm loss")


def _from_step(src, dst, step: int):
    shutil.copytree(src, dst)
    (dst / "latest").write_text(f"iter_{step:07d}\n")
    for later in dst.glob("iter_*"):
        if int(later.name[5:]) > step:
            shutil.rmtree(later)
    return dst


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_resume_is_exact(corpus, tmp_path, stage):
    ref_tb, ckpt, tb = tmp_path / "ref", tmp_path / "ckpt", tmp_path / "tb"
    cfg = _config(tmp_path, stage)
    torchrun(2, _flags(corpus, **SAT, **{"ds_config": cfg, "tensorboard-dir": ref_tb}))
    torchrun(2, _flags(corpus, **SAT, **{"ds_config": cfg, "save": ckpt, "exit-interval": 3, "tensorboard-dir": tb}))
    assert (ckpt / "latest").read_text().strip() == "iter_0000003"
    torchrun(2, _flags(corpus, **SAT, **{"ds_config": cfg, "save": ckpt, "load": ckpt, "tensorboard-dir": tb}))
    ref, got = scalars(ref_tb, "lm loss"), scalars(tb, "lm loss")
    for step in (4, 5, 6):
        assert got[step] == ref[step], (stage, step, got[step], ref[step])  # bit-exact, fp32 CPU


@pytest.mark.parametrize("stage,tp,world", [(3, 1, 2), (2, 2, 2), (3, 2, 4)],
                         ids=["zero1-to-zero3", "zero1-to-zero2-tp2", "zero1-to-zero3-tp2xdp2"])
def test_zero1_checkpoint_resumes_under_another_stage_and_layout(corpus, zero1_run, tmp_path, stage, tp, world):
    src, ref = zero1_run
    ckpt = _from_step(src / "ckpt", tmp_path / "ckpt", 4)
    cfg = str(REPO / "configs" / "ds_zero3.json") if stage == 3 else _config(tmp_path, stage)
    tb = tmp_path / "tb"
    torchrun(world, _flags(corpus, **SAT, **{"ds_config": cfg, "load": ckpt, "save": ckpt, "tensorboard-dir": tb,
                                             "tensor-model-parallel-size": tp}))
    got = scalars(tb, "lm loss")
    for step in (5, 6):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), (stage, tp, world, step)


def test_zero3_checkpoint_resumes_under_zero1(corpus, reference_run, tmp_path):
    """The other direction: the suite's ZeRO-3 reference run (TP 1 x DP 2, saved every 2
    steps), resumed from step 4 under ZeRO-1."""
    src, _, ref = reference_run
    ckpt = _from_step(src / "ckpt", tmp_path / "ckpt", 4)
    tb = tmp_path / "tb"
    torchrun(2, _flags(corpus, **{"ds_config": _config(tmp_path, 1), "load": ckpt, "save": ckpt,
                                  "tensorboard-dir": tb, "save-interval": 2, "eval-interval": 3}))
    got = scalars(tb, "lm loss")
    for step in (5, 6):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step
