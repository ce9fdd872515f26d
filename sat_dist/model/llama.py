"""Llama-2 decoder on LOCAL tensor-parallel shards, with SAT inside the MLP and attention.

Plain PyTorch: at TP size 1 (the default `ParallelComm`) this is the single-device model.
Tensor parallelism only changes the shard sizes and the `comm` hooks (megatron-core's
copy-to / reduce-from mappings and vocabulary-parallel cross entropy).

Parameters live directly on the module whose forward uses them (ZeRO-3 gathers a module's
own parameters before its forward), in row-gathered layouts so that SAT's kept units are
contiguous row blocks (shapes per TP rank; h hidden, f = ffn/tp, G = kv groups/tp,
r = query heads per group, d = head dim):
  mlp.fc1_weight   [2f, h]        gate rows, then up rows          (HF gate_proj, up_proj)
  mlp.fc2_weight   [f, h]         W_down transposed                (HF down_proj.T)
  attn.qkv_weight  [G*(r+2)*d, h] per group: r query heads, k, v   (HF q/k/v_proj)
  attn.proj_weight [G*r*d, h]     W_o transposed                   (HF o_proj.T)
How each parameter is split over TP ranks (and padded, and decayed) is declared once, in
sat_dist.model.layout; everything else reads it from there.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sat_dist.config import ModelConfig, SATConfig
from sat_dist.errors import SatDistError
from sat_dist.model.comm import SINGLE_PROCESS, ParallelComm
from sat_dist.model.layout import layout_of
from sat_dist.model.rope import inverse_frequencies, rope_scaling_key
from sat_dist.model.sat_state import UNSETTLED, SATState
from sat_dist.model.sparse_ops import backward_sparse_mlp, kept_linear, sampled_linear, unit_rows
from sat_dist.sat.compensation import omitted_mean_bias
from sat_dist.sat.importance import attention_scores, mlp_scores, mlp_scores_and_mean


def check_layer_rates(cfg: ModelConfig, sat: Optional[SATConfig]) -> None:
    """--sat-omission-mlp-layers names one rate per layer of this model, and
    --sat-wgrad-tokens-linears four keep fractions per layer."""
    rates = sat.mlp_layer_rates if sat is not None else None
    if rates is not None and len(rates) != cfg.num_layers:
        raise SatDistError(f"--sat-omission-mlp-layers: {len(rates)} rates for a model of {cfg.num_layers} "
                           f"layers; give one rate per layer, layer 0 first")
    keeps = sat.wgrad_linear_keeps if sat is not None else None
    if keeps is not None and len(keeps) != 4 * cfg.num_layers:
        raise SatDistError(f"--sat-wgrad-tokens-linears: {len(keeps)} keep fractions for a model of {cfg.num_layers} "
                           f"layers; give 4 per layer ({4 * cfg.num_layers}: q/k/v, o, gate/up, down, layer 0 "
                           f"first)")


def check_tensor_parallel(cfg: ModelConfig, tp: int, align_mlp: int = 1) -> None:
    """Raise one clear error if `tp` cannot shard `cfg`."""
    if tp < 1:
        raise SatDistError(f"--tensor-model-parallel-size: got {tp}; allowed: an integer >= 1")
    fix = "choose a tensor-model-parallel size that divides it"
    if cfg.num_attention_heads % tp:
        raise SatDistError(f"--tensor-model-parallel-size {tp} does not divide num_attention_heads="
                           f"{cfg.num_attention_heads} of model {cfg.name}; {fix}")
    if cfg.num_query_groups % tp:
        raise SatDistError(f"--tensor-model-parallel-size {tp} does not divide num_query_groups (KV heads)="
                           f"{cfg.num_query_groups} of model {cfg.name}; {fix}")
    if cfg.ffn_hidden_size % tp or cfg.ffn_hidden_size // tp < align_mlp:
        raise SatDistError(f"--tensor-model-parallel-size {tp} splits ffn_hidden_size={cfg.ffn_hidden_size} "
                           f"of model {cfg.name} into partitions that are not whole or smaller than "
                           f"the SAT MLP alignment {align_mlp}; {fix} or lower --sat-align-mlp")
    if cfg.padded_vocab_size(tp) % tp:
        raise SatDistError(f"--tensor-model-parallel-size {tp} does not divide the padded vocabulary "
                           f"{cfg.padded_vocab_size(tp)}; change make_vocab_size_divisible_by")


def _init_weight(*shape: int, std: float) -> nn.Parameter:
    # Initialised in the owning module's constructor: under DeepSpeed's zero.Init a module's
    # parameters are partitioned as soon as its constructor returns.
    return nn.Parameter(torch.empty(*shape).normal_(0.0, std))


class RMSNorm(nn.Module):
    def __init__(self, h: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32 as transformers' LlamaRMSNorm, through torch's own op: one fused kernel on
        # CUDA where the spelled-out form ran four over the activations.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


@functools.lru_cache(maxsize=8)
def rotary_tables(seq: int, head_dim: int, theta: float, device, scaling: tuple | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq, d] in Hugging Face's half-rotation convention, computed in fp32 and
    stored in `dtype` (the activations'); `scaling`: rope_scaling_key(cfg.rope_scaling).
    Cached: every layer of every micro-batch asks for the same tables (read-only)."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling, device)
    freqs = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [.., s, d] rotated by tables in x's dtype: transformers' convention (bf16 stays bf16,
    no fp32 round trip of q and k)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class SATAttention(nn.Module):
    """Causal self-attention whose units are KV groups; omitted groups are not computed."""

    def __init__(self, cfg: ModelConfig, layer: int, sat: SATState, comm: ParallelComm):
        super().__init__()
        self.h, self.d, self.r = cfg.hidden_size, cfg.head_dim, cfg.heads_per_group
        self.groups = cfg.num_query_groups // comm.tp_size
        self.layer, self.sat, self.comm, self.theta = layer, sat, comm, cfg.rope_theta
        self.rope_scaling = rope_scaling_key(cfg.rope_scaling)
        std = cfg.init_method_std
        self.qkv_weight = _init_weight(self.groups * (self.r + 2) * self.d, self.h, std=std)
        self.proj_weight = _init_weight(self.groups * self.r * self.d, self.h, std=std)
        self.row_zero = None
        """Comm-sparse ZeRO-3 (sat_dist.parallel.row_sparse_zero), or None: the weights are
        then used whole, as DeepSpeed gathered them."""
        self.row_weights = ()
        """(qkv, proj) for row_zero, held as plain references: read as module attributes
        inside DeepSpeed's forward, ZeRO-3 would gather them whole (and from then on gather
        them with the decoder layer every step, as 'external' parameters)."""

    def use_row_zero(self, zero) -> None:
        # In every step, also those that keep all units: were DeepSpeed to gather the
        # weights in some steps only, its prefetcher would follow a module order that
        # changes from step to step.
        self.row_zero, self.row_weights = zero, (self.qkv_weight, self.proj_weight)

    def _rows(self, i: int, kept: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The weight rows of kept groups `kept` in qkv (i=0) or proj (i=1); None: all."""
        return None if kept is None else unit_rows(kept, ((self.r + 2) * self.d, self.r * self.d)[i])

    def row_products(self) -> list:
        """[(weight, peek, layer)] of qkv and proj for RowSparseZero.register_order: peek() ->
        (rows, selection) once this micro-batch's selection is settled, else UNSETTLED."""
        def peek(i):
            kept = self.sat.peek(self.layer, "attn", self.groups)
            return kept if kept is UNSETTLED else (self._rows(i, kept), kept)
        return [(w, (lambda i=i: peek(i)), self.layer) for i, w in enumerate(self.row_weights)]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # x [b, s, h]; attn_mask bool [b, 1, s, s] (True: may attend) or None: causal;
        # position_ids [b, s] or None: 0..s-1
        b, s, h = x.shape
        r, d = self.r, self.d
        zero = self.row_zero
        if zero is None:
            def score(gen, stride):
                return attention_scores(self.sat.cfg.metric, x, self.qkv_weight, self.proj_weight, r, d,
                                        self.comm.reduce_over_dp, gen, stride)
        else:
            qkv_w, proj_w = self.row_weights

            def score(gen, stride):
                return zero.attention_scores(x, qkv_w, proj_w, r, d, self.comm.reduce_over_dp, gen, stride)
        kept = self.sat.kept_units(self.layer, "attn", self.groups, x.device, score)
        # Weight gradients from a sample of the tokens (None: from all): qkv's output and
        # proj's input are the features TP splits.
        s_qkv = self.sat.wgrad_sampler(self.layer, "qkv", "dy")
        s_proj = self.sat.wgrad_sampler(self.layer, "proj", "x")
        x = self.comm.copy_to_tp(x)
        if zero is not None:
            g = self.groups if kept is None else kept.numel()
            qkv = zero.linear(x, qkv_w, self._rows(0, kept), sampler=s_qkv, selection=kept)
        elif kept is None:
            g = self.groups
            qkv = sampled_linear(x, self.qkv_weight, s_qkv)
        else:
            g = kept.numel()  # kept groups on this rank
            qkv = kept_linear(x, self.qkv_weight, kept, unit_rows=(r + 2) * d, sampler=s_qkv)
        qkv = qkv.view(b, s, g, r + 2, d)
        q = qkv[:, :, :, :r].reshape(b, s, g * r, d).transpose(1, 2)  # [b, g*r, s, d]
        k = qkv[:, :, :, r].transpose(1, 2)  # [b, g, s, d]
        v = qkv[:, :, :, r + 1].transpose(1, 2)  # [b, g, s, d]
        cos, sin = rotary_tables(s, d, self.theta, x.device, self.rope_scaling, qkv.dtype)
        if position_ids is not None:
            # Positions restart inside the sample but never exceed s - 1: the s-row tables
            # cover them.
            cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)  # [b, 1, s, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = r > 1
        if attn_mask is not None and gqa:
            # SDPA's GQA path with a mask runs the math kernel, which holds [b, heads, s, s]
            # scores (out of memory at seq 4096 for Llama-3-8B); K/V expanded to the query
            # heads (linear in s) keep the memory-efficient kernel.
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)  # [b, g*r, s, d]
            gqa = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                             enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(b, s, g * r * d)  # [b, s, g*r*d]
        if zero is not None:
            y = zero.linear(out, proj_w, self._rows(1, kept), kept_in=True, sampler=s_proj, selection=kept)
        elif kept is None:
            y = sampled_linear(out, self.proj_weight, s_proj, kept_in=True)  # [b, s, h] partial over TP
        else:
            y = kept_linear(out, self.proj_weight, kept, unit_rows=r * d, kept_in=True, sampler=s_proj)
        return self.comm.reduce_from_tp(y)


class SATMLP(nn.Module):
    """SwiGLU MLP whose units are channels; omitted channels are not computed."""

    def __init__(self, cfg: ModelConfig, layer: int, sat: SATState, comm: ParallelComm):
        super().__init__()
        self.h, self.f = cfg.hidden_size, cfg.ffn_hidden_size // comm.tp_size
        self.layer, self.sat, self.comm = layer, sat, comm
        self.fc1_weight = _init_weight(2 * self.f, self.h, std=cfg.init_method_std)
        self.fc2_weight = _init_weight(self.f, self.h, std=cfg.init_method_std)
        self.row_zero = None
        """Comm-sparse ZeRO-3 (sat_dist.parallel.row_sparse_zero), or None: the weights are
        then used whole, as DeepSpeed gathered them."""
        self.row_weights = ()
        """(fc1, fc2) for row_zero, held as plain references (see SATAttention's)."""

    def use_row_zero(self, zero) -> None:
        self.row_zero, self.row_weights = zero, (self.fc1_weight, self.fc2_weight)  # every step, as attention's

    def _rows(self, i: int, kept: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The weight rows of kept channels `kept` in fc1 (i=0: gate rows, then up rows) or
        fc2 (i=1); None: all."""
        if kept is None or i == 1:
            return kept
        return torch.cat((kept, kept + self.f))

    def row_products(self) -> list:
        """[(weight, peek, layer)] of fc1 and fc2 (see SATAttention's)."""
        def peek(i):
            kept = self.sat.peek(self.layer, "mlp", self.f)
            return kept if kept is UNSETTLED else (self._rows(i, kept), kept)
        return [(w, (lambda i=i: peek(i)), self.layer) for i, w in enumerate(self.row_weights)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [b, s, h]
        if self.row_zero is not None:
            return self._forward_row_sparse(x)
        if self.sat.mlp_backward_only:
            return self._forward_dense_backward_sparse(x)
        compensate = self.sat.compensate_mlp
        score = mlp_scores_and_mean if compensate else mlp_scores
        kept = self.sat.kept_units(
            self.layer, "mlp", self.f, x.device,
            lambda gen, stride: score(
                self.sat.cfg.metric, x, self.fc1_weight, self.fc2_weight,
                self.comm.reduce_over_dp, gen, stride))
        s1, s2 = self._samplers()
        x = self.comm.copy_to_tp(x)
        if kept is None:
            gate, up = sampled_linear(x, self.fc1_weight, s1).chunk(2, dim=-1)  # [b, s, f] each
            return self.comm.reduce_from_tp(sampled_linear(F.silu(gate) * up, self.fc2_weight, s2, kept_in=True))
        # Channel j is row j (gate) and row f + j (up) of fc1: one product for both.
        gate, up = kept_linear(x, self.fc1_weight, torch.cat((kept, kept + self.f)),
                               sampler=s1).chunk(2, dim=-1)  # [b, s, k]
        y = kept_linear(F.silu(gate) * up, self.fc2_weight, kept, kept_in=True, sampler=s2)  # [b, s, h] partial
        mean = self.sat.selection_mean(self.layer, "mlp") if compensate else None
        if mean is not None:
            # A constant of the step: the omitted channels' weights get no gradient from it.
            y = y + omitted_mean_bias(mean, kept, self.fc2_weight).to(y.dtype)  # [h] partial over TP
        return self.comm.reduce_from_tp(y)

    def _samplers(self):
        """The weight gradients' token samplers of fc1 and fc2 this micro-batch (None: exact);
        fc1's output and fc2's input are the features TP splits."""
        return self.sat.wgrad_sampler(self.layer, "fc1", "dy"), self.sat.wgrad_sampler(self.layer, "fc2", "x")

    def _forward_row_sparse(self, x: torch.Tensor) -> torch.Tensor:
        # Under comm-sparse ZeRO-3 only the kept rows are gathered, and only their gradients
        # reduced (no compensation, no dense forward: sat_dist.parallel.row_sparse_zero).
        zero = self.row_zero
        fc1, fc2 = self.row_weights
        kept = self.sat.kept_units(
            self.layer, "mlp", self.f, x.device,
            lambda gen, stride: zero.mlp_scores(x, fc1, fc2, self.comm.reduce_over_dp, gen, stride))
        s1, s2 = self._samplers()
        x = self.comm.copy_to_tp(x)
        gate, up = zero.linear(x, fc1, self._rows(0, kept), sampler=s1, selection=kept).chunk(2, dim=-1)  # [b, s, k]
        y = zero.linear(F.silu(gate) * up, fc2, kept, kept_in=True, sampler=s2,
                        selection=kept)  # [b, s, h] partial over TP
        return self.comm.reduce_from_tp(y)

    def _forward_dense_backward_sparse(self, x: torch.Tensor) -> torch.Tensor:
        # The selection is made inside the dense forward, from its own activations (no
        # extra products); the backward runs over the kept channels only.
        def select(a: torch.Tensor):  # a [b, s, f]: this partition's channel activations
            kept = self.sat.kept_units(
                self.layer, "mlp", self.f, x.device,
                lambda gen, stride: mlp_scores(
                    self.sat.cfg.metric, x, self.fc1_weight, self.fc2_weight,
                    self.comm.reduce_over_dp, gen, stride, activations=a))
            weights = None if kept is None else self.sat.selection_weights(self.layer, "mlp")
            return kept, weights
        x = self.comm.copy_to_tp(x)
        y = backward_sparse_mlp(x, self.fc1_weight, self.fc2_weight, select,
                                exact_input_grad=self.sat.mlp_exact_input_grad)  # [b, s, h] partial over TP
        return self.comm.reduce_from_tp(y)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, sat: SATState, comm: ParallelComm):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attention = SATAttention(cfg, layer, sat, comm)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SATMLP(cfg, layer, sat, comm)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        attn, mlp = self.self_attention, self.mlp
        # Under comm-sparse ZeRO-3 the SAT modules gather their kept rows themselves: calling
        # their forward directly skips DeepSpeed's module hooks, which would gather the
        # weights whole.
        if attn.row_zero is not None:
            attn = attn.forward
        if mlp.row_zero is not None:
            mlp = mlp.forward
        x = x + attn(self.input_layernorm(x), attn_mask, position_ids)
        return x + mlp(self.pre_mlp_layernorm(x))


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split over TP ranks."""

    def __init__(self, vocab_local: int, h: int, comm: ParallelComm, std: float):
        super().__init__()
        self.comm = comm
        self.start = comm.tp_rank * vocab_local
        self.weight = _init_weight(vocab_local, h, std=std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [b, s]
        if self.comm.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.comm.reduce_from_tp(out)  # [b, s, h]


class OutputLayer(nn.Module):
    """LM head, column-parallel over the vocabulary; padded vocabulary entries are masked
    out of the softmax so that the loss equals an unpadded model's."""

    def __init__(self, vocab_local: int, h: int, vocab_size: int, comm: ParallelComm, std: float,
                 sat: SATState | None = None, layer: int = 0):
        super().__init__()
        self.comm, self.sat, self.layer = comm, sat, layer
        self.weight = _init_weight(vocab_local, h, std=std)
        self.valid = max(0, min(vocab_local, vocab_size - comm.tp_rank * vocab_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [b, s, h] -> [b, s, V/tp]
        # --sat-wgrad-tokens-head: the head's weight gradient from a sample of the tokens
        sampler = None if self.sat is None else self.sat.wgrad_sampler(self.layer, "head", "dy")
        logits = sampled_linear(self.comm.copy_to_tp(x), self.weight, sampler)
        if self.valid < logits.shape[-1]:
            pad = torch.arange(logits.shape[-1], device=logits.device) >= self.valid
            logits = logits.masked_fill(pad, float("-inf"))
        return logits


def document_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [b, 1, s, s] from document indices [b, s]: query i may attend key j iff j <= i and
    both are in the same document (sat_dist.data.documents)."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()  # [s, s]
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)  # [b, s, s]
    return (same & causal).unsqueeze(1)


class LlamaModel(nn.Module):
    """Llama decoder LM on local shards. forward(ids) -> local logits; with labels -> per-token loss."""

    def __init__(self, cfg: ModelConfig, sat: SATState | None = None,
                 comm: ParallelComm = SINGLE_PROCESS, recompute: bool = False):
        super().__init__()
        cfg.validate()
        sat = sat if sat is not None else SATState(None, comm)
        check_tensor_parallel(cfg, comm.tp_size, sat.align("mlp"))
        check_layer_rates(cfg, sat.cfg)
        self.cfg, self.sat, self.comm, self.recompute = cfg, sat, comm, recompute
        vocab_local = cfg.padded_vocab_size(comm.tp_size) // comm.tp_size
        std = cfg.init_method_std
        self.embedding = VocabParallelEmbedding(vocab_local, cfg.hidden_size, comm, std)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, sat, comm) for i in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output_layer = OutputLayer(vocab_local, cfg.hidden_size, cfg.vocab_size, comm, std, sat, cfg.num_layers)
        if cfg.tie_word_embeddings:
            self.output_layer.weight = self.embedding.weight
        for name, p in self.named_parameters():
            # Megatron's attributes: DeepSpeed's gradient norm counts a sharded parameter on
            # every TP rank and a replicated one (the norms) only once.
            layout = layout_of(name)
            if not layout.replicated:
                p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, layout.partition_dim, 1

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """ids, labels [b, s]; position_ids [b, s] (None: 0..s-1); segment_ids [b, s]: document
        of each token, attention stays inside it (None: plain causal attention)."""
        # Without segments no mask is made: SDPA's is_causal path stays the dense fast path.
        attn_mask = None if segment_ids is None else document_attention_mask(segment_ids)  # [b, 1, s, s]
        x = self.embedding(ids)  # [b, s, h]
        for layer in self.layers:
            if self.recompute and torch.is_grad_enabled():
                x = checkpoint(layer, x, attn_mask, position_ids, use_reentrant=False)
            else:
                x = layer(x, attn_mask, position_ids)
        logits = self.output_layer(self.final_layernorm(x))  # [b, s, V/tp]
        if labels is None:
            return logits
        return self.comm.vocab_cross_entropy(logits, labels)  # [b, s]
