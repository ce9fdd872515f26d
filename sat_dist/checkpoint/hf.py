"""Hugging Face Llama checkpoints in and out, at any tensor-parallel size.

The HF state dict (names and layouts of transformers' LlamaForCausalLM) is the canonical
full form. This module only maps HF tensors to and from each parameter's full tensor
(TP=1, unpadded: q/k/v grouped per KV head, [gate; up], transposes); the TP split, the
[gate; up] interleave per partition and the vocabulary padding are sat_dist.model.layout's,
applied by sat_dist.checkpoint.reshard. A wrong mapping here gives garbage with no error,
so tests compare logits with transformers itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from sat_dist.checkpoint.reshard import to_full, to_local
from sat_dist.config import ModelConfig
from sat_dist.errors import SatDistError

_LAYER = "model.layers.{}."


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) of an HF config: transformers 4 writes rope_theta and
    rope_scaling (its oldest form names the type "type"), transformers 5 one rope_parameters
    dict holding both. Read the way transformers 5 reads them, so both build the same model."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise SatDistError(f"HF config: rope_scaling {rope!r} is not an object")
    rope = dict(rope)
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.pop("rope_type", None) or rope.pop("type", "default")
    rope.pop("type", None)
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise SatDistError("HF config: partial_rotary_factor != 1 is not supported; the model rotates whole heads")
    if kind == "default":
        return theta, None
    if kind not in ModelConfig.ROPE_SCALING_KEYS:
        raise SatDistError(f"HF config: RoPE scaling ({kind}) is not supported; allowed: "
                           f"{', '.join(ModelConfig.ROPE_SCALING_KEYS)} or plain RoPE")
    if kind == "llama3":
        # transformers' default: the context the checkpoint declares is the one it was trained on
        n = rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        if isinstance(n, float) and n.is_integer():  # a JSON writer's 8192.0
            rope["original_max_position_embeddings"] = int(n)
    return theta, {"rope_type": kind, **rope}


def model_config_from_hf(hf: dict, name: str = "hf") -> ModelConfig:
    """ModelConfig from the fields of an HF LlamaConfig (config.json as a dict)."""
    arch = hf.get("model_type")
    if arch not in (None, "llama", "mistral"):
        raise SatDistError(f"HF config: model_type {arch!r} is not a Llama architecture; allowed: llama")
    rope_theta, rope_scaling = _rope_from_hf(hf)
    try:
        h, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        cfg = ModelConfig(
            hidden_size=h,
            ffn_hidden_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            name=name,
        )
    except KeyError as e:
        raise SatDistError(f"HF config: missing field {e.args[0]!r}")
    if hf.get("head_dim") not in (None, h // heads):
        raise SatDistError(f"HF config: head_dim={hf['head_dim']} != hidden_size/num_attention_heads; unsupported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise SatDistError(f"HF config: {key}=true is not supported; the model has no bias terms")
    if hf.get("hidden_act", "silu") != "silu":
        raise SatDistError(f"HF config: hidden_act {hf['hidden_act']!r} is not supported; allowed: silu")
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        raise SatDistError("HF config: sliding-window attention is not supported; use full causal attention")
    try:
        return cfg.validate()
    except SatDistError as e:
        raise SatDistError(f"HF config: {e}")


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """An HF LlamaConfig dict for `cfg`. RoPE in transformers 4's form (rope_theta, rope_scaling),
    which transformers 5 reads too; transformers 4 would ignore a rope_parameters dict."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else dict(cfg.rope_scaling),
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = _LAYER.format(i)
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return shapes


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class HFTensors(Mapping):
    """The tensors of an HF safetensors checkpoint (one file or sharded), read from disk one at a
    time when accessed: sharding for a TP rank never holds the whole model in memory."""

    def __init__(self, path: Path, files: list[str]):
        from safetensors import safe_open

        self._handles, self._file_of, self.header = {}, {}, {}
        for f in files:
            try:
                h = safe_open(str(path / f), framework="pt")
                for name in h.keys():
                    sl = h.get_slice(name)
                    self.header[name] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
                    self._file_of[name] = f
            except Exception as e:  # safetensors raises several types for a damaged file
                raise SatDistError(f"--hf-checkpoint {path}: cannot read {f}: {e}".splitlines()[0])
            self._handles[f] = h

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(name)
        return self._handles[self._file_of[name]].get_tensor(name)

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def check_hf_state_dict(sd: Mapping, cfg: ModelConfig, where: str) -> None:
    """One clear error for a missing tensor, a wrong shape or a non-float dtype (read from the
    safetensors headers for an HFTensors, without loading the data)."""
    header = sd.header if isinstance(sd, HFTensors) else {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    expected = expected_hf_shapes(cfg)
    # tied models may carry a copy of the embedding as lm_head; rotary caches are derived
    unexpected = sorted(n for n in header if n not in expected and n != "lm_head.weight"
                        and not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise SatDistError(f"HF checkpoint {where}: unexpected tensor {unexpected[0]} (and {len(unexpected) - 1} "
                           f"more); the model would silently ignore it (biases? another architecture?)")
    for name, shape in expected.items():
        if name not in header:
            raise SatDistError(f"HF checkpoint {where}: missing tensor {name}")
        got_shape, dtype = header[name]
        if got_shape != shape:
            raise SatDistError(f"HF checkpoint {where}: {name} has shape {got_shape}, "
                               f"config.json implies {shape}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise SatDistError(f"HF checkpoint {where}: {name} has dtype {dtype}; expected a float dtype")


def shard_hf_state_dict(sd: Mapping, cfg: ModelConfig, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """Local tensors of TP rank `rank` (names of LlamaModel.state_dict())."""
    h, d, r, G = cfg.hidden_size, cfg.head_dim, cfg.heads_per_group, cfg.num_query_groups

    def local(name: str, full: torch.Tensor) -> torch.Tensor:
        return to_local(name, full, cfg, tp, rank).contiguous().clone()

    out = {"embedding.weight": local("embedding.weight", sd["model.embed_tokens.weight"]),
           "final_layernorm.weight": local("final_layernorm.weight", sd["model.norm.weight"])}
    head = sd["model.embed_tokens.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    out["output_layer.weight"] = local("output_layer.weight", head)
    for i in range(cfg.num_layers):
        p, o = _LAYER.format(i), f"layers.{i}."
        qkv = torch.cat((sd[p + "self_attn.q_proj.weight"].reshape(G, r * d, h),
                         sd[p + "self_attn.k_proj.weight"].reshape(G, d, h),
                         sd[p + "self_attn.v_proj.weight"].reshape(G, d, h)), dim=1)  # [G, (r+2)d, h]
        for name, full in (
            ("self_attention.qkv_weight", qkv.reshape(-1, h)),
            ("self_attention.proj_weight", sd[p + "self_attn.o_proj.weight"].t()),
            ("mlp.fc1_weight", torch.cat((sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]))),
            ("mlp.fc2_weight", sd[p + "mlp.down_proj.weight"].t()),
            ("input_layernorm.weight", sd[p + "input_layernorm.weight"]),
            ("pre_mlp_layernorm.weight", sd[p + "post_attention_layernorm.weight"]),
        ):
            out[o + name] = local(o + name, full)
    return out


def merge_tp_state_dicts(shards: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF state dict from the local tensors of all TP ranks (in rank order)."""
    h, d, r, G = cfg.hidden_size, cfg.head_dim, cfg.heads_per_group, cfg.num_query_groups

    def full(name):
        return to_full(name, [s[name] for s in shards], cfg)

    out = {"model.embed_tokens.weight": full("embedding.weight"), "model.norm.weight": full("final_layernorm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = full("output_layer.weight")
    for i in range(cfg.num_layers):
        p, o = _LAYER.format(i), f"layers.{i}."
        qkv = full(o + "self_attention.qkv_weight").reshape(G, (r + 2) * d, h)
        out[p + "self_attn.q_proj.weight"] = qkv[:, : r * d].reshape(-1, h)
        out[p + "self_attn.k_proj.weight"] = qkv[:, r * d:(r + 1) * d].reshape(-1, h)
        out[p + "self_attn.v_proj.weight"] = qkv[:, (r + 1) * d:].reshape(-1, h)
        out[p + "self_attn.o_proj.weight"] = full(o + "self_attention.proj_weight").t()
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = full(o + "mlp.fc1_weight").chunk(2)
        out[p + "mlp.down_proj.weight"] = full(o + "mlp.fc2_weight").t()
        out[p + "input_layernorm.weight"] = full(o + "input_layernorm.weight")
        out[p + "post_attention_layernorm.weight"] = full(o + "pre_mlp_layernorm.weight")
    return {k: v.contiguous().clone() for k, v in out.items()}


def load_hf_checkpoint(path: str | Path) -> tuple[ModelConfig, HFTensors]:
    """config.json and the safetensors weights (one file or a sharded index), checked by their
    headers; the tensors themselves are read when accessed."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SatDistError(f"--hf-checkpoint {path}: no config.json there; give an HF Llama model directory")
    try:
        cfg = model_config_from_hf(json.loads(cfg_file.read_text()), name=path.name)
    except json.JSONDecodeError as e:
        raise SatDistError(f"--hf-checkpoint {path}: config.json is not valid JSON ({e.msg}, line {e.lineno})")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SatDistError(f"--hf-checkpoint {path}: model.safetensors.index.json is malformed "
                               f"({type(e).__name__})")
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise SatDistError(f"--hf-checkpoint {path}: no model.safetensors or model.safetensors.index.json")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise SatDistError(f"--hf-checkpoint {path}: {missing[0]} is listed in the index but missing")
    sd = HFTensors(path, files)
    check_hf_state_dict(sd, cfg, str(path))
    return cfg, sd


def save_hf_checkpoint(path: str | Path, cfg: ModelConfig, sd: dict[str, torch.Tensor],
                       max_shard_bytes: int = 5 * 2**30, dtype: str = "float32") -> None:
    """Write config.json and safetensors (sharded with an index above max_shard_bytes)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
