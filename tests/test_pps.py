"""--sat-selection pps: inclusion probabilities, the sampler, and the unbiased sparse backward.

References: a hand computation of the water-filling probabilities, binomial bounds on
empirical inclusion frequencies, and the dense model's autograd gradient, which the mean of
many sparse backwards must reach within a statistical bound (and which it misses when the
1/pi weights are left out).
"""

import pytest
import torch

from sat_dist.checkpoint.hf import merge_tp_state_dicts, shard_hf_state_dict
from sat_dist.config import SATConfig
from sat_dist.model.llama import LlamaModel
from sat_dist.model.sat_state import SATState
from sat_dist.model.sparse_ops import backward_sparse_mlp
from sat_dist.sat.selection import inclusion_probabilities, pps_units, selection_generator
from tests.test_tensor_parallel import MHA, _batch, _hf_model, _single


def test_inclusion_probabilities_equal_hand_water_filling():
    scores = torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 3.0])
    pi = inclusion_probabilities(scores, 3)
    # 10 alone would take 3 * 10 / 18.5 > 1: capped. The other 2 are spread over 7.5 of score
    # (3 would take 2 * 3 / 7.5 = 0.8 < 1: not capped): c = 2 / 7.5.
    c = 2 / 7.5
    want = torch.tensor([1.0, c, c, c, c, 0.5 * c, 0.0, 3 * c], dtype=torch.float64)
    torch.testing.assert_close(pi, want, atol=1e-5, rtol=1e-9)
    assert pi[6] > 0  # a zero score still has a (tiny) chance
    assert float(pi.sum()) == pytest.approx(3.0, abs=1e-12)
    # two capped, then the rest: 9 and 8 both pass 1 at k = 3 of [9, 8, 1, 1, 1, 1]
    pi = inclusion_probabilities(torch.tensor([9.0, 8.0, 1.0, 1.0, 1.0, 1.0]), 3)
    torch.testing.assert_close(pi, torch.tensor([1, 1, .25, .25, .25, .25], dtype=torch.float64))
    # the floor mixes in the uniform k/n: weights 1/pi are then at most n / (k * floor)
    scores = torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 3.0])
    mixed = inclusion_probabilities(scores, 3, floor=0.4)
    torch.testing.assert_close(mixed, 0.6 * want + 0.4 * 3 / 8, atol=1e-5, rtol=1e-9)
    assert float(mixed.sum()) == pytest.approx(3.0, abs=1e-12) and float(mixed.min()) >= 0.4 * 3 / 8
    # uniform scores: k / n each
    torch.testing.assert_close(inclusion_probabilities(torch.zeros(10), 4), torch.full((10,), 0.4, dtype=torch.float64))


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_pps_keeps_exactly_k_with_frequencies_pi_and_weights_one_over_pi(floor):
    g0 = torch.Generator().manual_seed(0)
    scores = torch.rand(40, generator=g0).pow(3) * 5  # skewed: some capped, some tiny
    k, n = 12, 10000
    pi = inclusion_probabilities(scores, k, floor)
    if floor == 0:
        assert (pi == 1).sum() >= 1 and (pi < 0.05).sum() >= 3
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(40, dtype=torch.float64)
    for _ in range(n):
        idx, w = pps_units(scores, k, g, floor)
        assert idx.numel() == k and idx.unique().numel() == k and bool((idx[1:] > idx[:-1]).all())
        torch.testing.assert_close(w, (1 / pi[idx]).float())
        counts[idx] += 1
    # Binomial bound: 5 standard deviations per unit (false alarm < 1e-5 over 40 units).
    sd = (n * pi * (1 - pi)).sqrt()
    assert ((counts - n * pi).abs() <= 5 * sd + 1).all(), (counts / n, pi)


def test_pps_draw_depends_on_the_seeded_generator_only():
    scores = torch.rand(256, generator=torch.Generator().manual_seed(0))

    def pick(step):
        return pps_units(scores, 64, selection_generator(7, step, 0, 1, 0, "mlp"))[0]

    torch.manual_seed(1)
    a = pick(3)
    torch.manual_seed(2)
    assert torch.equal(a, pick(3)) and not torch.equal(a, pick(4))


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[n].double().flatten() for n in sorted(grads)])


def _bias_and_noise(samples: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """(||mean - dense||^2, its expectation if the estimator were unbiased: sum var / N)."""
    n = samples.shape[0]
    mean = samples.mean(0)
    return float((mean - dense).pow(2).sum()), float(samples.var(0).sum() / n)


def test_sparse_backward_mlp_is_an_unbiased_estimate_of_the_dense_gradient():
    """One MLP: the mean over draws of the pps backward's dx, dW_fc1 and dW_fc2 is autograd's
    dense gradient; without the 1/pi weights (the same draws) it is not."""
    g0 = torch.Generator().manual_seed(0)
    t, h, f, k = 24, 8, 32, 8
    x = torch.randn(2, t // 2, h, generator=g0, dtype=torch.float64)
    fc1 = torch.randn(2 * f, h, generator=g0, dtype=torch.float64) * 0.5
    fc2 = torch.randn(f, h, generator=g0, dtype=torch.float64) * 0.5
    dy = torch.randn(2, t // 2, h, generator=g0, dtype=torch.float64)

    def grads(select):
        xs, w1, w2 = (p.clone().requires_grad_() for p in (x, fc1, fc2))
        if select is None:
            gate, up = torch.nn.functional.linear(xs, w1).chunk(2, dim=-1)
            y = (torch.nn.functional.silu(gate) * up) @ w2
        else:
            y = backward_sparse_mlp(xs, w1, w2, select)
        y.backward(dy)
        return torch.cat([xs.grad.flatten(), w1.grad.flatten(), w2.grad.flatten()])

    dense = grads(None)
    g = torch.Generator().manual_seed(1)
    weighted, plain = [], []
    a = torch.nn.functional.silu(x @ fc1[:f].t()) * (x @ fc1[f:].t())  # [2, t/2, f]
    scores = a.reshape(-1, f).norm(dim=0) * fc2.norm(dim=1)  # the activation metric
    for _ in range(3000):
        idx, w = pps_units(scores, k, g)
        weighted.append(grads(lambda _a: (idx, w.double())))
        plain.append(grads(lambda _a: (idx, None)))
    err, noise = _bias_and_noise(torch.stack(weighted), dense)
    err_plain, noise_plain = _bias_and_noise(torch.stack(plain), dense)
    print(f"\nHT: ||mean - dense||^2 {err:.3e} (noise {noise:.3e}); without 1/pi {err_plain:.3e} "
          f"(noise {noise_plain:.3e})")
    # Unbiased: the squared error is a sum of many noise terms with mean `noise`; 3x is far
    # out in its tail. Biased: the bias alone is many times the noise.
    assert err < 3 * noise
    assert err_plain > 30 * noise_plain


def _model_grad_samples(cfg, hf_sd, ids, labels, steps: int, weigh: bool) -> torch.Tensor:
    sat = SATConfig(selection="pps", sparse_pass="backward", align_mlp=8, token_stride=1).validate()
    state = SATState(sat)
    if not weigh:  # the same draws, without their 1/pi weights
        state.selection_weights = lambda layer, kind: None
    model = LlamaModel(cfg, state).double()
    model.load_state_dict(shard_hf_state_dict(hf_sd, cfg, 1, 0))
    samples = []
    for step in range(steps):
        state.set_step(step, 0, attn=0.0, mlp=0.5)
        model.zero_grad(set_to_none=True)
        model(ids, labels).mean().backward()
        assert state.kept[(0, "mlp")] == (64, 128) and state.kept[(1, "mlp")] == (64, 128)
        samples.append(_flat(merge_tp_state_dicts([{n: p.grad for n, p in model.named_parameters()}], cfg)))
    return torch.stack(samples)


def test_model_backward_with_pps_averages_to_the_dense_gradient():
    """The whole model (2 layers, MLP rate 0.5, every parameter): gradients averaged over the
    draws of 300 steps equal the dense model's gradient within the statistical bound, and
    miss it by far without the 1/pi weights."""
    cfg = MHA
    hf_sd = _hf_model(cfg).state_dict()
    ids, labels = _batch(cfg)
    _, dense, _ = _single(cfg, hf_sd, ids, labels)
    dense = _flat(dense)
    err, noise = _bias_and_noise(_model_grad_samples(cfg, hf_sd, ids, labels, 300, True), dense)
    err_plain, noise_plain = _bias_and_noise(_model_grad_samples(cfg, hf_sd, ids, labels, 300, False), dense)
    print(f"\nmodel: ||mean - dense||^2 {err:.3e} (noise {noise:.3e}); without 1/pi {err_plain:.3e} "
          f"(noise {noise_plain:.3e})")
    assert noise > 0 and err < 3 * noise
    assert err_plain > 30 * noise_plain


@pytest.mark.parametrize("overrides,msg", [
    ({"selection": "pps"}, "add --sat-sparse-pass backward"),
    ({"selection": "pps", "sparse_pass": "both"}, "add --sat-sparse-pass backward"),
    ({"selection": "pps", "sparse_pass": "backward", "pps_floor": 1.5}, "sat.pps_floor: got 1.5"),
])
def test_pps_bad_settings_are_refused_with_one_clear_error(overrides, msg):
    from sat_dist.errors import SatDistError

    with pytest.raises(SatDistError) as e:
        SATConfig(**overrides).validate()
    assert msg in str(e.value) and "\n" not in str(e.value)
