"""tools/gpu_check.py's own logic, without a GPU and without running its parts: the budgets
fit a borrowed node's time, a part that outruns its budget loses every process it started
(workers in sessions of their own included), the report embeds each part's JSON, and the
shell preamble installs deepspeed and megatron-core from a folder of wheels when they are
missing. (CI runs the whole `tools/gpu_check.sh --cpu`; this file does not.)"""

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


def _gone(pid: int, within: float = 5.0) -> bool:
    """The process has ended (a zombie waiting for init to reap it counts as ended)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("mode", sorted(gc.BUDGETS))
def test_budgets_cover_every_part_and_fit_under_nine_minutes(mode):
    budgets = gc.BUDGETS[mode]
    assert set(budgets) == set(gc.PARTS)
    worst = sum(budgets.values()) + gc.GRACE_S * len(budgets)  # every part cut off at its budget
    assert worst < gc.LIMIT_S <= 9 * 60


# A part that starts a worker in a session of its own which ignores SIGTERM (as torchrun
# starts its workers: only a walk of the process tree finds them, only SIGKILL ends this
# one) and a plain child; it writes their pids, then hangs.
HANGING_PART = r"""
import subprocess, sys, time
code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(120)"
worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
worker.stdout.readline()
child = subprocess.Popen(["sleep", "120"])
open(sys.argv[1], "w").write(f"{worker.pid} {child.pid}")
time.sleep(120)
"""


def test_a_part_past_its_budget_loses_its_whole_process_tree(tmp_path):
    pids = tmp_path / "pids"
    t0 = time.monotonic()
    r = gc.run_part([sys.executable, "-c", HANGING_PART, str(pids)], budget_s=6, log=tmp_path / "part.log",
                    grace_s=1)
    assert r["timed_out"] and r["rc"] == 124
    assert time.monotonic() - t0 < 6 + 1 + 8  # budget, grace, and the SIGKILL wait at most
    worker, child = (int(x) for x in pids.read_text().split())
    assert r["killed"] >= 3  # the part, its worker and its child
    assert _gone(worker) and _gone(child)
    assert "timed out after 6 s" in (tmp_path / "part.log").read_text()


def test_processes_left_behind_by_a_finished_part_are_stopped(tmp_path):
    pid_file = tmp_path / "pid"
    # the shell exits at once; its background sleep is orphaned but stays in the part's session
    r = gc.run_part(["sh", "-c", f"sleep 120 & echo $! > {pid_file}"], budget_s=20, log=tmp_path / "part.log",
                    grace_s=1)
    assert r["rc"] == 0 and not r["timed_out"] and r["killed"] >= 1
    assert _gone(int(pid_file.read_text()))


def test_report_embeds_each_parts_json_and_names_failures(tmp_path):
    env = {"ok": True, "device": "cpu", "torch": "x", "note": "cpu; matmul 0.01 TFLOP/s"}
    e2e = {"ok": True, "losses": {"1": 6.9}, "resumed": {"1": 6.9}, "max_abs_loss_diff": 0.0, "tolerance": 0.0}
    partial = {"ok": False, "run_seconds": {"uninterrupted": 3.0}}
    (tmp_path / "env.json").write_text(json.dumps(env))
    (tmp_path / "e2e.json").write_text(json.dumps(e2e))
    (tmp_path / "bench-step-on.json").write_text(json.dumps(partial))
    (tmp_path / "bench-step-on.log").write_text("step 1\nstep 2\n")
    (tmp_path / "gpu-tests.log").write_text("Traceback ...\nImportError: no module named x\n")
    runs = {"env": {"budget_s": 25, "rc": 0, "seconds": 2.0, "timed_out": False, "killed": 0},
            "e2e": {"budget_s": 150, "rc": 0, "seconds": 40.0, "timed_out": False, "killed": 0},
            "bench-step-on": {"budget_s": 90, "rc": 124, "seconds": 95.0, "timed_out": True, "killed": 3},
            "gpu-tests": {"budget_s": 115, "rc": 1, "seconds": 1.0, "timed_out": False, "killed": 0}}
    meta = {"date": "today", "mode": "cpu", "commit": "abc", "deps": "already import"}
    gc.build_report(tmp_path, meta, runs)
    report = json.loads((tmp_path / "report.json").read_text())
    parts = report["parts"]
    assert parts["env"]["result"] == env and parts["e2e"]["result"] == e2e  # embedded, not paths
    assert parts["env"]["ok"] and parts["e2e"]["ok"] and not report["ok"]
    assert parts["bench-step-on"]["result"] == partial and "budget" in parts["bench-step-on"]["error"]
    assert parts["gpu-tests"]["result"] is None and "wrote no gpu-tests.json" in parts["gpu-tests"]["error"]
    assert "ImportError" in parts["gpu-tests"]["log_tail"]
    md = (tmp_path / "report.md").read_text()
    assert "FAILED" in md and "TIMED OUT" in md and "| env | ok |" in md


def _wheel(folder: Path, dist: str, files: dict[str, str]) -> None:
    """A minimal pure-Python wheel of `dist` 0.0.1 holding `files`."""
    info = f"{dist}-0.0.1.dist-info"
    entries = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n",
               f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    with zipfile.ZipFile(folder / f"{dist}-0.0.1-py3-none-any.whl", "w") as z:
        for path, text in entries.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
            z.writestr(path, data)
        z.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")


def _fake_python(tmp_path: Path) -> Path:
    """A `python` for gpu_check.sh that cannot see the venv's packages when it imports
    (`-S`), uses the real pip, and in place of gpu_check.py reports what the preamble set up."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
case "$1" in
  -c) exec {sys.executable} -S "$@" ;;
  -m) exec {sys.executable} "$@" ;;
esac
echo "DEPS=$SAT_DIST_GPU_CHECK_DEPS"
exec {sys.executable} -S -c 'import deepspeed, megatron.core; print("IMPORTED", deepspeed.__file__)'
""")
    fake.chmod(0o755)
    return fake


def test_preamble_installs_missing_packages_from_the_wheel_folder(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "deepspeed", {"deepspeed/__init__.py": "__version__ = '0.0.1'\n"})
    _wheel(wheels, "megatron_core", {"megatron/__init__.py": "", "megatron/core/__init__.py": ""})
    site = tmp_path / "site"
    env = dict(os.environ, PYTHON=str(_fake_python(tmp_path)), SAT_DIST_SITE=str(site))
    env.pop("SAT_DIST_WHEELS", None)
    env.pop("PYTHONPATH", None)
    r = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--cpu", "--wheels", str(wheels)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"DEPS=installed from {wheels} into {site}" in r.stdout
    assert f"IMPORTED {site}/deepspeed/__init__.py" in r.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--cpu", "--wheels", str(empty)],
                       capture_output=True, text=True, env=dict(env, SAT_DIST_SITE=str(tmp_path / "site2")),
                       timeout=60)
    assert "DEPS=NOT INSTALLED" in r.stdout and str(empty) in r.stdout and "device-wheels.sh" in r.stdout
