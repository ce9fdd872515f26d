"""The pure SAT core: selection, keep counts, schedules, importance metrics, config errors."""

import math

import pytest
import torch

from sat_dist.config import ModelConfig, SATConfig
from sat_dist.errors import SatDistError
from sat_dist.sat import OmissionSchedule, attention_scores, keep_count, mlp_scores, select_units
from sat_dist.sat.selection import selection_generator


# ---------------------------------------------------------------- selection
def test_sampling_k1_matches_softmax():
    scores = torch.tensor([0.2, 1.0, 0.9, 0.5, 0.95, 0.0])
    T = 0.1
    p = torch.softmax(scores / scores.max() / T, 0)
    n = 20000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(n):
        counts[select_units(scores, 1, "sampling", T, g)] += 1
    # Binomial bound: 5 standard deviations per unit (false alarm < 1e-5 over 6 units).
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sd + 1).all(), (counts / n, p)


def test_sampling_k2_inclusion_matches_hand_computation():
    scores = torch.tensor([1.0, 0.8, 0.6, 0.3])
    T = 0.25
    p = torch.softmax(scores / scores.max() / T, 0).double()
    # Sequential draws without replacement: P(i in pair) = p_i + sum_{j!=i} p_j p_i / (1 - p_j).
    incl = torch.tensor([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)])
    n = 20000
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(4, dtype=torch.float64)
    for _ in range(n):
        idx = select_units(scores, 2, "sampling", T, g)
        assert idx.numel() == 2 and idx[0] < idx[1]
        counts[idx] += 1
    sd = (n * incl * (1 - incl)).sqrt()
    assert ((counts - n * incl).abs() <= 5 * sd + 1).all(), (counts / n, incl)


def test_topk_picks_largest():
    scores = torch.tensor([0.1, 5.0, 3.0, 0.2, 4.0, 1.0])
    idx = select_units(scores, 3, "topk", 0.05, torch.Generator().manual_seed(0))
    assert idx.tolist() == [1, 2, 4]


def test_same_seed_same_selection_other_seed_other():
    scores = torch.rand(512, generator=torch.Generator().manual_seed(0))

    def pick(seed, step=7, micro=0, layer=3, tp=0, kind="mlp"):
        g = selection_generator(seed, step, micro, layer, tp, kind)
        return select_units(scores, 256, "sampling", 1.0, g)

    assert torch.equal(pick(1), pick(1))
    assert not torch.equal(pick(1), pick(2))
    assert not torch.equal(pick(1), pick(1, step=8))
    assert not torch.equal(pick(1), pick(1, layer=4))
    assert not torch.equal(pick(1), pick(1, tp=1))
    assert not torch.equal(pick(1), pick(1, micro=1))
    # Global RNG state plays no part.
    torch.manual_seed(123)
    a = pick(5)
    torch.manual_seed(456)
    assert torch.equal(a, pick(5))


def test_all_zero_scores_still_select_k():
    idx = select_units(torch.zeros(10), 4, "sampling", 0.05, torch.Generator().manual_seed(0))
    assert idx.numel() == 4 and idx.unique().numel() == 4


@pytest.mark.parametrize("n,rate,align,expect", [
    (11008, 0.3, 128, 7680),   # 7705.6 -> 7680 (the aligned count that ran faster than dense)
    (11008, 0.5, 128, 5504),
    (11008, 0.0, 128, 11008),  # rate 0 is dense, not rounded
    (11008, 0.99, 128, 128),   # at least align, never 0
    (32, 0.3, 1, 22),
    (32, 0.5, 1, 16),
    (8, 0.9, 1, 1),
    (4, 0.3, 1, 3),            # 2.8 rounds to nearest (floored, 2 omitted half the heads)
    (3, 0.15, 1, 3),           # 2.55 -> 3: this nonzero rate runs dense
    (1376, 0.075, 128, 1280),  # 1272.8 -> 1280 (floored: 1152)
    (1376, 0.3, 128, 1024),    # 963.2 -> 1024 (nearest; the ladder rule may go down, below)
    (100, 0.3, 128, 100),      # align above n: never more than n
])
def test_keep_count(n, rate, align, expect):
    assert keep_count(n, rate, align) == expect


LADDER = (0.3, 0.225, 0.15, 0.075)  # the default ladder: r = 0.3, 3 rungs


@pytest.mark.parametrize("what,n,align,kind,expect", [
    # SmolLM2-135M attention, 3 KV groups (TP=1): only 2 and 3 exist; nearest, so 0.15 and
    # 0.075 run dense (floored, every rung kept 2: a third of the heads omitted to the end)
    ("smollm2 attn", 3, 1, "attn", [2, 2, 3, 3]),
    # Llama-2 7B attention at TP=8, 4 heads per partition: 0.3 keeps 3 (floored: 2, i.e. 0.5)
    ("7b attn tp8", 4, 1, "attn", [3, 3, 3, 4]),
    # Llama-2 7B MLP at TP=8, 1376 channels, align 128: nearest gives 1024 twice; one step
    # down for 0.3 keeps all rungs distinct (floored: 1152 twice)
    ("7b mlp tp8", 1376, 128, "mlp", [896, 1024, 1152, 1280]),
    ("7b mlp tp1", 11008, 128, "mlp", [7680, 8576, 9344, 10240]),
    ("tiny-test mlp", 128, 16, "mlp", [96, 96, 112, 112]),  # no distinct choice within one step
])
def test_ladder_keep_counts_by_hand(what, n, align, kind, expect):
    cfg = SATConfig(omission_attn=0.3, omission_mlp=0.3).validate()
    assert [keep_count(n, r, align, cfg, kind) for r in LADDER] == expect, what
    assert keep_count(n, 0.0, align, cfg, kind) == n


def test_ladder_keep_count_rule_brute_force():
    """Against an enumeration of all down/up choices: distinct and below n if any choice is,
    the one closest to the nominal counts; else nearest."""
    import itertools

    for n, align, r, L in ((1376, 128, 0.3, 3), (40, 4, 0.5, 4), (7, 1, 0.6, 2), (64, 16, 0.45, 3), (9, 1, 0.3, 5)):
        cfg = SATConfig(omission_mlp=r, ladder_steps=L).validate()
        rates = [r * (1.0 if j == 0 else (L - j + 1) / (L + 1)) for j in range(L + 1)]
        nominal = [n * (1 - x) for x in rates]
        choices = [sorted({min(n, max(align, math.floor(c / align) * align)),
                           min(n, max(align, math.ceil(c / align) * align))}) for c in nominal]
        ok = [ks for ks in itertools.product(*choices) if len(set(ks + (n,))) == len(ks) + 1
              and list(ks) == sorted(ks)]
        if ok:
            want = min(ok, key=lambda ks: (sum(abs(k - c) for k, c in zip(ks, nominal)), ks))
        else:
            want = tuple(min(n, max(align, math.floor(c / align + 0.5) * align)) for c in nominal)
        got = tuple(keep_count(n, x, align, cfg, "mlp") for x in rates)
        assert got == want, (n, align, r, L, got, want)


def test_constant_schedule_rounds_to_nearest():
    cfg = SATConfig(schedule="constant", omission_attn=0.3).validate()
    assert keep_count(4, 0.3, 1, cfg, "attn") == 3


# ---------------------------------------------------------------- schedules
def test_ladder_schedule_values():
    cfg = SATConfig(omission_mlp=0.4, omission_attn=0.2, schedule="ladder",
                    sparse_fraction=0.5, ladder_steps=3, dense_fraction=0.2).validate()
    s = OmissionSchedule(cfg, total_steps=100)
    # 0-49 sparse at r; 50-79 three rungs of 10 steps at 3/4, 2/4, 1/4 of r; 80-99 dense.
    expect = {0: 0.4, 49: 0.4, 50: 0.3, 59: 0.3, 60: 0.2, 69: 0.2, 70: 0.1, 79: 0.1, 80: 0.0, 99: 0.0}
    for step, r in expect.items():
        attn, mlp = s.rates(step)
        assert mlp == pytest.approx(r), step
        assert attn == pytest.approx(r / 2), step


def test_short_ladder_still_ends_dense():
    s = OmissionSchedule(SATConfig(omission_mlp=0.3).validate(), total_steps=6)  # 0.1 * 6 < 1 step
    assert [round(s.rates(t)[1], 4) for t in range(6)] == [0.3, 0.3, 0.3, 0.225, 0.15, 0.0]


@pytest.mark.parametrize("sparse,dense", [(0.6, 0.0), (1.0, 0.0), (0.9, 0.0), (0.0, 0.0), (0.5, 0.5)])
@pytest.mark.parametrize("steps", [1, 2, 7, 100])
def test_ladder_always_ends_with_a_dense_step(sparse, dense, steps):
    s = OmissionSchedule(SATConfig(sparse_fraction=sparse, dense_fraction=dense).validate(), steps)
    assert s.fraction(steps - 1) == 0.0 and s.rates(steps - 1) == (0.0, 0.0)
    if steps > 1 and sparse > 0 and dense == 0:
        assert s.fraction(0) == 1.0  # only the last step was made dense


def test_ladder_dense_fraction_zero_by_hand():
    s = OmissionSchedule(SATConfig(omission_mlp=0.4, sparse_fraction=0.5, ladder_steps=1,
                                   dense_fraction=0.0).validate(), 10)
    # 0-4 at r; the one rung (r/2) over steps 5-8; step 9 dense (without the fix: r/2)
    assert [round(s.rates(t)[1], 6) for t in range(10)] == [0.4] * 5 + [0.2] * 4 + [0.0]
    s = OmissionSchedule(SATConfig(omission_mlp=0.4, sparse_fraction=1.0, dense_fraction=0.0).validate(), 4)
    assert [s.rates(t)[1] for t in range(4)] == [0.4, 0.4, 0.4, 0.0]


def test_rungs_lists_the_distinct_rates_in_order():
    cfg = SATConfig(omission_mlp=0.4, omission_attn=0.2, sparse_fraction=0.5, ladder_steps=3,
                    dense_fraction=0.2).validate()
    rungs = [(round(a, 9), round(m, 9)) for a, m in OmissionSchedule(cfg, 100).rungs()]
    assert rungs == [(0.2, 0.4), (0.15, 0.3), (0.1, 0.2), (0.05, 0.1), (0, 0)]
    short = OmissionSchedule(SATConfig(omission_mlp=0.3).validate(), 6)  # skips the last rung
    assert [m for _, m in short.rungs()] == pytest.approx([0.3, 0.225, 0.15, 0.0])
    assert OmissionSchedule(SATConfig(schedule="dense").validate(), 5).rungs() == [(0.0, 0.0)]


def test_constant_and_dense_schedules():
    c = OmissionSchedule(SATConfig(schedule="constant", omission_mlp=0.5).validate(), 10)
    assert [c.rates(t)[1] for t in (0, 5, 9)] == [0.5, 0.5, 0.5]
    d = OmissionSchedule(SATConfig(schedule="dense", omission_mlp=0.5).validate(), 10)
    assert [d.rates(t) for t in (0, 9)] == [(0.0, 0.0), (0.0, 0.0)]


def test_a_stage_runs_the_schedule_over_its_own_steps():
    """A stage from iteration 4 to 10 runs the 6-step ladder (worked out by hand: sparse 0.6
    of 6 steps, then 3/4 and 2/4 of the rate, the last step dense) at iterations 4..9."""
    stage = OmissionSchedule(SATConfig(omission_mlp=0.3).validate(), 6, first_step=4)
    assert [m for _, m in (stage.rates(4 + i) for i in range(6))] == pytest.approx([0.3, 0.3, 0.3, 0.225, 0.15, 0.0])
    assert [m for _, m in stage.rungs()] == pytest.approx([0.3, 0.225, 0.15, 0.0])


# ---------------------------------------------------------------- importance
H, F, PLANT = 16, 12, 7


def _planted_mlp():
    """Channel PLANT is the important one: its gate/up rows are large and aligned with the
    input's strongest features; all others are small."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, H, generator=g) * 0.1
    x[:, :4] += 3.0  # strong features 0-3
    fc1 = torch.randn(2 * F, H, generator=g) * 0.05
    fc2 = torch.randn(F, H, generator=g) * 0.05
    fc1[PLANT, :4] = 1.0
    fc1[F + PLANT, :4] = 1.0
    fc2[PLANT] = 0.5
    return x, fc1, fc2


@pytest.mark.parametrize("metric", ["maxip", "wanda", "magnitude", "activation"])
def test_mlp_metric_ranks_planted_first(metric):
    x, fc1, fc2 = _planted_mlp()
    s = mlp_scores(metric, x, fc1, fc2)
    assert s.shape == (F,) and int(s.argmax()) == PLANT


def test_mlp_metrics_equal_hand_computation():
    x, fc1, fc2 = _planted_mlp()
    maxip = [max(abs(float(x[t] @ fc1[j])) for t in range(40)) for j in range(F)]
    feat = [math.sqrt(sum(float(x[t, i]) ** 2 for t in range(40))) for i in range(H)]
    wanda = [sum((abs(float(fc1[j, i])) + abs(float(fc1[F + j, i]))) * feat[i] for i in range(H)) for j in range(F)]
    mag = [math.sqrt(float(fc1[j].pow(2).sum() + fc1[F + j].pow(2).sum() + fc2[j].pow(2).sum())) for j in range(F)]
    torch.testing.assert_close(mlp_scores("maxip", x, fc1, fc2), torch.tensor(maxip), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mlp_scores("wanda", x, fc1, fc2), torch.tensor(wanda), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mlp_scores("magnitude", x, fc1, fc2), torch.tensor(mag), rtol=1e-5, atol=1e-6)
    # activation: the norm over tokens of channel j's contribution a_j(t) * W_down[:, j]
    silu = lambda z: z / (1.0 + math.exp(-z))  # noqa: E731
    act = [math.sqrt(sum((silu(float(x[t] @ fc1[j])) * float(x[t] @ fc1[F + j])) ** 2 for t in range(40)))
           * math.sqrt(float(fc2[j].pow(2).sum())) for j in range(F)]
    torch.testing.assert_close(mlp_scores("activation", x, fc1, fc2), torch.tensor(act), rtol=1e-5, atol=1e-6)
    contrib = [float(torch.stack([silu(float(x[t] @ fc1[j])) * float(x[t] @ fc1[F + j]) * fc2[j]
                                  for t in range(40)]).norm()) for j in range(F)]
    torch.testing.assert_close(mlp_scores("activation", x, fc1, fc2), torch.tensor(contrib), rtol=1e-4, atol=1e-6)
    # token_stride scores every 4th token only
    strided = [max(abs(float(x[t] @ fc1[j])) for t in range(0, 40, 4)) for j in range(F)]
    torch.testing.assert_close(mlp_scores("maxip", x, fc1, fc2, token_stride=4), torch.tensor(strided),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["maxip", "wanda", "magnitude", "activation"])
@pytest.mark.parametrize("groups,heads", [(4, 4), (2, 6)], ids=["mha", "gqa"])
def test_attention_metric_ranks_planted_first(metric, groups, heads):
    cfg = ModelConfig(hidden_size=24, num_attention_heads=heads, num_query_groups=groups).validate()
    r, d, h = cfg.heads_per_group, cfg.head_dim, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, h, generator=g) * 0.1
    x[:, :3] += 2.0
    qkv = torch.randn(groups, (r + 2) * d, h, generator=g) * 0.05
    o = torch.randn(groups * r * d, h, generator=g) * 0.05
    plant = groups - 1
    qkv[plant, :, :3] = 1.0
    s = attention_scores(metric, x, qkv.reshape(-1, h), o, r, d)
    assert s.shape == (groups,) and int(s.argmax()) == plant
    if metric == "maxip":  # hand computation: max over tokens of the group's query norm
        hand = [max(float((x[t] @ qkv[u, : r * d].t()).norm()) for t in range(30)) for u in range(groups)]
        torch.testing.assert_close(s, torch.tensor(hand), rtol=1e-5, atol=1e-6)
    if metric == "activation":  # hand: L2 norm over tokens of the group's values times ||W_o,g||
        wo = o.view(groups, r * d, h)
        hand = [math.sqrt(sum(float((x[t] @ qkv[u, (r + 1) * d:].t()).pow(2).sum()) for t in range(30)))
                * float(wo[u].norm()) for u in range(groups)]
        torch.testing.assert_close(s, torch.tensor(hand), rtol=1e-5, atol=1e-6)


def test_random_metric_is_seeded():
    x, fc1, fc2 = _planted_mlp()
    a = mlp_scores("random", x, fc1, fc2, generator=torch.Generator().manual_seed(3))
    b = mlp_scores("random", x, fc1, fc2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (F,)


def test_reduce_is_applied_to_the_right_statistic():
    """Two halves of a batch, combined by the reduce hook, score like the whole batch."""
    x, fc1, fc2 = _planted_mlp()
    halves = (x[:20], x[20:])
    for metric, op in (("maxip", "max"), ("wanda", "sum"), ("activation", "sum")):
        partials = []

        def capture(t, o, _p=partials):
            assert o == op
            _p.append(t)
            return t

        for half in halves:
            mlp_scores(metric, half, fc1, fc2, reduce=capture)
        combined = torch.maximum(*partials) if op == "max" else partials[0] + partials[1]
        got = mlp_scores(metric, halves[0], fc1, fc2, reduce=lambda t, o: combined)
        torch.testing.assert_close(got, mlp_scores(metric, x, fc1, fc2))


# ---------------------------------------------------------------- config errors
@pytest.mark.parametrize("field,value,allowed", [
    ("metric", "l1", "maxip, wanda, magnitude, random"),
    ("selection", "greedy", "sampling, topk"),
    ("schedule", "cosine", "ladder, constant, dense"),
    ("temperature", 0.0, "> 0"),
    ("omission_mlp", 1.0, "[0, 1)"),
    ("omission_attn", -0.1, "[0, 1)"),
    ("ladder_steps", -1, ">= 0"),
    ("align_mlp", 0, ">= 1"),
    ("token_stride", 1.5, ">= 1"),
    ("sparse_fraction", 2.0, "[0, 1]"),
])
def test_bad_sat_config_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(SatDistError) as e:
        SATConfig(**{field: value}).validate()
    msg = str(e.value)
    assert msg.startswith(f"sat.{field}: got {value!r}") and allowed in msg and "\n" not in msg


def test_fractions_must_fit_in_the_run():
    with pytest.raises(SatDistError, match="sparse_fraction \\+ sat.dense_fraction"):
        SATConfig(sparse_fraction=0.8, dense_fraction=0.3).validate()


def test_bad_model_config():
    with pytest.raises(SatDistError, match="model.num_query_groups: got 3"):
        ModelConfig(num_attention_heads=4, num_query_groups=3).validate()
