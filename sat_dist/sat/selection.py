"""Which units a layer keeps this step: keep counts, top-k, temperature sampling, and
probability-proportional-to-size sampling with Horvitz-Thompson weights."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Optional

import torch

from sat_dist.config import SATConfig
from sat_dist.sat.schedule import ladder_rates

_EPS = 1e-9  # n * (1 - r) is computed in floating point: 96.0 must not become 95.999...


def keep_count(n: int, omission: float, align: int, sat: Optional[SATConfig] = None,
               kind: str = "mlp") -> int:
    """Units kept out of `n` (one TP partition) at omission rate `omission`.

    Rate 0 keeps all `n` (dense, whatever the alignment). Otherwise the nominal count
    n*(1-omission) is rounded to the NEAREST multiple of `align`, at least `align` and at
    most `n` (a nonzero rate that rounds to `n` runs dense). With `sat` given, a rate on the
    `kind`'s ladder gets its count from `ladder_keep_counts`, which keeps the rungs distinct
    where the partition's unit count allows. Every TP partition holds the same `n`, so every
    TP rank keeps the same count.
    """
    if omission <= 0.0:
        return n
    if sat is not None:
        rates = ladder_rates(sat, kind)
        for r, k in zip(rates, ladder_keep_counts(n, align, rates)):
            if abs(r - omission) <= _EPS:
                return k
    return _nearest(n, omission, align)


def layer_keep_count(n: int, omission: float, align: int, sat: SATConfig, kind: str, layer: int) -> int:
    """keep_count for one layer: with --sat-omission-mlp-layers, the MLP of `layer` runs at its
    own rate, scaled by the rung's fraction (`omission` / the headline omission_mlp), and its
    keep counts come from that rate's own ladder (so its rungs stay distinct too)."""
    rates = sat.mlp_layer_rates if kind == "mlp" else None
    if rates is None or omission <= 0.0:
        return keep_count(n, omission, align, sat, kind)
    own = rates[layer]
    return keep_count(n, own * omission / sat.omission_mlp, align, dataclasses.replace(sat, omission_mlp=own), kind)


def _nearest(n: int, omission: float, align: int) -> int:
    k = int(math.floor(n * (1.0 - omission) / align + 0.5 + _EPS)) * align
    return min(n, max(k, align))


@functools.lru_cache(maxsize=256)
def ladder_keep_counts(n: int, align: int, rates: tuple[float, ...]) -> tuple[int, ...]:
    """Keep counts of `n` units at the ladder's nonzero `rates` (highest first).

    Rounding each rate to the nearest aligned count can give two rungs the same count (the
    rung's rates differ by less than `align` units) and so drop a rung from the ladder: 1376
    MLP channels per partition (Llama-2 7B at TP=8, align 128) at 0.3 and 0.225 both round
    to 1024. So: each rate may round down or up (never further than one `align` step from
    its nominal count); if some such choice makes all counts distinct and below `n` (the
    dense end), the one closest in total to the nominal counts is used (1376 -> 896, 1024,
    1152, 1280); otherwise, when there are fewer aligned counts than rungs (3 KV groups,
    4 rungs), each rate rounds to nearest.
    """
    near = [_nearest(n, r, align) for r in rates]
    if len(set(near + [n])) == len(near) + 1:
        return tuple(near)
    # Shortest path over (rung, candidate count): counts must rise strictly along the rungs.
    # best[k] = (total distance from the nominal counts, counts so far) ending at count k.
    best: dict[int, tuple[float, tuple[int, ...]]] = {-1: (0.0, ())}
    for r in rates:
        c = n * (1.0 - r)
        down = min(n, max(align, int(math.floor(c / align + _EPS)) * align))
        up = min(n, max(align, int(math.ceil(c / align - _EPS)) * align))
        step: dict[int, tuple[float, tuple[int, ...]]] = {}
        for k in {down, up}:
            if k >= n:
                continue
            options = [(cost + abs(k - c), path + (k,)) for prev, (cost, path) in best.items() if prev < k]
            if options:
                step[k] = min(options)
        best = step
    if not best:
        return tuple(near)
    return min(best.values())[1]


def selection_generator(seed: int, step: int, micro: int, layer: int, tp_rank: int, kind: str,
                        device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step, micro-batch, layer, TP rank, kind), never global
    RNG state.

    Every rank holding a copy of the same partition builds the same generator, so all data-
    parallel replicas of a partition draw the same units.
    """
    key = f"{seed}/{step}/{micro}/{layer}/{tp_rank}/{kind}".encode()
    s = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    g = torch.Generator(device=device)
    g.manual_seed(s)
    return g


def select_units(scores: torch.Tensor, k: int, method: str, temperature: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Indices (int64, ascending) of the `k` units kept out of `scores` ([n], >= 0).

    topk: the k largest scores.
    sampling: k draws without replacement with p proportional to exp(s / max(s) / T),
    done exactly by Gumbel-top-k on the logits (one tensor op, no host synchronisation).
    """
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    scores = scores.float()
    if method == "topk":
        keys = scores
    elif method == "sampling":
        # Scores are >= 0; dividing by the max makes T independent of the metric's scale.
        # clamp_min avoids a 0/0 when every score is 0 (then all units are equally likely).
        logits = scores / scores.max().clamp_min(torch.finfo(torch.float32).tiny) / temperature
        u = torch.rand(n, generator=generator, device=scores.device, dtype=torch.float32)
        u = u.clamp_(min=torch.finfo(torch.float32).tiny)
        keys = logits - torch.log(-torch.log(u))
    else:
        raise ValueError(f"unknown selection method {method!r}")
    return torch.topk(keys, k, sorted=False).indices.sort().values


def inclusion_probabilities(scores: torch.Tensor, k: int, floor: float = 0.0) -> torch.Tensor:
    """pi [n] (float64, each in (0, 1], summing to k): (1 - floor) * min(1, c * s_i) + floor * k/n.

    c is chosen so that the first term sums to k ("water filling": units whose share would
    pass 1 are capped at 1 and the rest of the budget is spread over the others in proportion
    to their scores). The mix with the uniform k/n is again a set of inclusion probabilities
    summing to k, and it bounds every unit's Horvitz-Thompson weight 1/pi by n / (k * floor):
    the score proxies a channel's forward contribution, not its gradient, and a channel of
    tiny score can still have a sizeable gradient, which 1/pi would blow up.

    Every unit gets pi > 0 even at floor 0, as an unbiased estimator needs: scores are floored
    at 1e-6 of their mean (all-zero scores give pi = k/n for all).
    """
    n = scores.numel()
    s = scores.double().clamp_min(0.0)
    s = torch.where(s.amax() > 0, s, torch.ones_like(s))  # all zero: uniform
    s = torch.maximum(s, 1e-6 * s.mean())
    desc, order = torch.sort(s, descending=True)
    # With the m largest capped, c_m = (k - m) / sum of the other scores; the right m is the
    # smallest for which the largest uncapped unit stays within 1: c_m * desc[m] <= 1.
    m = torch.arange(k, device=s.device, dtype=torch.float64)
    tail = desc.flip(0).cumsum(0).flip(0)[:k]  # [k]: sum of desc[m:]
    c = (k - m) / tail
    ok = c * desc[:k] <= 1.0 + 1e-12
    first = int(torch.argmax(ok.to(torch.int8)))  # ok[k-1] always holds (tail[k-1] >= desc[k-1])
    pi_desc = torch.clamp(c[first] * desc, max=1.0)
    pi_desc[:first] = 1.0
    pi = torch.empty_like(pi_desc).scatter_(0, order, pi_desc)  # sums to first + c * tail = k
    return pi if floor <= 0 else (1.0 - floor) * pi + floor * (k / n)


def pps_units(scores: torch.Tensor, k: int, generator: torch.Generator,
              floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int64 ascending [k], weights float32 [k] = 1 / pi of those units): exactly `k`
    distinct units, unit i kept with probability pi_i = inclusion_probabilities(scores, k,
    floor)[i].

    Capped units (pi = 1) are kept; the others are drawn by randomized systematic sampling: in
    a seeded random order their probabilities are laid end to end on [0, k'), and the units
    whose intervals hold the points u, u+1, ..., u+k'-1 (u uniform on [0, 1)) are kept. Each
    interval is shorter than 1, so it holds a point with probability exactly its length and
    never two. Scaling a kept unit's contribution by its weight 1/pi makes a sum over the kept
    units an unbiased estimate of the sum over all (Horvitz-Thompson).
    """
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device), torch.ones(n, device=scores.device)
    pi = inclusion_probabilities(scores, k, floor)
    capped = pi >= 1.0
    rest = (~capped).nonzero().squeeze(1)
    k_rest = k - int(capped.sum())
    kept = [capped.nonzero().squeeze(1)]
    if k_rest > 0:
        perm = rest[torch.randperm(rest.numel(), generator=generator, device=scores.device)]
        cum = pi[perm].cumsum(0)
        cum = cum * (k_rest / cum[-1])  # the uncapped budget is k' exactly
        u = torch.rand((), generator=generator, device=scores.device, dtype=torch.float64)
        points = u + torch.arange(k_rest, device=scores.device, dtype=torch.float64)
        pos = torch.searchsorted(cum, points, right=True).clamp_(max=perm.numel() - 1)
        kept.append(perm[pos])
    idx = torch.cat(kept).sort().values
    return idx, (1.0 / pi[idx]).float()
