"""The parameter layout table (sat_dist.model.layout) and what reads it: every parameter has
exactly one entry, the entries agree with the model's shapes, and resharding by them is exact."""

import re

import pytest
import torch

from sat_dist.checkpoint.reshard import reshard_local, reshard_local_from, to_full, to_local
from sat_dist.config import ModelConfig
from sat_dist.errors import SatDistError
from sat_dist.model import layout
from sat_dist.model.comm import ParallelComm
from sat_dist.model.layout import LAYOUTS, ParamLayout, layout_of
from sat_dist.model.llama import LlamaModel
from sat_dist.train.engine import optimizer_param_groups

GQA = ModelConfig(hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=8, num_query_groups=4,
                  vocab_size=203, make_vocab_size_divisible_by=8, name="tiny-gqa")
TIED = ModelConfig(**{**GQA.__dict__, "tie_word_embeddings": True, "name": "tiny-tied"})


def _model(cfg, tp=1, rank=0):
    return LlamaModel(cfg, comm=ParallelComm(tp_size=tp, tp_rank=rank))


@pytest.mark.parametrize("cfg", [GQA, TIED], ids=["untied", "tied"])
def test_every_parameter_has_exactly_one_entry_and_every_entry_is_used(cfg):
    names = [n for n, _ in _model(cfg).named_parameters()]
    for name in names:
        assert sum(bool(re.fullmatch(lay.pattern, name)) for lay in LAYOUTS) == 1, name
    used = {layout_of(n).pattern for n in names}
    if cfg.tie_word_embeddings:
        used.add(layout_of("output_layer.weight").pattern)  # shared with the embedding
    assert used == {lay.pattern for lay in LAYOUTS}


def test_a_name_without_an_entry_is_a_clear_error(monkeypatch):
    for name in ("layers.0.mlp.fc3_weight", "embedding.bias", "module.embedding.weight", "layers.x.mlp.fc1_weight"):
        with pytest.raises(SatDistError, match=re.escape(f"parameter {name!r}: no entry in sat_dist.model.layout")):
            layout_of(name)
    monkeypatch.setattr(layout, "LAYOUTS", LAYOUTS + (ParamLayout(r"layers\.\d+\.mlp\..*", "dup", 0),))
    with pytest.raises(SatDistError, match="'layers.0.mlp.fc1_weight': 2 entries"):
        layout_of("layers.0.mlp.fc1_weight")


def test_entries_agree_with_the_model_at_tp2():
    full = dict(_model(GQA).named_parameters())
    for rank in range(2):
        for name, p in _model(GQA, 2, rank).named_parameters():
            lay = layout_of(name)
            shape = list(full[name].shape)
            if lay.replicated:
                assert list(p.shape) == shape and not getattr(p, "tensor_model_parallel", False), name
                continue
            if lay.vocab_padded:
                shape[lay.partition_dim] = GQA.padded_vocab_size(2)
            shape[lay.partition_dim] //= 2
            assert list(p.shape) == shape, name
            assert (p.tensor_model_parallel, p.partition_dim, p.partition_stride) == (True, lay.partition_dim, 1)
            assert (p.shape[lay.partition_dim] // lay.blocks) % lay.unit_rows(GQA) == 0, name


def test_weight_decay_groups_follow_the_table():
    model = _model(GQA)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optimizer_param_groups(model)
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    assert [names[id(p)] for p in no_decay["params"]] == \
        ["layers.0.input_layernorm.weight", "layers.0.pre_mlp_layernorm.weight",
         "layers.1.input_layernorm.weight", "layers.1.pre_mlp_layernorm.weight", "final_layernorm.weight"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_fc1_is_gate_then_up_per_partition_and_the_vocabulary_is_padded_per_tp():
    f, h = GQA.ffn_hidden_size, GQA.hidden_size
    gate, up = torch.randn(f, h), torch.randn(f, h)
    for rank in range(2):
        local = to_local("layers.0.mlp.fc1_weight", torch.cat((gate, up)), GQA, 2, rank)
        rows = slice(rank * f // 2, (rank + 1) * f // 2)
        assert torch.equal(local, torch.cat((gate[rows], up[rows])))
    emb = torch.randn(GQA.vocab_size, h)
    vp = GQA.padded_vocab_size(4)
    shards = [to_local("embedding.weight", emb, GQA, 4, r) for r in range(4)]
    assert sum(s.shape[0] for s in shards) == vp > GQA.vocab_size
    assert torch.equal(torch.cat(shards)[GQA.vocab_size:], torch.zeros(vp - GQA.vocab_size, h))
    assert torch.equal(to_full("embedding.weight", shards, GQA), emb)


def test_resharding_any_tp_to_any_tp_is_exact():
    g = torch.Generator().manual_seed(0)
    full = {}
    for name, p in _model(GQA).named_parameters():  # full tensors are unpadded
        full[name] = torch.randn(GQA.vocab_size if layout_of(name).vocab_padded else p.shape[0], *p.shape[1:],
                                 generator=g)
    for name, t in full.items():
        for old_tp in (1, 2, 4):
            shards = [to_local(name, t, GQA, old_tp, r) for r in range(old_tp)]
            assert torch.equal(to_full(name, shards, GQA), t), (name, old_tp)
            for new_tp in (1, 2, 4):
                got = [reshard_local(name, shards, GQA, new_tp, r) for r in range(new_tp)]
                want = [to_local(name, t, GQA, new_tp, r) for r in range(new_tp)]
                assert all(torch.equal(a, b) for a, b in zip(got, want)), (name, old_tp, new_tp)


def test_a_split_through_a_unit_is_an_error():
    qkv = torch.randn(GQA.num_query_groups * (GQA.heads_per_group + 2) * GQA.head_dim, GQA.hidden_size)
    with pytest.raises(SatDistError, match="layers.0.self_attention.qkv_weight: .* whole units of 16 rows"):
        to_local("layers.0.self_attention.qkv_weight", qkv, GQA, 8, 0)  # 4 KV groups over 8 ranks


def test_resharding_reads_only_the_overlapping_old_shards():
    """reshard_local_from gives to_local's tensor and touches only the old shards that hold
    some of the new shard's rows; which ones those are is found independently, by sharding
    a tensor of row numbers."""
    g = torch.Generator().manual_seed(1)
    for name, p in _model(GQA).named_parameters():
        lay = layout_of(name)
        n = GQA.vocab_size if lay.vocab_padded else p.shape[0]
        t = torch.randn(n, *p.shape[1:], generator=g)
        ids = torch.arange(1, n + 1, dtype=torch.float64)  # row number + 1; padding is 0
        for old_tp in (1, 2, 4):
            shards = [to_local(name, t, GQA, old_tp, r) for r in range(old_tp)]
            id_shards = [set(to_local(name, ids, GQA, old_tp, r).tolist()) - {0.0} for r in range(old_tp)]
            for new_tp in (1, 2, 4):
                for rank in range(new_tp):
                    touched = []
                    got = reshard_local_from(name, lambda r: touched.append(r) or shards[r], GQA, old_tp,
                                             new_tp, rank)
                    assert torch.equal(got, to_local(name, t, GQA, new_tp, rank)), (name, old_tp, new_tp, rank)
                    wanted = set(to_local(name, ids, GQA, new_tp, rank).tolist()) - {0.0}
                    overlap = [r for r in range(old_tp) if id_shards[r] & wanted] if not lay.replicated else [0]
                    assert sorted(set(touched)) == overlap, (name, old_tp, new_tp, rank, touched)
