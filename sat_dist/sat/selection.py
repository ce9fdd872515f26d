"""Which units a layer keeps this step: keep counts, top-k and temperature sampling."""

from __future__ import annotations

import hashlib

import torch


def keep_count(n: int, omission: float, align: int) -> int:
    """Units kept out of `n` at omission rate `omission`.

    Rate 0 keeps all `n` (dense, whatever the alignment). Otherwise n*(1-omission) is rounded
    DOWN to a multiple of `align`, and is at least `align` (at most n).
    """
    if omission <= 0.0:
        return n
    k = int(n * (1.0 - omission) + 1e-9) // align * align
    return min(n, max(k, align))


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
