"""Importance scores of SAT units, computed without grad from the block's input.

Units: an MLP channel j is row j of W_gate and W_up and column j of W_down; an attention
unit is one key/value group (its KV head and the query heads sharing it).

Weights are passed in the model's row-gathered layouts (see sat_dist/model/llama.py):
  fc1 [2n, h]  gate rows then up rows      fc2 [n, h]  = W_down^T
  qkv [G*(r+2)*d, h]  per group: r query heads, then k, then v      o [G*r*d, h] = W_o^T

`reduce(t, op)` combines a partial statistic over the data-parallel group (op "sum" or
"max"; identity in one process). Each metric reduces the statistic that makes the result
exactly what one process would compute on the whole global micro-batch:
  maxip: max over tokens (reduce max);  wanda: per-feature sum of squares (reduce sum);
  activation: per-unit sum of squares of its activation over tokens (reduce sum);
  fluctuation (MLP): per-unit sum and sum of squares of its activation, and the token count
    (reduce sum), from which the mean and the centred sum of squares follow;
  magnitude: weights only, identical on every replica (no reduce);
  random: drawn from the seeded generator, identical on every replica (no reduce).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Reduce = Callable[[torch.Tensor, str], torch.Tensor]


def no_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    return t


def _tokens(x: torch.Tensor, token_stride: int) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])  # [tokens, h]
    return x[::token_stride] if token_stride > 1 else x


def _feature_norms(x: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    """L2 norm over all tokens (all DP replicas) of each input feature: [h]."""
    sq = x.float().pow(2).sum(0)
    return reduce(sq, "sum").sqrt()


def _scored_activations(x: torch.Tensor, fc1: torch.Tensor, n: int, token_stride: int,
                        activations: torch.Tensor | None) -> torch.Tensor:
    """a_j(t) = silu(x_t.w_gate_j) * (x_t.w_up_j) on the scored tokens, fp32 [tokens, n]: taken
    from `activations` when the caller has them (the dense forward of --sat-sparse-pass
    backward), else computed from x."""
    if activations is not None:
        return _tokens(activations, token_stride).float()
    xs = _tokens(x, token_stride).float()
    return F.silu(xs @ fc1[:n].float().t()) * (xs @ fc1[n:].float().t())


@torch.no_grad()
def channel_moments(a: torch.Tensor, reduce: Reduce = no_reduce
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean [n], centred sum of squares [n], token count []) over the tokens of a [tokens, n]
    and of every DP replica: one reduce of the sums and the count, so the result is the one-
    process value over the global micro-batch (up to fp32 summation order)."""
    a = a.float()
    n = a.shape[-1]
    stats = torch.cat((a.sum(0), a.pow(2).sum(0), a.new_full((1,), float(a.shape[0]))))
    stats = reduce(stats, "sum")
    s1, s2, count = stats[:n], stats[n:2 * n], stats[2 * n]
    mean = s1 / count
    # s2 - s1^2/count can round below 0 for a channel that is nearly constant
    return mean, (s2 - s1 * mean).clamp_min(0.0), count


@torch.no_grad()
def mlp_scores_and_mean(metric: str, x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
                        reduce: Reduce = no_reduce, generator: torch.Generator | None = None,
                        token_stride: int = 1, activations: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [n], mean activation [n] over the scored tokens) of the MLP channels held
    here: what --sat-compensation mean needs. One reduce for activation and fluctuation."""
    n = fc2.shape[0]
    a = _scored_activations(x, fc1, n, token_stride, activations)
    mean, centred, count = channel_moments(a, reduce)
    if metric == "fluctuation":
        return centred.sqrt() * fc2.float().norm(dim=1), mean
    if metric == "activation":  # the sum of squares is centred + count * mean^2
        return (centred + count * mean.pow(2)).sqrt() * fc2.float().norm(dim=1), mean
    return mlp_scores(metric, x, fc1, fc2, reduce, generator, token_stride), mean


@torch.no_grad()
def mlp_scores(metric: str, x: torch.Tensor, fc1: torch.Tensor | None, fc2: torch.Tensor | None,
               reduce: Reduce = no_reduce, generator: torch.Generator | None = None,
               token_stride: int = 1, activations: torch.Tensor | None = None,
               down_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [n] of the n MLP channels held here. x: [..., h] input of the MLP.
    activations: the channels' activations [..., n] when the caller has them already (the
    dense forward of --sat-sparse-pass backward); activation and fluctuation then use them
    instead of recomputing the gate and up products. down_norms [n]: the norms of W_down's
    columns when the caller has them (comm-sparse ZeRO-3, which has no whole weights; with
    activations given, fc1 and fc2 may then be None)."""
    n = fc2.shape[0] if down_norms is None else down_norms.shape[0]
    if metric == "random":
        return torch.rand(n, generator=generator, device=fc2.device)
    if metric == "magnitude":
        gate, up = fc1[:n].float(), fc1[n:].float()
        return (gate.pow(2).sum(1) + up.pow(2).sum(1) + fc2.float().pow(2).sum(1)).sqrt()
    xs = _tokens(x, token_stride)
    if metric == "maxip":
        # fp32 products: bf16 rounding before the max made many exact ties, which top-k then
        # broke towards low indices. Cheap at the token stride.
        ip = (xs.float() @ fc1[:n].float().t()).abs()  # [tokens, n]
        return reduce(ip.amax(0), "max")
    if metric == "wanda":
        norms = _feature_norms(xs, reduce)  # [h]
        w = fc1.float().abs()
        return w[:n] @ norms + w[n:] @ norms
    if metric in ("activation", "fluctuation"):
        # Channel j adds a_j(t) * W_down[:, j] to the output, a_j = silu(x.w_gate_j) * (x.w_up_j),
        # so ||a_j|| over tokens times ||W_down[:, j]|| is the norm of exactly what omitting
        # j removes. maxip sees only the gate's pre-activation.
        a = _scored_activations(x, fc1, n, token_stride, activations)  # [tokens, n]
        w_down = fc2.float().norm(dim=1) if down_norms is None else down_norms
        if metric == "fluctuation":
            # FLAP's fluctuation: what omitting j removes once its mean is added back
            return channel_moments(a, reduce)[1].sqrt() * w_down
        return reduce(a.pow(2).sum(0), "sum").sqrt() * w_down
    raise ValueError(f"unknown importance metric {metric!r}")


@torch.no_grad()
def attention_scores(metric: str, x: torch.Tensor, qkv: torch.Tensor | None, o: torch.Tensor | None,
                     heads_per_group: int, head_dim: int, reduce: Reduce = no_reduce,
                     generator: torch.Generator | None = None,
                     token_stride: int = 1, values: torch.Tensor | None = None,
                     out_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [G] of the G attention units (KV groups) held here. x: [..., h] input of the
    attention projections. values [tokens, G*d] (the scored tokens' value projections) and
    out_norms [G] (each group's W_o norm): what activation needs, when the caller has them
    without whole weights (comm-sparse ZeRO-3; qkv and o may then be None)."""
    r, d = heads_per_group, head_dim
    if values is not None and metric in ("activation", "fluctuation"):
        G = out_norms.shape[0]
        v = values.float().view(-1, G, d)
        return reduce(v.pow(2).sum((0, 2)), "sum").sqrt() * out_norms
    h = qkv.shape[1]
    groups = qkv.view(-1, (r + 2) * d, h)  # [G, (r+2)d, h]
    G = groups.shape[0]
    if metric == "random":
        return torch.rand(G, generator=generator, device=qkv.device)
    if metric == "magnitude":
        w_in = groups.float().pow(2).sum((1, 2))
        w_out = o.view(G, r * d, h).float().pow(2).sum((1, 2))
        return (w_in + w_out).sqrt()
    xs = _tokens(x, token_stride)
    if metric == "maxip":
        wq = groups[:, : r * d].reshape(G * r * d, h)
        q = (xs.float() @ wq.float().t()).view(-1, G, r * d)  # [tokens, G, r*d], fp32 as above
        return reduce(q.norm(dim=2).amax(0), "max")
    if metric == "wanda":
        norms = _feature_norms(xs, reduce)  # [h]
        return groups.float().abs().sum(1) @ norms
    if metric in ("activation", "fluctuation"):
        # fluctuation is an MLP metric; attention units are scored as by activation.
        # A group's output is W_o,g times a convex mix (softmax weights) of its values, so
        # ||v_g|| over tokens times ||W_o,g|| bounds what omitting it removes; the exact
        # output would need every token's keys and values, i.e. the dense cost.
        wv = groups[:, (r + 1) * d:].reshape(G * d, h)
        v = (xs.float() @ wv.float().t()).view(-1, G, d)  # [tokens, G, d]
        w_out = o.view(G, r * d, h).float().pow(2).sum((1, 2)).sqrt()
        return reduce(v.pow(2).sum((0, 2)), "sum").sqrt() * w_out
    raise ValueError(f"unknown importance metric {metric!r}")
