"""Tensor- and data-parallel Llama with SAT on gloo ranks, against one process.

References: a single-process model (dense, and SAT with the same units forced) and
transformers' LlamaForCausalLM for logits.
"""

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM

from sat_dist.checkpoint.hf import merge_tp_state_dicts, shard_hf_state_dict
from sat_dist.config import ModelConfig, SATConfig
from sat_dist.errors import SatDistError
from sat_dist.model.llama import LlamaModel, check_tensor_parallel
from sat_dist.model.sat_state import SATState
from sat_dist.parallel.state import init_distributed
from tests.dist_harness import run_ranks
from tests.reference import hf_config

MHA = ModelConfig(hidden_size=32, ffn_hidden_size=128, num_layers=2, num_attention_heads=4,
                  num_query_groups=4, vocab_size=200, make_vocab_size_divisible_by=16, name="tiny-mha")
GQA = ModelConfig(hidden_size=32, ffn_hidden_size=128, num_layers=2, num_attention_heads=8,
                  num_query_groups=4, vocab_size=200, make_vocab_size_divisible_by=16, name="tiny-gqa")
B, S = 4, 12


def _hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_config(cfg)).float().eval()


def _batch(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _sat_state(sat_cfg, comm=None, forced=None, rates=(0.0, 0.0)):
    state = SATState(sat_cfg, comm) if comm is not None else SATState(sat_cfg)
    state.forced = dict(forced or {})
    state.set_step(5, 0, attn=rates[0], mlp=rates[1])
    return state


def _global_selection(state, comm, cfg):
    """Kept units as GLOBAL indices (TP rank offset added), per (layer, kind)."""
    out = {}
    for (layer, kind), idx in state.selected.items():
        n_local = (cfg.num_query_groups if kind == "attn" else cfg.ffn_hidden_size) // comm.tp_size
        out[(layer, kind)] = None if idx is None else (idx + comm.tp_rank * n_local).tolist()
    return out


def _worker(rank, world, tp, cfg, hf_sd, ids, labels, sat_cfg, forced, rates):
    """Forward+backward of this rank's DP slice; grads averaged over DP like a DP optimizer."""
    comm = init_distributed(tp)
    state = _sat_state(sat_cfg, comm, forced, rates)
    model = LlamaModel(cfg, state, comm)
    model.load_state_dict(shard_hf_state_dict(hf_sd, cfg, tp, comm.tp_rank))
    per = ids.shape[0] // comm.dp_size
    rows = slice(comm.dp_rank * per, (comm.dp_rank + 1) * per)
    loss = model(ids[rows], labels[rows]).mean()
    loss.backward()
    loss = loss.detach()
    dist.all_reduce(loss, group=comm.dp_group)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=comm.dp_group)
        grads[name] = g / comm.dp_size
    logits = model(ids[rows]).detach()
    return {"tp_rank": comm.tp_rank, "dp_rank": comm.dp_rank, "loss": float(loss) / comm.dp_size,
            "grads": grads, "logits": logits, "selected": _global_selection(state, comm, cfg),
            "kept": dict(state.kept)}


def _single(cfg, hf_sd, ids, labels, sat_cfg=None, forced=None, rates=(0.0, 0.0)):
    state = _sat_state(sat_cfg, None, forced, rates)
    model = LlamaModel(cfg, state)
    model.load_state_dict(shard_hf_state_dict(hf_sd, cfg, 1, 0))
    loss = model(ids, labels).mean()
    loss.backward()
    grads = merge_tp_state_dicts([{n: p.grad for n, p in model.named_parameters()}], cfg)
    return float(loss), grads, _global_selection(state, state.comm, cfg)


def _merged_grads(results, tp, cfg):
    dp0 = sorted((r for r in results if r["dp_rank"] == 0), key=lambda r: r["tp_rank"])
    assert [r["tp_rank"] for r in dp0] == list(range(tp))
    return merge_tp_state_dicts([r["grads"] for r in dp0], cfg)


def _max_err(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# Largest errors seen are printed (pytest -s) for the closing note.
@pytest.mark.parametrize("tp,world", [(2, 2), (2, 4)], ids=["tp2", "tp2xdp2"])
@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_dense_tp_dp_equals_single_process(cfg, tp, world):
    hf_sd = _hf_model(cfg).state_dict()
    ids, labels = _batch(cfg)
    ref_loss, ref_grads, _ = _single(cfg, hf_sd, ids, labels)
    res = run_ranks(world, _worker, tp, cfg, hf_sd, ids, labels, None, None, (0.0, 0.0))
    err = _max_err(_merged_grads(res, tp, cfg), ref_grads)
    print(f"\n[dense {cfg.name} tp={tp} world={world}] loss err {abs(res[0]['loss'] - ref_loss):.2e} "
          f"grad err {err:.2e}")
    for r in res:
        assert r["loss"] == pytest.approx(ref_loss, abs=1e-6)
    assert err < 1e-5


def test_sat_forced_units_tp_dp_equals_single_process():
    cfg = GQA
    hf_sd = _hf_model(cfg).state_dict()
    ids, labels = _batch(cfg)
    # Balanced over 2 TP partitions: MLP channels 0-63 | 64-127, KV groups 0-1 | 2-3.
    forced = {}
    for layer in range(cfg.num_layers):
        g = torch.Generator().manual_seed(layer)
        forced[(layer, "mlp")] = torch.cat([torch.randperm(64, generator=g)[:24] + 64 * p
                                            for p in range(2)]).sort().values
        forced[(layer, "attn")] = torch.tensor([layer % 2, 2 + (layer + 1) % 2])
    sat_cfg = SATConfig(align_mlp=8, token_stride=1).validate()
    ref_loss, ref_grads, _ = _single(cfg, hf_sd, ids, labels, sat_cfg, forced)
    res = run_ranks(4, _worker, 2, cfg, hf_sd, ids, labels, sat_cfg, forced, (0.0, 0.0))
    grads = _merged_grads(res, 2, cfg)
    err = _max_err(grads, ref_grads)
    print(f"\n[sat forced tp=2 dp=2] loss err {abs(res[0]['loss'] - ref_loss):.2e} grad err {err:.2e}")
    assert res[0]["loss"] == pytest.approx(ref_loss, abs=1e-6)
    assert err < 1e-5
    # omitted MLP channels of layer 0 got exactly zero gradient, in HF layout
    omitted = torch.ones(cfg.ffn_hidden_size, dtype=torch.bool)
    omitted[forced[(0, "mlp")]] = False
    assert torch.count_nonzero(grads["model.layers.0.mlp.gate_proj.weight"][omitted]) == 0


def test_selection_is_dp_invariant():
    """Same global batch: DP=1 and DP=2 select the same units and give the same loss and
    gradients (scores reduced over DP), at TP=1 and at TP=2; replicas agree; TP ranks keep
    equal counts."""
    cfg = MHA
    hf_sd = _hf_model(cfg).state_dict()
    ids, labels = _batch(cfg)
    rates = (0.5, 0.5)
    for metric in ("maxip", "wanda"):
        sat_cfg = SATConfig(metric=metric, align_mlp=8, token_stride=1, temperature=0.5).validate()
        ref_loss, ref_grads, ref_sel = _single(cfg, hf_sd, ids, labels, sat_cfg, None, rates)
        dp2 = run_ranks(2, _worker, 1, cfg, hf_sd, ids, labels, sat_cfg, None, rates)
        for r in dp2:
            assert r["selected"] == ref_sel
            assert r["loss"] == pytest.approx(ref_loss, abs=1e-6)
        assert _max_err(_merged_grads(dp2, 1, cfg), ref_grads) < 1e-5

    sat_cfg = SATConfig(metric="maxip", align_mlp=8, token_stride=1, temperature=0.5).validate()
    tp2 = run_ranks(2, _worker, 2, cfg, hf_sd, ids, labels, sat_cfg, None, rates)
    tp2dp2 = run_ranks(4, _worker, 2, cfg, hf_sd, ids, labels, sat_cfg, None, rates)
    by_tp = {r["tp_rank"]: r for r in tp2}
    for r in tp2dp2:
        assert r["selected"] == by_tp[r["tp_rank"]]["selected"]  # same units as DP=1, every replica
        assert r["loss"] == pytest.approx(tp2[0]["loss"], abs=1e-6)
    assert _max_err(_merged_grads(tp2dp2, 2, cfg), _merged_grads(tp2, 2, cfg)) < 1e-5
    for r in tp2dp2:  # equal quotas: every TP rank keeps the same number of units
        for layer in range(cfg.num_layers):
            assert r["kept"][(layer, "mlp")] == (32, 64)
            assert r["kept"][(layer, "attn")] == (1, 2)
    # the partitions select different units (not a copy of rank 0's pattern shifted)
    assert by_tp[0]["selected"][(0, "mlp")] != [i - 64 for i in by_tp[1]["selected"][(0, "mlp")]]


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_logits_equal_transformers_tp1_tp2(cfg):
    hf = _hf_model(cfg)
    ids, labels = _batch(cfg)
    ref = hf(ids).logits.detach()
    ours = LlamaModel(cfg)
    ours.load_state_dict(shard_hf_state_dict(hf.state_dict(), cfg, 1, 0))
    err1 = float((ours(ids)[..., : cfg.vocab_size].detach() - ref).abs().max())
    res = run_ranks(2, _worker, 2, cfg, hf.state_dict(), ids, labels, None, None, (0.0, 0.0))
    logits = torch.cat([r["logits"] for r in sorted(res, key=lambda r: r["tp_rank"])], dim=-1)
    err2 = float((logits[..., : cfg.vocab_size] - ref).abs().max())
    print(f"\n[hf parity {cfg.name}] tp1 {err1:.2e} tp2 {err2:.2e}")
    assert err1 < 1e-4 and err2 < 1e-4
    # padded vocabulary entries never take probability mass
    assert torch.isinf(logits[..., cfg.vocab_size:]).all()


@pytest.mark.parametrize("cfg,tp,msg", [
    (MHA, 3, "does not divide num_attention_heads=4"),
    (GQA, 8, "does not divide num_query_groups (KV heads)=4"),
    (ModelConfig(hidden_size=32, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=4), 4,
     "splits ffn_hidden_size=96"),
])
def test_tp_size_errors(cfg, tp, msg):
    with pytest.raises(SatDistError) as e:
        check_tensor_parallel(cfg, tp, align_mlp=32)
    assert msg in str(e.value) and "\n" not in str(e.value)
