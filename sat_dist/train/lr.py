"""Learning-rate schedule: linear warmup, then cosine / linear decay to min_lr, or constant."""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int, style: str) -> float:
    """Learning rate of optimizer step `step` (0-based) of a `total`-step run."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if style == "constant":
        return lr
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if style == "linear":
        return lr - (lr - min_lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
