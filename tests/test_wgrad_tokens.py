"""Weight gradients from a sample of the tokens (--sat-wgrad-tokens): the draw, the estimate's
unbiasedness against autograd's dense gradient, TP parity with one process, and the
quality budget's measurement and controller."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from sat_dist.checkpoint.hf import merge_tp_state_dicts, shard_hf_state_dict
from sat_dist.config import ModelConfig, SATConfig
from sat_dist.errors import SatDistError
from sat_dist.model.llama import LlamaModel
from sat_dist.model.sat_state import SATState
from sat_dist.model.sparse_ops import kept_linear, sampled_linear
from sat_dist.model.token_sampler import TokenSampler, WGradProbe
from sat_dist.parallel.state import init_distributed
from sat_dist.sat.budget import WGradBudget
from sat_dist.sat.token_sampling import inclusion_probabilities, keep_tokens, poisson_variance, systematic_sample
from sat_dist.train.metrics import model_flops
from tests.dist_harness import run_ranks
from tests.test_tensor_parallel import GQA, _batch, _hf_model


def _capped_reference(scores: list[float], k: int) -> list[float]:
    """Inclusion probabilities by the textbook loop: cap the largest at 1 until the rest,
    scaled to sum to what is left, all fall below 1."""
    capped: set[int] = set()
    while True:
        rest = [i for i in range(len(scores)) if i not in capped]
        c = (k - len(capped)) / sum(scores[i] for i in rest)
        over = [i for i in rest if scores[i] * c > 1]
        if not over:
            return [1.0 if i in capped else scores[i] * c for i in range(len(scores))]
        capped.update(over)


def test_inclusion_probabilities_match_the_textbook_loop():
    g = torch.Generator().manual_seed(0)
    for T, k in ((10, 3), (64, 16), (200, 150), (7, 6)):
        s = torch.rand(T, generator=g) ** 6  # heavy-tailed: several capped
        p = inclusion_probabilities(s, k)
        ref = torch.tensor(_capped_reference([float(v) + 1e-6 * float(s.mean()) for v in s], k))
        assert float(p.sum()) == pytest.approx(k, abs=1e-4)
        assert float(p.max()) <= 1.0 + 1e-6
        assert torch.allclose(p, ref, atol=1e-5), (T, k)
    assert torch.equal(inclusion_probabilities(torch.rand(5), 5), torch.ones(5))


def test_systematic_sample_is_fixed_size_and_draws_each_token_with_its_probability():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(40, generator=g) ** 3
    p = inclusion_probabilities(s, 10)
    n = 4000
    counts = torch.zeros(40)
    for i in range(n):
        idx = systematic_sample(p, 10, torch.Generator().manual_seed(i))
        assert idx.numel() == 10 and idx.unique().numel() == 10
        counts[idx] += 1
    # each count is Binomial(n, p_t): 5 standard deviations
    bound = 5 * (p * (1 - p) / n).sqrt() + 1e-9
    assert bool(((counts / n - p).abs() <= bound).all())


def _sampler(keep, method, draw_key, probe=None):
    return TokenSampler(keep, method, (7, draw_key, 0, 0, "fc1", 0), probe=probe)


def _linear_grads(x, w, dy, sampler, kept=None):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    if kept is None:
        y = sampled_linear(x, w, sampler)
    else:
        y = kept_linear(x, w, kept, sampler=sampler)
    y.backward(dy)
    return x.grad, w.grad


@pytest.mark.parametrize("kept", [None, torch.tensor([0, 2, 3, 6])], ids=["dense-product", "kept-channels"])
def test_sampled_weight_gradient_is_unbiased_and_input_gradient_exact(kept):
    """The mean over N draws of the sampled weight gradient converges to autograd's dense
    one, within a bound that shrinks as 1/sqrt(N); without the 1/p weights (topk) it does
    not. The input gradient is autograd's, exactly, in every draw."""
    g = torch.Generator().manual_seed(2)
    T, h_in, h_out = 64, 6, 8
    x = torch.randn(T, h_in, generator=g) * torch.rand(T, 1, generator=g) * 3
    w = torch.randn(h_out, h_in, generator=g)
    rows = h_out if kept is None else kept.numel()
    dy = torch.randn(T, rows, generator=g)
    x_ref = x.clone().requires_grad_(True)
    w_ref = w.clone().requires_grad_(True)
    (x_ref @ (w_ref if kept is None else w_ref[kept]).t()).backward(dy)
    dense_w = w_ref.grad
    errors = {}
    for n in (25, 400):
        total = torch.zeros_like(w)
        sq = torch.zeros_like(w)
        for i in range(n):
            gx, gw = _linear_grads(x, w, dy, _sampler(0.25, "pps", i), kept)
            assert torch.allclose(gx, x_ref.grad, atol=1e-5)
            total += gw
            sq += gw * gw
        mean = total / n
        std = (sq / n - mean * mean).clamp_min(0).sqrt()
        # every element within 5 standard errors of the dense value
        assert bool(((mean - dense_w).abs() <= 5 * std / math.sqrt(n) + 1e-5).all()), n
        errors[n] = float((mean - dense_w).norm() / dense_w.norm())
    assert errors[400] < errors[25]  # the bound shrinks
    # top-k, unweighted: biased; its error stays large however many draws
    _, gw_topk = _linear_grads(x, w, dy, _sampler(0.25, "topk", 0), kept)
    assert float((gw_topk - dense_w).norm() / dense_w.norm()) > 5 * errors[400]
    if kept is not None:  # omitted channels still get exactly zero gradient
        omitted = torch.ones(h_out, dtype=torch.bool)
        omitted[kept] = False
        assert float(gw_topk[omitted].abs().max()) == 0.0


def test_keep_one_is_the_exact_gradient_and_the_work_shrinks():
    g = torch.Generator().manual_seed(3)
    x, w, dy = torch.randn(32, 5, generator=g), torch.randn(7, 5, generator=g), torch.randn(32, 7, generator=g)
    _, exact = _linear_grads(x, w, dy, None)
    _, one = _linear_grads(x, w, dy, _sampler(1.0, "pps", 0))
    assert torch.equal(exact, one)
    xs, gs = _sampler(0.25, "pps", 0).operands(x, dy)
    assert xs.shape == (keep_tokens(32, 0.25), 5) and gs.shape == (8, 7)  # one GEMM over 8 tokens


def _tiny():
    return ModelConfig(hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                       vocab_size=96, make_vocab_size_divisible_by=16, name="tiny-wgrad")


def _model_grads(model, ids, labels, step):
    model.sat.set_step(step, 0, 0.0, 0.0, wgrad=1.0)
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels).mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_gradient_is_unbiased_for_every_product_and_the_head():
    """Through the whole model: the loss is dense's exactly; every parameter's gradient
    averaged over draws approaches autograd's (q/k/v, o, gate/up, down and the LM head
    sampled; the embedding and norms, fed by exact input gradients, equal in the mean)."""
    cfg = _tiny()
    torch.manual_seed(0)
    dense = LlamaModel(cfg)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    ref_loss, ref = _model_grads(dense, ids, labels, 0)
    sat_cfg = SATConfig(schedule="constant", omission_mlp=0.0, align_mlp=8, wgrad_tokens=0.25,
                        wgrad_tokens_head=0.5).validate()
    model = LlamaModel(cfg, SATState(sat_cfg))
    model.load_state_dict(dense.state_dict())
    n = 300
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in ref.items()}
    sq = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in ref.items()}
    for i in range(n):
        loss, grads = _model_grads(model, ids, labels, i)
        assert loss == ref_loss
        for k in total:
            total[k] += grads[k].double()
            sq[k] += grads[k].double() ** 2
    sampled = 0
    for k in ref:
        mean = total[k] / n
        var = (sq[k] / n - mean ** 2).clamp_min(0).sum()  # summed over the elements
        err = float((mean - ref[k].double()).pow(2).sum())
        if float(var) < 1e-12 * float(ref[k].double().pow(2).sum()):
            assert err < 1e-10, k  # exact in every draw (the norms: only input gradients reach them)
            continue
        sampled += 1
        # E||mean - dense||^2 = (sum of the elements' variances) / n for an unbiased estimate;
        # over hundreds of elements the ratio concentrates near 1.
        assert err / (float(var) / n) < 3.0, (k, err / (float(var) / n))
    assert sampled == 4 * cfg.num_layers + 1  # every product's weight and the (tied: no) head


def _tp_worker(rank, world, tp, cfg, hf_sd, ids, labels, sat_cfg):
    comm = init_distributed(tp)
    state = SATState(sat_cfg, comm)
    state.set_step(3, 0, 0.0, 0.0, wgrad=1.0)
    model = LlamaModel(cfg, state, comm)
    model.load_state_dict(shard_hf_state_dict(hf_sd, cfg, tp, comm.tp_rank))
    loss = model(ids, labels).mean()
    loss.backward()
    loss = loss.detach()
    dist.all_reduce(loss, group=comm.dp_group)
    return {"tp_rank": comm.tp_rank, "dp_rank": comm.dp_rank, "loss": float(loss) / comm.dp_size,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("method", ["pps", "topk"])
def test_tensor_parallel_draws_the_tokens_of_one_process(method):
    """At TP 2 every rank sums its split operand's token norms over TP, so both ranks draw
    the tokens one process draws: the merged gradients equal one process's."""
    cfg = GQA
    hf_sd = _hf_model(cfg).state_dict()
    ids, labels = _batch(cfg)
    sat_cfg = SATConfig(schedule="constant", omission_mlp=0.0, align_mlp=8, wgrad_tokens=0.3, wgrad_tokens_head=0.4,
                        wgrad_sampling=method).validate()
    state = SATState(sat_cfg)
    state.set_step(3, 0, 0.0, 0.0, wgrad=1.0)
    single = LlamaModel(cfg, state)
    single.load_state_dict(shard_hf_state_dict(hf_sd, cfg, 1, 0))
    loss = single(ids, labels).mean()
    loss.backward()
    ref = merge_tp_state_dicts([{n: p.grad for n, p in single.named_parameters()}], cfg)
    res = run_ranks(2, _tp_worker, 2, cfg, hf_sd, ids, labels, sat_cfg)
    merged = merge_tp_state_dicts([r["grads"] for r in sorted(res, key=lambda r: r["tp_rank"])], cfg)
    err = max(float((merged[k] - ref[k]).abs().max()) for k in ref)
    assert res[0]["loss"] == pytest.approx(float(loss), abs=1e-6)
    assert err < 1e-5, err
    # and the sampling did something: the exact gradient differs
    exact = LlamaModel(cfg)
    exact.load_state_dict(shard_hf_state_dict(hf_sd, cfg, 1, 0))
    exact(ids, labels).mean().backward()
    exact_g = merge_tp_state_dicts([{n: p.grad for n, p in exact.named_parameters()}], cfg)
    assert max(float((exact_g[k] - ref[k]).abs().max()) for k in ref) > 1e-3


def test_probe_measures_the_relative_variance_of_one_draw():
    """The probe's per-draw estimate of E||G_hat - G||^2 / ||G||^2, averaged, against a Monte
    Carlo reference over many draws; the probe trains with the exact gradient; systematic
    sampling is not worse than the Poisson formula."""
    g = torch.Generator().manual_seed(5)
    T = 256
    x = torch.randn(T, 8, generator=g) * torch.rand(T, 1, generator=g)
    dy = torch.randn(T, 6, generator=g) * torch.rand(T, 1, generator=g)
    G = dy.t() @ x
    sq = []
    for i in range(400):
        xs, gs = _sampler(0.2, "pps", i).operands(x, dy)
        sq.append(float((gs.t() @ xs - G).pow(2).sum()))
    truth = sum(sq) / len(sq) / float(G.pow(2).sum())
    est = []
    for i in range(400):
        probe = WGradProbe()
        xs, gs = _sampler(0.2, "pps", 1000 + i, probe).operands(x, dy)
        assert xs is x and gs is dy  # the probe micro-batch trains with the exact gradient
        est.append(float(probe.relative_variances()[0]))
    assert sum(est) / len(est) == pytest.approx(truth, rel=0.15)
    scores = x.norm(dim=1) * dy.norm(dim=1)
    poisson = float(poisson_variance(scores, keep_tokens(T, 0.2))) / float(G.pow(2).sum())
    assert truth <= 1.2 * poisson


def test_budget_moves_the_scale_towards_the_target_and_stays_in_range():
    b = WGradBudget.for_keeps(0.5, [0.25, 0.25, 1.0], min_tokens=0.05)
    assert (b.lo, b.hi) == (pytest.approx(0.2), pytest.approx(4.0))
    assert b.update(2.0) == pytest.approx(2.0)  # gap 4x the target: keep up by sqrt(4)
    assert b.update(0.125) == pytest.approx(1.0)  # gap a quarter: down by 2
    assert b.update(float("nan")) == pytest.approx(1.0)
    for _ in range(20):
        b.update(1e6)
    assert b.scale == pytest.approx(4.0)  # every product exact at most
    state = b.state()
    b2 = WGradBudget.for_keeps(0.5, [0.25, 0.25, 1.0], min_tokens=0.05)
    b2.restore(state)
    assert b2.scale == b.scale


def test_flops_and_bad_settings():
    cfg = _tiny()
    dense = model_flops(cfg, 4, 64)
    # a third of every decoder product's and the head's FLOPs are the weight gradient's
    head = 4 * 64 * 6 * cfg.hidden_size * cfg.vocab_size
    assert model_flops(cfg, 4, 64, wgrad_keep=0.25, head_wgrad_keep=0.25) == pytest.approx(
        dense - 0.75 / 3 * (dense - 4 * 64 * 64 * 6 * cfg.hidden_size * cfg.num_layers))
    assert model_flops(cfg, 4, 64, head_wgrad_keep=0.0) == pytest.approx(dense - head / 3)
    with pytest.raises(SatDistError, match="wgrad_tokens"):
        SATConfig(wgrad_tokens=0.0).validate()
    with pytest.raises(SatDistError, match="--sat-budget"):
        SATConfig(budget=0.3, wgrad_sampling="topk").validate()
    with pytest.raises(SatDistError, match="--sat-sparse-pass weight-grad"):
        SATConfig(sparse_pass="weight-grad", wgrad_tokens=0.5).validate()
    with pytest.raises(SatDistError, match="4 per layer"):
        LlamaModel(cfg, SATState(SATConfig(align_mlp=8, wgrad_tokens_linears="0.5,0.5").validate()))


def test_allocation_fits_the_budget_and_is_near_the_enumerated_optimum():
    """Three products with 1/k-shaped curves of different weight and cost: the allocation
    keeps the FLOP-weighted mean keep within the budget, beats the uniform keep, and is
    within 1% of the best feasible choice found by enumerating every combination."""
    import itertools

    from sat_dist.sat.wgrad_allocation import allocate_keeps

    grid = (0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0)
    weights, costs = (1.0, 4.0, 0.5), (3.0, 1.0, 6.0)
    curves = [[w * (1 / k - 1) for k in grid] for w in weights]
    for mean in (0.25, 0.5):
        keeps = allocate_keeps(curves, grid, costs, mean)
        cost = sum(c * k for c, k in zip(costs, keeps))
        assert cost <= mean * sum(costs) + 1e-9
        value = sum(curves[i][grid.index(k)] for i, k in enumerate(keeps))
        uniform = sum(curves[i][grid.index(mean)] for i in range(3))
        best = min(sum(curves[i][g] for i, g in enumerate(combo))
                   for combo in itertools.product(range(len(grid)), repeat=3)
                   if sum(c * grid[g] for c, g in zip(costs, combo)) <= mean * sum(costs) + 1e-9)
        assert value < uniform and value <= 1.01 * best, (mean, keeps, value, best, uniform)


def test_a_sampled_run_with_a_budget_resumes_bit_exactly(corpus, tmp_path):
    """Through torchrun (TP 1 x DP 2, ZeRO-3): a run with sampled weight gradients and a
    quality budget, stopped at step 4 and resumed from its checkpoint, reproduces the
    uninterrupted run's losses exactly: the draws are keyed by the step, and the budget's
    scale comes back from the manifest."""
    from tests.launchers import _flags, scalars, torchrun

    sat = {"sat-wgrad-tokens": 0.3, "sat-wgrad-tokens-head": 0.5, "sat-budget": 0.2, "sat-budget-interval": 2,
           "train-iters": 6, "save-interval": 2}
    ref = tmp_path / "ref"
    torchrun(2, _flags(corpus, save=ref / "ckpt", **sat, **{"tensorboard-dir": ref / "tb"}))
    ref_loss = scalars(ref / "tb", "lm loss")
    scale = scalars(ref / "tb", "sat/budget-scale")
    assert len(set(scale.values())) > 1  # the budget moved the keeps
    d = tmp_path / "cut"
    torchrun(2, _flags(corpus, save=d / "ckpt", **sat, **{"exit-interval": 4, "tensorboard-dir": d / "tb1"}))
    torchrun(2, _flags(corpus, load=d / "ckpt", save=d / "ckpt", **sat, **{"tensorboard-dir": d / "tb2"}))
    got = scalars(d / "tb2", "lm loss")
    for step in (5, 6):
        assert got[step] == ref_loss[step], (step, got[step], ref_loss[step])
