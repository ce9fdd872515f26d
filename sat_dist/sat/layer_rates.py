"""Uneven MLP omission rates per layer under one FLOP budget (--sat-omission-mlp-layers).

Every layer's MLP has the same size, so a mean rate fixes the FLOPs saved however the rate
is spread over the layers. Given each layer's measured loss increase at a few rates (with
only that layer sparse: tools/sat_fidelity.py --per-layer), pick one rate per layer so that
the layers' mean is at least the budget and the summed increase is least. Summing the
layers' increases assumes they add up; the tool measures the proposal jointly to check it.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence


def allocate_layer_rates(costs: Sequence[Sequence[float]], rates: Sequence[float],
                         mean: float) -> tuple[float, ...]:
    """One rate per layer, from {0} and `rates`, with mean >= `mean` and the least sum of costs.

    costs[l][j]: layer l's loss increase at rates[j] (rate 0 costs 0). An exact
    multiple-choice knapsack: the rates are put on a common grid (their fractions' least
    common denominator, so 1/12 steps stay exact) and a table over layers and the rate sum
    so far, capped at the budget, keeps the cheapest choice for each sum. Among choices of
    equal cost the smaller rate sum wins (no more omission than the budget asks for).
    """
    n_layers = len(costs)
    if n_layers == 0 or any(len(c) != len(rates) for c in costs):
        raise ValueError("costs: one row per layer, one cost per rate")
    if not all(0.0 < r < 1.0 for r in rates) or not 0.0 <= mean < 1.0:
        raise ValueError("rates in (0, 1) and a mean in [0, 1)")
    grid = [Fraction(r).limit_denominator(1000) for r in rates]
    denom = math.lcm(*(f.denominator for f in grid))
    units = [0] + [int(f * denom) for f in grid]  # rate 0 first: the layer stays dense
    choices = [0.0] + list(rates)
    need = math.ceil(Fraction(mean).limit_denominator(1000) * n_layers * denom)
    # best[s]: (summed cost, rate sum, rates chosen) over the layers so far, for the rate
    # sum s capped at `need` (beyond the budget only the cost matters)
    best: dict[int, tuple[float, int, tuple[float, ...]]] = {0: (0.0, 0, ())}
    for layer in range(n_layers):
        nxt: dict[int, tuple[float, int, tuple[float, ...]]] = {}
        for s, (cost, total, chosen) in best.items():
            for j, u in enumerate(units):
                cand = (cost + (float(costs[layer][j - 1]) if j else 0.0), total + u, chosen + (choices[j],))
                key = min(s + u, need)
                if key not in nxt or cand[:2] < nxt[key][:2]:
                    nxt[key] = cand
        best = nxt
    if need not in best:
        raise ValueError(f"mean {mean} is above the highest rate {max(rates)}")
    return best[need][2]

