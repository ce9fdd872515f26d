"""The quality budget (--sat-budget): keep the sampled weight gradients' measured relative
variance at a target by scaling every keep fraction with one factor.

Pure arithmetic on numbers every rank holds identically (the measured gap is all-reduced
before it gets here), so every rank makes the same decision; the state is one number,
saved in the checkpoint manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class WGradBudget:
    target: float
    """The relative variance to hold (--sat-budget)."""
    lo: float
    """The lowest scale: the largest base keep fraction brought to --sat-budget-min-tokens."""
    hi: float
    """The highest scale: the smallest base keep fraction brought to 1 (everything exact)."""
    scale: float = 1.0
    """The current multiplier of every keep fraction."""
    gap: Optional[float] = None
    """The last measured gap (None before the first probe)."""

    @classmethod
    def for_keeps(cls, target: float, keeps: list[float], min_tokens: float) -> "WGradBudget":
        """A budget over the products' base keep fractions `keeps` (those < 1)."""
        sampled = [k for k in keeps if k < 1.0] or [1.0]
        return cls(target, lo=min(1.0, min_tokens / max(sampled)), hi=1.0 / min(sampled))

    def update(self, gap: float) -> float:
        """The scale after a probe measured `gap` at the current scale.

        A sampled gradient's relative variance falls roughly as 1/keep (for keeps well below
        1), so the scale that meets the target is scale * gap / target; half that step is
        taken in log space (scale * sqrt(gap / target)), since one probe's measurement is
        itself noisy. A non-finite or non-positive gap changes nothing."""
        if not (math.isfinite(gap) and gap > 0):
            return self.scale
        self.gap = gap
        self.scale = min(self.hi, max(self.lo, self.scale * math.sqrt(gap / self.target)))
        return self.scale

    def state(self) -> dict:
        return {"scale": self.scale, "gap": self.gap}

    def restore(self, state: dict) -> None:
        scale = state.get("scale")
        if isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0:
            self.scale = min(self.hi, max(self.lo, float(scale)))
        gap = state.get("gap")
        self.gap = float(gap) if isinstance(gap, (int, float)) else None
