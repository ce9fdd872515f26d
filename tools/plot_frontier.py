#!/usr/bin/env python
"""SAT's quality-speed frontier: one point per training arm, x = whole-run speedup over its
dense reference, y = held-out perplexity above that reference, lines per method, markers
per run length; a PNG with one panel per held-out set and a Markdown table.

    python tools/plot_frontier.py --spec docs/experiments/frontier.json --out docs/experiments/frontier.png

The spec (JSON) names the arms and how to time them:
  {"runs": "runs/cpt_setup/runs",                     # folder holding the arms' run folders
   "step_times": {"both": "docs/experiments/bench_smollm2.json", ...},   # bench_step reports
   "sets": ["new", "old"],
   "arms": [{"run": "mlp-bwd-0.75", "reference": "dense", "method": "backward only",
             "length": "40 steps", "times": "both"}, ...],
   "points": [{"label": "mlp-act-0.2", "method": "both passes", "length": "40 steps",
               "speedup": 1.049, "gap": {"new": 0.013, "old": 0.010}, "source": "8eccc07"}]}
An arm is read from its TensorBoard log (tools/plot_runs.py's reader): every step is charged
the benchmark's median for the omission rates it ran at, from the report named by "times",
and so is its reference, so the speedup is a ratio of side-by-side step times. "points" are
earlier arms whose logs are not at hand, given by their measured values and the commit that
ran them. The reference arm itself is the point (1, 0) of its length.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plot_runs import Run, bench_step_times, save_figure  # noqa: E402


def arm_points(spec: dict, root: Path) -> list[dict]:
    sets = spec.get("sets", ["new", "old"])
    runs_dir = root / spec["runs"]
    tables = {k: bench_step_times(root / v) for k, v in spec.get("step_times", {}).items()}
    cache: dict[tuple[str, str], Run] = {}

    def run(name: str, times: str) -> Run:
        if times not in tables:
            raise SystemExit(f"error: arm {name}: step_times has no report {times!r} (it has {sorted(tables)})")
        if (name, times) not in cache:
            path = runs_dir / name
            if not path.is_dir():
                raise SystemExit(f"error: arm {name}: {path} not found")
            cache[(name, times)] = Run(path, sets, tables[times])
        return cache[(name, times)]

    out = []
    for arm in spec.get("arms", []):
        r = run(arm["run"], arm.get("times", "both"))
        ref = run(arm["reference"], arm.get("reference_times", "both"))
        gap = {}
        for n in sets:
            v, f = r.final(n), ref.final(n)
            if v is None or f is None:
                raise SystemExit(f"error: arm {arm['run']} or {arm['reference']}: no `lm loss validation/{n}`")
            gap[n] = math.exp(v - f) - 1
        out.append({"label": arm["run"], "method": arm["method"], "length": arm["length"],
                    "speedup": ref.train_seconds / r.train_seconds, "gap": gap, "steps": r.iterations,
                    "source": "this run"})
    for pt in spec.get("points", []):
        out.append(dict(pt, steps=pt.get("steps", "")))
    return out


def table(points: list[dict], sets: list[str]) -> str:
    head = ["arm", "method", "length", "whole run vs dense"] + [f"{n} ppl vs dense" for n in sets] + ["source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        row = [p["label"], p["method"], p["length"], f"{p['speedup']:.3f}x"]
        row += [f"{p['gap'][n]:+.2%}" for n in sets] + [p.get("source", "")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(points: list[dict], sets: list[str], out: Path, title: str, target: float | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(p["method"] for p in points))
    lengths = list(dict.fromkeys(p["length"] for p in points))
    markers = "os^Dv<>"
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 5), squeeze=False)
    for ax, n in zip(axes[0], sets):
        for mi, m in enumerate(methods):
            for li, length in enumerate(lengths):
                pts = sorted((p for p in points if p["method"] == m and p["length"] == length),
                             key=lambda p: p["speedup"])
                if not pts:
                    continue
                xs = [1.0] + [p["speedup"] for p in pts]
                ys = [0.0] + [100 * p["gap"][n] for p in pts]
                ax.plot(xs, ys, "-" if li == 0 else ":", marker=markers[li % len(markers)], color=f"C{mi}",
                        label=f"{m}, {length}")
                for p in pts:
                    ax.annotate(p["label"], (p["speedup"], 100 * p["gap"][n]), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")
        if target is not None:
            ax.axhline(100 * target, color="grey", lw=0.8, ls="--")
            ax.axvline(1.2, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xlabel("whole-run speedup over dense (side-by-side step times)")
        ax.set_ylabel(f"held-out perplexity above dense: {n} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, title, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--root", type=Path, default=Path.cwd(), help="paths in the spec are relative to this")
    p.add_argument("--title", default="SAT on SmolLM2-135M: quality vs whole-run speed")
    p.add_argument("--target", type=float, default=0.01, help="the quality target, drawn as a line (0.01 = 1%%)")
    a = p.parse_args(argv)
    try:
        spec = json.loads(a.spec.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: --spec {a.spec}: {e}")
    sets = spec.get("sets", ["new", "old"])
    points = arm_points(spec, a.root)
    if not points:
        raise SystemExit(f"error: --spec {a.spec}: no arms and no points")
    plot(points, sets, a.out, a.title, a.target)
    print(table(points, sets))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
