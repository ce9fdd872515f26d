"""Omission-rate schedules: ladder (LORS), constant and dense, as pure functions of the step.

Ladder, over a run of T optimizer steps with sparse-stage rate r:
  steps [0, sparse_fraction*T)             rate r
  then ladder_steps rungs of equal length   rates r*L/(L+1), r*(L-1)/(L+1), ..., r*1/(L+1)
  steps [(1-dense_fraction)*T, T)           rate 0 (the run ends dense; at least one step)
so the rate falls from r to 0 in L+1 equal decrements.
"""

from __future__ import annotations

import math

from sat_dist.config import SATConfig
from sat_dist.errors import SatDistError


class OmissionSchedule:
    """Omission rates of MLP channels and attention units at a given optimizer step."""

    def __init__(self, cfg: SATConfig, total_steps: int):
        if total_steps < 1:
            raise SatDistError(f"sat schedule: total_steps={total_steps}; allowed: an integer >= 1")
        self.cfg = cfg
        self.total_steps = int(total_steps)

    def fraction(self, step: int) -> float:
        """Multiplier in [0, 1] of the sparse-stage rates at `step`."""
        cfg, T = self.cfg, self.total_steps
        if cfg.schedule == "dense":
            return 0.0
        if cfg.schedule == "constant":
            return 1.0
        sparse_end = int(math.floor(cfg.sparse_fraction * T + 1e-9))
        dense_start = int(math.ceil((1.0 - cfg.dense_fraction) * T - 1e-9))
        if cfg.dense_fraction > 0:
            dense_start = min(dense_start, T - 1)  # a short run still ends with a dense step
        if step < sparse_end:
            return 1.0
        if step >= dense_start:
            return 0.0
        L = cfg.ladder_steps
        if L == 0:
            return 0.0
        rung_len = (dense_start - sparse_end) / L
        rung = min(int((step - sparse_end) / rung_len), L - 1)
        return (L - rung) / (L + 1)

    def rates(self, step: int) -> tuple[float, float]:
        """(attention omission rate, MLP omission rate) at `step`."""
        f = self.fraction(step)
        return self.cfg.omission_attn * f, self.cfg.omission_mlp * f

    def state_dict(self) -> dict:
        c = self.cfg
        return {
            "total_steps": self.total_steps,
            "schedule": c.schedule,
            "omission_mlp": c.omission_mlp,
            "omission_attn": c.omission_attn,
            "sparse_fraction": c.sparse_fraction,
            "ladder_steps": c.ladder_steps,
            "dense_fraction": c.dense_fraction,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved schedule. Rates are a pure function of the step, so the state is
        the schedule's definition; a resumed run keeps the saved one (and says so if the
        flags asked for another)."""
        mine = self.state_dict()
        if set(state) != set(mine):
            raise SatDistError(f"SAT schedule state: keys {sorted(state)}; expected {sorted(mine)}")
        self.total_steps = int(state["total_steps"])
        for k in mine:
            if k != "total_steps":
                setattr(self.cfg, k, state[k])
