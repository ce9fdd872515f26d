"""Learning-rate schedule, with Megatron-LM's definition (OptimizerParamScheduler.get_lr,
counted in iterations): linear warmup from --lr-warmup-init, then constant, linear, cosine or
WSD (warmup-stable-decay) decay to --min-lr at --lr-decay-iters, and min_lr after it.

Step k (0-based: k optimizer steps were taken before it) runs at lr_at(k). The warmup
reaches --lr at k = warmup (so step 0 runs at --lr-warmup-init, 0 by default), as in Megatron;
a run resumed with other flags (--override-opt_param-scheduler) takes the new schedule's value
at its iteration, which is what makes the value a pure function of k.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

WSD_COEFFS: dict[str, Callable[[float], float]] = {
    "linear": lambda r: 1.0 - r,
    "cosine": lambda r: 0.5 * (math.cos(math.pi * r) + 1.0),
    "exponential": lambda r: 2.0 * 0.5 ** r - 1.0,
    "minus_sqrt": lambda r: 1.0 - math.sqrt(r),
}
"""WSD's anneal shapes: the decay coefficient (1 -> 0) at fraction r of the anneal."""


def lr_at(step: int, lr: float, min_lr: float, warmup: int, decay_iters: int, style: str,
          warmup_init: float = 0.0, wsd_decay_iters: Optional[int] = None,
          wsd_style: str = "exponential") -> float:
    """Learning rate of optimizer step `step` (0-based). `decay_iters`: the step at which the
    decay reaches min_lr (Megatron's --lr-decay-iters, warmup included); WSD anneals over
    the last `wsd_decay_iters` of them in `wsd_style`."""
    if warmup > 0 and step <= warmup:
        return warmup_init + (lr - warmup_init) * step / warmup
    if style == "constant":
        return lr
    if step > decay_iters:
        return min_lr
    if style == "WSD":
        anneal = int(wsd_decay_iters or 0)
        anneal_start = decay_iters - anneal
        # step > anneal_start implies anneal > 0 (step <= decay_iters here)
        coeff = 1.0 if step <= anneal_start else WSD_COEFFS[wsd_style]((step - anneal_start) / anneal)
    else:
        # decay_iters > warmup here: step lies in (warmup, decay_iters]
        ratio = (step - warmup) / (decay_iters - warmup)
        coeff = 1.0 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (lr - min_lr)


def decay_iters_of(t) -> int:
    """The effective --lr-decay-iters of a TrainConfig (default: --train-iters)."""
    return t.train_iters if t.lr_decay_iters is None else t.lr_decay_iters


def schedule_of(t) -> Callable[[int], float]:
    """step -> learning rate under a TrainConfig's flags."""
    decay = decay_iters_of(t)
    return lambda step: lr_at(step, t.lr, t.min_lr, t.lr_warmup_iters, decay, t.lr_decay_style,
                              t.lr_warmup_init, t.lr_wsd_decay_iters, t.lr_wsd_decay_style)
