#!/usr/bin/env python
"""Held-out loss of several training runs against tokens and against training time, from
their TensorBoard logs: a PNG plot and a Markdown table.

    python tools/plot_runs.py RUN_DIR [RUN_DIR ...] --out plot.png [--base BASE_DIR]
        [--sets new old] [--reference dense]

A RUN_DIR holds `tensorboard/` (as written by launch/pretrain.py with --tensorboard-dir),
or is that folder itself; its name labels the run. Read per run:
  - `lm loss validation/NAME` for every NAME in --sets (the named --valid-data-path sets),
    at the iterations they were evaluated;
  - `iteration-time` (seconds per training step, averaged over each log interval; it
    excludes evaluation and checkpoint saving) and `throughput/tokens-per-sec`, from which
    the cumulative training time and the tokens of each iteration follow (tokens per
    iteration = tokens-per-sec x iteration-time, i.e. global batch x sequence length).
--step-times takes the time of every step from a tools/bench_step.py report instead (the
median step of dense and each SAT setting, measured side by side on a quiet machine),
looked up by the omission rates the step really ran at (`sat/effective-omission-rate-*`):
training times that a busy machine during the runs cannot distort. --run-step-times
NAME=REPORT gives run NAME its own report (a run whose steps cost other times at the same
rates, e.g. --sat-sparse-pass backward).
--base names a run made with --skip-train (the starting model): its values are drawn as
every curve's point at 0 tokens and 0 s. The table gives, per run, the last evaluation of
every set, its perplexity, the difference to --reference in perplexity, the training time
and the mean step time, and each run's speed relative to the reference.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def read_scalars(run: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every event file under run (the last write of a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run / "tensorboard" if (run / "tensorboard").is_dir() else run
    files = sorted(tb.rglob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
    if not files:
        raise SystemExit(f"error: {run}: no TensorBoard event files (expected {tb}/events.out.tfevents.*)")
    out: dict[str, dict[int, float]] = {}
    for f in files:  # a resumed run appends a new file; later files override earlier steps
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def bench_step_times(path: Path) -> dict[tuple[float, float, float, float], float]:
    """(effective attention omission, MLP omission, decoder weight-gradient keep, LM head
    keep) -> median step seconds, from a tools/bench_step.py report (the sat_dist arm: dense
    and every SAT setting measured side by side; reports from before --sat-wgrad-tokens
    have keeps of 1)."""
    import json

    report = json.loads(path.read_text())
    rows = report.get("sat_dist", report).get("settings")
    if not rows:
        raise SystemExit(f"error: --step-times {path}: no sat_dist settings; expected a tools/bench_step.py "
                         f"--out report")
    return {(round(1 - r["keep_fraction_attn"], 3), round(1 - r["keep_fraction_mlp"], 3),
             round(r.get("wgrad_keep", 1.0), 3), round(r.get("wgrad_keep_head", 1.0), 3)): r["median_step_s"]
            for r in rows}


def step_time(table: dict, key: tuple[float, float, float, float]) -> float | None:
    """The benchmark's time of a step at `key`; for keeps between two measured ones at the
    same omission rates with equal decoder and head keeps (a --sat-budget run moves both
    together), linear interpolation in the keep. None: not covered."""
    if key in table:
        return table[key]
    a, m, w, h = key
    if w != h:
        return None
    line = sorted((k[2], t) for k, t in table.items() if k[:2] == (a, m) and k[2] == k[3])
    for (w0, t0), (w1, t1) in zip(line, line[1:]):
        if w0 <= w <= w1:
            return t0 + (t1 - t0) * (w - w0) / (w1 - w0)
    return None


def run_name(path: Path) -> str:
    return path.name if path.name != "tensorboard" else path.parent.name


def run_step_times(paths: list[Path], default: dict | None, per_run: list[str]) -> list[dict | None]:
    """The step-time table of each run: its NAME=REPORT entry, else the default."""
    own = {}
    for entry in per_run:
        name, sep, report = entry.partition("=")
        if not sep or not name or not report:
            raise SystemExit(f"error: --run-step-times {entry!r}: expected NAME=REPORT")
        own[name] = bench_step_times(Path(report))
    names = {run_name(p) for p in paths}
    unknown = sorted(set(own) - names)
    if unknown:
        raise SystemExit(f"error: --run-step-times names {', '.join(unknown)}, which is not among the runs "
                         f"({', '.join(sorted(names))})")
    return [own.get(run_name(p), default) for p in paths]


class Run:
    def __init__(self, path: Path, sets: list[str], step_times: dict[tuple[float, float], float] | None = None):
        self.name = run_name(path)
        s = read_scalars(path)
        self.valid = {name: dict(sorted(s.get(f"lm loss validation/{name}", {}).items())) for name in sets}
        times = dict(sorted(s.get("iteration-time", {}).items()))
        tps = s.get("throughput/tokens-per-sec", {})
        if step_times is not None:
            # Every step costs what the side-by-side benchmark measured for the omission rates it
            # really ran at: training times that a busy machine during the run cannot distort.
            attn = s.get("sat/effective-omission-rate-attn", {})
            mlp = s.get("sat/effective-omission-rate-mlp", {})
            wgrad, head = s.get("sat/wgrad-keep", {}), s.get("sat/wgrad-keep-head", {})
            tokens = {it: tps[it] * dt for it, dt in times.items() if it in tps}
            times = {}
            for it in sorted(mlp):
                key = (round(attn.get(it, 0.0), 3), round(mlp[it], 3), round(wgrad.get(it, 1.0), 3),
                       round(head.get(it, 1.0), 3))
                t = step_time(step_times, key)
                if t is None:
                    keys = ",".join(f"{v:g}" for v in key)
                    raise SystemExit(f"error: {self.name}: iteration {it} ran at omission attn/mlp {key[0]}/{key[1]} "
                                     f"and weight-gradient keeps {key[2]}/{key[3]}, which --step-times does not have "
                                     f"(it has {sorted(step_times)}); run tools/bench_step.py with --omissions "
                                     f"{keys if key[2:] != (1.0, 1.0) else f'{key[0]},{key[1]}'}")
                times[it] = t
            tps = {it: tokens.get(it, 0.0) / dt for it, dt in times.items()}
        # cumulative training seconds and tokens at every logged iteration
        self.seconds, self.tokens, self.step_time = {0: 0.0}, {0: 0.0}, times
        last, secs, toks = 0, 0.0, 0.0
        for it, dt in times.items():
            steps = it - last
            secs += dt * steps
            toks += tps.get(it, 0.0) * dt * steps
            self.seconds[it], self.tokens[it] = secs, toks
            last = it
        self.tokens_per_iter = toks / last if last else 0.0

    def at(self, table: dict[int, float], it: int) -> float:
        """Value of a cumulative table at iteration it (the last logged one at or before it,
        extrapolated by the mean step for iterations after it)."""
        if it in table:
            return table[it]
        before = [k for k in table if k <= it]
        k = max(before) if before else 0
        per = table[max(table)] / max(table) if max(table) else 0.0
        return table[k] + per * (it - k)

    def curve(self, name: str, base: float | None, x: str) -> tuple[list[float], list[float]]:
        pts = self.valid[name]
        xs = [self.at(self.tokens if x == "tokens" else self.seconds, it) for it in pts]
        ys = list(pts.values())
        if base is not None:
            xs, ys = [0.0] + xs, [base] + ys
        return xs, ys

    def final(self, name: str) -> float | None:
        pts = self.valid[name]
        return pts[max(pts)] if pts else None

    @property
    def train_seconds(self) -> float:
        return self.seconds[max(self.seconds)]

    @property
    def iterations(self) -> int:
        return max(self.seconds)


def table(runs: list[Run], sets: list[str], reference: str | None, base: dict[str, float] | None) -> str:
    ref = next((r for r in runs if r.name == reference), None)
    head = ["run", "steps", "tokens"]
    for n in sets:
        head += [f"{n} loss", f"{n} ppl", f"{n} ppl vs {reference}" if ref else ""]
    head += ["training time (s)", "mean step (s)", f"time vs {reference}" if ref else ""]
    head = [h for h in head if h]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def loss_cells(final) -> list[str]:
        """loss, ppl (and ppl vs the reference) of every set; final(name) -> loss or None."""
        cells = []
        for n in sets:
            v = final(n)
            cells += [f"{v:.4f}", f"{math.exp(v):.3f}"] if v is not None else ["", ""]
            if ref:
                f = ref.final(n)
                cells.append(f"{math.exp(v - f) - 1:+.1%}" if v is not None and f is not None else "")
        return cells

    if base:
        row = ["base (start)", "0", "0"] + loss_cells(base.get) + ["", ""] + ([""] if ref else [])
        lines.append("| " + " | ".join(row) + " |")
    for r in runs:
        row = [r.name, str(r.iterations), f"{r.tokens[r.iterations]:,.0f}"] + loss_cells(r.final)
        row += [f"{r.train_seconds:.0f}", f"{r.train_seconds / max(r.iterations, 1):.2f}"]
        if ref:
            row.append(f"{r.train_seconds / ref.train_seconds:.3f}" if ref.train_seconds else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(runs: list[Run], sets: list[str], base: dict[str, float] | None, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sets), 2, figsize=(12, 4.2 * len(sets)), squeeze=False)
    for i, name in enumerate(sets):
        for j, x in enumerate(("tokens", "seconds")):
            ax = axes[i][j]
            for r in runs:
                if not r.valid[name]:
                    continue
                xs, ys = r.curve(name, base.get(name) if base else None, x)
                style = "-" if r.name == "dense" else "--"
                ax.plot(xs, ys, style, marker="o", markersize=3, label=r.name)
            ax.set_xlabel("training tokens" if x == "tokens" else "training time (s, evaluation excluded)")
            ax.set_ylabel(f"held-out loss: {name}")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    save_figure(fig, title, out)


def save_figure(fig, title: str, out: Path) -> None:
    """Title, layout, and the PNG at `out` (its folder made if missing)."""
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (holding tensorboard/)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--base", type=Path, default=None, help="a --skip-train run of the starting model")
    p.add_argument("--sets", nargs="+", default=["new", "old"], help="validation set names (default: new old)")
    p.add_argument("--reference", default="dense", help="the run the table compares with (default: dense)")
    p.add_argument("--title", default="held-out loss vs training tokens and training time")
    p.add_argument("--step-times", type=Path, default=None,
                   help="a tools/bench_step.py --out report: each step's time is the benchmark's median for the "
                        "omission rates the step ran at, instead of the run's own iteration-time")
    p.add_argument("--run-step-times", nargs="+", default=[], metavar="NAME=REPORT",
                   help="a bench_step.py report for run NAME only (overrides --step-times for it)")
    a = p.parse_args(argv)
    base = None
    if a.base is not None:
        b = read_scalars(a.base)
        base = {n: v[min(v)] for n in a.sets if (v := b.get(f"lm loss validation/{n}"))}
        if not base:
            raise SystemExit(f"error: --base {a.base}: no `lm loss validation/NAME` scalars for {a.sets}")
    step_times = bench_step_times(a.step_times) if a.step_times else None
    runs = [Run(r, a.sets, times) for r, times in zip(a.runs, run_step_times(a.runs, step_times, a.run_step_times))]
    for r in runs:
        if not any(r.valid.values()):
            raise SystemExit(f"error: {r.name}: no `lm loss validation/NAME` scalars for {a.sets}; "
                             f"was it run with --valid-data-path NAME=PREFIX?")
    plot(runs, a.sets, base, a.out, a.title)
    print(table(runs, a.sets, a.reference if any(r.name == a.reference for r in runs) else None, base))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
