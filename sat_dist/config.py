"""Configuration dataclasses: one validation path, one error style.

Every `validate()` raises `SatDistError` with a message of the form
`<section>.<field>: got <value>; allowed: <what is allowed>`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from sat_dist.errors import SatDistError, fail_field

METRICS = ("maxip", "wanda", "magnitude", "random", "activation")
SELECTIONS = ("sampling", "topk")
SCHEDULES = ("ladder", "constant", "dense")
GRANULARITIES = ("step", "micro-batch")


@dataclass
class SATConfig:
    """Settings of Sparsity-Accelerated Training (see docs/SAT.md)."""

    metric: str = "maxip"
    """Importance metric of a unit: maxip (default), wanda, magnitude or random."""

    selection: str = "sampling"
    """How kept units are chosen from the scores: sampling (temperature, without
    replacement) or topk."""

    temperature: float = 0.05
    """Sampling temperature T: p(unit) is proportional to exp(score / max(score) / T)."""

    omission_mlp: float = 0.3
    """Fraction of MLP channels omitted in the sparse stage, in [0, 1)."""

    omission_attn: float = 0.3
    """Fraction of attention units (KV groups) omitted in the sparse stage, in [0, 1)."""

    schedule: str = "ladder"
    """Omission-rate schedule: ladder (LORS), constant, or dense (SAT off)."""

    sparse_fraction: float = 0.6
    """Ladder: fraction of the run trained at the full omission rates."""

    ladder_steps: int = 3
    """Ladder: number of rungs between the sparse stage and the dense end."""

    dense_fraction: float = 0.1
    """Ladder: fraction of the run at the end trained dense."""

    align_mlp: int = 128
    """Kept MLP channels per TP partition are rounded down to a multiple of this (tensor
    core tiles: an unaligned keep count can run slower than dense)."""

    align_attn: int = 1
    """Kept attention units per TP partition are rounded down to a multiple of this."""

    token_stride: int = 8
    """Importance is computed on every token_stride-th token of the micro-batch, to bound
    its cost."""

    seed: int = 1234
    """Seed of the selection generators (combined with step, layer and TP rank)."""

    granularity: str = "step"
    """How often units are selected: once per optimizer step ("step": scored on the step's
    first micro-batch, reused by every micro-batch and by activation recompute) or afresh
    for every micro-batch ("micro-batch"). See docs/SAT.md for what each guarantees."""

    def validate(self) -> "SATConfig":
        s = "sat"
        if self.metric not in METRICS:
            raise fail_field(s, "metric", self.metric, ", ".join(METRICS))
        if self.selection not in SELECTIONS:
            raise fail_field(s, "selection", self.selection, ", ".join(SELECTIONS))
        if self.schedule not in SCHEDULES:
            raise fail_field(s, "schedule", self.schedule, ", ".join(SCHEDULES))
        if self.granularity not in GRANULARITIES:
            raise fail_field(s, "granularity", self.granularity, ", ".join(GRANULARITIES))
        if not _is_number(self.temperature) or not self.temperature > 0 or math.isinf(self.temperature):
            raise fail_field(s, "temperature", self.temperature, "a finite number > 0")
        for name in ("omission_mlp", "omission_attn"):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 <= v < 1.0:
                raise fail_field(s, name, v, "a number in [0, 1)")
        for name in ("sparse_fraction", "dense_fraction"):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 <= v <= 1.0:
                raise fail_field(s, name, v, "a number in [0, 1]")
        if self.sparse_fraction + self.dense_fraction > 1.0 + 1e-9:
            raise SatDistError(
                f"sat.sparse_fraction + sat.dense_fraction: got "
                f"{self.sparse_fraction} + {self.dense_fraction} > 1; allowed: a sum <= 1"
            )
        for name, lo in (("ladder_steps", 0), ("align_mlp", 1), ("align_attn", 1), ("token_stride", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise fail_field(s, name, v, f"an integer >= {lo}")
        if not _is_int(self.seed) or self.seed < 0:
            raise fail_field(s, "seed", self.seed, "an integer >= 0")
        return self


@dataclass
class ModelConfig:
    """Shape of a Llama-architecture decoder (Llama-2 names in comments)."""

    hidden_size: int = 256
    """Model width h (Llama-2 7B: 4096)."""

    ffn_hidden_size: int = 512
    """SwiGLU inner width (Llama-2 7B: 11008)."""

    num_layers: int = 2
    """Number of decoder layers."""

    num_attention_heads: int = 4
    """Query heads."""

    num_query_groups: int = 4
    """Key/value heads (GQA groups); equal to num_attention_heads for multi-head attention."""

    vocab_size: int = 8000
    """Tokenizer vocabulary; the embedding is padded up to padded_vocab_size()."""

    max_position_embeddings: int = 4096
    """Longest sequence the rotary tables are built for."""

    rope_theta: float = 10000.0
    """Rotary base."""

    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    make_vocab_size_divisible_by: int = 128
    """Megatron-style vocabulary padding multiple (times the TP size)."""

    tie_word_embeddings: bool = False
    """Share the input embedding with the LM head (SmolLM2 does; Llama-2 does not)."""

    init_method_std: float = 0.02
    """Std of the normal initialisation of freshly built (not imported) weights."""

    name: str = "custom"
    """A label for logs."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate(self) -> "ModelConfig":
        s = "model"
        for name in ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise fail_field(s, name, v, "an integer >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise fail_field(s, "num_attention_heads", self.num_attention_heads,
                             f"a divisor of hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_query_groups:
            raise fail_field(s, "num_query_groups", self.num_query_groups,
                             f"a divisor of num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise fail_field(s, "num_attention_heads", self.num_attention_heads,
                             "a value giving an even head_dim (rotary embedding)")
        for name in ("rope_theta", "norm_eps", "init_method_std"):
            v = getattr(self, name)
            if not _is_number(v) or not v > 0:
                raise fail_field(s, name, v, "a number > 0")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls(**load_fields(path, cls, "model config")).validate()


def read_json_object(path: str | Path, what: str) -> dict:
    """A JSON object from `path`; a missing file or bad JSON is one clear error naming `what`."""
    path = Path(path)
    if not path.is_file():
        raise SatDistError(f"{what} {path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SatDistError(f"{what} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
    if not isinstance(data, dict):
        raise SatDistError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_fields(path: str | Path, cls, what: str) -> dict:
    """Read a JSON object from `path` and check its keys are fields of `cls`."""
    data = read_json_object(path, what)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SatDistError(f"{what} {path}: unknown keys {unknown}; allowed: {sorted(names)}")
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


__all__ = ["SATConfig", "ModelConfig", "METRICS", "SELECTIONS", "SCHEDULES", "GRANULARITIES", "load_fields",
           "read_json_object"]
