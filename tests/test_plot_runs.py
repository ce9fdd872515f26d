"""tools/plot_runs.py against TensorBoard logs written here with known values: the table's
numbers are computed by hand below, and the PNG is a real image."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "plot_runs.py"

pytest.importorskip("matplotlib")


def _write(run: Path, scalars: dict[str, dict[int, float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run / "tensorboard"))
    for tag, pts in scalars.items():
        for step, v in pts.items():
            w.add_scalar(tag, v, step)
    w.close()


def _run_logs(step_time: float, valid: dict[int, tuple[float, float]], iters: int, tokens_per_step: int):
    s = {"iteration-time": {i: step_time for i in range(1, iters + 1)},
         "throughput/tokens-per-sec": {i: tokens_per_step / step_time for i in range(1, iters + 1)},
         "lm loss validation/new": {i: v[0] for i, v in valid.items()},
         "lm loss validation/old": {i: v[1] for i, v in valid.items()}}
    return s


def test_table_and_png(tmp_path):
    _write(tmp_path / "base", {"lm loss validation/new": {0: 2.5}, "lm loss validation/old": {0: 3.5}})
    _write(tmp_path / "dense", _run_logs(10.0, {2: (2.2, 3.4), 4: (2.0, 3.45)}, 4, 2048))
    _write(tmp_path / "sat", _run_logs(8.0, {2: (2.3, 3.5), 4: (2.1, 3.5)}, 4, 2048))
    out = tmp_path / "plot.png"
    r = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "dense"), str(tmp_path / "sat"),
                        "--base", str(tmp_path / "base"), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    # columns: steps, tokens, new loss, new ppl, new vs dense, old loss, old ppl, old vs dense,
    # training time, mean step, time vs dense
    sat = rows["sat"]
    assert sat[0] == "4" and sat[1] == "8,192"
    assert sat[2] == "2.1000" and sat[3] == f"{math.exp(2.1):.3f}"
    assert sat[4] == f"{math.exp(2.1) / math.exp(2.0) - 1:+.1%}"  # +10.5%
    assert sat[7] == f"{math.exp(3.5) / math.exp(3.45) - 1:+.1%}"
    assert sat[8] == "32" and sat[9] == "8.00" and sat[10] == "0.800"
    assert rows["dense"][4] == "+0.0%" and rows["dense"][8] == "40"
    assert rows["base (start)"][2] == "2.5000" and rows["base (start)"][4] == f"{math.exp(0.5) - 1:+.1%}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_run_without_validation_sets_is_one_clear_error(tmp_path):
    _write(tmp_path / "dense", {"iteration-time": {1: 1.0}, "lm loss": {1: 2.0}})
    r = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "dense"), "--out", str(tmp_path / "p.png")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode != 0 and "--valid-data-path NAME=PREFIX" in r.stderr
    assert not (tmp_path / "p.png").exists()


def test_step_times_from_a_benchmark_report(tmp_path):
    """--step-times: each step costs the benchmark's median for the rates it ran at."""
    import json

    logs = _run_logs(99.0, {4: (2.1, 3.5)}, 4, 2048)  # the run's own (busy-machine) times: ignored
    logs["sat/effective-omission-rate-attn"] = {i: 0.0 for i in range(1, 5)}
    logs["sat/effective-omission-rate-mlp"] = {1: 0.333, 2: 0.333, 3: 0.167, 4: 0.0}
    _write(tmp_path / "sat", logs)
    bench = {"sat_dist": {"settings": [
        {"keep_fraction_attn": 1.0, "keep_fraction_mlp": 1.0, "median_step_s": 10.0},
        {"keep_fraction_attn": 1.0, "keep_fraction_mlp": 1024 / 1536, "median_step_s": 7.0},
        {"keep_fraction_attn": 1.0, "keep_fraction_mlp": 1280 / 1536, "median_step_s": 8.5}]}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    cmd = [sys.executable, str(TOOL), str(tmp_path / "sat"), "--out", str(tmp_path / "p.png"), "--step-times",
           str(tmp_path / "bench.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| sat "))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[1] == "8,192"  # tokens still from the run's log
    assert cells[-2] == "32" and cells[-1] == "8.12"  # 7 + 7 + 8.5 + 10 = 32.5 s -> "32", 32.5 / 4
    del bench["sat_dist"]["settings"][2]  # no row for 0.167: one clear error naming the fix
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode != 0 and "tools/bench_step.py with --omissions 0.0,0.167" in r.stderr


def test_run_step_times_give_one_run_its_own_report(tmp_path):
    """--run-step-times NAME=REPORT: that run is timed by its report, the others by --step-times."""
    import json

    for name in ("dense", "bwd"):
        logs = _run_logs(99.0, {2: (2.1, 3.5)}, 2, 2048)
        logs["sat/effective-omission-rate-attn"] = {1: 0.0, 2: 0.0}
        logs["sat/effective-omission-rate-mlp"] = {1: 0.0, 2: 0.0} if name == "dense" else {1: 0.5, 2: 0.0}
        _write(tmp_path / name, logs)
    both = {"sat_dist": {"settings": [
        {"keep_fraction_attn": 1.0, "keep_fraction_mlp": 1.0, "median_step_s": 10.0},
        {"keep_fraction_attn": 1.0, "keep_fraction_mlp": 0.5, "median_step_s": 6.0}]}}
    backward = {"sat_dist": {"settings": [
        {"keep_fraction_attn": 1.0, "keep_fraction_mlp": 1.0, "median_step_s": 10.0},
        {"keep_fraction_attn": 1.0, "keep_fraction_mlp": 0.5, "median_step_s": 8.0}]}}
    (tmp_path / "both.json").write_text(json.dumps(both))
    (tmp_path / "backward.json").write_text(json.dumps(backward))
    cmd = [sys.executable, str(TOOL), str(tmp_path / "dense"), str(tmp_path / "bwd"), "--out",
           str(tmp_path / "p.png"), "--step-times", str(tmp_path / "both.json")]
    r = subprocess.run(cmd + ["--run-step-times", f"bwd={tmp_path / 'backward.json'}"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| bwd "))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[-3:] == ["18", "9.00", "0.900"]  # 8 + 10 s against dense's 20 s
    r = subprocess.run(cmd + ["--run-step-times", f"nosuch={tmp_path / 'backward.json'}"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode != 0 and "--run-step-times names nosuch" in r.stderr


def test_frontier_points_from_logs_and_given_points(tmp_path):
    """tools/plot_frontier.py: speedup = the reference's benchmarked training time over the
    arm's, gap = exp(loss - reference loss) - 1, by hand."""
    import json

    runs = tmp_path / "runs"
    for name, mlp, losses in (("dense", 0.0, (2.0, 3.4)), ("sat", 0.5, (2.01, 3.45))):
        logs = _run_logs(99.0, {4: losses}, 4, 2048)
        logs["sat/effective-omission-rate-attn"] = {i: 0.0 for i in range(1, 5)}
        logs["sat/effective-omission-rate-mlp"] = {1: mlp, 2: mlp, 3: mlp, 4: 0.0}
        _write(runs / name, logs)
    bench = {"sat_dist": {"settings": [
        {"keep_fraction_attn": 1.0, "keep_fraction_mlp": 1.0, "median_step_s": 10.0},
        {"keep_fraction_attn": 1.0, "keep_fraction_mlp": 0.5, "median_step_s": 6.0}]}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    spec = {"runs": "runs", "step_times": {"both": "bench.json"}, "sets": ["new", "old"],
            "arms": [{"run": "sat", "reference": "dense", "method": "m", "length": "4 steps", "times": "both"}],
            "points": [{"label": "old-arm", "method": "m", "length": "4 steps", "speedup": 1.1,
                        "gap": {"new": 0.02, "old": 0.01}, "source": "abc1234"}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "f.png"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "plot_frontier.py"), "--spec", str(tmp_path / "spec.json"),
                        "--root", str(tmp_path), "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["sat"][2] == f"{40 / 28:.3f}x"  # dense 4 x 10 s; sat 3 x 6 + 10 s
    assert rows["sat"][3] == f"{math.exp(0.01) - 1:+.2%}" and rows["sat"][4] == f"{math.exp(0.05) - 1:+.2%}"
    assert rows["old-arm"][2:5] == ["1.100x", "+2.00%", "+1.00%"] and rows["old-arm"][5] == "abc1234"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_time_of_sampled_weight_gradients_and_budget_keeps():
    """A step is charged the benchmark row of its omission rates and weight-gradient keeps;
    a --sat-budget step whose keeps lie between two measured ones (decoder = head) gets the
    linear interpolation, and anything else is not covered."""
    sys.path.insert(0, str(REPO / "tools"))
    from plot_runs import step_time

    table = {(0.0, 0.0, 1.0, 1.0): 10.0, (0.0, 0.0, 0.25, 0.25): 7.0, (0.0, 0.0, 0.1, 0.1): 6.4,
             (0.0, 0.0, 0.25, 1.0): 8.0}
    assert step_time(table, (0.0, 0.0, 0.25, 1.0)) == 8.0
    assert step_time(table, (0.0, 0.0, 0.5, 0.5)) == pytest.approx(7.0 + 3.0 * 0.25 / 0.75)
    assert step_time(table, (0.0, 0.0, 0.175, 0.175)) == pytest.approx(6.7)
    assert step_time(table, (0.0, 0.0, 0.5, 1.0)) is None
    assert step_time(table, (0.0, 0.083, 0.25, 0.25)) is None
