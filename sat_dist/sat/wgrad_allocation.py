"""Where a token budget for sampled weight gradients goes: one keep fraction per product,
chosen so that the summed relative variance is least at a given share of the weight-
gradient FLOPs (--sat-wgrad-tokens-linears; tools/wgrad_calibrate.py measures the inputs).

Pure arithmetic on measured curves: product i at keep fraction k costs c_i * k FLOPs (its
weight elements times the kept tokens) and adds v_i(k) relative variance. Minimising
sum v_i(k_i) subject to sum c_i k_i <= B over a grid of keeps is a multiple-choice
knapsack, solved exactly by dynamic programming over the budget cut into `bins` steps,
each choice's cost rounded up (so the answer always fits the true budget, and is optimal
up to that rounding).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def allocate_keeps(curves: Sequence[Sequence[float]], grid: Sequence[float], costs: Sequence[float],
                   mean_keep: float, bins: int = 0) -> list[float]:
    """Keep fractions (one per product, from `grid`) whose FLOP-weighted mean is at most
    `mean_keep`, with the least summed relative variance.

    curves[i][g]: product i's relative variance at keep grid[g]; costs[i]: its weight
    elements (FLOPs per kept token, up to a common factor). bins: the budget's resolution
    (default 1000 per product: the rounding gives away at most 0.1% of the budget)."""
    if not curves:
        return []
    if sorted(grid) != list(grid):
        raise ValueError("grid: increasing keep fractions")
    budget = mean_keep * sum(costs)
    bins = bins or 1000 * len(curves)
    unit = budget / bins
    inf = math.inf
    best = np.zeros(bins + 1)  # least variance of the products so far within b bins
    choice = []
    for v, c in zip(curves, costs):
        new = np.full(bins + 1, inf)
        arg = np.full(bins + 1, -1, dtype=np.int64)
        for g, k in enumerate(grid):
            w = math.ceil(c * k / unit - 1e-9)
            if w > bins:
                continue
            cand = np.full(bins + 1, inf)
            cand[w:] = best[: bins + 1 - w] + v[g]
            better = cand < new
            new[better], arg[better] = cand[better], g
        best = new
        choice.append(arg)
    if not math.isfinite(best[bins]):
        return [grid[0]] * len(curves)  # even the lowest keeps do not fit
    picks, b = [], bins
    for i in range(len(curves) - 1, -1, -1):
        g = int(choice[i][b])
        picks.append(g)
        b -= math.ceil(costs[i] * grid[g] / unit - 1e-9)
    return [grid[g] for g in reversed(picks)]
