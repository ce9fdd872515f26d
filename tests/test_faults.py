"""Faults and resume: killed ranks and launchers, a save cut in half, preemption, a full disk,
non-finite steps, and resuming on another TP x DP layout.

The reference is always an uninterrupted run with the same flags: after any fault and a
resume with --load, the losses must be the reference's (bit-exact on the same layout, fp32
CPU), which also shows no sample was replayed or skipped.
"""

import os
import random
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launchers import REPO, _env, _flags, digest, scalars, torchrun, torchrun_cmd

ITERS = 6
SEED = 0  # the random choices below: a failure reproduces


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run[0], reference_run[2]


def _resume_matches(corpus, ckpt, tb, ref_losses, first_new):
    r = torchrun(2, _flags(corpus, load=ckpt, save=ckpt, **{"save-interval": 2, "tensorboard-dir": tb}))
    got = scalars(tb, "lm loss")
    for step in range(first_new, ITERS + 1):
        assert got[step] == ref_losses[step], (step, got[step], ref_losses[step])
    return r


def _latest(ckpt: Path) -> int:
    return int((ckpt / "latest").read_text().strip().split("_")[1])


def test_kill_in_the_middle_of_a_save(corpus, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    r = torchrun(2, _flags(corpus, save=ckpt, **{"save-interval": 2}), check=False,
                 env={"SAT_DIST_FAULT": "kill-after-state-file@4"})
    assert r.returncode != 0
    assert _latest(ckpt) == 2  # the half-written iter_0000004 is never picked
    assert (ckpt / "iter_0000004").is_dir() and not (ckpt / "iter_0000004" / "sat_dist.json").exists()
    out = _resume_matches(corpus, ckpt, tmp_path / "tb", reference[1], first_new=3)
    assert "resumed from" in out.stdout and "at iteration 2" in out.stdout
    assert (ckpt / "iter_0000004" / "sat_dist.json").is_file()  # redone cleanly


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_sigkill_launcher_at_a_random_point(corpus, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    stop_after = random.Random(SEED).randint(1, 3)
    cmd = torchrun_cmd(2, _flags(corpus, save=ckpt, **{"save-interval": 1}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(),
                            cwd=REPO, start_new_session=True)
    try:
        deadline = time.time() + 240
        for line in proc.stdout:  # kill somewhere in the step (or save) after checkpoint stop_after
            if f"saved checkpoint at iteration {stop_after} " in line or time.time() > deadline:
                break
        # The launcher and every rank, wherever they are (torchrun starts its workers in
        # sessions of their own, so killing its process group would leave them running).
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        proc.wait(timeout=60)
    k = _latest(ckpt)
    assert k >= stop_after
    if k == ITERS:  # the kill came after the final save: resuming must find nothing to do
        r = torchrun(2, _flags(corpus, load=ckpt, save=ckpt))
        assert "nothing to train" in r.stdout
        return
    _resume_matches(corpus, ckpt, tmp_path / "tb", reference[1], first_new=k + 1)


def test_preemption_signal_saves_and_exits_cleanly(corpus, reference, tmp_path):
    """SIGUSR1 (SLURM's pre-timeout warning) reaching rank 0 only: every rank stops at the
    same step boundary, one checkpoint is written, the exit code is 0."""
    ckpt = tmp_path / "ckpt"
    r = torchrun(2, _flags(corpus, save=ckpt), check=False, env={"SAT_DIST_FAULT": "sigusr1@3"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "preempted (SIGUSR1): saved checkpoint at iteration 3" in r.stdout
    assert _latest(ckpt) == 3
    _resume_matches(corpus, ckpt, tmp_path / "tb", reference[1], first_new=4)


def test_nonfinite_steps_are_skipped_then_the_run_stops(corpus, tmp_path):
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    # lr 1e30 blows the weights up in one update; the next losses are NaN
    r = torchrun(2, _flags(corpus, save=ckpt, lr="1e30", **{"min-lr": 0, "lr-warmup-iters": 0, "save-interval": 1,
                                                           "max-nonfinite-steps": 2, "tensorboard-dir": tb}),
                 check=False)
    assert r.returncode != 0
    assert "update skipped | number of skipped iterations: 1" in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and "2 non-finite steps in a row (last at iteration 3)" in errors[0]
    assert _latest(ckpt) == 1  # nothing saved during the streak
    assert not (ckpt / "iter_0000002").exists()
    assert scalars(tb, "skipped-iterations")[3] == 2


def test_full_disk_during_a_save(corpus, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0] / "ckpt", ckpt)
    (ckpt / "latest").write_text("iter_0000002\n")
    for later in ("iter_0000004", "iter_0000006"):
        shutil.rmtree(ckpt / later)
    before = digest(ckpt)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write() instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = torchrun(2, _flags(corpus, load=ckpt, save=ckpt, **{"save-interval": 2}), check=False,
                 preexec_fn=small_files)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and "could not write" in errors[0] and "disk full" in errors[0], r.stderr[-2000:]
    assert 'pretrain.py", line' not in r.stderr
    assert _latest(ckpt) == 2
    after = digest(ckpt)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing existing changed


def test_resume_on_other_layouts(corpus, tmp_path):
    """TP=2 x DP=2 checkpoint, resumed at TP=1 x DP=1, TP=1 x DP=2 and TP=2 x DP=1: weights and
    Adam state re-partitioned, data position and SAT schedule kept. The schedule is sparse for
    the first steps (SAT ran before the save) and dense after, where every layout computes the
    same function, so the next loss must equal the original layout's."""
    sat = {"sat-sparse-fraction": 0.25, "sat-ladder-steps": 1, "sat-dense-fraction": 0.5, "train-iters": 6}
    ref = tmp_path / "ref"
    torchrun(4, _flags(corpus, save=ref / "ckpt", **sat, **{"tensor-model-parallel-size": 2, "save-interval": 4,
                                                           "tensorboard-dir": ref / "tb"}))
    ref_loss = scalars(ref / "tb", "lm loss")
    for tp, world in ((1, 1), (1, 2), (2, 2)):  # the last is TP=2 x DP=1
        d = tmp_path / f"tp{tp}_w{world}"
        shutil.copytree(ref / "ckpt", d / "ckpt")
        (d / "ckpt" / "latest").write_text("iter_0000004\n")
        shutil.rmtree(d / "ckpt" / "iter_0000006")
        r = torchrun(world, _flags(corpus, load=d / "ckpt", save=d / "ckpt", **sat,
                                   **{"tensor-model-parallel-size": tp, "tensorboard-dir": d / "tb"}))
        assert f"TP 2 x DP 2 -> TP {tp} x DP {world // tp}" in r.stdout
        got = scalars(d / "tb", "lm loss")
        for step in (5, 6):
            assert got[step] == pytest.approx(ref_loss[step], rel=1e-5, abs=1e-5), (tp, world, step)
        assert scalars(d / "tb", "sat/omission-rate-mlp")[5] == 0.0


def test_data_from_another_tokenizer_is_one_clear_error(corpus, tmp_path):
    """Token ids that fit the file's dtype but not the model's vocabulary stop the run with
    one line before they reach the embedding."""
    import numpy as np

    from sat_dist.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(tmp_path / "wide", np.uint16) as w:
        for i in range(50):
            w.add_document(np.arange(i * 100, i * 100 + 100) % 3000)  # ids up to 2999 > 1024
        w.finalize()
    r = torchrun(2, _flags(corpus, **{"data-path": tmp_path / "wide", "train-iters": 2}), check=False)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and "outside the model's vocabulary (1024)" in errors[0], r.stderr[-2000:]
