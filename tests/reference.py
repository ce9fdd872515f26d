"""Independent references for tests: transformers' Llama modules, and hand-written weight
mappings between their layout and ours (deliberately not using sat_dist.checkpoint.hf)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from sat_dist.config import ModelConfig


def hf_config(cfg: ModelConfig, attn: str = "eager") -> LlamaConfig:
    c = LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False, mlp_bias=False,
    )
    c._attn_implementation = attn
    return c


def causal_mask(s: int) -> torch.Tensor:
    """Additive [1, 1, s, s] mask for eager attention."""
    return torch.full((s, s), float("-inf")).triu(1)[None, None]


def mlp_weights_from_hf(hf_mlp) -> tuple[torch.Tensor, torch.Tensor]:
    """(fc1 [2f, h], fc2 [f, h]) from HF gate/up/down."""
    fc1 = torch.cat((hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight)).detach().clone()
    return fc1, hf_mlp.down_proj.weight.detach().t().contiguous()


def attn_weights_from_hf(hf_attn, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(qkv [G*(r+2)*d, h], proj [G*r*d, h]): for each KV group g, its r query heads, then
    its key head, then its value head; proj is o_proj transposed."""
    d, r, G = cfg.head_dim, cfg.heads_per_group, cfg.num_query_groups
    q, k, v = hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight
    rows = []
    for g in range(G):
        rows.append(q[g * r * d:(g + 1) * r * d])
        rows.append(k[g * d:(g + 1) * d])
        rows.append(v[g * d:(g + 1) * d])
    return torch.cat(rows).detach().clone(), hf_attn.o_proj.weight.detach().t().contiguous()


def rank_micro_batches(ds, consumed: int, gbs: int, mbs: int, dp_rank: int = 0, dp_size: int = 1):
    """The micro-batches (input_ids, labels) DP rank `dp_rank` of `dp_size` trains on in the
    step that starts after `consumed` samples of a single dataset, by the data contract: the
    global batch is samples consumed .. consumed + gbs - 1 of the dataset's order
    (ds.sample), and rank r takes the r-th contiguous gbs / dp_size of them."""
    import numpy as np

    per_rank = gbs // dp_size
    first = consumed + dp_rank * per_rank
    rows = torch.from_numpy(np.stack([ds.sample(g) for g in range(first, first + per_rank)]))
    return [(rows[i:i + mbs, :-1], rows[i:i + mbs, 1:]) for i in range(0, per_rank, mbs)]
