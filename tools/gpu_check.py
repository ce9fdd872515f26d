#!/usr/bin/env python
"""One-shot check of a GPU node (tools/gpu_check.sh runs this, after making sure deepspeed
and megatron-core import): does sat_dist's default path work and compute correctly there,
and how fast is it? No network needed. Made for a borrowed node's ~15 minutes: the part
budgets below add up to under 9 minutes, grace periods included.

    tools/gpu_check.sh [--out DIR]            # a GPU node: DIR defaults to gpu_check/
    tools/gpu_check.sh --cpu --out DIR        # anywhere, tiny shapes (CI runs this)

Parts, each a process of its own (its own session) under a time budget; at the budget the
part's whole process tree is sent SIGTERM, then SIGKILL after a grace, so no worker of a
timed-out part keeps the GPU:
  env             versions, the device, bf16, one large matmul's TFLOP/s; deepspeed and
                  megatron-core must import
  gpu-tests       SAT_DIST_GPU_TESTS=1 pytest tests/gpu (logits against transformers,
                  no host syncs, attention kernels, peak memory with and without recompute);
                  on a CPU they are only collected (and skip)
  bench-sat       tools/bench_sat.py: one layer fwd+bwd at 7B width, seq 4096, bf16
  bench-step-on   tools/bench_step.py: whole ZeRO-3 steps at 7B width (4 layers, seq 4096,
  bench-step-off  bf16, DP 1), dense vs SAT, with --sat-comm-sparse on and off (DP 1 is all
                  one GPU allows; `auto` would turn comm-sparse off there, so it is forced on)
  e2e             launch/pretrain.py from an HF checkpoint through DeepSpeed ZeRO-3, with
                  --recompute-activations, the document-mask flags (--reset-attention-mask,
                  --reset-position-ids, --eod-mask-loss) and --sat-comm-sparse on: 6 steps
                  uninterrupted, then 3 + save + resume + 3; the resumed losses must match
Everything goes into --out: each part's log (PART.log) and JSON (PART.json), report.json
(every part's JSON embedded) and report.md (a short summary). Bulky scratch (corpus,
checkpoints) lives in a temporary folder removed at the end. Exit status 1 if any part
failed or ran out of time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
PARTS = ("env", "gpu-tests", "bench-sat", "bench-step-on", "bench-step-off", "e2e")
# Seconds per part on a GPU node and with --cpu (2 CPU cores, tiny shapes). On a GPU the
# expected times are about half of these; each sum plus one grace per part stays under 9
# minutes, leaving room in a 15-minute loan for the machine's start and the wheel install.
BUDGETS = {
    "gpu": {"env": 40, "gpu-tests": 115, "bench-sat": 40, "bench-step-on": 90, "bench-step-off": 70, "e2e": 150},
    "cpu": {"env": 30, "gpu-tests": 45, "bench-sat": 45, "bench-step-on": 90, "bench-step-off": 90, "e2e": 180},
}
GRACE_S = 5.0
"""Between SIGTERM and SIGKILL when a part runs out of time."""
LIMIT_S = 540
"""What the budgets and graces of one mode may add up to (tests/test_gpu_check.py checks)."""
GPU_LOSS_TOL = 5e-3
"""Resumed vs uninterrupted losses on a GPU (non-deterministic backward kernels: atomics in
the memory-efficient attention backward); on a CPU they must be equal."""


# --------------------------------------------------------------------------- processes

def _procs() -> dict[int, tuple[int, int, int, str]]:
    """{pid: (parent pid, session id, start time in ticks, state)} of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        out[int(name)] = (int(fields[1]), int(fields[3]), int(fields[19]), fields[0])
    return out


def family(leader: int, roots: tuple[int, ...] = ()) -> dict[int, int]:
    """{pid: start time} of a part's live processes: the leader and `roots`, every
    descendant of them (torchrun's workers sit in sessions of their own, so a process group
    alone misses them), and whatever is left in the leader's session."""
    procs = _procs()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    todo = [leader, *roots] + [pid for pid, v in procs.items() if v[1] == leader]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in procs:
            continue
        seen.add(pid)
        todo += kids.get(pid, [])
    return {pid: procs[pid][2] for pid in seen if procs[pid][3] not in ("Z", "X")}


def _alive(pid: int, start: int) -> bool:
    p = _procs_one(pid)
    return p is not None and p[2] == start and p[3] not in ("Z", "X")


def _procs_one(pid: int):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[3]), int(fields[19]), fields[0]


def _signal_all(procs: dict[int, int], sig: int, group: int | None) -> None:
    if group is not None:
        try:
            os.killpg(group, sig)
        except OSError:
            pass
    for pid, start in procs.items():
        if _alive(pid, start):  # the same process, not a reused pid
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def _reap(pids) -> None:
    """Collect exit statuses of our own (adopted) children, so that they do not linger as zombies."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass


def stop_family(leader: int, grace_s: float = GRACE_S, roots: tuple[int, ...] = (),
                popen: subprocess.Popen | None = None) -> list[int]:
    """SIGTERM the part's process group and every process of family(leader), wait up to
    grace_s for them to end, then SIGKILL what is left. Returns the pids signalled."""
    procs = family(leader, roots)
    _signal_all(procs, signal.SIGTERM, leader)
    signalled = set(procs)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if popen is not None:
            popen.poll()
        _reap([p for p in procs if p != leader])
        procs = {p: s for p, s in {**procs, **family(leader, roots)}.items() if _alive(p, s)}
        if not procs:
            break
        time.sleep(0.05)
    if procs:
        signalled |= set(procs)
        _signal_all(procs, signal.SIGKILL, leader)
        end = time.monotonic() + 5
        while time.monotonic() < end and any(_alive(p, s) for p, s in procs.items()):
            if popen is not None:
                popen.poll()
            _reap([p for p in procs if p != leader])
            time.sleep(0.05)
    if popen is not None:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return sorted(signalled)


def run_part(cmd: list[str], budget_s: float, log: Path, env: dict | None = None,
             grace_s: float = GRACE_S) -> dict:
    """Run `cmd` in a session of its own, output to `log`, for at most budget_s seconds. On
    time out, or if anything of it outlives its leader, that is stopped (stop_family).
    Returns {rc, seconds, timed_out, killed}; rc 124 on a time out."""
    me = os.getpid()
    before = {pid for pid, v in _procs().items() if v[0] == me}
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), start_new_session=True)
        timed_out = False
        try:
            rc = p.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            timed_out, rc = True, 124
        except BaseException:  # Ctrl-C, or SIGTERM to the check (main() turns it into this)
            stop_family(p.pid, grace_s, (), p)
            f.write("\n[gpu_check] interrupted: the part was stopped\n")
            raise
        # orphans a subreaper (main()) adopted while the part ran are children of ours now
        adopted = tuple(pid for pid, v in _procs().items() if v[0] == me and pid not in before and pid != p.pid)
        left = family(p.pid, adopted)
        left.pop(p.pid, None)
        killed = stop_family(p.pid, grace_s, adopted, p) if (timed_out or left) else []
        secs = time.monotonic() - t0
        if timed_out:
            f.write(f"\n[gpu_check] timed out after {budget_s:.0f} s: stopped {len(killed)} processes "
                    f"(SIGTERM, SIGKILL after {grace_s:.0f} s)\n")
        elif killed:
            f.write(f"\n[gpu_check] {len(killed)} processes outlived the part: stopped\n")
    return {"rc": rc, "seconds": round(secs, 1), "timed_out": timed_out, "killed": len(killed)}


def _subreaper() -> bool:
    """Adopt orphaned descendants (Linux PR_SET_CHILD_SUBREAPER), so that a part's workers
    whose launcher died can still be found and stopped."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except Exception:
        return False


# --------------------------------------------------------------------------- report

def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def build_report(out: Path, meta: dict, runs: dict[str, dict]) -> dict:
    """report.json (every part's JSON embedded, with how its process ended) and report.md in
    `out`. `runs`: {part: run_part's result, plus budget_s}; a part's JSON is read from
    out/PART.json (missing: the part died before writing it)."""
    parts = {}
    for name, r in runs.items():
        path = out / f"{name}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        ok = r.get("rc") == 0 and not r.get("timed_out") and bool(data and data.get("ok"))
        entry = {"ok": ok, **r, "log": f"{name}.log", "result": data}
        if not ok:
            why = []
            if r.get("timed_out"):
                why.append(f"ran out of its {r.get('budget_s')} s budget")
            if r.get("interrupted"):
                why.append("the check was interrupted while it ran")
            if data is None:
                why.append(f"wrote no {name}.json")
            elif data.get("error"):
                why.append(str(data["error"]))
            if r.get("rc") not in (0, 124, None):
                why.append(f"exit status {r.get('rc')}")
            log = out / f"{name}.log"
            entry["error"] = "; ".join(why) or "failed"
            entry["log_tail"] = tail(log.read_text(errors="replace"), 2500) if log.exists() else ""
        parts[name] = entry
    report = {**meta, "ok": all(p["ok"] for p in parts.values()), "parts": parts}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(summary_md(report))
    return report


def summary_md(report: dict) -> str:
    parts = report["parts"]
    env = (parts.get("env") or {}).get("result") or {}
    lines = [f"# GPU node check ({report['mode']}): {'all parts passed' if report['ok'] else 'FAILED'}", "",
             f"{report['date']}, commit {report['commit']}; device {env.get('device', '?')}, torch "
             f"{env.get('torch', '?')}, CUDA {env.get('cuda')}, deepspeed {env.get('deepspeed', '?')}, megatron-core "
             f"{env.get('megatron.core', '?')}; matmul {env.get('matmul', '?')}: {env.get('matmul_tflops', 0):.3g} "
             f"TFLOP/s", "", f"Dependencies: {report.get('deps') or 'not checked'}", "",
             "| part | result | seconds (budget) | note |", "| --- | --- | --- | --- |"]
    for name, p in parts.items():
        res = "ok" if p["ok"] else ("TIMED OUT" if p.get("timed_out") else "FAILED")
        note = ((p.get("result") or {}).get("note") or "") if p["ok"] else p.get("error", "")
        lines.append(f"| {name} | {res} | {p.get('seconds', 0):.0f} ({p.get('budget_s')}) | "
                     f"{note.replace('|', '/').replace(chr(10), ' ')[:300]} |")
    on = ((parts.get("bench-step-on") or {}).get("result") or {}).get("report")
    off = ((parts.get("bench-step-off") or {}).get("result") or {}).get("report")
    if on or off:
        cfg = (on or off)["config"]
        lines += ["", f"Whole ZeRO-3 step (tools/bench_step.py): {cfg['width']} width, {cfg['layers']} layers, seq "
                  f"{cfg['seq']}, {cfg['dtype']}, DP 1; median step seconds, speedup over dense, peak GB:",
                  "| omission attn,mlp | comm-sparse off: s, speedup, GB | on: s, speedup, GB | on / off time |",
                  "| --- | --- | --- | --- |"]
        rows_on = {tuple(r["omission"]): r for r in (on or {}).get("sat_dist", {}).get("settings", [])}
        rows_off = {tuple(r["omission"]): r for r in (off or {}).get("sat_dist", {}).get("settings", [])}

        def cell(r):
            return f"{r['median_step_s']:.3f}, {r['speedup']:.3f}, {r['peak_memory_gb']:.2f}" if r else "-"
        for key in sorted(set(rows_on) | set(rows_off)):
            a, b = rows_off.get(key), rows_on.get(key)
            ratio = f"{b['median_step_s'] / a['median_step_s']:.3f}" if a and b else "-"
            lines.append(f"| {key[0]},{key[1]} | {cell(a)} | {cell(b)} | {ratio} |")
    layer = ((parts.get("bench-sat") or {}).get("result") or {}).get("report")
    if layer:
        lines += ["", "One layer fwd+bwd (tools/bench_sat.py):",
                  "| shape | seq x micro | omission attn,mlp | ms | speedup | FLOP-ideal | of ideal |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in layer.get("layer", []):
            lines.append(f"| {r['shape']} | {r['seq']}x{r['micro_batch']} | {r['omission_attn']},{r['omission_mlp']} "
                         f"| {r['ms']} | {r['speedup']} | {r['flop_ideal_speedup']} | {r['fraction_of_ideal']} |")
    e2e = (parts.get("e2e") or {}).get("result") or {}
    if "losses" in e2e:
        lines += ["", f"e2e ({e2e.get('model')}, seq {e2e.get('seq')}): resumed vs uninterrupted losses, max abs "
                  f"difference {e2e.get('max_abs_loss_diff')} (allowed {e2e.get('tolerance')}); save "
                  f"{e2e.get('save_seconds')} s, load {e2e.get('load_seconds')} s; {e2e.get('comm_sparse_line')}"]
    tests = ((parts.get("gpu-tests") or {}).get("result") or {}).get("lines")
    if tests:
        lines += ["", "GPU tests:", "```", *tests, "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- parts
# Each runs in its own process (`gpu_check.py --part NAME`) and writes OUT/NAME.json.

class Part:
    def __init__(self, name: str, out: Path, scratch: Path, cpu: bool):
        self.name, self.out, self.scratch, self.cpu = name, out, scratch, cpu
        self.data: dict = {"ok": False}

    def save(self, **kw) -> None:
        """Write what is known so far (a part cut off by its budget still reports it)."""
        self.data.update(kw)
        tmp = self.out / f".{self.name}.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.out / f"{self.name}.json")


def tee(cmd: list[str], env: dict | None = None) -> tuple[int, str]:
    """Run cmd, its output copied into this part's log as it comes; (exit status, output)."""
    print(f"[gpu_check] $ {' '.join(cmd)}", flush=True)
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, **(env or {})))
    chunks = []
    for line in p.stdout:
        sys.stdout.write(line)
        chunks.append(line)
    sys.stdout.flush()
    return p.wait(), "".join(chunks)


ENV_CODE = r"""
import importlib, json, os, sys, time, torch
out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(), "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST")}
for m in ("deepspeed", "megatron.core", "transformers"):
    try:
        out[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:
        out[m] = f"missing: {type(e).__name__}: {e}"
dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cuda":
    out["device"] = torch.cuda.get_device_name()
    out["capability"] = "%d.%d" % torch.cuda.get_device_capability()
    out["bf16_supported"] = torch.cuda.is_bf16_supported()
    out["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
else:
    out["device"] = "cpu"
n = 8192 if dev == "cuda" else 512
dt = torch.bfloat16 if dev == "cuda" else torch.float32
a = torch.randn(n, n, device=dev, dtype=dt); b = torch.randn(n, n, device=dev, dtype=dt)
for _ in range(3): a @ b
if dev == "cuda": torch.cuda.synchronize()
t = time.perf_counter(); reps = 20
for _ in range(reps): a @ b
if dev == "cuda": torch.cuda.synchronize()
out["matmul_tflops"] = round(2 * n**3 * reps / (time.perf_counter() - t) / 1e12, 2)
out["matmul"] = f"{n}^3 {dt}"
print("ENV " + json.dumps(out))
"""


def part_env(p: Part) -> None:
    rc, text = tee([PY, "-c", ENV_CODE])
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("ENV {")), None)
    if rc != 0 or line is None:
        p.save(error=f"the environment probe failed (exit {rc}): {tail(text, 1500)}")
        return
    info = json.loads(line[4:])
    info["deps"] = os.environ.get("SAT_DIST_GPU_CHECK_DEPS", "not checked (gpu_check.py run directly)")
    missing = [m for m in ("deepspeed", "megatron.core") if str(info.get(m, "")).startswith("missing")]
    errors = []
    if not p.cpu and not info["cuda_available"]:
        errors.append("no CUDA device visible (on a machine without a GPU use --cpu)")
    if missing:
        errors.append(f"{' and '.join(missing)} do not import ({info['deps']})")
    note = f"{info['device']}; matmul {info['matmul_tflops']} TFLOP/s"
    p.save(ok=not errors, note=note, **info, **({"error": "; ".join(errors)} if errors else {}))


def part_gpu_tests(p: Part) -> None:
    xml = p.scratch / "gpu_tests.xml"
    cmd = [PY, "-m", "pytest", "-s", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests/gpu"]
    rc, text = tee(cmd, {"SAT_DIST_GPU_TESTS": "1"})
    counts, cases = junit_counts(xml)
    lines = [ln for ln in text.splitlines() if ln.startswith("[")]
    if p.cpu:  # no CUDA: the tests only have to import and be collected (they skip)
        ok = rc == 0 and counts["skipped"] == counts["tests"] > 0
        note = f"CPU: {counts['skipped']} collected and skipped (no CUDA)"
    else:
        ok = rc == 0 and counts["tests"] > 0 and counts["passed"] == counts["tests"]
        note = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "tests" and v)
    p.save(ok=ok, note=note, command="SAT_DIST_GPU_TESTS=1 python " + " ".join(cmd[1:-2] + cmd[-1:]),
           counts=counts, tests=cases, lines=lines[-20:],
           **({} if ok else {"error": f"pytest exit {rc} ({note}): {_error_lines(text)}",
                             "log_tail": tail(text, 3000)}))


def junit_counts(path: Path) -> tuple[dict, dict]:
    """({tests, passed, failed, skipped}, {test id: outcome}) from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    counts = {"tests": 0, "passed": 0, "failed": 0, "skipped": 0}
    cases = {}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts, cases
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        cases[f"{case.get('classname')}::{case.get('name')}"] = outcome
        counts["tests"] += 1
        counts[outcome] += 1
    return counts, cases


def part_bench_sat(p: Part) -> None:
    raw = p.scratch / "bench_sat.json"
    if p.cpu:
        args = ["--device", "cpu", "--dtype", "fp32", "--shapes", "tiny", "--warmup", "1", "--iters", "3",
                "--seqs", "128x1", "--omissions", "0.5,0.5"]
    else:
        args = ["--dtype", "bf16", "--shapes", "7b", "--warmup", "2", "--iters", "5", "--seqs", "4096x1",
                "--omissions", "0.3,0.3", "0.5,0.5"]
    rc, text = tee([PY, "tools/bench_sat.py", *args, "--out", str(raw)])
    report = json.loads(raw.read_text()) if rc == 0 and raw.exists() else None
    rows = (report or {}).get("layer", [])
    ok = bool(rows)
    note = ", ".join(f"({r['omission_attn']},{r['omission_mlp']}) {r['speedup']}x of {r['flop_ideal_speedup']}x"
                     for r in rows if (r["omission_attn"], r["omission_mlp"]) != (0.0, 0.0))
    p.save(ok=ok, note=note, command="python tools/bench_sat.py " + " ".join(args), report=report,
           **({} if ok else {"error": f"bench_sat exit {rc}: {_error_lines(text)}", "log_tail": tail(text, 3000)}))


def part_bench_step(p: Part, comm_sparse: str) -> None:
    raw = p.scratch / f"bench_step_{comm_sparse}.json"
    if p.cpu:
        args = ["--width", "tiny", "--layers", "2", "--vocab", "1000", "--seq", "128", "--ranks", "1",
                "--rounds", "2", "--warmup", "1", "--omissions", "0.5,0.5"]
    else:
        args = ["--width", "7b", "--layers", "4", "--seq", "4096", "--dtype", "bf16", "--ranks", "1",
                "--rounds", "3", "--warmup", "1", "--omissions", "0.3,0.3", "0.5,0.5"]
    args += ["--sat-comm-sparse", comm_sparse]
    rc, text = tee([PY, "tools/bench_step.py", *args, "--out", str(raw)])
    report = json.loads(raw.read_text()) if rc == 0 and raw.exists() else None
    rows = ((report or {}).get("sat_dist") or {}).get("settings", [])
    errors = [] if rows else [f"bench_step exit {rc}: {_error_lines(text)}"]
    # the comm-sparse path counts the bytes of its own gathers (None where it is not in use)
    sparse_rows = [r for r in rows if r["omission"] != [0.0, 0.0]]
    used = any(r.get("sat_weight_bytes_per_rank") is not None for r in sparse_rows)
    if rows and used != (comm_sparse == "on"):
        errors.append(f"--sat-comm-sparse {comm_sparse}, but the comm-sparse path was "
                      f"{'used' if used else 'not used'}")
    note = ", ".join(f"({r['omission'][0]},{r['omission'][1]}) {r['speedup']:.3f}x of {r['flop_ideal_speedup']:.3f}x"
                     for r in sparse_rows)
    p.save(ok=not errors, note=note, command="python tools/bench_step.py " + " ".join(args), comm_sparse_used=used,
           report=report, **({"error": "; ".join(errors), "log_tail": tail(text, 3000)} if errors else {}))


LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?\| lm loss: ([0-9.eE+-]+)")


def losses(text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in LOSS.finditer(text)}


def _e2e_inputs(d: Path, cpu: bool) -> tuple[str, str, str, dict]:
    """A small corpus of many short documents (so that sequences cross document ends and the
    document masks matter), its SentencePiece tokenizer, and a random HF Llama checkpoint."""
    import sysconfig

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sat_dist.data.indexed import IndexedDatasetWriter, token_dtype
    from sat_dist.data.tokenizer import (
        document_ids,
        load_tokenizer,
        tokenizer_record,
        train_sentencepiece,
        write_tokenizer_record,
    )

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40 if cpu else 80]
    tok_path = train_sentencepiece(files, d / "tokenizer", vocab_size=1000, max_bytes=1_000_000)
    tok = load_tokenizer(tok_path)
    prefix = d / "corpus"
    with IndexedDatasetWriter(prefix, token_dtype(tok.vocab_size)) as w:
        for f in files:
            doc = ""
            for block in f.read_text(encoding="utf-8", errors="replace").split("\n\n"):
                doc += block + "\n\n"
                if len(doc) > 1500:
                    w.add_document(document_ids(tok, doc))
                    doc = ""
            if doc.strip():
                w.add_document(document_ids(tok, doc))
        w.finalize()
    write_tokenizer_record(prefix, tokenizer_record(tok_path, tok, bos=tok.add_bos))
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if cpu else
             dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=4))
    cfg = LlamaConfig(**shape, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d / "hf_init")
    return str(prefix), str(tok_path), str(d / "hf_init"), shape


def part_e2e(p: Part) -> None:
    d = p.scratch / "e2e"
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    prefix, tok, hf, shape = _e2e_inputs(d, p.cpu)
    seq = 128 if p.cpu else 2048
    model = f"Llama h{shape['hidden_size']} x {shape['num_hidden_layers']} layers, GQA " \
            f"{shape['num_attention_heads']}/{shape['num_key_value_heads']}, random HF init"
    tol = 0.0 if p.cpu else GPU_LOSS_TOL
    p.save(model=model, seq=seq, tolerance=tol, inputs_seconds=round(time.monotonic() - t0, 1))
    base = [PY, "launch/pretrain.py", "--hf-checkpoint", hf, "--data-path", prefix, "--tokenizer-model", tok,
            "--ds_config", "configs/ds_zero3.json", "--seq-length", str(seq), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "6", "--log-interval", "1", "--lr-warmup-iters", "2",
            "--eval-iters", "1", "--recompute-activations", "--reset-attention-mask", "--reset-position-ids",
            "--eod-mask-loss", "--sat-schedule", "constant", "--sat-omission-attn", "0.3", "--sat-omission-mlp", "0.5"]
    base += ["--sat-align-mlp", "16"] if p.cpu else ["--bf16"]
    runs = {"uninterrupted": [],
            "first_half": ["--save", str(d / "ckpt"), "--save-interval", "3", "--exit-interval", "3"],
            "resumed_half": ["--load", str(d / "ckpt"), "--save", str(d / "ckpt")]}
    texts, seconds, errors = {}, {}, []
    comm = "on"
    for name, extra in runs.items():
        t = time.monotonic()
        rc, texts[name] = tee(base + ["--sat-comm-sparse", comm] + extra,
                              {"MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"})
        seconds[f"{name} (comm-sparse {comm})"] = round(time.monotonic() - t, 1)
        p.save(run_seconds=seconds)
        if rc != 0 and name == "uninterrupted" and comm == "on":
            # Tell the comm-sparse path's failure from the rest: the same run with it off, and
            # the save and resume with it off too (the part still fails).
            errors.append(f"the run with --sat-comm-sparse on failed (exit {rc}): {_error_lines(texts[name])}")
            p.save(error=errors[0], comm_sparse_on_log_tail=tail(texts[name], 3000))
            comm = "off"
            t = time.monotonic()
            rc, texts[name] = tee(base + ["--sat-comm-sparse", comm] + extra,
                                  {"MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"})
            seconds[f"{name} (comm-sparse {comm})"] = round(time.monotonic() - t, 1)
            p.save(run_seconds=seconds)
        if rc != 0:
            errors.append(f"the {name} run (comm-sparse {comm}) failed (exit {rc}): {_error_lines(texts[name])}")
            p.save(error="; ".join(errors), log_tail=tail(texts[name], 3000))
            return
    ref = losses(texts["uninterrupted"])
    resumed = {**losses(texts["first_half"]), **losses(texts["resumed_half"])}
    diffs = {i: abs(resumed[i] - ref[i]) for i in ref if i in resumed}
    line = next((ln.strip() for ln in texts["first_half"].splitlines() if "comm-sparse ZeRO-3:" in ln), "")
    line = line[line.find("comm-sparse ZeRO-3:"):]
    if len(diffs) != 6:
        errors.append(f"losses of steps 1-6 missing: uninterrupted {sorted(ref)}, resumed {sorted(resumed)}")
    elif max(diffs.values()) > tol:
        errors.append(f"resumed losses differ from the uninterrupted run's by up to {max(diffs.values()):.3g} "
                      f"(allowed {tol})")
    if comm == "on" and "comm-sparse ZeRO-3: on" not in line:
        errors.append(f"comm-sparse was not on: {line or 'no comm-sparse line in the log'}")
    save_s = [float(m) for m in re.findall(r"saved checkpoint at iteration \d+ to \S+ \(([0-9.]+) s\)",
                                           texts["first_half"] + texts["resumed_half"])]
    load_s = [float(m) for m in re.findall(r"loaded in ([0-9.]+) s", texts["resumed_half"])]
    mx = max(diffs.values()) if diffs else None
    p.save(ok=not errors, note=f"resume (comm-sparse {comm}): max abs loss diff {mx} (allowed {tol})",
           losses=ref, resumed=resumed, max_abs_loss_diff=mx, save_seconds=save_s, load_seconds=load_s,
           comm_sparse_line=line, flags=" ".join(base[2:] + ["--sat-comm-sparse", "on"]),
           **({"error": "; ".join(errors)} if errors else {}))


def _error_lines(text: str, n: int = 3) -> str:
    """The last few lines that name an error (a traceback's last line, `error: ...`)."""
    hits = [ln.strip() for ln in text.splitlines() if re.search(r"(Error|error:|Exception)\b", ln)]
    return " / ".join(dict.fromkeys(hits[-n:])) or tail(text, 300)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_main(a) -> int:
    p = Part(a.part, a.out, a.scratch, a.cpu)
    p.save()
    fn = {"env": part_env, "gpu-tests": part_gpu_tests, "bench-sat": part_bench_sat, "e2e": part_e2e,
          "bench-step-on": lambda q: part_bench_step(q, "on"),
          "bench-step-off": lambda q: part_bench_step(q, "off")}[a.part]
    try:
        fn(p)
    except Exception as e:
        import traceback

        traceback.print_exc()
        p.save(ok=False, error=f"{type(e).__name__}: {e}")
    return 0 if p.data.get("ok") else 1


# --------------------------------------------------------------------------- driver

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on a machine without a GPU (tiny shapes)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check"),
                    help="output folder: PART.log, PART.json, report.json, report.md (default gpu_check/)")
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts not to run")
    ap.add_argument("--only", nargs="*", default=None, choices=PARTS, help="run only these parts")
    ap.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder (corpus, checkpoints)")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.part:
        return part_main(a)
    mode = "cpu" if a.cpu else "gpu"
    budgets = BUDGETS[mode]
    names = [n for n in PARTS if n not in a.skip and (a.only is None or n in a.only)]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": mode, "commit": _commit(),
            "deps": os.environ.get("SAT_DIST_GPU_CHECK_DEPS", "not checked (gpu_check.py run directly)"),
            "budgets_s": {n: budgets[n] for n in names}, "grace_s": GRACE_S}
    subreaper = _subreaper()
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    env: dict = {}
    runs: dict = {}
    print(f"[gpu_check] {mode} mode, output in {a.out}; budgets {meta['budgets_s']} s "
          f"(sum {sum(meta['budgets_s'].values())} s)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # so that the running part is stopped too
    signal.signal(signal.SIGHUP, _interrupt)
    interrupted, name = False, None
    try:
        for name in names:
            (a.out / f"{name}.json").unlink(missing_ok=True)
            print(f"[gpu_check] {name} (budget {budgets[name]} s) ...", flush=True)
            cmd = [PY, "-u", str(Path(__file__).resolve()), "--part", name, "--out", str(a.out),
                   "--scratch", str(scratch)] + (["--cpu"] if a.cpu else [])
            r = run_part(cmd, budgets[name], a.out / f"{name}.log", env)
            runs[name] = {"budget_s": budgets[name], **r}
            report = build_report(a.out, meta, runs)
            entry = report["parts"][name]
            print(f"[gpu_check] {name}: {'ok' if entry['ok'] else 'FAILED'} ({r['seconds']:.0f} s)"
                  + ("" if entry["ok"] else f": {entry['error'][:1500]}"), flush=True)
            if name == "env":
                info = entry.get("result") or {}
                # DeepSpeed's JIT builds reject the "9.0a" that torch reports on Hopper
                if info.get("capability") and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
                    env["TORCH_CUDA_ARCH_LIST"] = info["capability"]
                if not a.cpu and info.get("cuda_available") is False:
                    print("[gpu_check] no GPU: the other parts are not run (use --cpu without one)", flush=True)
                    break
    except KeyboardInterrupt:
        interrupted = True
        if name is not None and name not in runs:
            runs[name] = {"budget_s": budgets[name], "rc": 130, "seconds": 0.0, "timed_out": False, "killed": 0,
                          "interrupted": True}
        print(f"[gpu_check] interrupted during {name}: stopped it", flush=True)
    finally:
        if not a.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    meta["subreaper"] = subreaper
    report = build_report(a.out, meta, runs)
    print("\n" + (a.out / "report.md").read_text(), flush=True)
    print(f"[gpu_check] report: {a.out / 'report.json'}, {a.out / 'report.md'}", flush=True)
    if interrupted:
        return 130
    return 0 if report["ok"] and runs else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or "?"
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
