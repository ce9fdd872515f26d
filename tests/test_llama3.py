"""Llama-3.x checkpoints: RoPE scaling (rope_type llama3 and linear) imported from HF, run at
any TP size, trained and exported back, each time checked against transformers itself."""

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sat_dist.checkpoint.hf import (
    hf_config_dict,
    load_hf_checkpoint,
    merge_tp_state_dicts,
    model_config_from_hf,
    save_hf_checkpoint,
    shard_hf_state_dict,
)
from sat_dist.config import MODEL_CONFIG_DIR, ModelConfig
from sat_dist.data.indexed import IndexedDatasetWriter, token_dtype
from sat_dist.data.tokenizer import load_tokenizer
from sat_dist.errors import SatDistError
from sat_dist.model.llama import LlamaModel
from sat_dist.model.rope import inverse_frequencies
from sat_dist.train.arguments import parse_args, run_definition
from tests.launchers import _flags, scalars, torchrun

SEQ = 64
# head_dim 16, theta 1e4: wavelengths 6.3, 20, 63, 200, ... positions. Against a pretraining
# context of 32 (bounds 32/4 = 8 and 32/1 = 32) llama3 keeps the first, blends the second and
# slows the rest, and a 64-token sample reaches beyond 32: every branch shows in the logits.
CFG = ModelConfig(hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4, num_query_groups=2,
                  vocab_size=100, make_vocab_size_divisible_by=16, max_position_embeddings=256)
SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 4.0},
}
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def _hf_config(cfg: ModelConfig, scaling: dict | None) -> LlamaConfig:
    """transformers' config, written independently of sat_dist.checkpoint.hf."""
    c = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                    num_key_value_heads=cfg.num_query_groups, vocab_size=cfg.vocab_size,
                    max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                    rope_scaling=None if scaling is None else dict(scaling), rms_norm_eps=cfg.norm_eps,
                    tie_word_embeddings=cfg.tie_word_embeddings)
    c._attn_implementation = "eager"
    return c


def _random_model(cfg: ModelConfig, scaling: dict | None) -> LlamaForCausalLM:
    """A random model whose attention depends strongly on position: at the init's scale the
    scores are nearly uniform and any RoPE would give almost the same logits."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_hf_config(cfg, scaling)).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- the frequencies
@pytest.mark.parametrize("scaling", [LLAMA31, {"rope_type": "linear", "factor": 2.0}, *SCALINGS.values()],
                         ids=["llama3.1", "linear2", "llama3-tiny", "linear-tiny"])
def test_frequencies_are_transformers(scaling):
    hd, theta = (128, 500000.0) if scaling is LLAMA31 else (CFG.head_dim, CFG.rope_theta)
    c = LlamaConfig(hidden_size=hd * 4, num_attention_heads=4, max_position_embeddings=1 << 17,
                    rope_theta=theta, rope_scaling=dict(scaling))
    want, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](c, "cpu")
    assert attention_factor == 1.0  # cos/sin keep their magnitude: only the frequencies change
    got = inverse_frequencies(hd, theta, scaling)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    plain = inverse_frequencies(hd, theta)
    ratio = plain / got
    if scaling["rope_type"] == "linear":
        assert torch.allclose(ratio, torch.full_like(ratio, scaling["factor"]))
    else:  # kept, blended and slowed frequencies all occur
        assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(scaling["factor"])
        assert ((ratio > 1.01) & (ratio < scaling["factor"] - 0.01)).any()


# ---------------------------------------------------------------- import, TP, export
@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_import_any_tp_export_reloads_in_transformers(kind, tmp_path):
    scaling = SCALINGS[kind]
    hf = _random_model(CFG, scaling)
    hf.save_pretrained(tmp_path / "hf")
    cfg, sd = load_hf_checkpoint(tmp_path / "hf")
    assert cfg.rope_scaling == scaling and cfg.rope_theta == CFG.rope_theta
    ids = torch.randint(0, 100, (2, SEQ))
    ref = _logits(hf, ids)
    plain = LlamaForCausalLM(_hf_config(CFG, None)).float().eval()
    plain.load_state_dict(hf.state_dict())
    assert (_logits(plain, ids) - ref).abs().max() > 1e-2  # the scaling matters at this length

    ours = LlamaModel(cfg).eval()
    ours.load_state_dict(shard_hf_state_dict(sd, cfg, 1, 0))
    with torch.no_grad():
        assert torch.allclose(ours(ids)[..., :100], ref, atol=1e-4)
    for tp in (1, 2):
        shards = [shard_hf_state_dict(sd, cfg, tp, r) for r in range(tp)]
        out = tmp_path / f"export_tp{tp}"
        save_hf_checkpoint(out, cfg, merge_tp_state_dicts(shards, cfg))
        back = LlamaForCausalLM.from_pretrained(out).float().eval()
        params = back.config.rope_parameters
        assert params["rope_type"] == kind and all(params[k] == v for k, v in scaling.items())
        assert torch.allclose(_logits(back, ids), ref, atol=1e-5)
        again, _ = load_hf_checkpoint(out)
        assert (again.rope_scaling, again.rope_theta) == (scaling, cfg.rope_theta)


def _hf_fields(**rope) -> dict:
    return {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "max_position_embeddings": 256, **rope}


def test_every_hf_form_of_rope_scaling_imports():
    want = SCALINGS["linear"]
    forms = [
        {"rope_theta": 5e5, "rope_scaling": dict(want)},  # transformers 4
        {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}},  # its oldest name
        {"rope_parameters": {"rope_theta": 5e5, **want}},  # transformers 5
    ]
    for form in forms:
        cfg = model_config_from_hf(_hf_fields(**form))
        assert (cfg.rope_theta, cfg.rope_scaling) == (5e5, want), form
    for plain in ({"rope_theta": 5e5}, {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}):
        assert model_config_from_hf(_hf_fields(**plain)).rope_scaling is None
    # transformers fills in a llama3 pretraining context that config.json leaves out
    partial = {k: v for k, v in SCALINGS["llama3"].items() if k != "original_max_position_embeddings"}
    cfg = model_config_from_hf(_hf_fields(rope_scaling=partial))
    assert cfg.rope_scaling["original_max_position_embeddings"] == 256
    assert hf_config_dict(cfg)["rope_scaling"] == cfg.rope_scaling


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "dynamic", "factor": 2.0},
    {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
])
def test_other_rope_types_are_one_clear_error(rope, tmp_path):
    kind = rope.get("rope_type") or rope["type"]
    with pytest.raises(SatDistError) as e:
        model_config_from_hf(_hf_fields(rope_scaling=rope))
    msg = str(e.value)
    assert msg == f"HF config: RoPE scaling ({kind}) is not supported; allowed: llama3, linear or plain RoPE"
    (tmp_path / "config.json").write_text(json.dumps(_hf_fields(rope_parameters={"rope_theta": 1e4, **rope})))
    with pytest.raises(SatDistError, match=rf"RoPE scaling \({kind}\) is not supported"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("scaling,msg", [
    ({"rope_type": "yarn", "factor": 2.0}, "model.rope_scaling.rope_type: got 'yarn'; allowed: llama3, linear"),
    ({"factor": 2.0}, "model.rope_scaling.rope_type: got None"),
    ("llama3", "model.rope_scaling: got 'llama3'"),
    ({"rope_type": "linear"}, "model.rope_scaling.factor: got None; allowed: a finite number > 0"),
    ({"rope_type": "linear", "factor": 0}, "model.rope_scaling.factor: got 0"),
    ({"rope_type": "linear", "factor": math.inf}, "model.rope_scaling.factor: got inf"),
    ({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}, "(unknown: low_freq_factor)"),
    ({**LLAMA31, "low_freq_factor": -1.0}, "model.rope_scaling.low_freq_factor: got -1.0"),
    ({**LLAMA31, "original_max_position_embeddings": 8192.5},
     "model.rope_scaling.original_max_position_embeddings: got 8192.5; allowed: an integer >= 1"),
    ({**LLAMA31, "high_freq_factor": 1.0}, "model.rope_scaling.high_freq_factor: got 1.0; allowed: a number > "
                                           "low_freq_factor=1.0"),
])
def test_malformed_rope_scaling_is_one_clear_error(scaling, msg):
    with pytest.raises(SatDistError) as e:
        ModelConfig(rope_scaling=scaling).validate()
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_malformed_hf_rope_scaling_names_the_config():
    with pytest.raises(SatDistError, match="^HF config: model.rope_scaling.low_freq_factor: got None"):
        model_config_from_hf(_hf_fields(rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_shipped_configs_and_old_manifests(corpus):
    for path in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        ModelConfig.from_file(path)
    l3, l31 = (ModelConfig.from_file(MODEL_CONFIG_DIR / f"{n}.json") for n in ("llama3-8b", "llama3.1-8b"))
    assert l3.rope_scaling is None and l31.rope_scaling == LLAMA31
    assert (l31.head_dim, l31.num_query_groups, l31.vocab_size, l31.rope_theta) == (128, 8, 128256, 500000.0)
    # what transformers builds from the exported config has our frequencies
    hf = LlamaConfig(**{k: v for k, v in hf_config_dict(l31).items() if k not in ("architectures", "torch_dtype")})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert torch.allclose(inverse_frequencies(128, 500000.0, l31.rope_scaling), want, rtol=1e-6, atol=0)
    # checkpoint manifests store model_cfg.__dict__; ones written before rope_scaling still load
    old = {k: v for k, v in l3.__dict__.items() if k != "rope_scaling"}
    assert ModelConfig(**old).validate().rope_scaling is None
    assert ModelConfig(**json.loads(json.dumps(l31.__dict__))) == l31
    # a resume compares run definitions by .get(): one saved without rope_scaling ran plain RoPE
    run = parse_args(["--data-path", corpus["data"], "--tokenizer-model", corpus["tok"]])
    assert run_definition(run, l31)["rope_scaling"] == LLAMA31
    assert run_definition(run, l3)["rope_scaling"] is None


# ---------------------------------------------------------------- a real run
def test_trains_from_a_llama3_checkpoint_and_exports_it(corpus, tmp_path):
    """--hf-checkpoint with llama3 RoPE, one rank, 2 steps at --lr 0: the logged validation
    loss is transformers' for the scaled model (and not the plain-RoPE one), and the exported
    checkpoint carries the scaling back to transformers."""
    from tools.export_hf import export

    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    scaling = {**SCALINGS["llama3"], "original_max_position_embeddings": 16}
    hf = _random_model(cfg, scaling)
    hf.save_pretrained(tmp_path / "hf")
    tok = load_tokenizer(corpus["tok"])
    ids = tok.encode(json.__doc__ * 20)[:2 * SEQ] + [tok.eos_id]  # one document: 2 samples
    with IndexedDatasetWriter(tmp_path / "valid", token_dtype(tok.vocab_size)) as w:
        w.add_document(ids)
        w.finalize()
    flags = _flags(corpus, **{"hf-checkpoint": tmp_path / "hf", "model-config": None, "lr": 0, "min-lr": 0,
                              "lr-warmup-iters": 0, "train-iters": 2, "global-batch-size": 2,
                              "eval-interval": 2, "eval-iters": 1, "tensorboard-dir": tmp_path / "tb",
                              "save": tmp_path / "ckpt"})
    torchrun(1, flags + ["--valid-data-path", f"rope={tmp_path / 'valid'}"])

    samples = torch.tensor(ids).unfold(0, SEQ + 1, SEQ)  # [2, SEQ + 1]

    def loss(model):
        logits = _logits(model, samples[:, :-1])
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), samples[:, 1:].flatten()))

    plain = LlamaForCausalLM(_hf_config(cfg, None)).float().eval()
    plain.load_state_dict(hf.state_dict())
    logged = scalars(tmp_path / "tb", "lm loss validation/rope")[2]
    assert logged == pytest.approx(loss(hf), abs=2e-5)
    assert abs(loss(plain) - loss(hf)) > 1e-3
    out = export(str(tmp_path / "ckpt"), str(tmp_path / "hf_out"))
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == scaling
    assert loss(LlamaForCausalLM.from_pretrained(out).float().eval()) == pytest.approx(loss(hf), abs=1e-5)
