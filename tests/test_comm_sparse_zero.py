"""Comm-sparse ZeRO-3 (--sat-comm-sparse): only the kept rows of SAT's weights are gathered
and reduced over the DP group.

Reference: the current path, DeepSpeed gathering and reducing the same weights whole
(--sat-comm-sparse off), on the same ranks, data and seeds: the losses, gradient norms and
final weights of a multi-step SAT run must agree to fp32 reordering (the scores are summed in
another order); and the bytes each rank sends, against the arithmetic of the partitions.
"""

import dataclasses
import math

import pytest
import torch

from sat_dist.config import ModelConfig, SATConfig, TrainConfig
from sat_dist.errors import SatDistError
from sat_dist.train.arguments import MODEL_CONFIG_DIR
from sat_dist.train.engine import comm_sparse_line, comm_sparse_wanted, deepspeed_config
from tests.dist_harness import run_ranks

ZERO3 = str(MODEL_CONFIG_DIR.parents[1] / "configs" / "ds_zero3.json")
SEQ, STEPS = 32, 20
# Rows that do not split evenly over 2 or 4 ranks (ffn 88: fc2 has 88 rows, fc1 176; qkv
# 3 groups * 4 rows * 8): partitions then end inside rows, and shares differ in size.
ODD = ModelConfig(hidden_size=24, ffn_hidden_size=88, num_layers=2, num_attention_heads=6, num_query_groups=3,
                  vocab_size=256, make_vocab_size_divisible_by=16, max_position_embeddings=64, name="odd")


def _train_config(mode: str, accum: int, dp: int, bf16: bool = False, recompute: bool = False) -> TrainConfig:
    return TrainConfig(micro_batch_size=1, global_batch_size=accum * dp, seq_length=SEQ, train_iters=STEPS,
                       lr=3e-3, min_lr=0.0, lr_warmup_iters=0, lr_decay_style="constant", clip_grad=0.05,
                       weight_decay=0.1, bf16=bf16, ds_config=ZERO3, sat_comm_sparse=mode,
                       recompute_activations=recompute).validate()


def _sat(metric: str = "activation") -> SATConfig:
    return SATConfig(schedule="constant", omission_attn=0.34, omission_mlp=0.5, align_mlp=1, metric=metric,
                     token_stride=2).validate()


def _run(rank, world, tp, cfg, mode, sat_cfg, accum, steps, bf16=False, route="auto", zero_over=None,
         recompute=False, record=False):
    """Train `steps` SAT steps (every fourth dense); per step the loss (averaged over DP) and the gradient norm,
    then every weight whole (fp32 master) and the bytes each phase sent. Sampled weight gradients
    (sat_cfg.wgrad_tokens < 1) run on every step, the dense ones included."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from sat_dist.parallel.state import init_distributed
    from sat_dist.train.engine import build_engine

    comm = init_distributed(tp)
    t = _train_config(mode, accum, comm.dp_size, bf16, recompute)
    ds = deepspeed_config(t, comm.dp_size)
    # every weight partitioned (none kept whole as "persistent"): the case of a real model
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds["zero_optimization"].update(zero_over or {})
    torch.manual_seed(0)
    eng = build_engine(cfg, sat_cfg, t, comm, ds_config=ds)
    zero = eng.model.layers[0].mlp.row_zero
    assert (zero is not None) == (mode == "on")
    if zero is not None:
        zero.scoring_route = route
    log = []
    if record:
        zero.overlap = True  # on CPU it is off by default (docs/SAT.md)
        zero.comm = _Recording(zero.comm, log, {id(p): n for n, p in eng.model.named_parameters()})
    gen = torch.Generator().manual_seed(100 + comm.dp_rank)
    batches = [torch.randint(0, cfg.vocab_size, (1, SEQ + 1), generator=gen) for _ in range(accum)]
    losses, norms, per_step = [], [], []
    for step in range(steps):
        before = dict(zero.bytes_moved) if zero is not None else {}
        total = torch.zeros(())
        for micro in range(accum):
            # every fourth step dense (a ladder's rungs switch the same way): DeepSpeed then
            # gathers and reduces the SAT weights whole, as without comm-sparse
            dense = step % 4 == 3
            eng.sat.set_step(step, micro, 0.0 if dense else sat_cfg.omission_attn,
                             0.0 if dense else sat_cfg.omission_mlp, wgrad=1.0)
            ids = batches[micro]  # the same batches every step: the loss must fall
            log.append(("micro", step, micro))
            loss = eng(ids[:, :-1], ids[:, 1:]).float().mean()
            eng.backward(loss)
            eng.step()
            total += loss.detach() / accum
        dist.all_reduce(total, group=comm.dp_group)
        losses.append(float(total) / comm.dp_size)
        norms.append(float(eng.grad_norm()))
        if zero is not None:
            sent = {k: v - before[k] for k, v in zero.bytes_moved.items()}
            kept = {key: (None if idx is None else idx.tolist()) for key, idx in eng.sat.selected.items()}
            per_step.append((sent, kept))
    weights = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in eng.model.named_parameters()}
    kept = {k: v for k, v in eng.sat.kept.items()}
    return {"tp_rank": comm.tp_rank, "dp_rank": comm.dp_rank, "losses": losses, "norms": norms,
            "weights": weights, "kept": kept, "per_step": per_step, "log": log}


class _Recording:
    """Comm-sparse's collectives, recording when each is issued and when waited for."""

    def __init__(self, inner, log, names):
        self.inner, self.log, self.serial = inner, log, 0

    def _issue(self, kind, tag, work):
        n, self.serial = self.serial, self.serial + 1
        self.log.append(("issue", tag, n))
        log = self.log

        class Handle:
            def wait(self):
                log.append(("wait", tag, n))
                return work.wait()
        return Handle()

    def all_gather(self, out, inp, tag):
        return self._issue("gather", tag, self.inner.all_gather(out, inp, tag))

    def reduce_scatter(self, out, inp, tag):
        return self._issue("reduce", tag, self.inner.reduce_scatter(out, inp, tag))

    def all_reduce(self, t, **kw):
        return self.inner.all_reduce(t, **kw)


def _compare(on, off, loss_tol=2e-5, weight_tol=2e-5):
    for a, b in zip(on, off):
        assert a["losses"] == pytest.approx(b["losses"], rel=loss_tol)
        assert a["norms"] == pytest.approx(b["norms"], rel=10 * loss_tol)
        for name in a["weights"]:
            err = float((a["weights"][name] - b["weights"][name]).abs().max())
            assert err < weight_tol, (name, err)


REGATHER = {"stage3_max_reuse_distance": 0}  # ZeRO-3 gathers again for backward: so does comm-sparse


@pytest.mark.parametrize("cfg_name,tp,world,accum,route,zero_over", [("tiny-test", 1, 2, 2, "tokens", None),
                                                                     ("odd", 1, 4, 1, "tokens", REGATHER),
                                                                     ("odd", 1, 4, 1, "weights", None),
                                                                     ("tiny-test", 2, 4, 2, "tokens", REGATHER)],
                         ids=["dp2-ga2", "dp4-unaligned-regather", "dp4-unaligned-weights-route", "tp2xdp2-regather"])
def test_losses_equal_the_current_path(cfg_name, tp, world, accum, route, zero_over):
    """20 SAT steps at (0.34, 0.5) (every fourth dense), clipping active, weight decay on:
    comm-sparse and the whole-weight path give the same losses, gradient norms and weights,
    with either scoring route."""
    cfg = ODD if cfg_name == "odd" else ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    on = run_ranks(world, _run, tp, cfg, "on", _sat(), accum, STEPS, False, route, zero_over, timeout=600)
    off = run_ranks(world, _run, tp, cfg, "off", _sat(), accum, STEPS, False, route, zero_over, timeout=600)
    steps = [sent for sent, _ in on[0]["per_step"]]
    if zero_over == REGATHER:
        assert all(b["backward_gather"] == b["forward_gather"] > 0 for b in steps)
    else:  # a small model: ZeRO-3 keeps the weights from forward to backward, and so do we
        assert all(b["backward_gather"] == 0 < b["forward_gather"] for b in steps)
    _compare(on, off)
    assert on[0]["losses"][-1] < 0.9 * on[0]["losses"][0]  # it trained
    assert max(on[0]["norms"]) > 0.05  # clipping was active on some steps


def test_other_metrics_and_bf16_equal_the_current_path():
    """Scored on whole gathered weights (wanda) or from the seeded generator (random), and in
    bf16 with fp32 reduction: the same run as the whole-weight path."""
    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    for metric in ("wanda", "random"):
        on = run_ranks(2, _run, 1, cfg, "on", _sat(metric), 1, 6, timeout=600)
        off = run_ranks(2, _run, 1, cfg, "off", _sat(metric), 1, 6, timeout=600)
        _compare(on, off)
    on = run_ranks(2, _run, 1, cfg, "on", _sat(), 2, 6, True, timeout=600)
    off = run_ranks(2, _run, 1, cfg, "off", _sat(), 2, 6, True, timeout=600)
    _compare(on, off, loss_tol=1e-3, weight_tol=1e-3)  # bf16 products: rounding of the bf16 outputs


def test_optimizer_offload_equals_the_current_path():
    """Adam on the CPU (the gradient partitions are copied to it at the boundary): the same
    run as the whole-weight path."""
    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    zero_over = {"offload_optimizer": {"device": "cpu"}}
    on = run_ranks(2, _run, 1, cfg, "on", _sat(), 2, 6, False, "tokens", zero_over, timeout=600)
    off = run_ranks(2, _run, 1, cfg, "off", _sat(), 2, 6, False, "tokens", zero_over, timeout=600)
    _compare(on, off)


def test_hpz_is_refused_by_on_and_skipped_by_auto():
    """Comm-sparse would gather SAT's backward rows across nodes where hpZ keeps them on the
    node: `on` is one error naming hpZ, `auto` leaves DeepSpeed's path on."""
    from sat_dist.parallel.row_sparse_zero import unsupported_reason

    ds = {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 4}}
    assert "zero_hpz_partition_size 4" in unsupported_reason(_sat(), ds)
    assert unsupported_reason(_sat(), {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 1}}) is None


def _largest_share(rows, n_rows, h, world):
    """Largest number of elements of `rows` in one rank's flat partition of an [n_rows, h]
    weight (rank q holds elements [q*n, (q+1)*n), n = ceil(n_rows*h / world)): by counting."""
    numel, n = n_rows * h, math.ceil(n_rows * h / world)
    return max(sum(max(0, min((j + 1) * h, min((q + 1) * n, numel)) - max(j * h, min(q * n, numel)))
                   for j in rows) for q in range(world))


def test_bytes_match_the_arithmetic():
    """Bytes each rank sends per step and phase, against the partition arithmetic: for each
    SAT weight, the kept rows' elements in the fullest rank's partition (every share is
    padded to it) times (dp - 1) times 4 bytes; a dense step gathers every row. Exact, from
    the selections the run made (zero_bytes.step_bytes gives the expectation over uniformly
    random selections instead: test_largest_share_against_monte_carlo)."""
    cfg, world = ODD, 4
    res = run_ranks(world, _run, 1, cfg, "on", _sat(), 1, 4, False, "tokens", REGATHER, timeout=600)
    h, d, r = cfg.hidden_size, cfg.head_dim, cfg.heads_per_group
    groups, f = cfg.num_query_groups, cfg.ffn_hidden_size
    for sent, kept in res[0]["per_step"]:
        expected = 0
        for layer in range(cfg.num_layers):
            attn, mlp = kept[(layer, "attn")], kept[(layer, "mlp")]
            attn = list(range(groups)) if attn is None else attn  # a dense step gathers every row
            mlp = list(range(f)) if mlp is None else mlp
            qkv = [g * (r + 2) * d + i for g in attn for i in range((r + 2) * d)]
            proj = [g * r * d + i for g in attn for i in range(r * d)]
            expected += _largest_share(qkv, groups * (r + 2) * d, h, world)
            expected += _largest_share(proj, groups * r * d, h, world)
            expected += _largest_share(mlp + [f + j for j in mlp], 2 * f, h, world)
            expected += _largest_share(mlp, f, h, world)
        expected *= (world - 1) * 4
        assert sent["forward_gather"] == sent["backward_gather"] == sent["grad_reduce"] == expected
    sparse, dense = res[0]["per_step"][0][0], res[0]["per_step"][3][0]
    assert 0 < sparse["forward_gather"] < 0.75 * dense["forward_gather"]


# Four KV groups of one head (r = 1, d = 16: qkv 192 rows, proj 64), 128 MLP channels (fc1
# 256 rows, fc2 128), hidden 64: the auto rule worked by hand on it below.
RULE = ModelConfig(hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4, num_query_groups=4,
                   vocab_size=256, max_position_embeddings=64, name="rule")


def test_modes_and_errors():
    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    t = _train_config("auto", 1, 2)
    ds = deepspeed_config(t, 2)
    assert comm_sparse_wanted("on", _sat(), ds, cfg, t, 2)
    assert not comm_sparse_wanted("off", _sat(), ds, cfg, t, 2)
    assert not comm_sparse_wanted("auto", SATConfig(schedule="dense").validate(), ds, cfg, t, 2)
    comp = SATConfig(compensation="mean").validate()
    assert not comm_sparse_wanted("auto", comp, ds, cfg, t, 2)
    with pytest.raises(SatDistError, match="--sat-comm-sparse on: cannot run because --sat-compensation mean"):
        comm_sparse_wanted("on", comp, ds, cfg, t, 2)
    z1 = dict(ds, zero_optimization={"stage": 1})
    with pytest.raises(SatDistError, match="stage 1"):
        comm_sparse_wanted("on", _sat(), z1, cfg, t, 2)
    with pytest.raises(SatDistError, match="--sat-comm-sparse"):
        TrainConfig(sat_comm_sparse="yes").validate()
    assert comm_sparse_line("on", _sat(), ds, cfg, t, 2).startswith("comm-sparse ZeRO-3: on (--sat-comm-sparse on; ")
    assert comm_sparse_line("auto", comp, ds, cfg, t, 2) == \
        "comm-sparse ZeRO-3: off (--sat-compensation mean reads the omitted rows)"
    assert comm_sparse_line("off", _sat(), ds, cfg, t, 2) == "comm-sparse ZeRO-3: off (--sat-comm-sparse off)"
    # one DP rank moves nothing: auto keeps DeepSpeed's path, on still runs it
    assert not comm_sparse_wanted("auto", _sat(), ds, cfg, t, 1) and comm_sparse_wanted("on", _sat(), ds, cfg, t, 1)
    assert comm_sparse_line("auto", _sat(), ds, cfg, t, 1) == \
        "comm-sparse ZeRO-3: off (data-parallel size 1: no ZeRO traffic to thin)"


def test_auto_is_on_only_where_the_bytes_model_predicts_at_most_0_75():
    """The auto rule on both sides of its threshold, worked by hand: RULE at DP 2, fp32,
    attention dense, MLP omission 0.5 (64 of 128 channels), 16 scored tokens a micro-batch
    (32 tokens, stride 2), weights kept from forward to backward (a small model)."""
    sat = SATConfig(schedule="constant", omission_attn=0.0, omission_mlp=0.5, align_mlp=16, token_stride=2).validate()
    # The fullest rank's share, in rows, of each weight: qkv and proj are kept whole (96 and
    # 32 rows a rank); fc1's gate rows lie on rank 0 and its up rows on rank 1, the same 64
    # channels on each; fc2's 64 rows a rank hold a hypergeometric count of the 64 kept
    # (mean 32, variance 64 * 1/4 * 64/127), and the larger of two such counts summing to
    # 64 is 32 + its deviation * sqrt(2/pi) (the normal approximation; largest_share).
    fc2 = 32 + math.sqrt(64 * 0.25 * 64 / 127) * math.sqrt(2 / math.pi)
    shares = 96 + 32 + 64 + fc2  # 226.27 rows
    # Per layer and micro-batch, one gather and one reduce-scatter of 2 ranks' slots of 64-wide
    # fp32 rows (ring: each rank sends half of the buffer); whole: the 640 rows.
    sparse, whole = 2 * shares * 64 * 4, 2 * 0.5 * 640 * 64 * 4  # 115848, 163840 bytes
    # Scoring, per layer once a step: the MLP by the weights route (fc1 gathered, half of 256
    # rows x 64 x 4 bytes = 32768, against the tokens route's 16 x 64 x 4 + 2 x half of
    # 32 x 256 x 4 = 36864), and fc2's and proj's row norms all-reduced (2 x half of 192 x 4).
    scoring = 32768 + 768
    for accum, on in ((1, False), (16, True)):
        ratio = (accum * sparse + scoring) / (accum * whole)  # 0.912 and 0.720
        t = _train_config("auto", accum, 2)
        ds = deepspeed_config(t, 2)
        assert comm_sparse_wanted("auto", sat, ds, RULE, t, 2) is on
        assert comm_sparse_wanted("on", sat, ds, RULE, t, 2)  # on forces it either way
        words = f"predicted {ratio:.3f} of the whole-weight bytes for SAT's weights at DP 2, omission 0,0.5"
        assert comm_sparse_line("auto", sat, ds, RULE, t, 2) == (
            f"comm-sparse ZeRO-3: on (auto: {words}, on at <= 0.75; SAT's weights gathered and reduced by kept rows)"
            if on else f"comm-sparse ZeRO-3: off (auto: {words}; on needs <= 0.75; --sat-comm-sparse on forces it)")
    assert f"{(sparse + scoring) / whole:.3f}" == "0.912" and f"{(16 * sparse + scoring) / (16 * whole):.3f}" == "0.720"


def test_bytes_model_by_hand():
    """sat_dist.parallel.zero_bytes at Llama-2 7B's width, against numbers worked by hand."""
    from sat_dist.parallel.zero_bytes import expected_max_normal, scoring_bytes, step_bytes

    assert expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-9)
    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "llama2-7b.json")
    one = dataclasses.replace(cfg, num_layers=1)
    layer = (3 * 4096 + 4096 + 2 * 11008 + 11008) * 4096  # qkv, proj, fc1, fc2: 202,375,168 elements
    b = step_bytes(one, 2, 1, 512, 1, 0.5, 0.5, 8, w_bytes=4, g_bytes=4, x_bytes=4)
    # Each rank's slot holds the fullest share: of 32 KV groups (384 qkv rows, 128 proj rows
    # each), 16 kept, 16 on a rank: hypergeometric, mean 8, variance 16 * 1/4 * 16/31; the
    # larger of two counts summing to 16 is 8 + deviation * sqrt(2/pi). fc1: 5504 channels,
    # gate rows on one rank, up rows on the other. fc2: 5504 of 11008 rows, 5504 a rank.
    spread = math.sqrt(2 / math.pi)
    groups = 8 + math.sqrt(16 * 0.25 * 16 / 31) * spread
    fc2 = 2752 + math.sqrt(5504 * 0.25 * 5504 / 11007) * spread
    shares = groups * (384 + 128) + 5504 + fc2  # rows, about 0.54 of the layer's 49408 (0.5 kept)
    assert b["forward_gather"] == b["backward_gather"] == b["grad_reduce"] == \
        pytest.approx(0.5 * 2 * shares * 4096 * 4, rel=1e-12)
    assert b["dense_sat_weights"] == 3 * 0.5 * layer * 4
    dense = step_bytes(one, 2, 1, 512, 1, 1.0, 1.0, 8, w_bytes=4, g_bytes=4, x_bytes=4)
    assert dense["forward_gather"] == 0.5 * layer * 4  # nothing omitted: every share is a whole partition
    # scoring at DP 2, 64 tokens a rank: gathering the tokens beats gathering fc1's 22016 rows
    tokens, weights = scoring_bytes(2, 64, 22016, 4096, 2, 2)
    assert tokens == 64 * 4096 * 2 + 2 * 0.5 * (2 * 64 * 22016 * 4)
    assert weights == 0.5 * 22016 * 4096 * 2
    assert tokens < weights
    # at DP 64 with 512 tokens a rank the global tokens outnumber the rows: gather the rows
    tokens, weights = scoring_bytes(64, 512, 22016, 4096, 2, 2)
    assert weights == 63 / 64 * 22016 * 4096 * 2 < tokens


def _drawn_largest_shares(kept, h, world):
    """Largest kept elements of one rank's flat partition, in rows, per draw: kept [draws,
    n_rows] bool of an [n_rows, h] weight (rank q holds elements [q*n, (q+1)*n), n =
    ceil(n_rows*h / world)); _largest_share vectorized over draws."""
    import numpy as np

    draws, n_rows = kept.shape
    numel, n = n_rows * h, -(-n_rows * h // world)
    bounds = np.minimum(np.arange(world + 1) * n, numel)
    before = np.concatenate([np.zeros((draws, 1), np.int64), np.cumsum(kept, 1)], 1)  # kept rows before row i
    row, offset = bounds // h, bounds % h
    # kept elements before each bound: the whole kept rows before its row, and the part of its row
    elements = before[:, row] * h + np.where(row < n_rows, kept[:, np.minimum(row, n_rows - 1)] * offset, 0)
    return (elements[:, 1:] - elements[:, :-1]).max(1) / h


@pytest.mark.parametrize("name,dp,keep", [("llama2-7b", 2, 0.5), ("llama2-7b", 8, 0.7), ("llama2-7b", 64, 0.5),
                                          ("llama2-7b", 256, 0.9), ("llama2-7b", 256, 0.5), ("llama2-13b", 8, 0.7),
                                          ("llama2-13b", 64, 0.7), ("llama2-13b", 256, 0.5)])
def test_largest_share_against_monte_carlo(name, dp, keep):
    """zero_bytes.padded_shares (the normal approximation of the fullest rank's share) against
    1000 uniformly random selections (KV groups for qkv and proj, channels for fc1's gate and
    up rows and fc2's) laid on the real flat partitions and counted. The mean of 1000 draws
    has a standard error under 0.4% here. Tolerances: 4% for each weight and 2% for their sum;
    over 7B and 13B at DP 2-256 and keeps 0.5-0.9 the largest errors seen were 3.1% (13B's
    qkv at DP 8, keep 0.7: 5 groups a rank, 28 of 40 kept, a count near its cap) and 1.3%."""
    import numpy as np

    from sat_dist.parallel.zero_bytes import padded_shares

    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / f"{name}.json")
    groups, f, h = cfg.num_query_groups, cfg.ffn_hidden_size, cfg.hidden_size
    r, d = cfg.heads_per_group, cfg.head_dim
    k_groups, k_channels = round(groups * keep), round(f * keep)
    rng = np.random.default_rng(dp)

    def choose(draws, units, k):  # [draws, units] bool, k of each row True, uniformly
        out = np.zeros((draws, units), bool)
        np.put_along_axis(out, np.argsort(rng.random((draws, units)), 1)[:, :k], True, 1)
        return out

    drawn = {name: [] for name in ("qkv", "proj", "fc1", "fc2")}
    for _ in range(4):
        g, c = choose(250, groups, k_groups), choose(250, f, k_channels)
        drawn["qkv"].append(_drawn_largest_shares(np.repeat(g, (r + 2) * d, 1), h, dp))
        drawn["proj"].append(_drawn_largest_shares(np.repeat(g, r * d, 1), h, dp))
        drawn["fc1"].append(_drawn_largest_shares(np.concatenate([c, c], 1), h, dp))
        drawn["fc2"].append(_drawn_largest_shares(c, h, dp))
    if dp == 8:  # the vectorized count is _largest_share's
        rows = np.flatnonzero(c[0]).tolist()
        assert drawn["fc2"][-1][0] * h == _largest_share(rows, f, h, dp)
        assert drawn["fc1"][-1][0] * h == _largest_share(rows + [f + j for j in rows], 2 * f, h, dp)
    mc = {k: float(np.concatenate(v).mean()) for k, v in drawn.items()}
    model = padded_shares(cfg, dp, 1, k_groups / groups, k_channels / f)
    for k in mc:
        assert model[k] == pytest.approx(mc[k], rel=0.04), (k, model[k], mc[k])
    assert sum(model.values()) == pytest.approx(sum(mc.values()), rel=0.02)


@pytest.mark.parametrize("tp,world", [(1, 2), (2, 4)], ids=["dp2-ga2", "tp2xdp2"])
def test_sampled_weight_gradients_equal_the_current_path(tp, world):
    """--sat-wgrad-tokens with unit omission: each rank draws the same tokens on either path
    (the draw's key is the step, micro-batch, layer, product and DP rank), so comm-sparse
    reduces the same sampled kept-row gradients as the whole-weight path."""
    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    sat_cfg = dataclasses.replace(_sat(), wgrad_tokens=0.3, wgrad_tokens_head=0.5).validate()
    on = run_ranks(world, _run, tp, cfg, "on", sat_cfg, 2, 8, False, "tokens", None, timeout=600)
    off = run_ranks(world, _run, tp, cfg, "off", sat_cfg, 2, 8, False, "tokens", None, timeout=600)
    # A drawn token's term is scaled by 1/p (up to ~10 here): the paths' different summation
    # orders then differ by that much more than on the exact path.
    _compare(on, off, weight_tol=1e-4)
    exact = run_ranks(world, _run, tp, cfg, "off", _sat(), 2, 8, False, "tokens", None, timeout=600)
    assert on[0]["losses"][1:] != pytest.approx(exact[0]["losses"][1:], rel=1e-4)  # the sampling ran


def test_sampled_weight_gradients_under_zero1_and_recompute():
    """The same draws, and so the same run, under ZeRO-1 (DeepSpeed's whole-weight path) and
    ZeRO-3 with activation recompute (the recomputed forward rebuilds the samplers with the
    same keys; the backward draws once)."""
    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    sat_cfg = dataclasses.replace(_sat(), wgrad_tokens=0.3).validate()
    z3 = run_ranks(2, _run, 1, cfg, "off", sat_cfg, 2, 6, False, "tokens", None, timeout=600)
    z1 = run_ranks(2, _run, 1, cfg, "off", sat_cfg, 2, 6, False, "tokens", {"stage": 1}, timeout=600)
    rc = run_ranks(2, _run, 1, cfg, "off", sat_cfg, 2, 6, False, "tokens", None, True, timeout=600)
    _compare(z1, z3, weight_tol=1e-4)
    _compare(rc, z3, weight_tol=1e-4)


def _micro_batches(log):
    """log -> {(step, micro): [(event, tag, serial)]}"""
    out, key = {}, None
    for e in log:
        if e[0] == "micro":
            key = e[1:]
            out[key] = []
        else:
            out[key].append(e)
    return out


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_gathers_run_ahead_and_reduces_wait_a_layer_behind(recompute):
    """The issue/wait order of comm-sparse's collectives on a micro-batch whose selections are
    settled (the step's second): every gather is issued before the previous one is waited for
    (one product ahead), forward and backward; a gradient reduce is waited for only once
    REDUCE_WINDOW later reduces are issued, or at the backward's end; nothing is left in
    flight. With activation recompute each product is gathered twice (forward and
    recomputed forward, as DeepSpeed), not three times. Losses and weights equal the
    whole-weight path's either way."""
    from sat_dist.parallel.row_sparse_zero import REDUCE_WINDOW

    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    products = 4 * cfg.num_layers
    regather = None if recompute else REGATHER
    # the weights route scores from x with its gradient on: nothing of it may be saved, or the
    # recomputed forward (which does not score) saves a different number of tensors
    route = "weights" if recompute else "tokens"
    on = run_ranks(2, _run, 1, cfg, "on", _sat(), 2, 4, False, route, regather, recompute, True, timeout=600)
    off = run_ranks(2, _run, 1, cfg, "off", _sat(), 2, 4, False, route, regather, recompute, timeout=600)
    _compare(on, off)
    for r in on:
        events = _micro_batches(r["log"])[(1, 1)]
        for phase in ("forward_gather", "backward_gather"):
            issued = [n for e, tag, n in events if e == "issue" and tag == phase]
            waited = [n for e, tag, n in events if e == "wait" and tag == phase]
            assert sorted(waited) == sorted(issued)  # everything issued is used
            pos = {(e, n): i for i, (e, tag, n) in enumerate(events) if tag == phase}
            for i, (a, b) in enumerate(zip(issued, issued[1:])):
                if i + 1 >= products and (i + 1 - products) % 4 == 0:
                    continue  # a layer's recomputation starts: the layer above was recomputed before it
                assert pos[("issue", b)] < pos[("wait", a)], (phase, a, b, events)
        fwd = [n for e, tag, n in events if e == "issue" and tag == "forward_gather"]
        bwd = [n for e, tag, n in events if e == "issue" and tag == "backward_gather"]
        assert (len(fwd), len(bwd)) == ((2 * products, 0) if recompute else (products, products))
        reduces = [n for e, tag, n in events if e == "issue" and tag == "grad_reduce"]
        assert len(reduces) == products
        pos = {(e, n): i for i, (e, tag, n) in enumerate(events) if tag == "grad_reduce"}
        for i, n in enumerate(reduces):
            later = reduces[min(i + REDUCE_WINDOW, len(reduces) - 1)]
            assert pos[("wait", n)] > pos[("issue", later)], (n, events)
