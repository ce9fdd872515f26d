"""Rotary position embedding (RoPE) frequencies, with the context extensions of Llama-3.x.

Plain RoPE turns channel pair i of a head (i < d/2) by the angle p * w_i at position p, with
w_i = theta^(-2i/d): a wavelength of 2*pi/w_i positions. Checkpoints stretched beyond the
context they were pretrained on lower some of these frequencies, as Hugging Face's
rope_scaling (ModelConfig.rope_scaling) describes:
  linear  every w_i divided by factor (position interpolation).
  llama3  by wavelength, against the pretraining context L = original_max_position_embeddings:
          a wavelength below L/high_freq_factor is kept (it already turned many times within
          L, so positions beyond L look familiar to it); one above L/low_freq_factor is divided
          by factor (interpolated into the range it was trained on); in between, the divisor
          goes from factor to 1 linearly in the number of turns within L, L*w_i/(2*pi), so the
          spectrum has no jump.
Neither changes the magnitude of cos/sin (transformers' attention factor is 1.0 for both):
only the frequencies differ from plain RoPE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sat_dist.errors import SatDistError


def rope_scaling_key(scaling: Mapping | None) -> tuple | None:
    """ModelConfig.rope_scaling in a hashable form, for caches keyed by it."""
    return None if scaling is None else tuple(sorted(scaling.items()))


def inverse_frequencies(head_dim: int, theta: float, scaling: Mapping | tuple | None = None,
                        device=None) -> torch.Tensor:
    """w_i [head_dim/2] in fp32 (as transformers computes them), `scaling` applied: a validated
    ModelConfig.rope_scaling, its rope_scaling_key, or None for plain RoPE."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv
    scaling = dict(scaling)
    kind, factor = scaling.get("rope_type"), float(scaling.get("factor", 0))
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        turns = scaling["original_max_position_embeddings"] * inv / (2 * math.pi)
        kept = ((turns - low) / (high - low)).clamp(0.0, 1.0)  # 1: unchanged, 0: divided by factor
        return inv * (kept + (1.0 - kept) / factor)
    raise SatDistError(f"rope_scaling: rope_type {kind!r} is not implemented; allowed: llama3, linear")
