"""HF checkpoint directories in and out, checked by transformers itself."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from sat_dist.checkpoint.hf import load_hf_checkpoint, merge_tp_state_dicts, save_hf_checkpoint, shard_hf_state_dict
from sat_dist.config import ModelConfig
from sat_dist.errors import SatDistError
from sat_dist.model.llama import LlamaModel
from tests.reference import hf_config

CFG = ModelConfig(hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4,
                  num_query_groups=2, vocab_size=100, make_vocab_size_divisible_by=16)


@pytest.fixture()
def hf_dir(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config(CFG)).float()
    d = tmp_path / "hf"
    model.save_pretrained(d, max_shard_size="20KB")  # several shards and an index
    assert (d / "model.safetensors.index.json").is_file()
    return d, model


def test_import_any_tp_export_reloads_in_transformers(hf_dir, tmp_path):
    d, hf = hf_dir
    cfg, sd = load_hf_checkpoint(d)
    assert (cfg.hidden_size, cfg.num_query_groups, cfg.vocab_size) == (32, 2, 100)
    ids = torch.randint(0, 100, (2, 9))
    ref = hf(ids).logits.detach()
    for tp in (1, 2):
        shards = [shard_hf_state_dict(sd, cfg, tp, r) for r in range(tp)]
        out = tmp_path / f"export_tp{tp}"
        save_hf_checkpoint(out, cfg, merge_tp_state_dicts(shards, cfg), max_shard_bytes=30_000)
        back = LlamaForCausalLM.from_pretrained(out).float()
        assert torch.allclose(back(ids).logits, ref, atol=1e-5)
    ours = LlamaModel(cfg)
    ours.load_state_dict(shard_hf_state_dict(sd, cfg, 1, 0))
    assert torch.allclose(ours(ids)[..., :100], ref, atol=1e-4)


def _single_file(d, tmp_path, edit):
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    edit(sd)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((d / "config.json").read_text())
    save_file(sd, str(bad / "model.safetensors"))
    return bad


@pytest.mark.parametrize("edit,msg", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda sd: sd.__setitem__("model.norm.weight", torch.ones(31)), "model.norm.weight has shape (31,)"),
    (lambda sd: sd.__setitem__("lm_head.weight", torch.ones(100, 32, dtype=torch.int32)), "dtype torch.int32"),
], ids=["missing", "shape", "dtype"])
def test_bad_checkpoint_is_one_clear_error(hf_dir, tmp_path, edit, msg):
    bad = _single_file(hf_dir[0], tmp_path, edit)
    with pytest.raises(SatDistError) as e:
        load_hf_checkpoint(bad)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_missing_or_bad_config(tmp_path):
    with pytest.raises(SatDistError, match="no config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SatDistError, match="not valid JSON"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SatDistError, match="not a Llama"):
        load_hf_checkpoint(tmp_path)
