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


@pytest.mark.parametrize("zero_over,tp,world", [({"offload_optimizer": {"device": "cpu"}}, 1, 2),
                                                ({"zero_hpz_partition_size": 2}, 2, 4)],
                         ids=["optimizer-offload", "hpz-tp2xdp2"])
def test_offload_and_hpz_equal_the_current_path(zero_over, tp, world):
    """Adam on the CPU (the gradient partitions are copied to it at the boundary) and
    ZeRO++'s secondary partitions (refreshed from the primaries comm-sparse reads): the same
    run as the whole-weight path."""
    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    on = run_ranks(world, _run, tp, cfg, "on", _sat(), 2, 6, False, "tokens", zero_over, timeout=600)
    off = run_ranks(world, _run, tp, cfg, "off", _sat(), 2, 6, False, "tokens", zero_over, timeout=600)
    _compare(on, off)


def _largest_share(rows, n_rows, h, world):
    """Largest number of elements of `rows` in one rank's flat partition of an [n_rows, h]
    weight (rank q holds elements [q*n, (q+1)*n), n = ceil(n_rows*h / world)): by counting."""
    numel, n = n_rows * h, math.ceil(n_rows * h / world)
    return max(sum(max(0, min((j + 1) * h, min((q + 1) * n, numel)) - max(j * h, min(q * n, numel)))
                   for j in rows) for q in range(world))


def test_bytes_match_the_arithmetic():
    """Bytes each rank sends per step and phase, against the partition arithmetic: for each
    SAT weight, the kept rows' elements in the fullest rank's partition (every share is
    padded to it) times (dp - 1) times 4 bytes; a dense step gathers every row."""
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


def test_modes_and_errors():
    ds = deepspeed_config(_train_config("auto", 1, 2), 2)
    assert comm_sparse_wanted("auto", _sat(), ds, 2)
    assert not comm_sparse_wanted("off", _sat(), ds, 2)
    assert not comm_sparse_wanted("auto", SATConfig(schedule="dense").validate(), ds, 2)
    comp = SATConfig(compensation="mean").validate()
    assert not comm_sparse_wanted("auto", comp, ds, 2)
    with pytest.raises(SatDistError, match="--sat-comm-sparse on: cannot run because --sat-compensation mean"):
        comm_sparse_wanted("on", comp, ds, 2)
    z1 = dict(ds, zero_optimization={"stage": 1})
    with pytest.raises(SatDistError, match="stage 1"):
        comm_sparse_wanted("on", _sat(), z1, 2)
    with pytest.raises(SatDistError, match="--sat-comm-sparse"):
        TrainConfig(sat_comm_sparse="yes").validate()
    assert comm_sparse_line("auto", _sat(), ds, 2).startswith("comm-sparse ZeRO-3: on")
    assert comm_sparse_line("auto", comp, ds, 2) == \
        "comm-sparse ZeRO-3: off (--sat-compensation mean reads the omitted rows)"
    assert comm_sparse_line("off", _sat(), ds, 2) == "comm-sparse ZeRO-3: off (--sat-comm-sparse off)"
    # one DP rank moves nothing: auto keeps DeepSpeed's path, on still runs it
    assert not comm_sparse_wanted("auto", _sat(), ds, 1) and comm_sparse_wanted("on", _sat(), ds, 1)
    assert comm_sparse_line("auto", _sat(), ds, 1) == \
        "comm-sparse ZeRO-3: off (data-parallel size 1: no ZeRO traffic to thin)"


def test_bytes_model_by_hand():
    """sat_dist.parallel.zero_bytes at Llama-2 7B's width, against numbers worked by hand."""
    from sat_dist.parallel.zero_bytes import scoring_bytes, step_bytes

    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "llama2-7b.json")
    one = dataclasses.replace(cfg, num_layers=1)
    layer = (3 * 4096 + 4096 + 2 * 11008 + 11008) * 4096  # qkv, proj, fc1, fc2: 202,375,168 elements
    b = step_bytes(one, 2, 1, 512, 1, 0.5, 0.5, 8, w_bytes=4, g_bytes=4, x_bytes=4)
    assert b["forward_gather"] == b["backward_gather"] == b["grad_reduce"] == 0.5 * 0.5 * layer * 4
    assert b["dense_sat_weights"] == 3 * 0.5 * layer * 4
    # scoring at DP 2, 64 tokens a rank: gathering the tokens beats gathering fc1's 22016 rows
    tokens, weights = scoring_bytes(2, 64, 22016, 4096, 2, 2)
    assert tokens == 64 * 4096 * 2 + 2 * 0.5 * (2 * 64 * 22016 * 4)
    assert weights == 0.5 * 22016 * 4096 * 2
    assert tokens < weights
    # at DP 64 with 512 tokens a rank the global tokens outnumber the rows: gather the rows
    tokens, weights = scoring_bytes(64, 512, 22016, 4096, 2, 2)
    assert weights == 63 / 64 * 22016 * 4096 * 2 < tokens


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
    on = run_ranks(2, _run, 1, cfg, "on", _sat(), 2, 4, False, "tokens", regather, recompute, True, timeout=600)
    off = run_ranks(2, _run, 1, cfg, "off", _sat(), 2, 4, False, "tokens", regather, recompute, timeout=600)
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
