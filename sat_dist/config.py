"""Configuration dataclasses: SAT, model shape and training run; one validation path each.

Every `validate()` checks its dataclass and returns it, or raises `SatDistError` with a
message of the form `<section>.<field>: got <value>; allowed: <what is allowed>`. The
training run's fields are command-line flags, so there the section and field are the flag
(`--min-lr: got ...`); the `--sat-*` flags and the run definition are derived from
SATConfig's fields (sat_dist.train.arguments).

The named model configs (`--model-config tiny`, ...) are JSON files shipped inside the
package, in MODEL_CONFIG_DIR (sat_dist/model_configs/; configs/model/ in a checkout is a
link to it).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sat_dist.errors import SatDistError, fail_field

METRICS = ("maxip", "wanda", "magnitude", "random", "activation", "fluctuation")
COMPENSATIONS = ("none", "mean")
SPARSE_PASSES = ("both", "backward", "weight-grad")
SELECTIONS = ("sampling", "topk", "pps")
SCHEDULES = ("ladder", "constant", "dense")
GRANULARITIES = ("step", "micro-batch")
WGRAD_SAMPLINGS = ("pps", "topk")
WGRAD_SCHEDULES = ("constant", "ladder")
LR_DECAY_STYLES = ("cosine", "linear", "constant", "WSD")
COMM_SPARSE_CHOICES = ("auto", "on", "off")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"


@functools.lru_cache(maxsize=64)
def _parse_numbers(text: str, field: str, allowed: str) -> Optional[tuple[float, ...]]:
    """Comma-separated numbers of a SATConfig text field (None when empty); cached: every
    layer's forward reads them."""
    text = text.strip()
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SatDistError(f"sat.{field}: got {text!r}; allowed: {allowed}") from None


def _parse_layer_rates(text: str) -> Optional[tuple[float, ...]]:
    return _parse_numbers(text, "omission_mlp_layers", "comma-separated numbers in [0, 1), one per layer "
                          "(e.g. 0,0.4,0.4)")


def _parse_keeps(text: str) -> Optional[tuple[float, ...]]:
    return _parse_numbers(text, "wgrad_tokens_linears", "comma-separated numbers in (0, 1], 4 per layer "
                          "(q/k/v, o, gate/up, down)")


@dataclass
class SATConfig:
    """Settings of Sparsity-Accelerated Training (see docs/SAT.md)."""

    metric: str = "activation"
    """Importance metric of a unit: activation (the norm of what the unit adds to the layer's
    output), fluctuation (MLP: the norm of what it adds minus its mean over the scored tokens,
    i.e. what omitting it removes once --sat-compensation mean adds the mean back; attention
    units are scored as by activation), maxip, wanda, magnitude or random. activation kept
    SmolLM2-135M's function best without compensation (docs/EXPERIMENTS.md)."""

    selection: str = "topk"
    """How kept units are chosen from the scores: topk, sampling (temperature, without
    replacement; the paper's choice, which lost more quality here), or pps (with
    --sat-sparse-pass backward or weight-grad: unit i kept with probability pi_i proportional
    to its score, capped at 1, and its gradient scaled by 1/pi_i, so the sparse backward is
    an unbiased estimate of the dense gradient; docs/SAT.md. Its variance compounds down the
    layers: on SmolLM2-135M it was far worse than topk, docs/EXPERIMENTS.md)."""

    pps_floor: float = 0.5
    """pps: the fraction of each unit's inclusion probability spread uniformly, pi = (1 -
    floor) * (score-proportional) + floor * k/n, in [0, 1]. It bounds the gradient weights
    1/pi by n / (k * floor): without it a channel of tiny score but sizeable gradient is
    kept rarely and then weighted hugely, and the gradient's variance swamps it (the value
    is measured in docs/EXPERIMENTS.md)."""

    temperature: float = 0.05
    """Sampling temperature T: p(unit) is proportional to exp(score / max(score) / T)."""

    omission_mlp: float = 0.1
    """Fraction of MLP channels omitted in the sparse stage, in [0, 1). 0.1 is the highest rate
    that stayed within 1% of dense quality in docs/EXPERIMENTS.md (the paper used 0.3)."""

    omission_attn: float = 0.0
    """Fraction of attention units (KV groups) omitted in the sparse stage, in [0, 1). Off by
    default: omitting KV groups cost the most quality per FLOP saved (docs/EXPERIMENTS.md)."""

    omission_mlp_layers: str = ""
    """Per-layer MLP omission rates of the sparse stage, comma-separated, layer 0 first, one per
    layer (empty: every layer at omission_mlp). Each in [0, 1) (0: the layer stays dense), and
    omission_mlp must be their mean: it stays the run's headline rate, and every rung of the
    ladder scales each layer's rate by the same fraction. Uneven rates at the same mean: on
    SmolLM2-135M layer 0's channels cost 6 to 24 times a middle layer's (docs/EXPERIMENTS.md);
    tools/sat_fidelity.py --per-layer measures a model's layers and proposes the rates."""

    schedule: str = "ladder"
    """Omission-rate schedule: ladder (LORS), constant, or dense (SAT off)."""

    sparse_fraction: float = 0.6
    """Ladder: fraction of the run trained at the full omission rates."""

    ladder_steps: int = 3
    """Ladder: number of rungs between the sparse stage and the dense end."""

    dense_fraction: float = 0.1
    """Ladder: fraction of the run at the end trained dense."""

    align_mlp: int = 128
    """Kept MLP channels per TP partition are rounded to the nearest multiple of this
    (tensor core tiles: an unaligned keep count can run slower than dense)."""

    align_attn: int = 1
    """Kept attention units per TP partition are rounded to the nearest multiple of this."""

    token_stride: int = 8
    """Importance is computed on every token_stride-th token of the micro-batch, to bound
    its cost."""

    seed: int = 1234
    """Seed of the selection generators (combined with step, layer and TP rank)."""

    compensation: str = "none"
    """What the sparse forward puts in place of the omitted MLP channels: none, or mean (their
    mean activation over the scored tokens times their W_down columns, added as a bias: one
    matrix-vector product per layer; FLAP, An et al. 2024). The bias is a constant of the step:
    omitted channels still get exactly zero gradient. Attention units are not compensated."""

    sparse_pass: str = "both"
    """Which passes skip the omitted MLP channels: both (forward and backward), or backward
    (the forward is the dense model's, so the loss and the activations are exact, and the
    backward's products run over the kept channels only; scores then come from the forward's
    own activations at no extra cost), or weight-grad (the forward and the input gradient
    are dense, so every layer below receives the exact gradient; only the weight gradients'
    products run over the kept channels: a third of the MLP's work, against backward's two
    thirds, but without the input-gradient bias that compounds down the layers). MLP only:
    needs --sat-omission-attn 0."""

    granularity: str = "step"
    """How often units are selected: once per optimizer step ("step": scored on the step's
    first micro-batch, reused by every micro-batch and by activation recompute) or afresh
    for every micro-batch ("micro-batch"). See docs/SAT.md for what each guarantees."""

    wgrad_tokens: float = 1.0
    """Fraction of each micro-batch's tokens that the decoder linears' weight gradients (q/k/v,
    o, gate/up, down) are computed from, in (0, 1]; 1: all (exact). The forward and the input
    gradients stay exact; each weight gradient is one smaller GEMM over the drawn tokens
    (docs/SAT.md, "Sampled weight gradients")."""

    wgrad_sampling: str = "pps"
    """How the tokens of a sampled weight gradient are drawn: pps (probability proportional
    to ||dy_t|| ||x_t||, capped at 1, each drawn token weighted 1/p: unbiased) or topk (the
    largest ||dy_t|| ||x_t||, unweighted: biased, for comparison)."""

    wgrad_schedule: str = "constant"
    """When --sat-wgrad-tokens applies: constant (every step of an enabled SAT schedule; the
    forward is exact, so there is no sparse model for a dense end to repair) or ladder (its
    omitted share follows the omission schedule's ladder down to a dense end)."""

    wgrad_tokens_head: float = 1.0
    """As wgrad_tokens, for the LM head's weight gradient (1: exact)."""

    wgrad_tokens_linears: str = ""
    """Per-product keep fractions, comma-separated, 4 per layer in the order q/k/v, o,
    gate/up, down, layer 0 first (empty: every product at wgrad_tokens). Each in (0, 1].
    tools/sat_fidelity.py --wgrad-calibrate proposes them for a FLOP budget."""

    budget: float = 0.0
    """Quality budget (0: off): every budget_interval steps the sampled weight gradients'
    relative variance E||G_hat - G||^2 / ||G||^2 (one draw against the exact gradient on the
    step's first micro-batch, mean over the products and ranks) is measured, logged as
    sat/quality-gap, and the keep fractions are all scaled by one factor to bring it to this
    value. Needs wgrad_sampling pps."""

    budget_interval: int = 10
    """Steps between two budget probes. A probe's first micro-batch computes its weight
    gradients exactly (as dense) plus one draw to measure against them."""

    budget_min_tokens: float = 0.02
    """The lowest keep fraction the budget may lower a product to, in (0, 1]."""

    @property
    def wgrad_linear_keeps(self) -> Optional[tuple[float, ...]]:
        """wgrad_tokens_linears as numbers (None when empty)."""
        text = self.wgrad_tokens_linears if isinstance(self.wgrad_tokens_linears, str) else ""
        return _parse_keeps(text)

    @property
    def samples_wgrad(self) -> bool:
        """Whether any weight gradient is drawn from a sample of the tokens."""
        keeps = self.wgrad_linear_keeps or ()
        return self.enabled and (self.wgrad_tokens < 1.0 or self.wgrad_tokens_head < 1.0
                                 or any(k < 1.0 for k in keeps) or self.budget > 0)

    @property
    def mlp_layer_rates(self) -> Optional[tuple[float, ...]]:
        """omission_mlp_layers as numbers (None when empty: every layer at omission_mlp). Read
        by every layer's keep count in every forward, so the parse is cached."""
        return _parse_layer_rates(self.omission_mlp_layers if isinstance(self.omission_mlp_layers, str) else "")

    def with_mlp_layer_rates(self, text: str) -> "SATConfig":
        """This config with per-layer MLP rates `text` and the headline rate set to their mean."""
        rates = _parse_layer_rates(text)
        if rates is None:
            return dataclasses.replace(self, omission_mlp_layers="")
        return dataclasses.replace(self, omission_mlp_layers=text, omission_mlp=sum(rates) / len(rates))

    @property
    def enabled(self) -> bool:
        """False for the dense schedule: SAT is off (no scoring, no keep-count alignment)."""
        return self.schedule != "dense"

    def validate(self) -> "SATConfig":
        s = "sat"
        for name, allowed in SAT_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise fail_field(s, name, getattr(self, name), ", ".join(allowed))
        if not _is_number(self.temperature) or not self.temperature > 0 or math.isinf(self.temperature):
            raise fail_field(s, "temperature", self.temperature, "a finite number > 0")
        for name in ("omission_mlp", "omission_attn"):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 <= v < 1.0:
                raise fail_field(s, name, v, "a number in [0, 1)")
        if not isinstance(self.omission_mlp_layers, str):
            raise fail_field(s, "omission_mlp_layers", self.omission_mlp_layers,
                             "comma-separated numbers in [0, 1), one per layer")
        layer_rates = self.mlp_layer_rates
        if layer_rates is not None:
            bad = [v for v in layer_rates if not 0.0 <= v < 1.0]
            if bad:
                raise fail_field(s, "omission_mlp_layers", self.omission_mlp_layers,
                                 f"rates in [0, 1) (not {bad[0]:g})")
            mean = sum(layer_rates) / len(layer_rates)
            if abs(mean - self.omission_mlp) > 5e-4:
                raise SatDistError(f"--sat-omission-mlp-layers: the rates' mean is {mean:.4f} but --sat-omission-mlp "
                                   f"is {self.omission_mlp:g}; set --sat-omission-mlp {mean:.4f} (the headline rate "
                                   f"the ladder scales)")
        for name in ("sparse_fraction", "dense_fraction", "pps_floor"):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 <= v <= 1.0:
                raise fail_field(s, name, v, "a number in [0, 1]")
        if self.sparse_fraction + self.dense_fraction > 1.0 + 1e-9:
            raise SatDistError(
                f"sat.sparse_fraction + sat.dense_fraction: got "
                f"{self.sparse_fraction} + {self.dense_fraction} > 1; allowed: a sum <= 1"
            )
        for name, lo in (("ladder_steps", 0), ("align_mlp", 1), ("align_attn", 1), ("token_stride", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise fail_field(s, name, v, f"an integer >= {lo}")
        if not _is_int(self.seed) or self.seed < 0:
            raise fail_field(s, "seed", self.seed, "an integer >= 0")
        for name in ("wgrad_tokens", "wgrad_tokens_head", "budget_min_tokens"):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 < v <= 1.0:
                raise fail_field(s, name, v, "a number in (0, 1]")
        if not isinstance(self.wgrad_tokens_linears, str):
            raise fail_field(s, "wgrad_tokens_linears", self.wgrad_tokens_linears,
                             "comma-separated numbers in (0, 1], 4 per layer")
        keeps = self.wgrad_linear_keeps
        if keeps is not None and not all(0.0 < v <= 1.0 for v in keeps):
            raise fail_field(s, "wgrad_tokens_linears", self.wgrad_tokens_linears, "keep fractions in (0, 1]")
        if not _is_number(self.budget) or not 0.0 <= self.budget < math.inf:
            raise fail_field(s, "budget", self.budget, "a number >= 0 (0: off)")
        if not _is_int(self.budget_interval) or self.budget_interval < 1:
            raise fail_field(s, "budget_interval", self.budget_interval, "an integer >= 1")
        if self.budget > 0 and self.wgrad_sampling != "pps":
            raise SatDistError("--sat-budget measures the variance of unbiased sampled weight gradients, and "
                               "--sat-wgrad-sampling topk is biased; use --sat-wgrad-sampling pps or --sat-budget 0")
        dense_forward = self.sparse_pass in ("backward", "weight-grad")
        if dense_forward and self.samples_wgrad:
            raise SatDistError(f"--sat-sparse-pass {self.sparse_pass} computes the MLP's weight gradients over kept "
                               f"channels in its own backward, which does not sample tokens; use --sat-sparse-pass "
                               f"both with --sat-wgrad-tokens (or --sat-wgrad-tokens 1)")
        if dense_forward and self.omission_attn > 0:
            raise SatDistError(f"--sat-sparse-pass {self.sparse_pass}: omits MLP channels only, but "
                               f"--sat-omission-attn is {self.omission_attn}; set --sat-omission-attn 0 or use "
                               f"--sat-sparse-pass both")
        if dense_forward and self.compensation != "none":
            raise SatDistError(f"--sat-sparse-pass {self.sparse_pass} runs the dense forward, so there is nothing for "
                               f"--sat-compensation {self.compensation} to make up; use --sat-compensation none")
        if self.selection == "pps" and not dense_forward:
            raise SatDistError("--sat-selection pps: its 1/pi gradient weights need the exact forward of "
                               "--sat-sparse-pass backward or weight-grad; add --sat-sparse-pass backward or use "
                               "--sat-selection topk")
        return self


SAT_CHOICES = {"metric": METRICS, "selection": SELECTIONS, "schedule": SCHEDULES, "granularity": GRANULARITIES,
               "compensation": COMPENSATIONS, "sparse_pass": SPARSE_PASSES, "wgrad_sampling": WGRAD_SAMPLINGS,
               "wgrad_schedule": WGRAD_SCHEDULES}
"""The SATConfig fields that take one of a fixed set of values (their --sat-* flags' choices)."""


@dataclass
class ModelConfig:
    """Shape of a Llama-architecture decoder (Llama-2 names in comments)."""

    hidden_size: int = 256
    """Model width h (Llama-2 7B: 4096)."""

    ffn_hidden_size: int = 512
    """SwiGLU inner width (Llama-2 7B: 11008)."""

    num_layers: int = 2
    """Number of decoder layers."""

    num_attention_heads: int = 4
    """Query heads."""

    num_query_groups: int = 4
    """Key/value heads (GQA groups); equal to num_attention_heads for multi-head attention."""

    vocab_size: int = 8000
    """Tokenizer vocabulary; the embedding is padded up to padded_vocab_size()."""

    max_position_embeddings: int = 4096
    """Longest sequence the rotary tables are built for."""

    rope_theta: float = 10000.0
    """Rotary base."""

    rope_scaling: Optional[dict] = None
    """Hugging Face's rope_scaling, the RoPE context extension of Llama-3.x checkpoints:
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (Llama-3.1: 8, 1, 4, 8192) or
    {"rope_type": "linear", "factor"}. None: plain RoPE (Llama-2, Llama-3.0, SmolLM2)."""

    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    make_vocab_size_divisible_by: int = 128
    """Megatron-style vocabulary padding multiple (times the TP size)."""

    tie_word_embeddings: bool = False
    """Share the input embedding with the LM head (SmolLM2 does; Llama-2 does not)."""

    init_method_std: float = 0.02
    """Std of the normal initialisation of freshly built (not imported) weights."""

    name: str = "custom"
    """A label for logs."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate(self) -> "ModelConfig":
        s = "model"
        for name in ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise fail_field(s, name, v, "an integer >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise fail_field(s, "num_attention_heads", self.num_attention_heads,
                             f"a divisor of hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_query_groups:
            raise fail_field(s, "num_query_groups", self.num_query_groups,
                             f"a divisor of num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise fail_field(s, "num_attention_heads", self.num_attention_heads,
                             "a value giving an even head_dim (rotary embedding)")
        for name in ("rope_theta", "norm_eps", "init_method_std"):
            v = getattr(self, name)
            if not _is_number(v) or not v > 0:
                raise fail_field(s, name, v, "a number > 0")
        if self.rope_scaling is not None:
            self._validate_rope_scaling()
        return self

    # The rope_scaling types sat_dist.model.rope implements, and the keys each needs besides
    # rope_type (a class attribute, not a field: it is not part of a model's description).
    ROPE_SCALING_KEYS = {
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "linear": ("factor",),
    }

    def _validate_rope_scaling(self) -> None:
        s, rs = "model", self.rope_scaling
        if not isinstance(rs, dict) or rs.get("rope_type") not in self.ROPE_SCALING_KEYS:
            got = rs.get("rope_type") if isinstance(rs, dict) else rs
            raise fail_field(s, "rope_scaling.rope_type" if isinstance(rs, dict) else "rope_scaling", got,
                             f"{', '.join(self.ROPE_SCALING_KEYS)} (or rope_scaling null for plain RoPE)")
        keys = self.ROPE_SCALING_KEYS[rs["rope_type"]]
        unknown = sorted(set(rs) - set(keys) - {"rope_type"})
        if unknown:
            raise fail_field(s, "rope_scaling", rs, f"for rope_type {rs['rope_type']}, exactly the keys "
                             f"rope_type, {', '.join(keys)} (unknown: {', '.join(unknown)})")
        for key in keys:
            v = rs.get(key)
            if key == "original_max_position_embeddings":
                if not _is_int(v) or v < 1:
                    raise fail_field(s, f"rope_scaling.{key}", v, "an integer >= 1")
            elif not _is_number(v) or not math.isfinite(v) or not v > 0:
                raise fail_field(s, f"rope_scaling.{key}", v, "a finite number > 0")
        if rs["rope_type"] == "llama3" and not rs["high_freq_factor"] > rs["low_freq_factor"]:
            # the smooth band between the two wavelength bounds would be empty or inverted
            raise fail_field(s, "rope_scaling.high_freq_factor", rs["high_freq_factor"],
                             f"a number > low_freq_factor={rs['low_freq_factor']}")

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls(**load_fields(path, cls, "model config")).validate()


def model_config_path(name: str) -> Path:
    """--model-config NAME: a JSON path, or the name of a config in MODEL_CONFIG_DIR."""
    p = Path(name)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise SatDistError(f"--model-config {name}: file not found")
        return p
    cand = MODEL_CONFIG_DIR / f"{name}.json"
    if not cand.is_file():
        known = sorted(f.stem for f in MODEL_CONFIG_DIR.glob("*.json"))
        raise SatDistError(f"--model-config {name}: unknown model; allowed: {', '.join(known)} or a JSON path")
    return cand


@dataclass
class TrainConfig:
    """Settings of the training run (model and SAT settings live in their own configs)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size; the data-parallel size is world_size / this."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one rank."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all DP ranks (default: micro_batch_size x DP size);
    gradient accumulation = global / (micro x DP)."""
    seq_length: int = 256
    """Tokens per sample."""
    train_iters: int = 80
    """Optimizer steps of the whole run (the SAT schedule spans these)."""
    lr: float = 6e-4
    """Peak learning rate."""
    min_lr: float = 6e-5
    """Final learning rate of the decay."""
    lr_warmup_iters: int = 10
    """Linear warmup steps from --lr-warmup-init to lr."""
    lr_warmup_init: float = 0.0
    """Learning rate at the start of the warmup (Megatron's --lr-warmup-init)."""
    lr_decay_iters: Optional[int] = None
    """Steps over which the LR decays to min_lr, warmup included (default: --train-iters);
    later steps run at min_lr."""
    lr_decay_style: str = "cosine"
    """cosine, linear, constant or WSD (warmup-stable-decay) after warmup."""
    lr_wsd_decay_iters: Optional[int] = None
    """WSD: steps of the final decay, which ends at --lr-decay-iters (required with WSD)."""
    lr_wsd_decay_style: str = "exponential"
    """WSD: shape of the final decay: exponential, linear, cosine or minus_sqrt."""
    override_opt_param_scheduler: bool = False
    """On --load, take the LR schedule (and SAT's) from the flags rather than refusing a
    checkpoint trained with other values; a new stage that continues the iteration count."""
    no_load_optim: bool = False
    """On --load, do not load the Adam moments (they start at zero; weights, iteration and
    data position are loaded)."""
    no_load_rng: bool = False
    """On --load, do not restore the random-number generators' state."""
    finetune: bool = False
    """On --load, load the weights only: iteration, data position, optimizer, LR and SAT
    schedules start at zero (a new stage from another run's checkpoint)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    bf16: bool = False
    """Train in bf16 (DeepSpeed bf16 mode; fp32 master weights)."""
    recompute_activations: bool = False
    """Recompute each layer's activations in backward (less memory, ~1/3 more compute)."""
    data_path: Optional[list[str]] = None
    """A megatron indexed dataset PREFIX (PREFIX.bin/.idx), or a blend W1 PREFIX1 W2 PREFIX2 ...
    (weights normalised), split by --split; None runs the embedded default."""
    split: str = "969,30,1"
    """Train/valid/test weights."""
    train_data_path: Optional[list[str]] = None
    """Training data of its own, a PREFIX or a blend (read whole; not split)."""
    test_data_path: Optional[list[str]] = None
    """Test data of its own, a PREFIX or a blend, evaluated at the end as `lm loss test`."""
    valid_data_path: Optional[list[str]] = None
    """Validation sets of their own, NAME=PREFIX each (a bare PREFIX replaces the split's
    validation set); each is read whole and logged as `lm loss validation/NAME`."""
    tokenizer_model: Optional[str] = None
    """SentencePiece tokenizer.model or HF tokenizer.json (its EOS separates documents)."""
    data_cache_path: Optional[str] = None
    """Where a dataset made without PREFIX.doclast.npz gets it, once (Megatron's flag name);
    default: beside the dataset. For dataset directories that are read-only."""
    load: Optional[str] = None
    """Checkpoint directory to resume from (its `latest`, or --ckpt-step's)."""
    accept_changed_data: bool = False
    """On --load, let a training dataset whose contents changed under its path (documents
    appended, another corpus) start again at sample 0 instead of refusing the resume."""
    ckpt_step: Optional[int] = None
    """Resume from this iteration's checkpoint in --load instead of the one `latest` names
    (Megatron-LM's flag): for when `latest` is missing or names a damaged checkpoint."""
    save: Optional[str] = None
    """Checkpoint directory to save to."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end)."""
    keep_latest_k: int = 0
    """Keep only this many complete checkpoints in --save, the newest ones (always the one
    `latest` names), deleting older ones after each save (0: keep all). Not part of the run
    definition: it may change on resume."""
    eval_interval: int = 0
    """Validate every this many steps (0: only at the end)."""
    eval_iters: int = 4
    """Validation micro-batches per evaluation."""
    tensorboard_dir: Optional[str] = None
    """Where rank 0 writes TensorBoard events."""
    log_interval: int = 5
    """Console log every this many steps."""
    seed: int = 1234
    """Seed of initialisation, data order and SAT selection."""
    model_config: Optional[str] = None
    """A model config shipped in sat_dist/model_configs/ (configs/model/ in a checkout), by
    name, or a path to a model JSON (default: tiny, or the shape of --hf-checkpoint; given
    with it, the two must agree)."""
    hf_checkpoint: Optional[str] = None
    """HF Llama directory with the initial weights (continual pre-training)."""
    ds_config: Optional[str] = None
    """DeepSpeed JSON config (ZeRO stage, offload); batch/clip/bf16/optimizer come from flags."""
    sat_comm_sparse: str = "auto"
    """Comm-sparse ZeRO-3 for SAT's weights: gather and reduce only the kept rows of the
    attention and MLP weights over the data-parallel group (docs/SAT.md). on: required (an
    error where it cannot run); off: DeepSpeed gathers and reduces them whole; auto: on
    where it can run (ZeRO-3, SAT on, --sat-sparse-pass both, no compensation, no
    parameter offload, no hpZ) at a data-parallel size above 1 (one rank sends nothing) and
    the bytes model predicts SAT's weights move at most 0.75 of the whole-weight bytes at
    the full omission rates (sat_dist.parallel.zero_bytes.AUTO_MAX_RATIO; not yet timed on
    a GPU). An execution choice, not part of the run definition."""
    max_nonfinite_steps: int = 5
    """Stop after this many non-finite (NaN/Inf) steps in a row; each one is skipped."""
    exit_interval: int = 0
    """Stop (after saving) at this iteration; 0: run to train_iters. For tests and tooling."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s per GPU that throughput/mfu divides by; default: the device's data-sheet
    value for the run's dtype, by exact device name (sat_dist.train.metrics.PEAK_FLOPS)."""
    distributed_timeout_minutes: int = 10
    """Timeout of every collective (Megatron's --distributed-timeout-minutes). Raise it when
    one rank works alone for long (a large checkpoint import or save on a slow filesystem)."""
    skip_train: bool = False
    """Only evaluate the validation sets (of the loaded or imported model) and exit: no
    training step, nothing saved (Megatron's --skip-train)."""
    reset_position_ids: bool = False
    """Restart the position ids after every EOD inside a packed sample."""
    reset_attention_mask: bool = False
    """No attention across an EOD inside a packed sample (each document sees only itself)."""
    eod_mask_loss: bool = False
    """No loss at positions whose input token is EOD (predicting the next document's first
    token from the previous one's end)."""
    eval_tasks: Optional[list[str]] = None
    """Downstream tasks of lm-evaluation-harness (comma-separated names: tasks, groups or
    tags it knows, or of --eval-tasks-path), scored on the dense model being trained, on
    every rank (sat_dist.eval; docs/EVALUATION.md). Needs the `eval` extra."""
    eval_tasks_path: Optional[str] = None
    """A directory of harness task YAMLs of one's own (relative data_files resolve beside
    each YAML)."""
    eval_tasks_interval: Optional[int] = None
    """Run --eval-tasks every this many steps (default: --eval-interval; 0: only at the end).
    Always at the end of training too, and alone with --skip-train."""
    eval_tasks_limit: Optional[int] = None
    """Examples per task (default: all); for quick looks, not for reported numbers."""
    wandb_project: Optional[str] = None
    """Weights & Biases project: global rank 0 logs the TensorBoard scalars and the run's
    config there (Megatron's flag; WANDB_MODE=offline writes to disk). Needs the `wandb` extra."""
    wandb_exp_name: Optional[str] = None
    """The W&B run's name (Megatron's flag)."""
    wandb_save_dir: Optional[str] = None
    """Where W&B writes its files (default: --save/wandb, else ./wandb)."""

    def validate(self) -> "TrainConfig":
        """Errors name the flag: `--<flag>: got <value>; allowed: ...` (or what to do)."""
        def positive(name, v, zero_ok=False):
            if v is None or v < (0 if zero_ok else 1):
                flag = "--" + name.replace("_", "-")
                raise SatDistError(f"{flag}: got {v}; allowed: an integer >= {0 if zero_ok else 1}")

        for name in ("tensor_model_parallel_size", "micro_batch_size", "seq_length", "train_iters",
                     "eval_iters", "log_interval", "max_nonfinite_steps", "distributed_timeout_minutes"):
            positive(name, getattr(self, name))
        for name in ("lr_warmup_iters", "save_interval", "eval_interval", "exit_interval"):
            positive(name, getattr(self, name), zero_ok=True)
        if self.keep_latest_k is None or self.keep_latest_k < 0:
            raise SatDistError(f"--keep-latest-k: got {self.keep_latest_k}; allowed: an integer >= 0 (the number of "
                               f"complete checkpoints to keep; 0 keeps them all)")
        if self.global_batch_size is not None:
            positive("global_batch_size", self.global_batch_size)
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            raise SatDistError(f"--peak-tflops: got {self.peak_tflops}; allowed: a finite number > 0 (TFLOP/s per GPU)")
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "adam_eps"):
            v = getattr(self, name)
            if not v >= 0:
                raise SatDistError(f"--{name.replace('_', '-')}: got {v}; allowed: a number >= 0")
        if self.min_lr > self.lr:
            raise SatDistError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}; lower --min-lr")
        self._validate_lr_schedule()
        self._validate_stage_flags()
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise SatDistError(f"--{name.replace('_', '-')}: got {v}; allowed: a number in [0, 1)")
        for flag, value in (("--data-path", self.data_path), ("--train-data-path", self.train_data_path),
                            ("--test-data-path", self.test_data_path)):
            if value and self.tokenizer_model is None:
                raise SatDistError(f"{flag} needs --tokenizer-model (the tokenizer the data was made with)")
        if (self.skip_train and not self.valid_data_path and not self.data_path and not self.test_data_path
                and not self.eval_tasks):
            raise SatDistError("--skip-train evaluates the validation sets: give --valid-data-path (or "
                               "--data-path with a validation share in --split)")
        if self.valid_data_path:
            valid_data_sets(self.valid_data_path)
            if not self.data_path and not self.train_data_path:
                raise SatDistError("--valid-data-path needs --data-path (or --train-data-path) and "
                                   "--tokenizer-model: the sets are read with the run's tokenizer")
        self._validate_eval_and_logging()
        return self

    def _validate_eval_and_logging(self) -> None:
        for name in ("eval_tasks_path", "eval_tasks_interval", "eval_tasks_limit"):
            if getattr(self, name) is not None and not self.eval_tasks:
                raise SatDistError(f"--{name.replace('_', '-')} needs --eval-tasks (the tasks it is about)")
        if self.eval_tasks_interval is not None and (not _is_int(self.eval_tasks_interval)
                                                     or self.eval_tasks_interval < 0):
            raise SatDistError(f"--eval-tasks-interval: got {self.eval_tasks_interval}; allowed: an integer >= 0 "
                               f"(0: only at the end of training)")
        if self.eval_tasks_limit is not None and (not _is_int(self.eval_tasks_limit) or self.eval_tasks_limit < 1):
            raise SatDistError(f"--eval-tasks-limit: got {self.eval_tasks_limit}; allowed: an integer >= 1 "
                               f"(examples per task)")
        for name in ("wandb_exp_name", "wandb_save_dir"):
            if getattr(self, name) and not self.wandb_project:
                raise SatDistError(f"--{name.replace('_', '-')} needs --wandb-project (W&B logging is on only "
                                   f"with a project)")

    def _validate_lr_schedule(self) -> None:
        if self.sat_comm_sparse not in COMM_SPARSE_CHOICES:
            raise SatDistError(f"--sat-comm-sparse: got {self.sat_comm_sparse}; "
                               f"allowed: {', '.join(COMM_SPARSE_CHOICES)}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise SatDistError(f"--lr-decay-style: got {self.lr_decay_style}; allowed: {', '.join(LR_DECAY_STYLES)}")
        if self.lr_wsd_decay_style not in WSD_DECAY_STYLES:
            raise SatDistError(f"--lr-wsd-decay-style: got {self.lr_wsd_decay_style}; allowed: "
                               f"{', '.join(WSD_DECAY_STYLES)}")
        if not 0 <= self.lr_warmup_init <= self.lr:
            raise SatDistError(f"--lr-warmup-init: got {self.lr_warmup_init}; allowed: a number in [0, --lr] "
                               f"= [0, {self.lr}]")
        warmup = self.lr_warmup_iters
        if self.lr_decay_iters is not None:
            # Only an explicit value is held to this: the default (--train-iters) may be shorter
            # than the warmup, and the run then warms up throughout (as it always could).
            if self.lr_decay_iters < max(warmup, 1):
                raise SatDistError(f"--lr-decay-iters: got {self.lr_decay_iters}; allowed: an integer >= "
                                   f"--lr-warmup-iters ({warmup}) and >= 1 (the decay ends at that step, "
                                   f"warmup included)")
        decay = self.train_iters if self.lr_decay_iters is None else self.lr_decay_iters
        if self.lr_decay_style == "WSD":
            wsd = self.lr_wsd_decay_iters
            if wsd is None:
                raise SatDistError("--lr-decay-style WSD needs --lr-wsd-decay-iters (the steps of the final "
                                   "anneal, which ends at --lr-decay-iters)")
            if not 0 <= wsd <= decay - warmup:
                raise SatDistError(f"--lr-wsd-decay-iters: got {wsd}; allowed: an integer in [0, --lr-decay-iters - "
                                   f"--lr-warmup-iters] = [0, {decay} - {warmup}] (the anneal follows the "
                                   f"warmup; --lr-decay-iters defaults to --train-iters)")

    def _validate_stage_flags(self) -> None:
        stage = [f for f, on in (("--finetune", self.finetune),
                                 ("--override-opt_param-scheduler", self.override_opt_param_scheduler),
                                 ("--no-load-optim", self.no_load_optim), ("--no-load-rng", self.no_load_rng)) if on]
        if self.ckpt_step is not None and (not _is_int(self.ckpt_step) or self.ckpt_step < 0):
            raise SatDistError(f"--ckpt-step: got {self.ckpt_step!r}; allowed: an iteration >= 0")
        if self.ckpt_step is not None and not self.load:
            raise SatDistError("--ckpt-step: names a checkpoint in --load, but no --load is given; add --load DIR")
        if stage and not self.load:
            raise SatDistError(f"{stage[0]}: says how to load a checkpoint, but no --load is given; add --load DIR "
                               f"or drop {stage[0]}")
        if self.finetune and self.override_opt_param_scheduler:
            raise SatDistError("--finetune with --override-opt_param-scheduler: contradictory (--finetune already "
                               "starts the iteration count and every schedule at 0 from the flags); drop "
                               "--override-opt_param-scheduler, or drop --finetune to continue the checkpoint's "
                               "iteration count with a new schedule")


_SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def valid_data_sets(entries: Optional[list[str]]) -> dict[str, str]:
    """--valid-data-path entries -> {"valid/NAME": PREFIX}; a bare PREFIX -> {"valid": PREFIX}
    (Megatron's meaning of the flag: the run's validation set). Malformed entries are refused
    here; missing files when the sets are opened."""
    out: dict[str, str] = {}
    fix = "write NAME=PREFIX, e.g. code=/data/code_text_document"
    for entry in entries or []:
        name, eq, prefix = entry.partition("=")
        if not eq:
            name, prefix = None, entry
        elif not name:
            raise SatDistError(f"--valid-data-path {entry!r}: empty name before '='; {fix}")
        elif not prefix:
            raise SatDistError(f"--valid-data-path {entry!r}: no dataset prefix after '='; {fix}")
        elif not _SET_NAME.fullmatch(name):
            raise SatDistError(f"--valid-data-path {entry!r}: name {name!r} may hold only letters, digits, "
                               f"'_', '-' and '.' (it becomes a TensorBoard tag)")
        key = "valid" if name is None else f"valid/{name}"
        if key in out:
            what = "two prefixes without a name" if name is None else f"the name {name!r} twice"
            raise SatDistError(f"--valid-data-path: got {what} ({out[key]}, {prefix}); give each set its own NAME=")
        out[key] = prefix
    return out


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field name: its docstring, whitespace folded} of a config dataclass, read from its
    source; empty when the source is not available (the docstrings are help texts only)."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError, SyntaxError, IndexError):
        return {}
    out = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def read_json_object(path: str | Path, what: str) -> dict:
    """A JSON object from `path`; a missing file or bad JSON is one clear error naming `what`."""
    path = Path(path)
    if not path.is_file():
        raise SatDistError(f"{what} {path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SatDistError(f"{what} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
    if not isinstance(data, dict):
        raise SatDistError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_fields(path: str | Path, cls, what: str) -> dict:
    """Read a JSON object from `path` and check its keys are fields of `cls`."""
    data = read_json_object(path, what)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SatDistError(f"{what} {path}: unknown keys {unknown}; allowed: {sorted(names)}")
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


__all__ = ["SATConfig", "ModelConfig", "TrainConfig", "METRICS", "SELECTIONS", "SCHEDULES", "GRANULARITIES",
           "LR_DECAY_STYLES", "COMM_SPARSE_CHOICES", "WSD_DECAY_STYLES", "SAT_CHOICES", "MODEL_CONFIG_DIR",
           "model_config_path",
           "valid_data_sets", "field_docs", "load_fields", "read_json_object"]
