"""Move one parameter's local tensor (or any tensor of its shape, e.g. an Adam moment)
between its full form and TP shards, and from one tensor-parallel size to another.

The layouts are sat_dist.model.layout's table; this module only applies them: a sharded
parameter's full tensor is split along its partition dim into equal slices of whole units,
block by block (fc1's [gate; up] halves are regrouped separately), and vocabulary-padded
ones are padded with zeros for the TP size and stripped again. Concatenating the old shards
and slicing the new ones is exact.
"""

from __future__ import annotations

from typing import Callable

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
    """The local tensor of `name` on rank `new_rank` of `new_tp`, from all old TP shards
    (a list; reshard_local_from reads only those it needs)."""
    return reshard_local_from(name, shards.__getitem__, cfg, len(shards), new_tp, new_rank)


def _new_rows(name: str, lay: ParamLayout, cfg: ModelConfig, old_rows: int, old_tp: int,
              new_tp: int) -> tuple[int, int]:
    """(true rows per block, new local rows per block) of `name` going from `old_tp` (whose
    local blocks have `old_rows` rows) to `new_tp`; the same error as to_local for a split
    through a unit."""
    if lay.vocab_padded:
        return cfg.vocab_size, cfg.padded_vocab_size(new_tp) // new_tp
    n, unit = old_rows * old_tp, lay.unit_rows(cfg)
    if n % new_tp or (n // new_tp) % unit:
        raise SatDistError(f"{name}: {n} rows (per block) do not split into {new_tp} tensor-parallel partitions "
                           f"of whole units of {unit} rows ({lay.rows})")
    return n, n // new_tp


def overlapping_shards(name: str, cfg: ModelConfig, old_tp: int, new_tp: int, new_rank: int) -> list[int]:
    """The old TP ranks whose shards hold rows of rank `new_rank` of `new_tp`'s local tensor
    of `name` (vocabulary padding excluded): the only ones resharding needs to read."""
    lay = layout_of(name)
    if lay.replicated:
        return [0]
    if lay.vocab_padded:
        lo, ln = cfg.padded_vocab_size(old_tp) // old_tp, cfg.padded_vocab_size(new_tp) // new_tp
        start, end = new_rank * ln, min((new_rank + 1) * ln, cfg.vocab_size)
        return list(range(start // lo, (end - 1) // lo + 1)) if end > start else []
    # Unpadded blocks are split evenly at both sizes: rank k's rows are the fraction
    # [k/new_tp, (k+1)/new_tp) of each block, old rank r's [r/old_tp, (r+1)/old_tp).
    first = new_rank * old_tp // new_tp
    last = -(-(new_rank + 1) * old_tp // new_tp) - 1
    return list(range(first, last + 1))


def reshard_local_from(name: str, shard: Callable[[int], torch.Tensor], cfg: ModelConfig, old_tp: int,
                       new_tp: int, new_rank: int) -> torch.Tensor:
    """Rank `new_rank` of `new_tp`'s local tensor of `name`, reading only the old shards that
    overlap it, and of those only the overlapping rows: `shard(r)` gives old rank r's local tensor (e.g.
    memory-mapped from its state file) and is called for overlapping_shards() only."""
    lay = layout_of(name)
    if lay.replicated:
        return shard(0).clone()
    dim = lay.partition_dim
    need = overlapping_shards(name, cfg, old_tp, new_tp, new_rank)
    tensors = {r: shard(r) for r in need}
    sample = tensors[need[0]] if need else shard(0)  # none: only padding here (its shape is all we read)
    lo = sample.shape[dim] // lay.blocks  # old local rows per block
    true_rows, ln = _new_rows(name, lay, cfg, lo, old_tp, new_tp)
    start, end = new_rank * ln, (new_rank + 1) * ln
    parts = []
    for b in range(lay.blocks):
        pos = start
        while pos < min(end, true_rows):
            r, off = divmod(pos, lo)
            n = min(lo - off, min(end, true_rows) - pos)
            parts.append(tensors[r].narrow(dim, b * lo + off, n))
            pos += n
        if end > pos:  # vocabulary padding of the new size
            pad = list(sample.shape)
            pad[dim] = end - max(pos, start)
            parts.append(sample.new_zeros(pad))
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0].clone()
