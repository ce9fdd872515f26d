#!/usr/bin/env python
"""Bytes a checkpoint save and resume read, write and move per rank, measured.

  python tools/bench_checkpoint_io.py --width 7b --layers 2 --ranks 2 \
      --save-tp 1 --load-tp 1 2 --out io.json [--code /path/to/an/older/checkout]

One run: launch --ranks processes (torchrun, gloo on CPU) at --save-tp, take one training
step (so Adam has moments), save; then for every --load-tp relaunch at that TP size (DP =
ranks / TP) and resume. Per rank it reports:
  read      bytes the resume read from storage (/proc/self/io read_bytes; the checkpoint's
            pages are first dropped from the page cache with posix_fadvise DONTNEED, so a
            re-read is a real read, as on a fresh node of a cluster; each rank resumes from
            its own copy of the checkpoint, or ranks sharing this machine's page cache would
            hide each other's reads)
  written   bytes the save wrote (write_bytes)
  moved     bytes each rank received from other ranks in collectives during the save or
            the resume (the torch.distributed calls are wrapped: broadcast, gather,
            all_gather, all_reduce, reduce_scatter; an all-reduce of n bytes over g ranks is
            counted as a ring's 2(g-1)/g n)
and the seconds each took. `--code DIR` runs the same measurement on another checkout of
sat_dist (an older commit: `git worktree add /tmp/before <commit>`), which is how the
"before" rows of docs/PERFORMANCE.md were taken. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from bench_step import WIDTHS, _commit, _free_port  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", choices=sorted(WIDTHS), default="7b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--save-tp", type=int, default=1)
    p.add_argument("--load-tp", type=int, nargs="+", default=[1])
    p.add_argument("--ds-config", default="configs/ds_zero3.json")
    p.add_argument("--code", default=None, help="a sat_dist checkout to measure instead of this one")
    p.add_argument("--dir", default=None, help="where to save (default: a temporary directory)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", choices=("save", "load"), default=None)
    p.add_argument("--result", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.worker:
        return worker(a)
    code = Path(a.code).resolve() if a.code else REPO
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        ckpt = Path(d) / "ckpt"
        runs = {"save": _launch(a, "save", a.save_tp, ckpt, code)}
        for tp in a.load_tp:
            runs[f"load_tp{tp}"] = _launch(a, "load", tp, ckpt, code)
        files = sorted(ckpt.glob("iter_*/*"))
        stored = sum(f.stat().st_size for f in files)
        sizes = {f.name: f.stat().st_size for f in files}
    report = {"command": "python tools/bench_checkpoint_io.py " + " ".join(argv or sys.argv[1:]),
              "commit": _commit() if code == REPO else _commit_of(code), "date": time.strftime("%Y-%m-%d"),
              "width": a.width, "layers": a.layers, "vocab": a.vocab, "ranks": a.ranks, "save_tp": a.save_tp,
              "ds_config": a.ds_config, "checkpoint_bytes": stored, "files": sizes,
              "runs": runs}
    for name, r in runs.items():
        print(f"{name:9s} " + "  ".join(
            f"rank {i}: read {x['read'] / 1e9:6.2f} GB, written {x['written'] / 1e9:6.2f} GB, "
            f"moved {x['moved'] / 1e9:6.2f} GB, {x['seconds']:.1f} s" for i, x in enumerate(r)))
    print(f"checkpoint: {stored / 1e9:.2f} GB: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items()))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _commit_of(code: Path) -> str:
    r = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def _copies(ckpt: Path, ranks: int) -> None:
    """ckpt.rank000 .. : one private copy of the checkpoint per rank, out of the page cache."""
    for r in range(ranks):
        dst = ckpt.with_name(f"{ckpt.name}.rank{r:03d}")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(ckpt, dst)
        for f in dst.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)  # clean pages can be dropped
                finally:
                    os.close(fd)
        _drop_cache(dst)


def _launch(a, phase: str, tp: int, ckpt: Path, code: Path) -> list[dict]:
    if phase == "load":
        _copies(ckpt, a.ranks)
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // a.ranks)),
                   SAT_DIST_CODE=str(code), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks),
               "--master-port", str(_free_port()), str(Path(__file__).resolve()),
               "--width", a.width, "--layers", str(a.layers), "--vocab", str(a.vocab),
               "--ds-config", a.ds_config, "--save-tp", str(tp), "--dir", str(ckpt),
               "--worker", phase, "--result", str(Path(d) / "r")]
        r = subprocess.run(cmd, env=env, cwd=code)
        out = sorted(Path(d).glob("r.*"))
        if r.returncode != 0 or len(out) != a.ranks:
            raise SystemExit(f"error: the {phase} run at TP {tp} failed (exit {r.returncode})")
        return [json.loads(f.read_text()) for f in out]


def _io() -> dict:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


class Moved:
    """Counts the bytes this rank receives from others in torch.distributed collectives
    while active. Installed before DeepSpeed makes its communication backend, which keeps
    references to some of these functions."""

    NAMES = ("broadcast", "gather", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_reduce",
             "reduce_scatter_tensor", "_reduce_scatter_base")

    def __init__(self):
        import inspect

        import torch.distributed as dist

        self.bytes, self.active, self.inside, self.by_name = 0, False, False, {}
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(dist, name, fn, inspect.signature(fn)))

    def _wrap(self, dist, name, fn, sig):
        nb = lambda t: t.numel() * t.element_size()  # noqa: E731

        def received(x: dict) -> int:
            g = dist.get_world_size(x.get("group"))
            if name == "broadcast":
                me = x.get("src") == dist.get_rank() if x.get("src") is not None else \
                    x.get("group_src") == dist.get_rank(x.get("group"))
                return 0 if me else nb(x["tensor"])
            if name == "gather":
                return sum(nb(t) for t in x["gather_list"]) - nb(x["tensor"]) if x.get("gather_list") else 0
            if name == "all_gather":
                return sum(nb(t) for t in x["tensor_list"]) - nb(x["tensor"])
            if name in ("all_gather_into_tensor", "_all_gather_base"):
                return nb(x["output_tensor"]) - nb(x["input_tensor"])
            if name == "all_reduce":
                return 2 * (g - 1) * nb(x["tensor"]) // g
            return (g - 1) * nb(x["input"]) // g  # reduce-scatter

        def wrapped(*args, **kw):
            if not self.active or self.inside:  # one collective may call another: count the outer one
                return fn(*args, **kw)
            n = received(sig.bind(*args, **kw).arguments)
            self.bytes += n
            self.by_name[name] = self.by_name.get(name, 0) + n
            self.inside = True
            try:
                return fn(*args, **kw)
            finally:
                self.inside = False

        return wrapped


def _drop_cache(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def worker(a) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    assert "sat_dist" not in sys.modules
    sys.path.insert(0, os.environ.get("SAT_DIST_CODE", str(REPO)))  # the checkout measured (--code)
    import torch
    import torch.distributed as dist

    import sat_dist
    from sat_dist.checkpoint import state
    from sat_dist.config import ModelConfig, SATConfig
    from sat_dist.parallel.state import init_distributed
    from sat_dist.train.arguments import TrainConfig
    from sat_dist.train.engine import build_engine

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    moved = Moved()
    comm = init_distributed(a.save_tp)  # --save-tp carries this launch's TP size
    cfg = ModelConfig(**WIDTHS[a.width], num_layers=a.layers, vocab_size=a.vocab, max_position_embeddings=4096,
                      name=f"{a.width}-width").validate()
    seq = 64
    t = TrainConfig(tensor_model_parallel_size=comm.tp_size, micro_batch_size=1, global_batch_size=comm.dp_size,
                    seq_length=seq, train_iters=10, lr=1e-5, min_lr=0.0, lr_warmup_iters=0,
                    lr_decay_style="constant", ds_config=a.ds_config)
    eng = build_engine(cfg, SATConfig(schedule="dense").validate(), t, comm)
    ckpt = Path(a.dir)
    dist.barrier()
    if a.worker == "save":
        ids = torch.randint(0, a.vocab, (1, seq + 1), generator=torch.Generator().manual_seed(comm.dp_rank))
        loss = eng.engine(ids[:, :-1], ids[:, 1:]).float().mean()
        eng.engine.backward(loss)
        eng.engine.step()
        dist.barrier()
        io0, t0 = _io(), time.perf_counter()
        moved.active = True
        state.save_checkpoint(eng.engine, eng.model, str(ckpt), 1, comm.dp_size, comm, cfg, eng.stage3,
                              {"train-iters": 10})
    else:
        ckpt = ckpt.with_name(f"{ckpt.name}.rank{dist.get_rank():03d}")  # this rank's own copy
        tag = state.latest_complete_tag(ckpt)
        manifest = state.read_manifest(ckpt, tag)
        _drop_cache(ckpt)
        dist.barrier()
        io0, t0 = _io(), time.perf_counter()
        moved.active = True
        state.restore_checkpoint(eng.engine, eng.model, str(ckpt), tag, manifest, comm, cfg, eng.stage3)
    moved.active, n = False, moved.bytes
    dist.barrier()
    io1, secs = _io(), time.perf_counter() - t0
    rec = {"code": str(Path(sat_dist.__file__).parents[1]), "tp_rank": comm.tp_rank, "dp_rank": comm.dp_rank,
           "read": io1["read_bytes"] - io0["read_bytes"], "written": io1["write_bytes"] - io0["write_bytes"],
           "moved": n, "moved_by_call": moved.by_name, "seconds": round(secs, 2)}
    Path(f"{a.result}.{dist.get_rank():03d}").write_text(json.dumps(rec))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
