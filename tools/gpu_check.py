#!/usr/bin/env python
"""One-shot check of a fresh GPU node (tools/gpu_check.sh runs this): does sat_dist work and
compute correctly there, and how fast is it? No network needed. Under 8 minutes on one GPU.

    tools/gpu_check.sh [--out gpu_check.json]        # a GPU node
    tools/gpu_check.sh --cpu                         # anywhere: the parts a CPU can run (CI does)

Parts (each is timed, and its outcome and numbers go into one JSON report):
  env       versions, the device, bf16 support, one large matmul's TFLOP/s
  gpu-tests SAT_DIST_GPU_TESTS=1 pytest tests/gpu (logits vs transformers in fp32/bf16, no
            host syncs, attention kernels, peak memory)                        [GPU only]
  bench-sat tools/bench_sat.py: one layer fwd+bwd, 7B and 13B shapes, bf16, seq 4096 (CPU: tiny)
  e2e       launch/pretrain.py on one device: 6 steps uninterrupted, and 3 + resume + 3;
            the resumed losses must equal the uninterrupted ones; save and load timed
  bench-step tools/bench_step.py: a whole 7B-width ZeRO-3 step, dense vs SAT (CPU: tiny)
A part that fails is recorded with its error output and the check goes on; the exit status
is 1 if any part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, **(env or {})))
        return r.returncode, r.stdout + r.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n(timed out after {timeout:.0f} s)", time.time() - t0


def part_env(cpu: bool) -> dict:
    code = r"""
import json, time, torch, importlib
out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
for m in ("deepspeed", "megatron.core", "transformers"):
    try:
        out[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:
        out[m] = f"missing: {e}"
dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cuda":
    out["device"] = torch.cuda.get_device_name()
    out["bf16_supported"] = torch.cuda.is_bf16_supported()
    out["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
n = 8192 if dev == "cuda" else 1024
dt = torch.bfloat16 if dev == "cuda" else torch.float32
a = torch.randn(n, n, device=dev, dtype=dt); b = torch.randn(n, n, device=dev, dtype=dt)
for _ in range(2): a @ b
if dev == "cuda": torch.cuda.synchronize()
t = time.time(); reps = 10
for _ in range(reps): a @ b
if dev == "cuda": torch.cuda.synchronize()
out["matmul_tflops"] = 2 * n**3 * reps / (time.time() - t) / 1e12
out["matmul"] = f"{n}^3 {dt}"
print(json.dumps(out))
"""
    rc, out, secs = run([PY, "-c", code], 120)
    res = {"ok": rc == 0, "seconds": secs}
    if rc == 0:
        res.update(json.loads(next(ln for ln in reversed(out.splitlines()) if ln.startswith('{"torch"'))))
        if not cpu and not res.get("cuda_available"):
            res.update(ok=False, error="no CUDA device visible; run with --cpu on a machine without a GPU")
    else:
        res["error"] = out[-3000:]
    return res


def part_gpu_tests() -> dict:
    rc, out, secs = run([PY, "-m", "pytest", "-q", "-s", "tests/gpu"], 300, {"SAT_DIST_GPU_TESTS": "1"})
    lines = [ln for ln in out.splitlines() if ln.startswith("[") or "passed" in ln or "failed" in ln]
    return {"ok": rc == 0, "seconds": secs, "lines": lines[-20:], **({} if rc == 0 else {"error": out[-4000:]})}


def part_bench_sat(cpu: bool, out_dir: Path) -> dict:
    report = out_dir / "bench_sat.json"
    if cpu:
        cmd = [PY, "tools/bench_sat.py", "--device", "cpu", "--dtype", "fp32", "--shapes", "tiny", "--warmup", "1",
               "--iters", "3", "--seqs", "256x1", "--omissions", "0.3,0.3", "--out", str(report)]
    else:
        cmd = [PY, "tools/bench_sat.py", "--dtype", "bf16", "--shapes", "7b", "13b", "--warmup", "3", "--iters", "10",
               "--seqs", "4096x1", "--omissions", "0.3,0.3", "0.5,0.5", "0,0.5", "--out", str(report)]
    rc, out, secs = run(cmd, 240)
    res = {"ok": rc == 0 and report.exists(), "seconds": secs, "command": " ".join(cmd[1:])}
    res.update({"table": [ln for ln in out.splitlines() if ln.startswith("|")]} if rc == 0 else {"error": out[-3000:]})
    return res


LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?\| lm loss: ([0-9.eE+-]+)")


def _losses(text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in LOSS.finditer(text)}


def part_e2e(cpu: bool, tmp: Path) -> dict:
    """6 steps; then 3, save, resume, 3 more: the same losses (bit-exact on one device)."""
    base = [PY, "launch/pretrain.py", "--train-iters", "6", "--log-interval", "1", "--seq-length", "128",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--sat-omission-mlp", "0.5"]
    if not cpu:
        base += ["--bf16"]
    env = {"MASTER_PORT": str(29600 + os.getpid() % 300)}
    rc, full, t_full = run(base + ["--save", str(tmp / "full")], 300, env)
    if rc != 0:
        return {"ok": False, "seconds": t_full, "error": full[-3000:]}
    rc, first, t_first = run(base + ["--save", str(tmp / "half"), "--save-interval", "3", "--exit-interval", "3"],
                             300, env)
    if rc != 0:
        return {"ok": False, "seconds": t_full + t_first, "error": first[-3000:]}
    rc, second, t_second = run(base + ["--load", str(tmp / "half"), "--save", str(tmp / "half")], 300, env)
    if rc != 0:
        return {"ok": False, "seconds": t_full + t_first + t_second, "error": second[-3000:]}
    ref, resumed = _losses(full), {**_losses(first), **_losses(second)}
    diffs = {i: abs(resumed[i] - ref[i]) for i in ref if i in resumed}
    save_s = [float(m) for m in re.findall(r"saved checkpoint at iteration \d+ to \S+ \(([0-9.]+) s\)", first)]
    load_s = [float(m) for m in re.findall(r"loaded in ([0-9.]+) s", second)]
    ok = len(diffs) == 6 and max(diffs.values()) == 0.0
    return {"ok": ok, "seconds": t_full + t_first + t_second, "losses": ref, "resumed": resumed,
            "max_abs_loss_diff": max(diffs.values()) if diffs else None, "save_seconds": save_s,
            "load_seconds": load_s,
            "run_seconds": {"uninterrupted": t_full, "first_half": t_first, "resumed_half": t_second},
            **({} if ok else {"error": "resumed losses differ from the uninterrupted run's (or are missing)"})}


def part_bench_step(cpu: bool, out_dir: Path) -> dict:
    report = out_dir / "bench_step.json"
    if cpu:
        cmd = [PY, "tools/bench_step.py", "--width", "tiny", "--layers", "2", "--vocab", "1000", "--seq", "128",
               "--ranks", "1", "--rounds", "2", "--warmup", "1", "--omissions", "0,0.5", "--out", str(report)]
    else:
        cmd = [PY, "tools/bench_step.py", "--width", "7b", "--layers", "4", "--seq", "4096", "--dtype", "bf16",
               "--ranks", "1", "--rounds", "3", "--warmup", "1", "--omissions", "0,0.5", "0.3,0.3", "0.5,0.5",
               "--out", str(report)]
    rc, out, secs = run(cmd, 300)
    res = {"ok": rc == 0 and report.exists(), "seconds": secs, "command": " ".join(cmd[1:])}
    res.update({"table": [ln for ln in out.splitlines() if ln.startswith("|")]} if rc == 0 else {"error": out[-3000:]})
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run the parts a machine without a GPU can run")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report (default gpu_check.json)")
    p.add_argument("--skip", nargs="*", default=[], choices=["gpu-tests", "bench-sat", "e2e", "bench-step"])
    a = p.parse_args(argv)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "cpu" if a.cpu else "gpu"}
    try:
        report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                          text=True).stdout.strip()
    except OSError:
        report["commit"] = "?"
    parts = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        steps = [("env", lambda: part_env(a.cpu))]
        if not a.cpu:
            steps.append(("gpu-tests", part_gpu_tests))
        steps += [("bench-sat", lambda: part_bench_sat(a.cpu, tmp)), ("e2e", lambda: part_e2e(a.cpu, tmp)),
                  ("bench-step", lambda: part_bench_step(a.cpu, tmp))]
        for name, fn in steps:
            if name in a.skip:
                continue
            print(f"[gpu_check] {name} ...", flush=True)
            parts[name] = fn()
            print(f"[gpu_check] {name}: {'ok' if parts[name]['ok'] else 'FAILED'} "
                  f"({parts[name]['seconds']:.0f} s)", flush=True)
            if not parts[name]["ok"]:
                print(parts[name].get("error", "")[-1500:], flush=True)
    report["parts"] = parts
    report["ok"] = all(v["ok"] for v in parts.values())
    a.out.write_text(json.dumps(report, indent=2))
    env = parts.get("env", {})
    failed = [k for k, v in parts.items() if not v["ok"]]
    print(f"\nsummary: {'FAILED: ' + ', '.join(failed) if failed else 'all parts passed'}"
          f" | device {env.get('device', 'cpu')} | torch {env.get('torch')} | matmul {env.get('matmul_tflops', 0):.1f} "
          f"TFLOP/s | report {a.out}")
    for name in ("bench-sat", "bench-step"):
        for line in parts.get(name, {}).get("table", [])[:12]:
            print(line)
    e2e = parts.get("e2e", {})
    if "max_abs_loss_diff" in e2e:
        print(f"e2e: resumed losses vs uninterrupted: max abs diff {e2e['max_abs_loss_diff']}; "
              f"save {e2e.get('save_seconds')} s, load {e2e.get('load_seconds')} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
