"""Which tokens a weight gradient is computed from: fixed-size sampling with inclusion
probabilities proportional to a score, and the variance it adds.

A linear layer's weight gradient is a sum over the micro-batch's tokens,
dW = sum_t dy_t x_t^T. Drawing k of the T tokens, token t with probability p_t, and
weighting each drawn token by 1/p_t gives an unbiased estimate (Horvitz-Thompson). Its
variance is least, for a fixed k, when p_t is proportional to ||dy_t|| ||x_t|| (the norm of
the token's own term), capped at 1. The forward pass and the input gradient are untouched.

Everything here is pure tensor code on the tokens' device: no host synchronisation (k is
known from the shapes; the draw is a `searchsorted`, not a variable-size `nonzero`).
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

from sat_dist.config import WGRAD_SAMPLINGS


def keep_tokens(tokens: int, keep: float) -> int:
    """Tokens drawn out of `tokens` at keep fraction `keep` (nearest, at least 1)."""
    return min(tokens, max(1, int(tokens * keep + 0.5)))


def inclusion_probabilities(scores: torch.Tensor, k: int) -> torch.Tensor:
    """p [T] with p_t proportional to scores_t, capped at 1, summing to k (0 < k <= T).

    The largest scores are capped one by one: with the scores sorted descending, m of them
    at 1 and the rest scaled by c_m = (k - m) / (sum of the rest); the right m is the first
    whose largest uncapped score gets p <= 1. Every score gets a floor of 1e-6 of the mean,
    so that a token whose term is zero can still be drawn (with its 1/p weight finite)."""
    T = scores.numel()
    if k >= T:
        return torch.ones_like(scores, dtype=torch.float32)
    s = scores.float().clamp_min(0)
    s = s + (1e-6 * s.mean() + 1e-30)
    s_sorted, order = s.sort(descending=True)
    tail = s_sorted.flip(0).cumsum(0).flip(0)  # tail[m] = sum of s_sorted[m:]
    m = torch.arange(k, device=s.device)
    c = (k - m).float() / tail[:k]
    ok = s_sorted[:k] * c <= 1.0  # True at m = k - 1 always
    m_star = (ok.cumsum(0) == 0).sum()  # the first m that is ok (a 0-dim tensor: no sync)
    c_star = c.gather(0, m_star.reshape(1))
    p_sorted = torch.where(torch.arange(T, device=s.device) < m_star, torch.ones_like(s_sorted),
                           (s_sorted * c_star).clamp_max(1.0))
    return torch.empty_like(p_sorted).scatter_(0, order, p_sorted)


def systematic_sample(p: torch.Tensor, k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """k distinct indices [k], index t drawn with probability exactly p_t (p_t <= 1, sum k).

    Systematic sampling: one uniform u, the points u, u + 1, ..., u + k - 1 on the
    cumulative sum of p; token t is drawn when a point falls in its interval of length p_t
    (at most one point can, since p_t <= 1)."""
    cum = p.double().cumsum(0)
    u = torch.rand((), generator=generator, device=p.device, dtype=torch.float64)
    points = u + torch.arange(k, device=p.device, dtype=torch.float64)
    return torch.searchsorted(cum, points, right=True).clamp_max(p.numel() - 1)


def sample_tokens(scores: torch.Tensor, k: int, method: str, generator: Optional[torch.Generator]
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(indices [k], weights [k] or None) of the tokens a weight gradient is computed from.

    pps: probability proportional to the score, capped at 1, weights 1/p (unbiased);
    topk: the k largest scores, unweighted (biased: the omitted tokens' terms are lost)."""
    if method == "topk":
        return scores.topk(k, sorted=False).indices, None
    if method != "pps":
        raise ValueError(f"token sampling {method!r}; allowed: {', '.join(WGRAD_SAMPLINGS)}")
    p = inclusion_probabilities(scores, k)
    idx = systematic_sample(p, k, generator)
    return idx, p.index_select(0, idx).reciprocal()


def poisson_variance(scores: torch.Tensor, k: int) -> torch.Tensor:
    """sum_t (1 - p_t) / p_t * scores_t^2: the variance (trace, squared Frobenius norm) of the
    Horvitz-Thompson estimate of sum_t dy_t x_t^T when scores_t = ||dy_t|| ||x_t|| and tokens
    are drawn independently with the pps probabilities of `k`. Systematic sampling's is
    usually lower; tools/sat_fidelity.py compares rates with it."""
    p = inclusion_probabilities(scores, k)
    s = scores.float()
    return ((1.0 - p) / p * s * s).sum()


def token_generator(seed: int, step: int, micro: int, layer: int, product: str, dp_rank: int, draw: int = 0,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step, micro-batch, layer, product, DP rank, draw), never
    global RNG state: a resumed run draws the same tokens, and every TP rank of a product the
    same ones (the TP rank is not in the key). DP ranks draw independently (their tokens
    differ anyway)."""
    key = f"wgrad/{seed}/{step}/{micro}/{layer}/{product}/{dp_rank}/{draw}".encode()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1))
    return g
