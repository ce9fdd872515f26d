"""How each parameter of LlamaModel is laid out over tensor-parallel ranks, declared once.

Everything that needs to know reads this table rather than a name suffix of its own: the
model's Megatron attributes (sat_dist.model.llama), resharding between TP sizes and HF
import/export (sat_dist.checkpoint.reshard, sat_dist.checkpoint.hf) and the optimizer's
weight-decay groups (sat_dist.train.engine). A parameter name with no entry is an error,
never a guess: a new parameter gets its entry here before anything can save, load or
shard it.

Terms. A parameter's FULL tensor is what a TP=1 model holds, with the vocabulary unpadded.
A sharded parameter's full tensor is `blocks` equal blocks along `partition_dim`; TP rank
r of tp holds the r-th of tp equal slices of every block, in block order (fc1: its gate
rows, then its up rows). Every slice is whole units of `unit_rows(cfg)` rows (a KV group of
qkv, a vocabulary entry, an MLP channel), so concatenating shards and re-slicing is exact.
A vocabulary-padded parameter is padded with zero rows to cfg.padded_vocab_size(tp)
before slicing (the padding depends on tp, so it is stripped from the full tensor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from sat_dist.config import ModelConfig
from sat_dist.errors import SatDistError


def _one_row(cfg: ModelConfig) -> int:
    return 1


def _kv_group_qkv(cfg: ModelConfig) -> int:
    return (cfg.heads_per_group + 2) * cfg.head_dim  # r query heads, k, v


def _kv_group_proj(cfg: ModelConfig) -> int:
    return cfg.heads_per_group * cfg.head_dim  # the r query heads' rows of W_o^T


@dataclass(frozen=True)
class ParamLayout:
    pattern: str
    """Regular expression matching the whole name (as in LlamaModel.named_parameters())."""

    rows: str
    """What the rows are (documentation)."""

    partition_dim: Optional[int]
    """The dimension split over TP ranks; None: replicated (every TP rank holds it whole)."""

    blocks: int = 1
    """Equal blocks of the full tensor, each split over TP separately (fc1's [gate; up]: 2)."""

    unit_rows: Callable[[ModelConfig], int] = _one_row
    """Rows of one unit; a TP slice is whole units."""

    vocab_padded: bool = False
    """Rows are vocabulary entries, padded to cfg.padded_vocab_size(tp)."""

    weight_decay: bool = True
    """AdamW applies weight decay to it."""

    @property
    def replicated(self) -> bool:
        return self.partition_dim is None


LAYOUTS: tuple[ParamLayout, ...] = (
    ParamLayout(r"embedding\.weight", "vocabulary entries [V, h]", 0, vocab_padded=True),
    ParamLayout(r"output_layer\.weight", "vocabulary entries of the LM head [V, h]", 0, vocab_padded=True),
    ParamLayout(r"layers\.\d+\.self_attention\.qkv_weight",
                "per KV group: its r query heads, k, v [G*(r+2)*d, h]", 0, unit_rows=_kv_group_qkv),
    ParamLayout(r"layers\.\d+\.self_attention\.proj_weight",
                "W_o transposed, per KV group its r heads [G*r*d, h]", 0, unit_rows=_kv_group_proj),
    ParamLayout(r"layers\.\d+\.mlp\.fc1_weight", "gate channels, then up channels [2*ffn, h]", 0, blocks=2),
    ParamLayout(r"layers\.\d+\.mlp\.fc2_weight", "W_down transposed, channels [ffn, h]", 0),
    ParamLayout(r"(layers\.\d+\.(input|pre_mlp)_layernorm|final_layernorm)\.weight",
                "RMSNorm gains [h]", None, weight_decay=False),
)


def layout_of(name: str) -> ParamLayout:
    """The one entry of LAYOUTS describing parameter `name`; SatDistError if none or several."""
    found = [lay for lay in LAYOUTS if re.fullmatch(lay.pattern, name)]
    if len(found) != 1:
        what = "no entry" if not found else f"{len(found)} entries ({', '.join(f.pattern for f in found)})"
        raise SatDistError(f"parameter {name!r}: {what} in sat_dist.model.layout.LAYOUTS; each parameter "
                           f"needs exactly one (its TP split, vocabulary padding, weight decay)")
    return found[0]
