"""Move one parameter's local tensor (or any tensor of its shape, e.g. an Adam moment)
from one tensor-parallel size to another, in the model's row-gathered layouts.

Every sharded parameter is split along dim 0 into equal blocks of whole units (vocabulary
rows, KV groups, MLP channels), so concatenating the old shards and slicing the new ones is
exact. Two details: fc1 holds [gate; up] per rank, so its halves are regrouped separately;
the vocabulary is padded to a multiple that depends on the TP size, so the padding is
stripped and re-added (with zeros).
"""

from __future__ import annotations

import torch

from sat_dist.config import ModelConfig

VOCAB_PARAMS = ("embedding.weight", "output_layer.weight")


def is_replicated(name: str) -> bool:
    """Parameters every TP rank holds in full (the norms)."""
    return name.endswith("layernorm.weight")


def rows(t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s block of `tp` equal blocks along dim 0."""
    n = t.shape[0] // tp
    return t[rank * n:(rank + 1) * n]


def reshard_local(name: str, shards: list[torch.Tensor], cfg: ModelConfig, new_tp: int,
                  new_rank: int) -> torch.Tensor:
    """The local tensor of `name` on rank `new_rank` of `new_tp`, from all old TP shards."""
    if is_replicated(name):
        return shards[0].clone()
    if name.endswith("mlp.fc1_weight"):
        halves = [s.chunk(2) for s in shards]
        gate = torch.cat([g for g, _ in halves])
        up = torch.cat([u for _, u in halves])
        return torch.cat((rows(gate, new_rank, new_tp), rows(up, new_rank, new_tp))).clone()
    full = torch.cat(shards)
    if name in VOCAB_PARAMS:
        v, vp = cfg.vocab_size, cfg.padded_vocab_size(new_tp)
        full = torch.cat((full[:v], full.new_zeros(vp - v, *full.shape[1:])))
    return rows(full, new_rank, new_tp).clone()
