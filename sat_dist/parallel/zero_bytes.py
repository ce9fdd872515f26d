"""Bytes each rank sends per optimizer step under ZeRO-3, whole-weight and comm-sparse.

The arithmetic behind docs/PERFORMANCE.md's model at 7B/13B (tools/zero_bytes_model.py);
tools/bench_step.py measures the same quantities on a real step. Ring accounting, as NCCL
moves them: an all-gather or a reduce-scatter of a buffer of B bytes sends (dp-1)/dp * B
per rank, an all-reduce twice that.

Per micro-batch each SAT weight is gathered for forward and again for backward (ZeRO-3
releases it in between once a model outgrows its live-parameter budget) and its gradient
reduce-scattered; comm-sparse moves the kept rows only (the mean share: padding to the
fullest rank adds up to one row per rank). Scoring happens once per step, by the cheaper of
its two routes (sat_dist.parallel.row_sparse_zero). The embedding, LM head and norms are
not SAT's and move whole either way.
"""

from __future__ import annotations

from sat_dist.config import ModelConfig


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


def sat_rows(cfg: ModelConfig, tp: int) -> dict[str, int]:
    """Rows of each SAT weight of one layer on one TP rank (each row h wide)."""
    g, r, d, f = cfg.num_query_groups // tp, cfg.heads_per_group, cfg.head_dim, cfg.ffn_hidden_size // tp
    return {"qkv": g * (r + 2) * d, "proj": g * r * d, "fc1": 2 * f, "fc2": f}


def step_bytes(cfg: ModelConfig, dp: int, tp: int, tokens_per_micro: int, grad_accum: int, keep_attn: float,
               keep_mlp: float, token_stride: int = 8, w_bytes: int = 2, g_bytes: int = 4,
               x_bytes: int = 2, regather: bool = True) -> dict[str, float]:
    """Bytes one rank sends per optimizer step, by phase, for SAT's weights (all layers) and
    for the rest. keep_*: kept fractions (1, 1: a dense step). tokens_per_micro: a rank's
    micro-batch in tokens. regather: the weights are gathered again for backward (False: a
    model small enough for ZeRO-3's reuse distance to keep them)."""
    h = cfg.hidden_size
    rows = sat_rows(cfg, tp)
    whole = sum(rows.values()) * h
    kept = ((rows["qkv"] + rows["proj"]) * keep_attn + (rows["fc1"] + rows["fc2"]) * keep_mlp) * h
    L, ga = cfg.num_layers, grad_accum
    out = {
        "forward_gather": L * ga * ring(dp, kept * w_bytes),
        "backward_gather": L * ga * ring(dp, kept * w_bytes) if regather else 0.0,
        "grad_reduce": L * ga * ring(dp, kept * g_bytes),
        "scoring": 0.0,
    }
    if keep_attn < 1 or keep_mlp < 1:
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
