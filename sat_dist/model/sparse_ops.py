"""Gathered products: run the matrix products of the kept units only.

Kept units are gathered as ROWS of weights stored in a row-gathered layout (every SAT
weight keeps one unit per contiguous block of rows), so a gather is one contiguous
index_select and the products are genuinely smaller in forward and backward.
"""

from __future__ import annotations

import torch


class _GatherRows(torch.autograd.Function):
    """weight[idx] along dim 0, with a backward that writes the kept rows' gradient into a
    fresh zero tensor by index_copy_ (indices are unique, so no atomic accumulation as in
    autograd's index_select backward, which SAT_SPEC.md measures as the slow part)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.weight_shape = weight.shape
        return weight.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        full = grad.new_zeros(ctx.weight_shape)
        full.index_copy_(0, idx, grad)
        return full, None


def gather_rows(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` (unique int64) of `weight`; omitted rows get exactly zero gradient."""
    return _GatherRows.apply(weight, idx)
