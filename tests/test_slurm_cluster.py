"""launch/slurm/pretrain_tiny_cpu.sbatch on a real SLURM: two fake nodes on this machine.

The first job trains across both nodes to the end. The others (one per launcher: srun, and
torchrun, whose agent must survive the signal) get the pre-timeout signal mid-training
(`scancel --signal=USR1 --batch`, what `--signal=B:USR1@...` sends): the batch script
forwards it to the step, the trainer saves and exits, the script requeues the job, and the
requeued job resumes from the checkpoint to the last iteration. Skipped, with the
reason, where SLURM cannot be brought up (not root, no apt-get). `corpus` is conftest's.
"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import NODES, Cluster, Unavailable, free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "launch" / "slurm" / "pretrain_tiny_cpu.sbatch")
# "preempted: saved ..." or "preempted (SIGUSR1): saved ..."
PREEMPTED = re.compile(r"preempted(?: \([^)]*\))?: saved checkpoint at iteration (\d+)")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Unavailable as e:
        pytest.skip(f"no SLURM cluster here: {e}")
    yield c
    c.stop()


def _job_env(cluster, corpus, run_dir, **over):
    env = dict(cluster.env, DATA_PATH=corpus["data"], TOKENIZER_MODEL=corpus["tok"], RUN_DIR=str(run_dir),
               PYTHON=sys.executable, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update({k: str(v) for k, v in over.items()})
    return env


def _sbatch(cluster, env, out, *flags, **kw):
    # Submitted from the checkout (the script finds it as SLURM_SUBMIT_DIR); the log and the
    # run directory go to the test's temp dir, not into the checkout.
    return cluster.run("sbatch", "--parsable", f"--output={out}", *flags, SCRIPT, cwd=REPO, env=env, **kw)


def _diagnose(cluster, log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no job log)"
    return (f"--- job log (tail) ---\n{text[-4000:]}\n--- slurmctld.log (tail) ---\n"
            f"{cluster.log_tail('slurmctld.log', 15)}")


def _tasks_per_node(cluster, job_id: str) -> dict:
    """Node -> number of step tasks its slurmd launched for this job (batch step excluded)."""
    found = {}
    for node in NODES:
        text = (cluster.root / "log" / f"slurmd-{node}.log").read_text(errors="replace")
        found[node] = len(re.findall(rf"launch task StepId={job_id}\.\d+ ", text))
    return found


def _scalar_steps(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return sorted({e.step for e in ea.Scalars(tag)})


def test_trains_across_two_nodes(cluster, corpus, tmp_path):
    iters = 4
    log, run = tmp_path / "job.out", tmp_path / "run"
    env = _job_env(cluster, corpus, run, TRAIN_ITERS=iters)
    try:  # 240 s: a fresh machine also JIT-builds DeepSpeed's CPU shm op (~1 min) here
        r = _sbatch(cluster, env, log, "--wait", timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sbatch --wait still waiting after 240 s\n{_diagnose(cluster, log)}")
    assert r.returncode == 0, f"sbatch --wait exited {r.returncode}: {r.stderr}\n{_diagnose(cluster, log)}"
    job_id = r.stdout.strip().split(";")[0]
    text = log.read_text()
    assert "# nodes (2): n1 n2" in text and "world size 2 = 2 nodes x 1 ranks per node" in text, text[-3000:]
    assert "TP 1 x DP 2" in text, text[-3000:]  # the trainer's own view: 2 ranks
    assert f"iteration {iters:8d}/{iters:8d}" in text, text[-3000:]
    assert _tasks_per_node(cluster, job_id) == {"n1": 1, "n2": 1}  # one rank on each node
    assert _scalar_steps(run / "tensorboard", "lm loss") == list(range(1, iters + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{iters:07d}"
    assert f"iteration {iters:8d}/{iters:8d}" in (run / "logs" / "train.log").read_text()


def _wait_for(pred, timeout, what, cluster, log, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{_diagnose(cluster, log)}")


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_preempted_job_requeues_and_resumes(cluster, corpus, tmp_path, launcher):
    iters = 30
    log, run = tmp_path / "job.out", tmp_path / "run"
    # no periodic saves: the only mid-run checkpoint is the one the signal asks for
    env = _job_env(cluster, corpus, run, TRAIN_ITERS=iters, SAVE_INTERVAL=0, EVAL_INTERVAL=0, LAUNCHER=launcher)
    r = _sbatch(cluster, env, log, timeout=30)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]

    def state():
        return cluster.job_field(job_id, "JobState"), cluster.job_field(job_id, "Reason")

    def trained_some():
        text = log.read_text(errors="replace") if log.exists() else ""
        if state()[0] in FINAL_STATES:
            pytest.fail(f"job ended before the signal\n{_diagnose(cluster, log)}")
        return re.search(rf"iteration +2/ +{iters}", text)

    _wait_for(trained_some, 120, "iteration 2", cluster, log)
    sig = cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    assert sig.returncode == 0, sig.stderr

    held_since = []

    def requeued_or_done():
        s, reason = state()
        if s == "PENDING" and reason == "BeginTime":
            # SLURM holds a requeued batch job ~2 min before it is eligible again; an operator
            # may release it, and the test does, to stay fast. Not at once: slurmd refuses a
            # job credential issued in the same second the old one was revoked ("Job
            # credential revoked", the job FAILS); that is what the hold is for.
            held_since.append(time.monotonic())
            if time.monotonic() - held_since[0] > 3:
                cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        return s if s in FINAL_STATES else None

    final = _wait_for(requeued_or_done, 150, "the requeued job to finish", cluster, log, step=0.3)
    text = log.read_text()
    preempted = PREEMPTED.search(text)
    if not preempted:
        pytest.fail("the trainer did not save on SIGUSR1 (no 'preempted: saved checkpoint' line; "
                    f"does pretrain.py handle SIGUSR1 yet?)\n{_diagnose(cluster, log)}")
    assert final == "COMPLETED", _diagnose(cluster, log)
    assert cluster.job_field(job_id, "Restarts") == "1", _diagnose(cluster, log)
    saved = int(preempted.group(1))
    assert 2 <= saved < iters, saved
    assert f"launcher {launcher}" in text and "TP 1 x DP 2" in text, text[-3000:]
    assert "sat_dist: SIGUSR1" in text and f"requeueing job {job_id}" in text, text[-3000:]
    assert re.search(rf"resumed from \S+ at iteration {saved}\b", text), text[-3000:]
    assert f"iteration {iters:8d}/{iters:8d}" in text, text[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{iters:07d}"
    assert _scalar_steps(run / "tensorboard", "lm loss") == list(range(1, iters + 1))
