"""Gathered products: run the matrix products of the kept units only.

Every SAT weight is stored in a row-gathered layout: unit u owns the contiguous block of
`unit_rows` rows [u*unit_rows, (u+1)*unit_rows). A product over the kept units gathers those
blocks (one index_select over a [units, unit_rows*h] view) and multiplies the smaller matrix,
in the forward AND the backward pass.

Why a custom autograd function rather than index_select + matmul under autograd:
- autograd would save the gathered copy for backward. Under ZeRO-3 that copy is memory
  dense training does not hold (DeepSpeed frees the full parameter after forward and
  re-gathers it before backward anyway), so here only the indices are saved and backward
  gathers again from the parameter DeepSpeed has just re-fetched;
- autograd's index_select backward zero-fills a full-size gradient and then scatters into
  it (on CPU the zero fill of freshly mapped pages cost as much as a fifth of a sparse
  layer's fwd+bwd). Here the kept rows are copied in and only the omitted rows are zeroed,
  so every byte of the full gradient is written once.
"""

from __future__ import annotations

import torch


def _gather(weight: torch.Tensor, idx: torch.Tensor, unit_rows: int) -> torch.Tensor:
    """The kept units' row blocks of `weight` [n*unit_rows, h] -> [k*unit_rows, h]."""
    h = weight.shape[-1]
    return weight.view(-1, unit_rows * h).index_select(0, idx).view(-1, h)


def _scatter(grad_kept: torch.Tensor, idx: torch.Tensor, omitted: torch.Tensor, unit_rows: int,
             shape: torch.Size) -> torch.Tensor:
    """Full-size weight gradient: kept blocks from `grad_kept`, omitted blocks exactly 0."""
    full = grad_kept.new_empty(shape)
    units = full.view(-1, unit_rows * shape[-1])
    units.index_copy_(0, idx, grad_kept.reshape(idx.numel(), -1))
    units.index_fill_(0, omitted, 0.0)
    return full


class _KeptLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, idx, omitted, unit_rows: int, kept_in: bool):
        w = _gather(weight, idx, unit_rows)  # [k*unit_rows, h]
        ctx.save_for_backward(x, weight, idx, omitted)
        ctx.unit_rows, ctx.kept_in = unit_rows, kept_in
        # kept_in: the kept rows are the product's INPUT features (W_down^T, W_o^T layouts)
        return torch.matmul(x, w) if kept_in else torch.matmul(x, w.t())

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, idx, omitted = ctx.saved_tensors
        w = _gather(weight, idx, ctx.unit_rows)  # re-gathered: nothing was kept from forward
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = None
        if ctx.kept_in:  # y = x @ w, w [k, h_out]
            if ctx.needs_input_grad[0]:
                grad_x = torch.matmul(grad_y, w.t())
            if ctx.needs_input_grad[1]:
                grad_w = _scatter(x2.t() @ g2, idx, omitted, ctx.unit_rows, weight.shape)
        else:  # y = x @ w^T, w [k, h_in]
            if ctx.needs_input_grad[0]:
                grad_x = torch.matmul(grad_y, w)
            if ctx.needs_input_grad[1]:
                grad_w = _scatter(g2.t() @ x2, idx, omitted, ctx.unit_rows, weight.shape)
        return grad_x, grad_w, None, None, None, None


def complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The indices in [0, n) that are not in `idx` (unique), without a host sync."""
    mask = torch.ones(n, dtype=torch.int8, device=idx.device).index_fill_(0, idx, 0)
    return torch.argsort(mask, descending=True, stable=True)[: n - idx.numel()]


def kept_linear(x: torch.Tensor, weight: torch.Tensor, kept, unit_rows: int = 1,
                kept_in: bool = False) -> torch.Tensor:
    """x @ W_kept^T (kept_in=False: kept units are output features) or x @ W_kept
    (kept_in=True: kept units are input features, x holds only their columns).

    kept: (idx, omitted) unit indices of `weight` viewed as [units, unit_rows, h]; omitted
    units get exactly zero gradient.
    """
    idx, omitted = kept
    return _KeptLinear.apply(x, weight, idx, omitted, unit_rows, kept_in)
