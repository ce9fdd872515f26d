"""SAT's quality levers against independent references: the fluctuation metric and mean
compensation (--sat-metric fluctuation, --sat-compensation mean) and the dense-forward,
sparse-backward mode (--sat-sparse-pass backward).

References: hand computations in float64, and transformers' LlamaForCausalLM with its MLPs
patched to compute the function each mode defines:
  compensation: the omitted channels' activations replaced by their mean over the scored
    tokens (the kept channels' outputs plus the omitted channels' mean contribution);
  backward only: the dense output, with the omitted channels' contribution detached, so
    autograd gives the gradient that the kept channels alone would pass back.
Both patched models compute their own activations, means and scores; only the kept sets are
taken from sat_dist, and those are checked against a top-k of the reference's own scores.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from sat_dist.checkpoint.hf import merge_tp_state_dicts
from sat_dist.config import SATConfig
from sat_dist.errors import SatDistError
from sat_dist.sat.compensation import omitted_mean_bias
from sat_dist.sat.importance import channel_moments, mlp_scores, mlp_scores_and_mean
from tests.dist_harness import run_ranks
from tests.test_tensor_parallel import GQA, MHA, _batch, _hf_model, _merged_grads, _single, _worker

STRIDE = 4  # B*S/DP = 24 tokens per DP rank: the strided tokens of the ranks are the global ones'


def _mlp(seed=0, tokens=40, h=6, f=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, h, generator=g)
    fc1 = torch.randn(2 * f, h, generator=g) * 0.5
    fc2 = torch.randn(f, h, generator=g) * 0.5
    return x, fc1, fc2


def test_fluctuation_and_mean_equal_hand_computation():
    x, fc1, fc2 = _mlp()
    f = fc2.shape[0]
    xd, w1, w2 = x.double(), fc1.double(), fc2.double()
    a = F.silu(xd @ w1[:f].t()) * (xd @ w1[f:].t())  # [T, f] float64
    for stride in (1, 3):
        at = a[::stride]
        mu = [float(at[:, j].mean()) for j in range(f)]
        fluct = [math.sqrt(sum((float(at[t, j]) - mu[j]) ** 2 for t in range(at.shape[0]))) * float(w2[j].norm())
                 for j in range(f)]
        act = [math.sqrt(sum(float(at[t, j]) ** 2 for t in range(at.shape[0]))) * float(w2[j].norm())
               for j in range(f)]
        got = mlp_scores("fluctuation", x, fc1, fc2, token_stride=stride)
        torch.testing.assert_close(got, torch.tensor(fluct, dtype=torch.float32), rtol=1e-4, atol=1e-5)
        for metric, want in (("fluctuation", fluct), ("activation", act)):
            s, m = mlp_scores_and_mean(metric, x, fc1, fc2, token_stride=stride)
            torch.testing.assert_close(s, torch.tensor(want, dtype=torch.float32), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(m, torch.tensor(mu, dtype=torch.float32), rtol=1e-4, atol=1e-6)
        # scores from precomputed activations (the backward-only mode's forward) are the same
        s2 = mlp_scores("fluctuation", x, fc1, fc2, token_stride=stride, activations=a.float())
        torch.testing.assert_close(s2, got, rtol=1e-5, atol=1e-6)
    # the two metrics rank differently: a channel with a large constant activation is worth
    # little once its mean is added back
    assert not torch.equal(mlp_scores("fluctuation", x, fc1, fc2).argsort(),
                           mlp_scores("activation", x, fc1, fc2).argsort())


def test_moments_reduce_like_the_whole_batch():
    """Two halves combined by the reduce hook (one sum of [sum, sum of squares, count]) give
    the whole batch's mean and centred sum of squares; unequal halves too."""
    x, fc1, fc2 = _mlp(tokens=41)
    f = fc2.shape[0]
    a = F.silu(x @ fc1[:f].t()) * (x @ fc1[f:].t())
    parts = []
    for half in (a[:13], a[13:]):
        channel_moments(half, reduce=lambda t, op, _p=parts: (_p.append((t, op)), t)[1])
    assert [op for _, op in parts] == ["sum", "sum"]
    combined = parts[0][0] + parts[1][0]
    mean, centred, count = channel_moments(a[:13], reduce=lambda t, op: combined)
    want_mean, want_centred, want_count = channel_moments(a)
    assert float(count) == float(want_count) == 41
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(centred, want_centred, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(want_centred, a.double().var(0, unbiased=False).float() * 41, rtol=1e-4, atol=1e-5)


def test_omitted_mean_bias_equals_hand_sum():
    _, _, fc2 = _mlp()
    mean = torch.randn(fc2.shape[0], generator=torch.Generator().manual_seed(4))
    kept = torch.tensor([1, 4, 5, 8])
    omitted = [j for j in range(fc2.shape[0]) if j not in kept.tolist()]
    want = sum(float(mean[j]) * fc2[j].double() for j in omitted)
    torch.testing.assert_close(omitted_mean_bias(mean, kept, fc2).double(), want, rtol=1e-5, atol=1e-6)


class _PatchedMLPs:
    """transformers' model with each layer's MLP computing SAT's function for given kept sets.

    mode "omit": omitted channels left out (SAT's plain sparse forward). mode "mean": omitted
    channels' activations replaced by their mean over every STRIDE-th
    token (a constant: detached). mode "backward": dense output, omitted channels' part
    detached. Records each layer's activations (fluctuation / activation scores come from them).
    """

    def __init__(self, hf, kept: dict[int, list[int]], mode: str, stride: int = STRIDE):
        self.acts = {}
        self.handles = []
        for i, layer in enumerate(hf.model.layers):
            mlp = layer.mlp
            self.handles.append(mlp.register_forward_hook(self._hook(i, kept.get(i), mode, stride)))

    def _hook(self, layer, kept, mode, stride):
        def hook(mlp, inputs, output):
            x = inputs[0]
            a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [b, s, f]
            self.acts[layer] = a.detach()
            if kept is None:
                return output
            keep = torch.zeros(a.shape[-1], dtype=torch.bool)
            keep[kept] = True
            if mode == "mean":
                mu = a.detach().reshape(-1, a.shape[-1])[::stride].mean(0)
                return mlp.down_proj(torch.where(keep, a, mu))
            w = mlp.down_proj.weight
            if mode == "omit":  # the sparse forward without compensation
                return F.linear(a * keep, w)
            return F.linear(a * keep, w) + F.linear(a * ~keep, w).detach()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _reference(cfg, hf_sd, ids, labels, kept, mode):
    hf = _hf_model(cfg)
    hf.load_state_dict(hf_sd)
    patch = _PatchedMLPs(hf, kept, mode)
    logits = hf(ids).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    grads = {n: p.grad for n, p in hf.named_parameters()}
    patch.close()
    return float(loss), grads, patch.acts


def _kept_mlp(selected, cfg):
    # a dense layer is None in one process and [] once _sat_run has merged the TP partitions
    return {layer: idx for (layer, kind), idx in selected.items() if kind == "mlp" and idx}


def _partition_topk(scores: torch.Tensor, tp: int, k_local: int) -> list[int]:
    n = scores.numel() // tp
    return sorted(int(i) + p * n for p in range(tp) for i in scores[p * n:(p + 1) * n].topk(k_local).indices)


def _sat_run(cfg, hf_sd, ids, labels, sat, rates, tp, world):
    """(loss, merged grads, global kept units per (layer, kind)) of one process (world 1) or of
    TP x DP gloo ranks; every DP replica of a partition must have picked the same units."""
    if world == 1:
        return _single(cfg, hf_sd, ids, labels, sat, None, rates)
    res = run_ranks(world, _worker, tp, cfg, hf_sd, ids, labels, sat, None, rates)
    selected = {}
    for r in res:
        assert r["selected"] == next(q for q in res if q["tp_rank"] == r["tp_rank"])["selected"]
        if r["dp_rank"] == 0:
            for key, idx in r["selected"].items():
                selected[key] = sorted((selected.get(key) or []) + (idx or []))
    return res[0]["loss"], _merged_grads(res, tp, cfg), selected


@pytest.mark.parametrize("tp,world", [(1, 1), (2, 4)], ids=["single", "tp2xdp2"])
def test_compensated_forward_equals_transformers_with_means(tp, world):
    cfg = GQA
    hf_sd = _hf_model(cfg).state_dict()
    ids, labels = _batch(cfg)
    rates = (0.0, 0.5)
    sat = SATConfig(metric="fluctuation", compensation="mean", selection="topk", align_mlp=8,
                    token_stride=STRIDE).validate()
    loss, grads, selected = _sat_run(cfg, hf_sd, ids, labels, sat, rates, tp, world)
    kept = _kept_mlp(selected, cfg)
    assert set(kept) == set(range(cfg.num_layers)) and all(len(v) == 64 for v in kept.values())
    ref_loss, ref_grads, acts = _reference(cfg, hf_sd, ids, labels, kept, "mean")
    # the kept sets are the top-k of the reference's own fluctuation scores, per TP partition
    for layer, a in acts.items():
        at = a.reshape(-1, a.shape[-1])[::STRIDE].double()
        w_down = hf_sd[f"model.layers.{layer}.mlp.down_proj.weight"].double()
        fluct = (at - at.mean(0)).pow(2).sum(0).sqrt() * w_down.norm(dim=0)
        assert kept[layer] == _partition_topk(fluct, tp, 64 // tp)
    print(f"\n[compensation tp={tp} world={world}] loss {loss:.6f} ref {ref_loss:.6f}")
    assert loss == pytest.approx(ref_loss, abs=2e-5)
    # gradients: equal everywhere except W_down's omitted columns, which the reference's
    # mean term trains and SAT leaves at exactly zero (the bias is a constant of the step)
    for name, g in grads.items():
        ref = ref_grads[name]
        if name.endswith("down_proj.weight"):
            layer = int(name.split(".")[2])
            omitted = torch.ones(cfg.ffn_hidden_size, dtype=torch.bool)
            omitted[kept[layer]] = False
            assert torch.count_nonzero(g[:, omitted]) == 0
            g, ref = g[:, ~omitted], ref[:, ~omitted]
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=2e-5, msg=name)
    # without compensation the gradients are measurably other ones (the test can fail)
    uncompensated = SATConfig(metric="fluctuation", align_mlp=8, token_stride=STRIDE, selection="topk").validate()
    _, plain, _ = _single(cfg, hf_sd, ids, labels, uncompensated, None, rates)
    diff = max(float((plain[n] - ref_grads[n]).abs().max()) for n in plain if "down_proj" not in n)
    print(f"uncompensated grads differ from the reference by {diff:.2e}")
    assert diff > 20 * 2e-5


@pytest.mark.parametrize("tp,world", [(1, 1), (2, 4)], ids=["single", "tp2xdp2"])
def test_backward_only_loss_is_dense_and_grads_equal_detached_reference(tp, world):
    cfg = MHA
    hf_sd = _hf_model(cfg).state_dict()
    ids, labels = _batch(cfg)
    rates = (0.0, 0.5)
    sat = SATConfig(metric="activation", selection="topk", sparse_pass="backward", align_mlp=8,
                    token_stride=STRIDE).validate()
    dense_loss, dense_grads, _ = _single(cfg, hf_sd, ids, labels)
    loss, grads, selected = _sat_run(cfg, hf_sd, ids, labels, sat, rates, tp, world)
    kept = _kept_mlp(selected, cfg)
    assert set(kept) == set(range(cfg.num_layers)) and all(len(v) == 64 for v in kept.values())
    ref_loss, ref_grads, acts = _reference(cfg, hf_sd, ids, labels, kept, "backward")
    # the forward is the dense model's: the loss is dense's
    assert loss == pytest.approx(dense_loss, abs=1e-6)
    assert ref_loss == pytest.approx(dense_loss, abs=1e-5)
    # kept sets: top-k of the activation metric over the reference's own activations
    for layer, a in acts.items():
        at = a.reshape(-1, a.shape[-1])[::STRIDE].double()
        w_down = hf_sd[f"model.layers.{layer}.mlp.down_proj.weight"].double()
        assert kept[layer] == _partition_topk(at.pow(2).sum(0).sqrt() * w_down.norm(dim=0), tp, 64 // tp)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=2e-5, msg=name)
    for layer in range(cfg.num_layers):
        omitted = torch.ones(cfg.ffn_hidden_size, dtype=torch.bool)
        omitted[kept[layer]] = False
        assert torch.count_nonzero(grads[f"model.layers.{layer}.mlp.gate_proj.weight"][omitted]) == 0
        assert torch.count_nonzero(grads[f"model.layers.{layer}.mlp.down_proj.weight"][:, omitted]) == 0
    # and the gradient is not dense's: the omitted channels' share of dx is dropped
    diff = max(float((grads[n] - dense_grads[n]).abs().max()) for n in grads if "embed" in n)
    assert diff > 1e-4


@pytest.mark.parametrize("tp,world", [(1, 1), (2, 4)], ids=["single", "tp2xdp2"])
def test_weight_grad_only_keeps_every_input_gradient_exact(tp, world):
    """--sat-sparse-pass weight-grad: the loss and every gradient that does not belong to an
    MLP weight are the dense model's (the input gradients are exact, so everything below an
    MLP is too); the MLP weights' kept rows and columns carry dense's gradient and the omitted
    ones exactly zero."""
    cfg = MHA
    hf_sd = _hf_model(cfg).state_dict()
    ids, labels = _batch(cfg)
    sat = SATConfig(metric="activation", selection="topk", sparse_pass="weight-grad", align_mlp=8,
                    token_stride=STRIDE).validate()
    dense_loss, dense_grads, _ = _single(cfg, hf_sd, ids, labels)
    loss, grads, selected = _sat_run(cfg, hf_sd, ids, labels, sat, (0.0, 0.75), tp, world)
    kept = _kept_mlp(selected, cfg)
    assert set(kept) == set(range(cfg.num_layers)) and all(len(v) == 32 for v in kept.values())
    assert loss == pytest.approx(dense_loss, abs=1e-6)
    for name, g in grads.items():
        if ".mlp." not in name:
            torch.testing.assert_close(g, dense_grads[name], rtol=1e-4, atol=2e-5, msg=name)
    for layer in range(cfg.num_layers):
        k = torch.tensor(kept[layer])
        omitted = torch.ones(cfg.ffn_hidden_size, dtype=torch.bool)
        omitted[k] = False
        for proj in ("gate_proj", "up_proj"):
            n = f"model.layers.{layer}.mlp.{proj}.weight"
            torch.testing.assert_close(grads[n][k], dense_grads[n][k], rtol=1e-4, atol=2e-5, msg=n)
            assert torch.count_nonzero(grads[n][omitted]) == 0
        n = f"model.layers.{layer}.mlp.down_proj.weight"
        torch.testing.assert_close(grads[n][:, k], dense_grads[n][:, k], rtol=1e-4, atol=2e-5, msg=n)
        assert torch.count_nonzero(grads[n][:, omitted]) == 0
        assert torch.count_nonzero(dense_grads[n][:, omitted]) > 0  # what was left out was not zero


@pytest.mark.parametrize("overrides", [
    {"metric": "fluctuation", "compensation": "mean"},
    {"metric": "activation", "sparse_pass": "backward"},
    {"metric": "activation", "sparse_pass": "backward", "selection": "pps"},
    {"metric": "activation", "sparse_pass": "weight-grad"},
], ids=["compensation", "backward-only", "backward-only-pps", "weight-grad"])
def test_levers_are_dp_invariant(overrides):
    """DP=2 selects what one process selects on the same global batch, and computes the same
    loss and gradients (scores and means reduced over DP)."""
    cfg = MHA
    hf_sd = _hf_model(cfg).state_dict()
    ids, labels = _batch(cfg)
    rates = (0.0, 0.5)
    sat = SATConfig(**{"align_mlp": 8, "token_stride": STRIDE, "selection": "topk", **overrides}).validate()
    ref_loss, ref_grads, ref_sel = _single(cfg, hf_sd, ids, labels, sat, None, rates)
    dp2 = run_ranks(2, _worker, 1, cfg, hf_sd, ids, labels, sat, None, rates)
    for r in dp2:
        assert r["selected"] == ref_sel
        assert r["loss"] == pytest.approx(ref_loss, abs=1e-6)
    assert max(float((g - ref_grads[n]).abs().max())
               for n, g in _merged_grads(dp2, 1, cfg).items()) < 1e-5


def test_backward_only_with_recompute_equals_without():
    from sat_dist.checkpoint.hf import shard_hf_state_dict
    from sat_dist.model.llama import LlamaModel
    from sat_dist.model.sat_state import SATState

    cfg = MHA
    hf_sd = _hf_model(cfg).state_dict()
    ids, labels = _batch(cfg)
    sat = SATConfig(sparse_pass="backward", align_mlp=8, token_stride=1).validate()
    out = []
    for recompute in (False, True):
        state = SATState(sat)
        state.set_step(3, 0, attn=0.0, mlp=0.5)
        model = LlamaModel(cfg, state, recompute=recompute)
        model.load_state_dict(shard_hf_state_dict(hf_sd, cfg, 1, 0))
        model(ids, labels).mean().backward()
        out.append(merge_tp_state_dicts([{n: p.grad for n, p in model.named_parameters()}], cfg))
    for n in out[0]:
        assert torch.equal(out[0][n], out[1][n]), n


@pytest.mark.parametrize("overrides,msg", [
    ({"sparse_pass": "backward", "omission_attn": 0.2}, "set --sat-omission-attn 0"),
    ({"sparse_pass": "backward", "compensation": "mean"}, "use --sat-compensation none"),
    ({"sparse_pass": "weight-grad", "omission_attn": 0.2}, "set --sat-omission-attn 0"),
    ({"compensation": "median"}, "sat.compensation: got 'median'"),
    ({"sparse_pass": "forward"}, "sat.sparse_pass: got 'forward'"),
])
def test_lever_settings_refused_with_one_clear_error(overrides, msg):
    with pytest.raises(SatDistError) as e:
        SATConfig(**overrides).validate()
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_run_definition_holds_the_levers_and_old_checkpoints_resume_as_before():
    """--sat-compensation and --sat-sparse-pass are part of the run definition (a resume that
    changes them is refused); a checkpoint saved before they existed ran without them."""
    from sat_dist.checkpoint.state import definition_changes
    from sat_dist.config import ModelConfig
    from sat_dist.train.arguments import parse_args, run_definition

    model = ModelConfig().validate()
    plain = run_definition(parse_args([]), model)
    levers = run_definition(parse_args(["--sat-sparse-pass", "backward", "--sat-metric", "fluctuation"]), model)
    assert plain["sat-compensation"] == "none" and plain["sat-sparse-pass"] == "both"
    old = {"run_definition": {k: v for k, v in plain.items() if k not in ("sat-compensation", "sat-sparse-pass")}}
    assert definition_changes(old, plain) == []
    assert sorted(definition_changes(old, levers)) == ["sat-metric", "sat-sparse-pass"]
    comp = run_definition(parse_args(["--sat-compensation", "mean"]), model)
    assert definition_changes(old, comp) == ["sat-compensation"]
