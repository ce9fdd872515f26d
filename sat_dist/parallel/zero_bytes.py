"""Bytes each rank sends per optimizer step under ZeRO-3, whole-weight and comm-sparse.

The arithmetic behind docs/PERFORMANCE.md's model at 7B/13B (tools/zero_bytes_model.py) and
behind `--sat-comm-sparse auto` (sat_dist.train.engine); tools/bench_step.py measures the
same quantities on a real step. Ring accounting, as NCCL moves them: an all-gather or a
reduce-scatter of a buffer of B bytes sends (dp-1)/dp * B per rank, an all-reduce twice that.

Per micro-batch each SAT weight is gathered for forward and again for backward (ZeRO-3
releases it in between once a model outgrows its live-parameter budget) and its gradient
reduce-scattered; comm-sparse moves the kept rows only, and every rank's share of a
collective is padded to the fullest rank's (sat_dist.parallel.row_sparse_zero), so its
buffer is dp times the largest share (`largest_share`), not the kept rows. Scoring happens
once per step, by the cheaper of its two routes. The embedding, LM head and norms are not
SAT's and move whole either way.
"""

from __future__ import annotations

import functools
import math

from sat_dist.config import ModelConfig

AUTO_MAX_RATIO = 0.75
"""`--sat-comm-sparse auto` (sat_dist.train.engine.comm_sparse_wanted) turns comm-sparse on
only where this model predicts that SAT's weights, gathers, reduces and scoring together
(`sat_ratio`), move at most this fraction of the whole-weight path's bytes at the run's full
omission rates. Comm-sparse has not been timed on a GPU: its gathers run one product ahead
and its reduces asynchronously, but how much of that NCCL overlaps is unmeasured, and it
adds what the bytes do not count (a host read per product and new selection, packing the
kept rows). The only ZeRO-time measurements (CPU, gloo, 7B width, docs/PERFORMANCE.md) sort
at this line: predicted 0.74 (DP 2, omission 0.3,0.3) measured 0.68-0.72 of the dense step's
ZeRO time, a win, and predicted 0.79 (DP 4, one layer, 0.3,0.3, two ranks a core) measured
1.07, a loss; 0.54 and 0.60 (0.5,0.5) won. So 0.75: a saving of a quarter or more of SAT's
bytes, until a multi-GPU measurement replaces it."""

WHOLE_WEIGHT_METRICS = ("maxip", "wanda", "magnitude")
"""Scoring metrics that read whole weights: comm-sparse gathers the four SAT weights whole
for them, once per step."""


def ring(dp: int, nbytes: float) -> float:
    """Bytes one rank sends in an all-gather or reduce-scatter of `nbytes` over dp ranks."""
    return (dp - 1) / dp * nbytes


def scoring_bytes(dp: int, tokens: int, rows: int, h: int, x_bytes: int, w_bytes: int) -> tuple[float, float]:
    """(tokens route, weights route): bytes one rank sends to score `rows` rows of width h
    from `tokens` scored tokens per rank. Tokens: all-gather the tokens, all-reduce the fp32
    products [dp * tokens, rows]; weights: all-gather the rows."""
    by_tokens = (dp - 1) * tokens * h * x_bytes + 2 * ring(dp, dp * tokens * rows * 4)
    by_weights = ring(dp, rows * h * w_bytes)
    return by_tokens, by_weights


@functools.lru_cache(maxsize=None)
def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals] (0 for n <= 1): the integral of
    x * n * phi(x) * Phi(x)^(n-1), by the trapezoid rule on [-9, 9] in steps of 1e-3
    (error under 1e-6: 1/sqrt(pi) = 0.5642 at n = 2; 2.3437 at 64, 2.8269 at 256)."""
    if n <= 1:
        return 0.0
    step, total = 1e-3, 0.0
    for i in range(-9000, 9001):
        x = i * step
        cdf = 0.5 * math.erfc(-x / math.sqrt(2.0))
        total += x * n * math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi) * cdf ** (n - 1)
    return total * step


def largest_share(rows: int, kept: float, parts: int, unit: int = 1) -> float:
    """Expected largest number of kept rows among `parts` equal flat partitions of `rows`
    rows (each holds rows/parts), the kept rows being kept/unit blocks of `unit` contiguous
    rows (an attention unit's rows; 1 for MLP channels) drawn uniformly at random.

    Each partition's count of kept units is hypergeometric (rows/unit units, kept/unit kept,
    rows/(unit*parts) drawn), with mean m and deviation s; the counts sum to the kept units,
    so they are correlated -1/(parts-1). As normals with that covariance, count_q = m +
    s * sqrt(parts/(parts-1)) * (Z_q - mean(Z)), whose expected maximum is m + s *
    sqrt(parts/(parts-1)) * E[max of `parts` standard normals]. Clamped to [kept/parts,
    min(rows/parts, kept)]: a partition inside one unit holds all or none of its rows, and
    then the fullest is (almost surely) whole. Against Monte-Carlo draws of the real flat
    partitions: tests/test_comm_sparse_zero.py::test_largest_share_against_monte_carlo."""
    if parts <= 1:
        return float(kept)
    mean, cap = kept / parts, min(rows / parts, kept)
    if kept <= 0 or kept >= rows:
        return min(mean, cap) if kept > 0 else 0.0
    units, k = rows / unit, kept / unit
    n, p = units / parts, k / units
    var = n * p * (1 - p) * (units - n) / (units - 1) if units > 1 else 0.0
    spread = math.sqrt(parts / (parts - 1)) * expected_max_normal(parts)
    return min(max(unit * (n * p + math.sqrt(var) * spread), mean), cap)


def sat_rows(cfg: ModelConfig, tp: int) -> dict[str, int]:
    """Rows of each SAT weight of one layer on one TP rank (each row h wide)."""
    g, r, d, f = cfg.num_query_groups // tp, cfg.heads_per_group, cfg.head_dim, cfg.ffn_hidden_size // tp
    return {"qkv": g * (r + 2) * d, "proj": g * r * d, "fc1": 2 * f, "fc2": f}


def padded_shares(cfg: ModelConfig, dp: int, tp: int, keep_attn: float, keep_mlp: float) -> dict[str, float]:
    """Rows of each SAT weight one rank's slot holds in comm-sparse's collectives (the
    expected largest share: every share is padded to it). qkv and proj keep whole KV groups
    ((r+2)*d and r*d contiguous rows); fc2 keeps channels; fc1 keeps each channel's gate row j
    and up row f+j, so at an even DP size its first dp/2 partitions hold the gate rows and the
    others the same channels' up rows: its fullest share is fc2's over dp/2 partitions (at an
    odd DP size, approximated as 2f rows with 2k kept)."""
    r, d = cfg.heads_per_group, cfg.head_dim
    rows = sat_rows(cfg, tp)
    f = rows["fc2"]
    fc1 = largest_share(f, f * keep_mlp, dp // 2) if dp % 2 == 0 else largest_share(2 * f, 2 * f * keep_mlp, dp)
    return {"qkv": largest_share(rows["qkv"], rows["qkv"] * keep_attn, dp, (r + 2) * d),
            "proj": largest_share(rows["proj"], rows["proj"] * keep_attn, dp, r * d),
            "fc1": fc1, "fc2": largest_share(f, f * keep_mlp, dp)}


def step_bytes(cfg: ModelConfig, dp: int, tp: int, tokens_per_micro: int, grad_accum: int, keep_attn: float,
               keep_mlp: float, token_stride: int = 8, w_bytes: int = 2, g_bytes: int = 4,
               x_bytes: int = 2, regather: bool = True, metric: str = "activation") -> dict[str, float]:
    """Bytes one rank sends per optimizer step, by phase, for SAT's weights (all layers) and
    for the rest. keep_*: kept fractions (1, 1: a dense step). tokens_per_micro: a rank's
    micro-batch in tokens. regather: the weights are gathered again for backward (False: a
    model small enough for ZeRO-3's reuse distance to keep them). Comm-sparse's gathers and
    reduces move dp slots of the fullest share each (`padded_shares`). metric: SAT's scoring
    metric (activation, fluctuation: the cheaper route; maxip, wanda, magnitude: the weights
    gathered whole; random: nothing)."""
    h = cfg.hidden_size
    rows = sat_rows(cfg, tp)
    whole = sum(rows.values()) * h
    kept = dp * sum(padded_shares(cfg, dp, tp, keep_attn, keep_mlp).values()) * h  # the padded buffer
    L, ga = cfg.num_layers, grad_accum
    out = {
        "forward_gather": L * ga * ring(dp, kept * w_bytes),
        "backward_gather": L * ga * ring(dp, kept * w_bytes) if regather else 0.0,
        "grad_reduce": L * ga * ring(dp, kept * g_bytes),
        "scoring": 0.0,
    }
    if metric in WHOLE_WEIGHT_METRICS:  # the scored module's two weights gathered whole
        attn, mlp = (rows["qkv"] + rows["proj"]) * h, (rows["fc1"] + rows["fc2"]) * h
        out["scoring"] = L * ring(dp, ((attn if keep_attn < 1 else 0) + (mlp if keep_mlp < 1 else 0)) * w_bytes)
    elif (keep_attn < 1 or keep_mlp < 1) and metric != "random":
        scored = -(-tokens_per_micro // token_stride)
        mlp = min(scoring_bytes(dp, scored, rows["fc1"], h, x_bytes, w_bytes))
        attn = min(scoring_bytes(dp, scored, rows["qkv"] // (cfg.heads_per_group + 2), h, x_bytes, w_bytes))
        norms = 2 * ring(dp, (rows["fc2"] + rows["proj"]) * 4)
        out["scoring"] = L * ((mlp if keep_mlp < 1 else 0) + (attn if keep_attn < 1 else 0) + norms)
    vocab = cfg.padded_vocab_size(tp) // tp
    other = (vocab * h * (1 if cfg.tie_word_embeddings else 2) + (2 * L + 1) * h)
    out["other_gather"] = (2 if regather else 1) * ga * ring(dp, other * w_bytes)
    out["other_reduce"] = ga * ring(dp, other * g_bytes)
    out["dense_sat_weights"] = L * ga * ((2 if regather else 1) * ring(dp, whole * w_bytes) + ring(dp, whole * g_bytes))
    return out


def sat_ratio(b: dict[str, float]) -> float:
    """Comm-sparse's bytes for SAT's weights (gathers, reduces, scoring) over the whole-weight
    path's, from a step_bytes result: what `--sat-comm-sparse auto` decides on."""
    sparse = b["forward_gather"] + b["backward_gather"] + b["grad_reduce"] + b["scoring"]
    return sparse / b["dense_sat_weights"] if b["dense_sat_weights"] else 1.0
