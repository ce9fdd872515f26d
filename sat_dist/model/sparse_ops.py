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
  layer's fwd+bwd). Here one row gather from the kept gradient plus a zero block builds
  the full gradient, writing every byte once.
"""

from __future__ import annotations

import torch

from sat_dist.model.token_sampler import weight_grad_operands


def _gather(weight: torch.Tensor, idx: torch.Tensor, unit_rows: int) -> torch.Tensor:
    """The kept units' row blocks of `weight` [n*unit_rows, h] -> [k*unit_rows, h]."""
    h = weight.shape[-1]
    return weight.view(-1, unit_rows * h).index_select(0, idx).view(-1, h)


def unit_rows(idx: torch.Tensor, rows_per_unit: int) -> torch.Tensor:
    """[k * rows_per_unit]: the row indices of units `idx` (sorted) of a weight viewed as
    [units, rows_per_unit, h], in order."""
    offsets = torch.arange(rows_per_unit, device=idx.device)
    return (idx.unsqueeze(1) * rows_per_unit + offsets).reshape(-1)


def unit_positions(idx: torch.Tensor, n: int) -> torch.Tensor:
    """[n]: the position of each unit in `idx` (unique), or len(idx) for omitted units.
    No host sync."""
    k = idx.numel()
    pos = torch.full((n,), k, dtype=torch.long, device=idx.device)
    return pos.index_copy_(0, idx, torch.arange(k, device=idx.device))


def _weight_grad(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, unit_rows: int,
                 shape: torch.Size) -> torch.Tensor:
    """Full-size weight gradient whose kept blocks are a @ b ([k*unit_rows, h]) and whose
    omitted blocks are exactly 0. The product is written into a buffer with one extra zero
    block, and one block gather (a memcpy per block) builds the full gradient, writing each
    byte once. CPU's index_copy_ copies element by element: in one 7B-width layer fwd+bwd at
    omission 0.5, index_copy_ + index_fill_ of the four weights took 0.81 s, this about 0.48 s."""
    k, h = idx.numel(), shape[-1]
    buf = torch.empty(((k + 1) * unit_rows, h), dtype=a.dtype, device=a.device)
    torch.mm(a, b, out=buf[: k * unit_rows])
    buf[k * unit_rows:].zero_()
    blocks = buf.view(k + 1, unit_rows * h)
    return blocks.index_select(0, unit_positions(idx, shape[0] // unit_rows)).view(shape)


class _KeptLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, idx, unit_rows: int, kept_in: bool, sampler):
        w = _gather(weight, idx, unit_rows)  # [k*unit_rows, h]
        ctx.save_for_backward(x, weight, idx)
        ctx.unit_rows, ctx.kept_in, ctx.sampler = unit_rows, kept_in, sampler
        # kept_in: the kept rows are the product's INPUT features (W_down^T, W_o^T layouts)
        return torch.matmul(x, w) if kept_in else torch.matmul(x, w.t())

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, idx = ctx.saved_tensors
        w = _gather(weight, idx, ctx.unit_rows)  # re-gathered: nothing was kept from forward
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_y, w.t()) if ctx.kept_in else torch.matmul(grad_y, w)
        if ctx.needs_input_grad[1]:
            # [T, in], [T, out]: all tokens, or the drawn ones (--sat-wgrad-tokens)
            x2, g2 = weight_grad_operands(x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1]),
                                          ctx.sampler)
            if ctx.kept_in:  # y = x @ w, w [k, h_out]
                grad_w = _weight_grad(x2.t(), g2, idx, ctx.unit_rows, weight.shape)
            else:  # y = x @ w^T, w [k, h_in]
                grad_w = _weight_grad(g2.t(), x2, idx, ctx.unit_rows, weight.shape)
        return grad_x, grad_w, None, None, None, None


def kept_linear(x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, unit_rows: int = 1,
                kept_in: bool = False, sampler=None) -> torch.Tensor:
    """x @ W_kept^T (kept_in=False: kept units are output features) or x @ W_kept
    (kept_in=True: kept units are input features, x holds only their columns).

    idx: kept unit indices (unique) of `weight` viewed as [units, unit_rows, h]; omitted
    units get exactly zero gradient. sampler: a TokenSampler (the weight gradient from the
    tokens it draws) or None (from all tokens).
    """
    return _KeptLinear.apply(x, weight, idx, unit_rows, kept_in, sampler)


class _SampledWGradLinear(torch.autograd.Function):
    """A dense product whose weight gradient comes from the tokens a TokenSampler draws: the
    forward and the input gradient are exact; the weight gradient is one GEMM over k of the
    T tokens (k/T of dense's third of the product's training FLOPs)."""

    @staticmethod
    def forward(ctx, x, weight, kept_in: bool, sampler):
        ctx.save_for_backward(x, weight)
        ctx.kept_in, ctx.sampler = kept_in, sampler
        return torch.matmul(x, weight) if kept_in else torch.matmul(x, weight.t())

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_y, weight.t()) if ctx.kept_in else torch.matmul(grad_y, weight)
        if ctx.needs_input_grad[1]:
            xs, gs = ctx.sampler.operands(x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1]))
            grad_w = xs.t() @ gs if ctx.kept_in else gs.t() @ xs  # [in, out] or [out, in]
        return grad_x, grad_w, None, None


def sampled_linear(x: torch.Tensor, weight: torch.Tensor, sampler=None, kept_in: bool = False) -> torch.Tensor:
    """x @ W^T (kept_in=False, weight [out, in]) or x @ W (kept_in=True, weight [in, out]),
    with the weight gradient from the tokens `sampler` draws; sampler None: plain autograd."""
    if sampler is None:
        return torch.matmul(x, weight) if kept_in else torch.nn.functional.linear(x, weight)
    return _SampledWGradLinear.apply(x, weight, kept_in, sampler)


class _DenseForwardSparseBackwardMLP(torch.autograd.Function):
    """y = silu(x W_gate^T) * (x W_up^T) @ W_down, computed dense; the backward runs over the
    kept channels K only, as if the omitted channels' contribution were a constant:
      da_K = dy W_down[:, K]          dW_down[:, K] = a_K^T dy   (other columns: 0)
      dg_K, du_K from da_K             dW_gate/up[K] = d[g|u]_K^T x (other rows: 0)
      dx = dg_K W_gate[K] + du_K W_up[K]   (the omitted channels' share of dx is dropped)
    i.e. the gradient of y_K(x) + stop_gradient(y_O(x)). Backward FLOPs: (k/n) of dense.

    exact_input_grad (--sat-sparse-pass weight-grad): da, dg, du and dx are computed over all
    channels, so dx is exactly dense's and only the weight gradients' products run over K.
    Backward FLOPs: (1 + k/n) / 2 of dense. Every layer below then gets the exact gradient:
    the dropped share of dx is the error that compounds down the layers (docs/SAT.md).

    With weights w [k] (--sat-selection pps: w_j = 1/pi_j), kept channel j's share of the
    weight gradients (and, without exact_input_grad, of dx) is scaled by w_j: every gradient
    is then a Horvitz-Thompson estimate of dense's, unbiased over the draw of K."""

    @staticmethod
    def forward(ctx, x, fc1, fc2, select, exact_input_grad: bool):
        f = fc2.shape[0]
        h1 = torch.nn.functional.linear(x, fc1)  # [b, s, 2f]: the dense path's products
        gate, up = h1.chunk(2, dim=-1)
        a = torch.nn.functional.silu(gate) * up  # [b, s, f]
        y = torch.matmul(a, fc2)  # [b, s, h]
        kept, weights = select(a)  # [k] local channel indices (None: dense backward), [k] or None
        if kept is None:
            kept = torch.arange(f, device=x.device)
        both = torch.cat((kept, kept + f))
        ctx.exact_input_grad = exact_input_grad
        # Without exact_input_grad only the kept channels' pre-activations are kept for
        # backward ((k/f) of dense's); with it, all of them (as dense).
        ctx.save_for_backward(x, fc1, fc2, both, h1 if exact_input_grad else h1.index_select(-1, both), weights)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, fc1, fc2, both, h1_saved, weights = ctx.saved_tensors
        k = both.numel() // 2
        kept = both[:k]
        x2 = x.reshape(-1, x.shape[-1])  # [T, h]
        dy = grad_y.reshape(-1, grad_y.shape[-1])  # [T, h]
        w = None if weights is None else weights.to(dy.dtype)
        if ctx.exact_input_grad:
            g, u = h1_saved.reshape(x2.shape[0], -1).chunk(2, dim=-1)  # [T, f] each
            sig = torch.sigmoid(g)
            silu_g = g * sig
            da = dy @ fc2.t()  # [T, f]
            dh = torch.cat((da * u * (sig * (1 + g * (1 - sig))), da * silu_g), dim=-1)  # [T, 2f]
            grad_x = (dh @ fc1).view_as(x)
            a_k = (silu_g * u).index_select(1, kept)  # [T, k]
            dh_k = dh.index_select(1, both)  # [T, 2k]
            if w is not None:
                a_k, dh_k = a_k * w, dh_k * torch.cat((w, w))
        else:
            g, u = h1_saved.reshape(-1, 2 * k).chunk(2, dim=-1)  # [T, k] each
            sig = torch.sigmoid(g)
            silu_g = g * sig
            a_k = silu_g * u  # [T, k]
            da = dy @ fc2.index_select(0, kept).t()  # [T, k]
            if w is not None:  # Horvitz-Thompson: channel j's share of every gradient times 1/pi_j
                da, a_k = da * w, a_k * w
            dh_k = torch.cat((da * u * (sig * (1 + g * (1 - sig))), da * silu_g), dim=-1)  # [T, 2k]: d gate, d up
            grad_x = (dh_k @ fc1.index_select(0, both)).view_as(x)
        grad_fc2 = _weight_grad(a_k.t(), dy, kept, 1, fc2.shape)
        grad_fc1 = _weight_grad(dh_k.t(), x2, both, 1, fc1.shape)
        return grad_x, grad_fc1, grad_fc2, None, None


def backward_sparse_mlp(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, select,
                        exact_input_grad: bool = False) -> torch.Tensor:
    """The SwiGLU MLP with a dense forward and a backward over kept channels only
    (--sat-sparse-pass backward; with exact_input_grad, --sat-sparse-pass weight-grad: only
    the weight gradients over kept channels). x [b, s, h]; fc1 [2f, h] (gate rows, then up
    rows); fc2 [f, h] = W_down^T; select(a [b, s, f]) -> (kept channel indices [k] (unique),
    or None to run the backward dense; per-channel gradient weights [k], or None for 1).
    Omitted channels get exactly zero weight gradient."""
    return _DenseForwardSparseBackwardMLP.apply(x, fc1, fc2, select, exact_input_grad)
