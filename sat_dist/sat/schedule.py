"""Omission-rate schedules: ladder (LORS), constant and dense, as pure functions of the step.

Ladder, over a run of T optimizer steps with sparse-stage rate r:
  steps [0, sparse_fraction*T)             rate r
  then ladder_steps rungs of equal length   rates r*L/(L+1), r*(L-1)/(L+1), ..., r*1/(L+1)
  steps [(1-dense_fraction)*T, T)           rate 0
so the rate falls from r to 0 in L+1 equal decrements. The last step is dense whatever the
fractions (dense_fraction 0 and sparse_fraction 1 included): the run ends with the dense model.
A training stage that begins at iteration s (--finetune, --override-opt_param-scheduler)
runs the schedule over its own T = --train-iters - s steps, so every stage ends dense.
"""

from __future__ import annotations

import functools
import math

from sat_dist.config import SATConfig
from sat_dist.errors import SatDistError


def _ladder_fractions(L: int) -> tuple[float, ...]:
    """Multipliers of r in the sparse stage and the L rungs, as `fraction` computes them."""
    return (1.0,) + tuple((L - rung) / (L + 1) for rung in range(L))


def ladder_rates(cfg: SATConfig, kind: str) -> tuple[float, ...]:
    """Every nonzero omission rate `kind` ("attn" or "mlp") can run at under `cfg`, highest
    first, whatever the run's length (keep counts are chosen for all of them together)."""
    r = cfg.omission_attn if kind == "attn" else cfg.omission_mlp
    return _nonzero_rates(cfg.schedule, r, cfg.ladder_steps)


@functools.lru_cache(maxsize=64)
def _nonzero_rates(schedule: str, r: float, L: int) -> tuple[float, ...]:
    if schedule == "dense" or r <= 0:
        return ()
    if schedule == "constant":
        return (r,)
    return tuple(r * f for f in _ladder_fractions(L))


class OmissionSchedule:
    """Omission rates of MLP channels and attention units at a given optimizer step, over
    the `total_steps` steps that begin at step `first_step` (a stage's first iteration)."""

    def __init__(self, cfg: SATConfig, total_steps: int, first_step: int = 0):
        if total_steps < 1:
            raise SatDistError(f"sat schedule: total_steps={total_steps}; allowed: an integer >= 1")
        self.cfg = cfg
        self.total_steps = int(total_steps)
        self.first_step = int(first_step)

    def fraction(self, step: int) -> float:
        """Multiplier in [0, 1] of the sparse-stage rates at `step`."""
        cfg, T = self.cfg, self.total_steps
        step -= self.first_step
        if not cfg.enabled:
            return 0.0
        if cfg.schedule == "constant":
            return 1.0
        sparse_end = int(math.floor(cfg.sparse_fraction * T + 1e-9))
        # At least the last step is dense, also for a short run or dense_fraction 0.
        dense_start = min(int(math.ceil((1.0 - cfg.dense_fraction) * T - 1e-9)), T - 1)
        if step >= dense_start:
            return 0.0
        if step < sparse_end:
            return 1.0
        L = cfg.ladder_steps
        if L == 0:
            return 0.0
        rung_len = (dense_start - sparse_end) / L
        rung = min(int((step - sparse_end) / rung_len), L - 1)
        return _ladder_fractions(L)[rung + 1]

    def wgrad_fraction(self, step: int) -> float:
        """Multiplier in [0, 1] of the omitted token shares of the sampled weight gradients at
        `step` (--sat-wgrad-schedule): 1 at every step of an enabled schedule (constant), or
        the omission ladder's fraction (ladder)."""
        if not self.cfg.enabled:
            return 0.0
        return 1.0 if self.cfg.wgrad_schedule == "constant" else self.fraction(step)

    def rates(self, step: int) -> tuple[float, float]:
        """(attention omission rate, MLP omission rate) at `step`."""
        f = self.fraction(step)
        return self.cfg.omission_attn * f, self.cfg.omission_mlp * f

    def rungs(self) -> list[tuple[float, float]]:
        """The distinct (attention, MLP) rates of this run, in the order the steps meet them
        (a short run may skip rungs)."""
        cfg, T = self.cfg, self.total_steps
        # The rate is constant between the stage and rung boundaries: visiting the steps
        # around each boundary meets every rate without walking a long run step by step.
        sparse_end = cfg.sparse_fraction * T
        dense_start = (1.0 - cfg.dense_fraction) * T
        L = max(cfg.ladder_steps, 1)
        edges = [0, T - 1] + [sparse_end + i * (dense_start - sparse_end) / L for i in range(L + 1)]
        steps = sorted({s for e in edges for s in range(int(e) - 1, int(e) + 3) if 0 <= s < T})
        return list(dict.fromkeys(self.rates(self.first_step + step) for step in steps))
