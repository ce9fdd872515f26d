"""The operands of one product's sampled weight gradient (--sat-wgrad-tokens).

A backward pass hands `TokenSampler.operands` the product's input x [T, in] and output
gradient dy [T, out]; it returns the drawn tokens' rows (xs [k, in], dys [k, out], the
narrower of the two weighted by 1/p), so that the caller's one smaller GEMM dys^T xs is the
weight gradient's estimate. The input gradient is computed by the caller from the whole dy, exact.

Under tensor parallelism one of the two operands is split over the TP ranks by features
(dy of a column-parallel product, x of a row-parallel one): its per-token squared norms
are summed over the TP group first, so every TP rank draws the same tokens as one process
would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from sat_dist.sat.token_sampling import keep_tokens, sample_tokens, token_generator


@dataclass
class WGradProbe:
    """What a budget probe micro-batch measured, per product (on the device, no sync): one
    draw's squared error ||G_hat - G||^2 against the exact weight gradient G, and ||G||^2.

    The exact gradient is what the probe micro-batch trains with. (Two draws alone, without
    G, estimate the ratio badly: at the relative variances a quarter of the tokens gives,
    the difference of two draws is as large as their mean, and the estimate of ||G||^2 from
    them goes negative in a good share of probes.)"""

    sq_err: dict = field(default_factory=dict)
    norm_sq: dict = field(default_factory=dict)

    def relative_variances(self) -> Optional[torch.Tensor]:
        """[products]: each product's ||G_hat - G||^2 / ||G||^2, an unbiased estimate of its
        relative variance E||G_hat - G||^2 / ||G||^2 (one draw each). None: nothing measured."""
        if not self.sq_err:
            return None
        keys = sorted(self.sq_err)
        e = torch.stack([self.sq_err[k] for k in keys]).double()
        n = torch.stack([self.norm_sq[k] for k in keys]).double()
        return e / n.clamp_min(1e-30)


@dataclass
class TokenSampler:
    keep: float
    """Fraction of the micro-batch's tokens the weight gradient is computed from."""
    method: str
    """pps (unbiased) or topk (biased)."""
    key: tuple
    """(seed, step, micro-batch, layer, product, DP rank): the draw's generator key."""
    sharded: Optional[str] = None
    """"x" or "dy": the operand split over TP ranks by features (None at TP 1)."""
    sum_over_tp: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    """Sums a [T] tensor over the TP group."""
    probe: Optional[WGradProbe] = None
    """Set on a budget probe micro-batch: draw once to measure, train with the exact gradient."""

    def _scores(self, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        # One fused reduction per operand (x.pow(2).sum(-1) would write a full-size temporary:
        # 150 ms for the LM head's dy on CPU against 10 ms).
        xn = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)  # [T]
        gn = torch.linalg.vector_norm(dy, dim=-1, dtype=torch.float32)  # [T]
        if self.sharded == "x":
            xn = self.sum_over_tp(xn * xn).sqrt()
        elif self.sharded == "dy":
            gn = self.sum_over_tp(gn * gn).sqrt()
        return xn * gn

    def _draw(self, x, dy, scores, k, draw: int):
        seed, step, micro, layer, product, dp_rank = self.key
        gen = token_generator(seed, step, micro, layer, product, dp_rank, draw, x.device)
        idx, w = sample_tokens(scores, k, self.method, gen)
        xs, dys = x.index_select(0, idx), dy.index_select(0, idx)  # fresh copies: scaled in place
        if w is not None:  # the 1/p weights go on the narrower operand
            if xs.shape[1] <= dys.shape[1]:
                xs.mul_(w.to(xs.dtype).unsqueeze(1))
            else:
                dys.mul_(w.to(dys.dtype).unsqueeze(1))
        return xs, dys

    def operands(self, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, in], dy [T, out] -> (xs [k, in], dys [k, out]) with dys^T xs the estimate of
        dy^T x (the 1/p weights folded into one of them); on a probe micro-batch (x, dy)
        themselves, after measuring a draw's error."""
        T = x.shape[0]
        k = keep_tokens(T, self.keep)
        if k >= T:
            return x, dy
        scores = self._scores(x, dy)
        xs, dys = self._draw(x, dy, scores, k, 0)
        if self.probe is None:
            return xs, dys
        exact = (dy.t() @ x).float()
        name = self.key[3:5]
        self.probe.sq_err[name] = ((dys.t() @ xs).float() - exact).pow(2).sum()
        self.probe.norm_sq[name] = exact.pow(2).sum()
        return x, dy  # the probe micro-batch trains with the exact gradient


def weight_grad_operands(x: torch.Tensor, dy: torch.Tensor, sampler: Optional[TokenSampler]):
    """(x, dy) as they are (exact weight gradient), or the sampler's drawn rows."""
    return (x, dy) if sampler is None else sampler.operands(x, dy)


__all__ = ["TokenSampler", "WGradProbe", "weight_grad_operands", "keep_tokens"]
