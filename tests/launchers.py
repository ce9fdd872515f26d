"""Run the trainer through its real launchers and read back what it wrote."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRETRAIN = str(REPO / "launch" / "pretrain.py")


def _flags(corpus, **over):
    f = {"model-config": "tiny-test", "data-path": corpus["data"], "tokenizer-model": corpus["tok"],
         "seq-length": 64, "micro-batch-size": 2, "global-batch-size": 8, "train-iters": 6,
         "log-interval": 1, "sat-align-mlp": 16, "sat-token-stride": 1, "split": "90,10,0",
         "eval-iters": 2, "ds_config": str(REPO / "configs" / "ds_zero3.json"),
         # the SAT settings the tests were written for, whatever the project's defaults are
         "sat-metric": "maxip", "sat-selection": "sampling", "sat-omission-attn": 0.3, "sat-omission-mlp": 0.3}
    f.update(over)
    out = []
    for k, v in f.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not None:
            out += [f"--{k}", str(v)]
    return out


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return env


def torchrun_cmd(n, flags):
    """The command line that runs launch/pretrain.py on n local ranks (on a free port)."""
    return [str(BIN / "torchrun"), "--nproc-per-node", str(n), "--master-port", str(_port()), PRETRAIN, *flags]


def torchrun(n, flags, check=True, timeout=300, env=None, **kw):
    """Run launch/pretrain.py on n local ranks and wait; `env`: variables added to the test
    environment (e.g. SAT_DIST_FAULT); `kw` goes to subprocess.run (e.g. preexec_fn)."""
    r = subprocess.run(torchrun_cmd(n, flags), capture_output=True, text=True, env=_env(**(env or {})),
                       timeout=timeout, cwd=REPO, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def _port():
    from tests.dist_harness import _free_port

    return _free_port()


def scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)}


def digest(d: Path) -> dict:
    """{relative path: md5} of every file under d: to prove nothing on disk changed."""
    return {str(p.relative_to(d)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}
