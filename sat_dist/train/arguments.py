"""Command-line flags (Megatron-LM's names where one exists) and --config files.

Precedence: built-in defaults < --config FILE (YAML or JSON, keys are flag names with '-' or
'_') < flags on the command line. Everything is validated once, here, into dataclasses.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sat_dist.config import GRANULARITIES, METRICS, SCHEDULES, SELECTIONS, ModelConfig, SATConfig
from sat_dist.errors import SatDistError

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_CONFIG_DIR = REPO_ROOT / "configs" / "model"
LR_DECAY_STYLES = ("cosine", "linear", "constant")


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
    """Linear warmup steps from 0 to lr."""
    lr_decay_style: str = "cosine"
    """cosine, linear or constant after warmup."""
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
    data_path: Optional[str] = None
    """Prefix of a megatron indexed dataset (PREFIX.bin/.idx); None runs the embedded default."""
    split: str = "969,30,1"
    """Train/valid/test weights."""
    valid_data_path: Optional[list[str]] = None
    """Validation sets of their own, NAME=PREFIX each (a bare PREFIX replaces the split's
    validation set); each is read whole and logged as `lm loss validation/NAME`."""
    tokenizer_model: Optional[str] = None
    """SentencePiece tokenizer.model or HF tokenizer.json (its EOS separates documents)."""
    load: Optional[str] = None
    """Checkpoint directory to resume from (its `latest`)."""
    save: Optional[str] = None
    """Checkpoint directory to save to."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end)."""
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
    """A name in configs/model/ or a path to a model JSON (default: tiny, or the shape of
    --hf-checkpoint; given with it, the two must agree)."""
    hf_checkpoint: Optional[str] = None
    """HF Llama directory with the initial weights (continual pre-training)."""
    ds_config: Optional[str] = None
    """DeepSpeed JSON config (ZeRO stage, offload); batch/clip/bf16/optimizer come from flags."""
    max_nonfinite_steps: int = 5
    """Stop after this many non-finite (NaN/Inf) steps in a row; each one is skipped."""
    exit_interval: int = 0
    """Stop (after saving) at this iteration; 0: run to train_iters. For tests and tooling."""
    skip_train: bool = False
    """Only evaluate the validation sets (of the loaded or imported model) and exit: no
    training step, nothing saved (Megatron's --skip-train)."""


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="pretrain.py", description="SAT continual pre-training of Llama models.")
    t = TrainConfig()
    a = p.add_argument
    a("--config", help="YAML or JSON file of flag values; flags given here override it")
    a("--tensor-model-parallel-size", type=int, default=t.tensor_model_parallel_size)
    a("--micro-batch-size", type=int, default=t.micro_batch_size)
    a("--global-batch-size", type=int, default=t.global_batch_size)
    a("--seq-length", type=int, default=t.seq_length)
    a("--train-iters", type=int, default=t.train_iters)
    a("--lr", type=float, default=t.lr)
    a("--min-lr", type=float, default=t.min_lr)
    a("--lr-warmup-iters", type=int, default=t.lr_warmup_iters)
    a("--lr-decay-style", choices=LR_DECAY_STYLES, default=t.lr_decay_style)
    a("--weight-decay", type=float, default=t.weight_decay)
    a("--adam-beta1", type=float, default=t.adam_beta1)
    a("--adam-beta2", type=float, default=t.adam_beta2)
    a("--adam-eps", type=float, default=t.adam_eps)
    a("--clip-grad", type=float, default=t.clip_grad)
    a("--bf16", action="store_true", default=t.bf16)
    a("--recompute-activations", action="store_true", default=t.recompute_activations)
    a("--data-path", default=t.data_path)
    a("--split", default=t.split)
    a("--valid-data-path", nargs="+", default=t.valid_data_path, metavar="NAME=PREFIX")
    a("--tokenizer-model", default=t.tokenizer_model)
    a("--load", default=t.load)
    a("--save", default=t.save)
    a("--save-interval", type=int, default=t.save_interval)
    a("--eval-interval", type=int, default=t.eval_interval)
    a("--eval-iters", type=int, default=t.eval_iters)
    a("--tensorboard-dir", default=t.tensorboard_dir)
    a("--log-interval", type=int, default=t.log_interval)
    a("--seed", type=int, default=t.seed)
    a("--model-config", default=t.model_config)
    a("--hf-checkpoint", default=t.hf_checkpoint)
    a("--max-nonfinite-steps", type=int, default=t.max_nonfinite_steps)
    a("--exit-interval", type=int, default=t.exit_interval)
    a("--skip-train", action="store_true", default=t.skip_train)
    a("--ds_config", "--deepspeed_config", "--ds-config", dest="ds_config", default=t.ds_config)
    a("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    a("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # accepted for compatibility
    s = SATConfig()
    a("--sat-metric", choices=METRICS, default=s.metric)
    a("--sat-selection", choices=SELECTIONS, default=s.selection)
    a("--sat-temperature", type=float, default=s.temperature)
    a("--sat-omission-mlp", type=float, default=s.omission_mlp)
    a("--sat-omission-attn", type=float, default=s.omission_attn)
    a("--sat-schedule", choices=SCHEDULES, default=s.schedule)
    a("--sat-sparse-fraction", type=float, default=s.sparse_fraction)
    a("--sat-ladder-steps", type=int, default=s.ladder_steps)
    a("--sat-dense-fraction", type=float, default=s.dense_fraction)
    a("--sat-token-stride", type=int, default=s.token_stride)
    a("--sat-align-mlp", type=int, default=s.align_mlp)
    a("--sat-align-attn", type=int, default=s.align_attn)
    a("--sat-granularity", choices=GRANULARITIES, default=s.granularity)
    return p


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise SatDistError(f"{message}; see --help")


@dataclass
class RunConfig:
    train: TrainConfig
    sat: SATConfig
    model_config_path: Optional[Path]
    """The model JSON (None when only --hf-checkpoint gives the model)."""


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


def run_definition(run: RunConfig, model_cfg: ModelConfig) -> dict:
    """The settings a resumed run must share with its checkpoint, by flag name: the LR and
    SAT schedules, the data order (seed, sample length, split) and SAT's selection. Megatron
    refuses to resume with different scheduler settings; so do we, naming each difference.
    Batch sizes and the parallel layout may change (the data position is kept in samples)."""
    t, s = run.train, run.sat
    d = {"train-iters": t.train_iters, "lr": t.lr, "min-lr": t.min_lr, "lr-warmup-iters": t.lr_warmup_iters,
         "lr-decay-style": t.lr_decay_style, "seed": t.seed, "seq-length": t.seq_length, "split": t.split,
         "rope_theta": model_cfg.rope_theta, "norm_eps": model_cfg.norm_eps}
    for name in ("metric", "selection", "temperature", "omission_mlp", "omission_attn", "schedule",
                 "sparse_fraction", "ladder_steps", "dense_fraction", "align_mlp", "align_attn", "token_stride",
                 "granularity"):
        d["sat-" + name.replace("_", "-")] = getattr(s, name)
    return d


def parse_args(argv: Optional[list[str]] = None) -> RunConfig:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_read_config_file(pre.config, parser))
    ns = parser.parse_args(argv)
    return config_from_namespace(ns)


def config_from_namespace(ns: argparse.Namespace) -> RunConfig:
    d = vars(ns)
    train = TrainConfig(**{k: d[k] for k in TrainConfig.__dataclass_fields__})
    _validate_train(train)
    sat = SATConfig(
        metric=ns.sat_metric, selection=ns.sat_selection, temperature=ns.sat_temperature,
        omission_mlp=ns.sat_omission_mlp, omission_attn=ns.sat_omission_attn,
        schedule=ns.sat_schedule, sparse_fraction=ns.sat_sparse_fraction,
        ladder_steps=ns.sat_ladder_steps, dense_fraction=ns.sat_dense_fraction,
        align_mlp=ns.sat_align_mlp, align_attn=ns.sat_align_attn,
        token_stride=ns.sat_token_stride, seed=ns.seed, granularity=ns.sat_granularity,
    ).validate()
    if train.model_config is None and not train.hf_checkpoint:
        train.model_config = "tiny"
    model_path = resolve_model_config(train.model_config) if train.model_config else None
    return RunConfig(train, sat, model_path)


def resolve_model_config(name: str) -> Path:
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


def _read_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    f = Path(path)
    if not f.is_file():
        raise SatDistError(f"--config {path}: file not found")
    text = f.read_text()
    try:
        if f.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise different types; both carry a position
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SatDistError(f"--config {path}: not valid {'YAML' if f.suffix in ('.yaml', '.yml') else 'JSON'}: {first}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SatDistError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        act = actions.get(dest)
        if act is None:
            raise SatDistError(f"--config {path}: unknown key {key!r}; keys are flag names such as seq-length")
        if act.choices is not None and value not in act.choices:
            raise SatDistError(f"--config {path}: {key}: got {value!r}; allowed: {', '.join(map(str, act.choices))}")
        if act.nargs == "+" and value is not None:
            if not isinstance(value, (str, list)):
                raise SatDistError(f"--config {path}: {key}: got {value!r}; expected a list of strings")
            value = [str(v) for v in ([value] if isinstance(value, str) else value)]
        if act.type is not None and value is not None:
            try:
                value = act.type(value)
            except (TypeError, ValueError):
                raise SatDistError(f"--config {path}: {key}: got {value!r}; expected {act.type.__name__}")
        out[dest] = value
    return out


def _validate_train(t: TrainConfig) -> None:
    def positive(name, v, zero_ok=False):
        if v is None or v < (0 if zero_ok else 1):
            flag = "--" + name.replace("_", "-")
            raise SatDistError(f"{flag}: got {v}; allowed: an integer >= {0 if zero_ok else 1}")

    for name in ("tensor_model_parallel_size", "micro_batch_size", "seq_length", "train_iters",
                 "eval_iters", "log_interval", "max_nonfinite_steps"):
        positive(name, getattr(t, name))
    for name in ("lr_warmup_iters", "save_interval", "eval_interval", "exit_interval"):
        positive(name, getattr(t, name), zero_ok=True)
    if t.global_batch_size is not None:
        positive("global_batch_size", t.global_batch_size)
    for name in ("lr", "min_lr", "weight_decay", "clip_grad", "adam_eps"):
        v = getattr(t, name)
        if not v >= 0:
            raise SatDistError(f"--{name.replace('_', '-')}: got {v}; allowed: a number >= 0")
    if t.min_lr > t.lr:
        raise SatDistError(f"--min-lr {t.min_lr} is larger than --lr {t.lr}; lower --min-lr")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(t, name)
        if not 0 <= v < 1:
            raise SatDistError(f"--{name.replace('_', '-')}: got {v}; allowed: a number in [0, 1)")
    if t.data_path is not None and t.tokenizer_model is None:
        raise SatDistError("--data-path needs --tokenizer-model (the tokenizer the data was made with)")
    if t.skip_train and not t.valid_data_path and not t.data_path:
        raise SatDistError("--skip-train evaluates the validation sets: give --valid-data-path (or --data-path "
                           "with a validation share in --split)")
    if t.valid_data_path:
        valid_data_sets(t.valid_data_path)
        if t.data_path is None:
            raise SatDistError("--valid-data-path needs --data-path and --tokenizer-model: the sets are read "
                               "with the run's tokenizer")
