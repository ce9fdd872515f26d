"""The communication surface of the model, as plain callables.

The model blocks are written on LOCAL shards and call these hooks; at tensor-parallel size 1
they are identities, so the same code is the single-device model. `sat_dist.parallel.state`
(a layer above) fills them from megatron-core's process groups and mappings when
distributed, so the model never imports the parallel layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sat_dist.sat.importance import no_reduce


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss, [b, s], from full-vocabulary logits [b, s, V]."""
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view(target.shape)


@dataclass
class ParallelComm:
    """Where this rank sits and how its shards talk to the others."""

    tp_size: int = 1
    """Tensor-parallel size."""

    tp_rank: int = 0
    """This rank's index in its tensor-parallel group."""

    copy_to_tp: Callable[[torch.Tensor], torch.Tensor] = _identity
    """Identity forward, all-reduce over TP backward (input of a column-parallel product)."""

    reduce_from_tp: Callable[[torch.Tensor], torch.Tensor] = _identity
    """All-reduce over TP forward, identity backward (output of a row-parallel product)."""

    reduce_over_dp: Callable[[torch.Tensor, str], torch.Tensor] = no_reduce
    """Combine a SAT statistic over the data-parallel group ("sum" or "max"), no grad."""

    sum_over_tp: Callable[[torch.Tensor], torch.Tensor] = _identity
    """Sum a tensor over the TP group, no grad (a SAT statistic of TP-split features)."""

    vocab_cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _cross_entropy
    """Per-token loss from vocabulary-parallel logits [b, s, V/tp] and targets [b, s]."""

    dp_size: int = 1
    """Data-parallel size (for logs)."""

    dp_rank: int = 0
    """This rank's index in its data-parallel group."""

    dp_group: Optional[object] = None
    """The torch.distributed group of the DP replicas (None in one process)."""


SINGLE_PROCESS = ParallelComm()
