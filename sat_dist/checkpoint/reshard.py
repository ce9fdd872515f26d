"""Move one parameter's local tensor (or any tensor of its shape, e.g. an Adam moment)
between its full form and TP shards, and from one tensor-parallel size to another.

The layouts are sat_dist.model.layout's table; this module only applies them: a sharded
parameter's full tensor is split along its partition dim into equal slices of whole units,
block by block (fc1's [gate; up] halves are regrouped separately), and vocabulary-padded
ones are padded with zeros for the TP size and stripped again. Concatenating the old shards
and slicing the new ones is exact.
"""

from __future__ import annotations

import torch

from sat_dist.config import ModelConfig
from sat_dist.errors import SatDistError
from sat_dist.model.layout import ParamLayout, layout_of


def rows(t: torch.Tensor, rank: int, tp: int, dim: int = 0) -> torch.Tensor:
    """Rank `rank`'s block of `tp` equal blocks along `dim` (a view)."""
    n = t.shape[dim] // tp
    return t.narrow(dim, rank * n, n)


def _slice(name: str, lay: ParamLayout, block: torch.Tensor, cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    dim, unit = lay.partition_dim, lay.unit_rows(cfg)
    n = block.shape[dim]
    if n % tp or (n // tp) % unit:
        raise SatDistError(f"{name}: {n} rows (per block) do not split into {tp} tensor-parallel partitions "
                           f"of whole units of {unit} rows ({lay.rows})")
    return rows(block, rank, tp, dim)


def to_local(name: str, full: torch.Tensor, cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank` of `tp`'s local tensor of `name` from its full tensor (a view where it can be)."""
    lay = layout_of(name)
    if lay.replicated:
        return full
    dim = lay.partition_dim
    if lay.vocab_padded:
        vp = cfg.padded_vocab_size(tp)
        if vp > full.shape[dim]:
            pad = list(full.shape)
            pad[dim] = vp - full.shape[dim]
            full = torch.cat((full, full.new_zeros(pad)), dim)
    if lay.blocks == 1:
        return _slice(name, lay, full, cfg, tp, rank)
    return torch.cat([_slice(name, lay, b, cfg, tp, rank) for b in full.chunk(lay.blocks, dim)], dim)


def to_full(name: str, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The full tensor of `name` from the local tensors of all TP ranks (in rank order)."""
    lay = layout_of(name)
    if lay.replicated:
        return shards[0]
    dim = lay.partition_dim
    if lay.blocks == 1:
        full = torch.cat(shards, dim)
    else:
        parts = [s.chunk(lay.blocks, dim) for s in shards]
        full = torch.cat([torch.cat([p[b] for p in parts], dim) for b in range(lay.blocks)], dim)
    if lay.vocab_padded:
        full = full.narrow(dim, 0, cfg.vocab_size)
    return full


def reshard_local(name: str, shards: list[torch.Tensor], cfg: ModelConfig, new_tp: int,
                  new_rank: int) -> torch.Tensor:
    """The local tensor of `name` on rank `new_rank` of `new_tp`, from all old TP shards."""
    return to_local(name, to_full(name, shards, cfg), cfg, new_tp, new_rank).clone()
