"""Checkpoint retention (--keep-latest-k): which checkpoints prune_checkpoints removes, and
that a run keeps only the newest ones, also when killed in the middle of a deletion."""

from pathlib import Path

import pytest

from sat_dist.checkpoint.state import prune_checkpoints
from sat_dist.config import TrainConfig
from sat_dist.errors import SatDistError
from tests.launchers import _flags, torchrun


def _fake(d: Path, complete=(), incomplete=(), latest=None) -> None:
    for it in complete:
        (d / f"iter_{it:07d}").mkdir(parents=True)
        (d / f"iter_{it:07d}" / "state_tp00_dp000.pt").write_bytes(b"x")
        (d / f"iter_{it:07d}" / "sat_dist.json").write_text("{}")
    for it in incomplete:
        (d / f"iter_{it:07d}").mkdir(parents=True)
        (d / f"iter_{it:07d}" / "state_tp00_dp000.pt").write_bytes(b"x")
    if latest is not None:
        (d / "latest").write_text(f"iter_{latest:07d}\n")


def _left(d: Path) -> list[str]:
    """The directories in d (checkpoints, incomplete ones, leftovers)."""
    return sorted(p.name for p in d.iterdir() if p.is_dir())


def test_keeps_the_newest_and_leaves_incomplete_ones(tmp_path):
    _fake(tmp_path, complete=(1, 2, 3, 4), incomplete=(5,), latest=4)
    assert prune_checkpoints(tmp_path, 2) == ["iter_0000001", "iter_0000002"]
    assert _left(tmp_path) == ["iter_0000003", "iter_0000004", "iter_0000005"]
    assert prune_checkpoints(tmp_path, 2) == []  # nothing more to do
    assert prune_checkpoints(tmp_path, 1) == ["iter_0000003"]
    assert _left(tmp_path) == ["iter_0000004", "iter_0000005"]


def test_latest_survives_when_older_than_the_newest(tmp_path):
    _fake(tmp_path, complete=(1, 2, 3, 4, 5), latest=2)  # an operator rolled back to iter 2
    assert prune_checkpoints(tmp_path, 2) == ["iter_0000001", "iter_0000003", "iter_0000004"]
    assert _left(tmp_path) == ["iter_0000002", "iter_0000005"]
    assert prune_checkpoints(tmp_path, 1) == ["iter_0000005"]
    assert _left(tmp_path) == ["iter_0000002"]


def test_leftovers_of_a_killed_deletion_are_removed(tmp_path):
    _fake(tmp_path, complete=(2, 3), latest=3)
    (tmp_path / ".deleting-iter_0000001").mkdir()
    (tmp_path / ".deleting-iter_0000001" / "sat_dist.json").write_text("{}")
    assert prune_checkpoints(tmp_path, 2) == []  # the leftover is not counted as a checkpoint
    assert _left(tmp_path) == ["iter_0000002", "iter_0000003"]


def test_without_latest_nothing_is_removed(tmp_path):
    _fake(tmp_path, complete=(1, 2, 3))
    assert prune_checkpoints(tmp_path, 1) == []
    assert _left(tmp_path) == ["iter_0000001", "iter_0000002", "iter_0000003"]


def test_negative_keep_is_refused():
    with pytest.raises(SatDistError, match="--keep-latest-k: got -1; allowed: an integer >= 0"):
        TrainConfig(keep_latest_k=-1).validate()


def test_run_keeps_the_latest_two_and_resumes(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = {"train-iters": 5, "save-interval": 1, "keep-latest-k": 2}
    r = torchrun(2, _flags(corpus, save=ckpt, **flags, **{"exit-interval": 4}))
    assert "removed checkpoint iter_0000002 from" in r.stdout
    assert _left(ckpt) == ["iter_0000003", "iter_0000004"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    r = torchrun(2, _flags(corpus, save=ckpt, load=ckpt, **flags))
    assert "resumed from" in r.stdout and "at iteration 4" in r.stdout
    assert _left(ckpt) == ["iter_0000004", "iter_0000005"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000005"


def test_kill_during_prune_then_resume(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = {"train-iters": 4, "save-interval": 1, "keep-latest-k": 2}
    # killed in the save of iteration 3, while removing iter_0000001 (renamed, not yet deleted)
    r = torchrun(2, _flags(corpus, save=ckpt, **flags), check=False, env={"SAT_DIST_FAULT": "kill-during-prune@1"})
    assert r.returncode != 0
    assert (ckpt / "latest").read_text().strip() == "iter_0000003"
    assert _left(ckpt) == [".deleting-iter_0000001", "iter_0000002", "iter_0000003"]
    r = torchrun(2, _flags(corpus, save=ckpt, load=ckpt, **flags))
    assert "resumed from" in r.stdout and "at iteration 3" in r.stdout
    assert _left(ckpt) == ["iter_0000003", "iter_0000004"]  # the leftover is gone too
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
