"""The gathered products and the selection-reuse path (issue [G]).

- kept_linear equals plain autograd over index_select + matmul (the previous path), output
  and gradients, with omitted units' gradient exactly zero; and it saves no gathered copy
  of a weight for backward.
- granularity "step": one scoring per layer and kind per optimizer step, reused by every
  micro-batch and by activation recompute; gradients accumulated over two micro-batches
  equal one forward of both samples as one batch with that selection forced.
- granularity "micro-batch": a fresh selection per micro-batch, and recompute still
  re-uses the forward's selection (no second scoring).
"""

import pytest
import torch

from sat_dist.config import ModelConfig, SATConfig
from sat_dist.model.llama import LlamaModel
from sat_dist.model.sat_state import SATState
from sat_dist.model.sparse_ops import kept_linear, unit_positions

CFG = ModelConfig(hidden_size=48, ffn_hidden_size=256, num_attention_heads=6, num_query_groups=2,
                  vocab_size=97, num_layers=2)


@pytest.mark.parametrize("kept_in", [False, True])
@pytest.mark.parametrize("unit_rows", [1, 3])
def test_kept_linear_equals_autograd_gather(kept_in, unit_rows):
    torch.manual_seed(0)
    units, h = 10, 8
    w = torch.randn(units * unit_rows, h, requires_grad=True)
    idx = torch.tensor([1, 4, 5, 9])
    rows = (idx[:, None] * unit_rows + torch.arange(unit_rows)).flatten()
    x = torch.randn(2, 5, rows.numel() if kept_in else h, requires_grad=True)
    g = torch.randn(2, 5, h if kept_in else rows.numel())

    y = kept_linear(x, w, idx, unit_rows=unit_rows, kept_in=kept_in)
    y.backward(g)
    dx, dw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    wk = w.index_select(0, rows)  # the reference: autograd's own gather and product
    y_ref = x @ wk if kept_in else x @ wk.t()
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, w.grad, rtol=1e-6, atol=1e-6)
    omitted_rows = torch.ones(units * unit_rows, dtype=torch.bool)
    omitted_rows[rows] = False
    assert torch.count_nonzero(dw[omitted_rows]) == 0


def test_unit_positions():
    idx = torch.tensor([0, 3, 4, 8])
    assert unit_positions(idx, 10).tolist() == [0, 4, 4, 1, 2, 4, 4, 4, 3, 4]
    assert unit_positions(torch.arange(5), 5).tolist() == [0, 1, 2, 3, 4]


def _model(granularity, recompute=False, rates=(0.5, 0.5)):
    sat = SATState(SATConfig(align_mlp=32, token_stride=1, granularity=granularity).validate())
    torch.manual_seed(0)
    model = LlamaModel(CFG, sat, recompute=recompute)
    calls = []  # every scoring, as (step, micro, layer, kind)
    orig = sat.kept_units

    def counting(layer, kind, n, device, scores_fn):
        def fn(gen, stride):
            calls.append((sat.step, sat.micro, layer, kind))
            return scores_fn(gen, stride)
        return orig(layer, kind, n, device, fn)

    sat.kept_units = counting
    return model, sat, calls


def _micro_batches():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, CFG.vocab_size, (1, 17), generator=gen) for _ in range(2)]


def _accumulate(model, sat, batches, step, rates=(0.5, 0.5)):
    model.zero_grad(set_to_none=True)
    selections = []
    for micro, ids in enumerate(batches):
        sat.set_step(step, micro, *rates)
        model(ids[:, :-1], ids[:, 1:]).mean().backward()
        selections.append({k: v.clone() for k, v in sat.selected.items()})
    return {n: p.grad.clone() for n, p in model.named_parameters()}, selections


def test_step_granularity_selects_once_and_equals_forced_reference():
    model, sat, calls = _model("step")
    batches = _micro_batches()
    grads, selections = _accumulate(model, sat, batches, step=5)
    assert len(calls) == 2 * CFG.num_layers  # micro-batch 1 scored nothing
    assert all(micro == 0 for _, micro, _, _ in calls)
    for key in selections[0]:
        assert torch.equal(selections[0][key], selections[1][key])
    # Reference: ONE forward of both samples as a batch of 2, that selection forced (no
    # scoring, no accumulation); two micro-batch means sum to twice the batch mean.
    ref_model, ref_sat, ref_calls = _model("step")
    ref_sat.forced = {k: v for k, v in selections[0].items()}
    ref_sat.set_step(5, 0, 0.5, 0.5)
    both = torch.cat(batches)
    (2 * ref_model(both[:, :-1], both[:, 1:]).mean()).backward()
    assert not ref_calls
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)
    # The next step selects afresh.
    _accumulate(model, sat, batches, step=6)
    assert len(calls) == 4 * CFG.num_layers


def test_micro_batch_granularity_selects_per_micro_batch():
    model, sat, calls = _model("micro-batch")
    _, selections = _accumulate(model, sat, _micro_batches(), step=5)
    assert len(calls) == 2 * 2 * CFG.num_layers
    assert any(not torch.equal(selections[0][k], selections[1][k]) for k in selections[0])


@pytest.mark.parametrize("granularity", ["step", "micro-batch"])
def test_recompute_reuses_the_selection(granularity):
    model, sat, calls = _model(granularity)
    grads, _ = _accumulate(model, sat, _micro_batches(), step=3)
    rc_model, rc_sat, rc_calls = _model(granularity, recompute=True)
    rc_grads, _ = _accumulate(rc_model, rc_sat, _micro_batches(), step=3)
    assert len(rc_calls) == len(calls)  # the recompute pass scored nothing
    for n in grads:
        torch.testing.assert_close(rc_grads[n], grads[n], rtol=1e-6, atol=1e-7)


def test_no_gathered_weight_is_saved_for_backward():
    """Under ZeRO-3 a saved gathered copy is memory dense training does not hold; only
    activations, the parameters themselves and indices may be saved."""
    model, sat, _ = _model("step")
    sat.set_step(1, 0, 0.5, 0.5)
    params = {p.data_ptr() for p in model.parameters()}
    weight_shapes = set()
    for layer in model.layers:
        a, m = layer.self_attention, layer.mlp
        k_attn, k_mlp = a.groups // 2, m.f // 2
        weight_shapes |= {(k_attn * (a.r + 2) * a.d, CFG.hidden_size), (k_attn * a.r * a.d, CFG.hidden_size),
                          (2 * k_mlp, CFG.hidden_size), (k_mlp, CFG.hidden_size)}
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.data_ptr() in params))
        return t

    ids = _micro_batches()[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids[:, :-1], ids[:, 1:]).mean()
    loss.backward()
    copies = [shape for shape, is_param in saved if shape in weight_shapes and not is_param]
    assert not copies, f"gathered weight copies saved for backward: {copies}"
