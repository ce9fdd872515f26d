"""SAT Llama blocks against transformers' LlamaMLP / LlamaAttention (fp32).

Omission 0: equal to transformers. Omission > 0: equal to a transformers block whose omitted
units are zeroed by hand; omitted units get exactly zero gradient; the products are smaller.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRotaryEmbedding

from sat_dist.config import ModelConfig, SATConfig
from sat_dist.model.llama import SATMLP, SATAttention
from sat_dist.model.sat_state import SATState
from tests.reference import attn_weights_from_hf, causal_mask, hf_config, mlp_weights_from_hf

MHA = ModelConfig(hidden_size=48, ffn_hidden_size=256, num_attention_heads=6, num_query_groups=6, vocab_size=64)
GQA = ModelConfig(hidden_size=48, ffn_hidden_size=256, num_attention_heads=6, num_query_groups=2, vocab_size=64)
B, S = 2, 10


class MatmulShapes(TorchDispatchMode):
    """Records the operand shapes of every matrix product, forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            self.shapes.append(tuple(tuple(m.shape) for m in mats[-2:]))
        return func(*args, **(kwargs or {}))


def _sat(rate_attn=0.0, rate_mlp=0.0, **kw):
    state = SATState(SATConfig(align_mlp=32, align_attn=1, token_stride=1, **kw).validate())
    state.set_step(3, 0, attn=rate_attn, mlp=rate_mlp)
    return state


def _hf_mlp(cfg):
    torch.manual_seed(0)
    return LlamaMLP(hf_config(cfg)).float()


def _ours_mlp(cfg, hf, state):
    m = SATMLP(cfg, 0, state, state.comm)
    fc1, fc2 = mlp_weights_from_hf(hf)
    with torch.no_grad():
        m.fc1_weight.copy_(fc1)
        m.fc2_weight.copy_(fc2)
    return m


def _run(module, x, *args):
    x = x.clone().requires_grad_(True)
    y = module(x, *args)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), x.grad


def test_mlp_dense_equals_transformers():
    hf = _hf_mlp(MHA)
    ours = _ours_mlp(MHA, hf, _sat())
    x = torch.randn(B, S, MHA.hidden_size)
    y_ref, dx_ref = _run(hf, x)
    y, dx = _run(ours, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=0)
    g_fc1 = torch.cat((hf.gate_proj.weight.grad, hf.up_proj.weight.grad))
    torch.testing.assert_close(ours.fc1_weight.grad, g_fc1, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.fc2_weight.grad, hf.down_proj.weight.grad.t(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("metric", ["maxip", "wanda", "magnitude", "random"])
def test_mlp_sparse_equals_zeroed_dense(metric):
    hf = _hf_mlp(MHA)
    state = _sat(rate_mlp=0.25, metric=metric)
    ours = _ours_mlp(MHA, hf, state)
    x = torch.randn(B, S, MHA.hidden_size)
    with MatmulShapes() as rec:
        y, dx = _run(ours, x)
    kept = state.selected[(0, "mlp")]
    f = MHA.ffn_hidden_size
    assert kept.numel() == 192  # 256 * (1 - 0.25), a multiple of align 32
    omitted = torch.ones(f, dtype=torch.bool)
    omitted[kept] = False

    with torch.no_grad():  # the reference: a dense block with the omitted channels zeroed
        hf.gate_proj.weight[omitted] = 0
        hf.up_proj.weight[omitted] = 0
        hf.down_proj.weight[:, omitted] = 0
    y_ref, dx_ref = _run(hf, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=0)
    gate_g, up_g = ours.fc1_weight.grad.chunk(2)
    torch.testing.assert_close(gate_g[kept], hf.gate_proj.weight.grad[kept], atol=1e-5, rtol=0)
    torch.testing.assert_close(up_g[kept], hf.up_proj.weight.grad[kept], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.fc2_weight.grad[kept], hf.down_proj.weight.grad.t()[kept], atol=1e-5, rtol=0)
    for g in (gate_g, up_g, ours.fc2_weight.grad):
        assert torch.count_nonzero(g[omitted]) == 0

    # Forward and backward multiply only kept channels (192; 2*192 for gate and up). The one
    # product with all 256 channels is maxip's scoring of the gate, [tokens, h] x [h, 256].
    scoring = [s for s in rec.shapes if f in {d for m in s for d in m}]
    training = [s for s in rec.shapes if s not in scoring]
    assert scoring == ([((B * S, MHA.hidden_size), (MHA.hidden_size, f))] if metric == "maxip" else [])
    assert len(training) == 6  # 2 forward + 4 backward products
    dims = {d for s in training for m in s for d in m}
    assert {192, 384} <= dims, training


def _hf_attn(cfg):
    torch.manual_seed(1)
    return LlamaAttention(hf_config(cfg), layer_idx=0).float()


def _ours_attn(cfg, hf, state):
    m = SATAttention(cfg, 0, state, state.comm)
    qkv, proj = attn_weights_from_hf(hf, cfg)
    with torch.no_grad():
        m.qkv_weight.copy_(qkv)
        m.proj_weight.copy_(proj)
    return m


class _HFAttn(torch.nn.Module):
    """transformers' attention with its rotary tables and an explicit causal mask (eager)."""

    def __init__(self, attn, cfg):
        super().__init__()
        self.attn, self.rope = attn, LlamaRotaryEmbedding(hf_config(cfg))

    def forward(self, x):
        pos = torch.arange(x.shape[1])[None]
        return self.attn(x, self.rope(x, pos), causal_mask(x.shape[1]))[0]


def _attn_grads(layer, cfg):
    """Gradients of an HF attention mapped to our layout, by the reference mapping."""
    class W:
        pass
    holder = W()
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = W()
        lin.weight = getattr(layer, n).weight.grad
        setattr(holder, n, lin)
    return attn_weights_from_hf(holder, cfg)


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_attention_dense_equals_transformers(cfg):
    hf = _hf_attn(cfg)
    ours = _ours_attn(cfg, hf, _sat())
    x = torch.randn(B, S, cfg.hidden_size)
    y_ref, dx_ref = _run(_HFAttn(hf, cfg), x)
    y, dx = _run(ours, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=0)
    g_qkv, g_proj = _attn_grads(hf, cfg)
    torch.testing.assert_close(ours.qkv_weight.grad, g_qkv, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.proj_weight.grad, g_proj, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("metric", ["maxip", "wanda", "magnitude"])
def test_attention_sparse_equals_zeroed_dense(cfg, metric):
    hf = _hf_attn(cfg)
    state = _sat(rate_attn=0.5, metric=metric)
    ours = _ours_attn(cfg, hf, state)
    x = torch.randn(B, S, cfg.hidden_size)
    with MatmulShapes() as rec:
        y, dx = _run(ours, x)
    G, r, d = cfg.num_query_groups, cfg.heads_per_group, cfg.head_dim
    kept = state.selected[(0, "attn")]
    assert kept.numel() == G // 2
    omitted = torch.ones(G, dtype=torch.bool)
    omitted[kept] = False
    q_rows = omitted.repeat_interleave(r * d)
    kv_rows = omitted.repeat_interleave(d)
    with torch.no_grad():
        hf.q_proj.weight[q_rows] = 0
        hf.k_proj.weight[kv_rows] = 0
        hf.v_proj.weight[kv_rows] = 0
        hf.o_proj.weight[:, q_rows] = 0
    y_ref, dx_ref = _run(_HFAttn(hf, cfg), x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=0)
    g_qkv, g_proj = _attn_grads(hf, cfg)
    ours_qkv = ours.qkv_weight.grad.view(G, -1, cfg.hidden_size)
    ours_proj = ours.proj_weight.grad.view(G, -1, cfg.hidden_size)
    torch.testing.assert_close(ours_qkv[kept], g_qkv.view(G, -1, cfg.hidden_size)[kept], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_proj[kept], g_proj.view(G, -1, cfg.hidden_size)[kept], atol=1e-5, rtol=0)
    assert torch.count_nonzero(ours_qkv[omitted]) == 0
    assert torch.count_nonzero(ours_proj[omitted]) == 0
    # The projections multiply only kept groups: (G/2)*(r+2)*d rows of qkv, (G/2)*r*d of o,
    # in all 2 forward and 4 backward products. maxip first scores the full query projection.
    training = rec.shapes
    if metric == "maxip":
        assert rec.shapes[0] == ((B * S, cfg.hidden_size), (cfg.hidden_size, G * r * d))
        training = rec.shapes[1:]
    assert len(training) == 6, training
    for shapes in training:
        dims = {dd for m in shapes for dd in m}
        assert (G // 2) * (r + 2) * d in dims or (G // 2) * r * d in dims, training
        assert G * (r + 2) * d not in dims, training
