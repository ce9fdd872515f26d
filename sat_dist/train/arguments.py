"""Command-line flags (Megatron-LM's names where one exists) and --config files.

Precedence: built-in defaults < --config FILE (YAML or JSON, keys are flag names with '-' or
'_') < flags on the command line. The values become the dataclasses of sat_dist.config and
are validated there. The `--sat-*` flags are SATConfig's fields (`--sat-` + the field name
with '-' for '_'; type, choices, default and help from the dataclass); SATConfig.seed is set
by --seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sat_dist.config import (
    COMM_SPARSE_CHOICES,
    LR_DECAY_STYLES,
    MODEL_CONFIG_DIR,
    SAT_CHOICES,
    WSD_DECAY_STYLES,
    ModelConfig,
    SATConfig,
    TrainConfig,
    field_docs,
    model_config_path,
    valid_data_sets,
)
from sat_dist.errors import SatDistError

# Kept importable from here (tools/bench_step.py imports TrainConfig from this module).
__all__ = ["TrainConfig", "RunConfig", "MODEL_CONFIG_DIR", "LR_DECAY_STYLES", "valid_data_sets", "build_parser",
           "parse_args", "config_from_namespace", "run_definition", "sat_flag", "SAT_FLAG_FIELDS"]

SAT_FLAG_FIELDS = tuple(f.name for f in dataclasses.fields(SATConfig) if f.name != "seed")
"""The SATConfig fields that have a --sat-* flag, in field order (seed comes from --seed)."""


def sat_flag(field: str) -> str:
    """The flag name, without the leading dashes, of a SATConfig field (also its key in the
    run definition): omission_mlp -> sat-omission-mlp."""
    return "sat-" + field.replace("_", "-")


def _help(doc: Optional[str]) -> Optional[str]:
    return doc.replace("%", "%%") if doc else None


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="pretrain.py", description="SAT continual pre-training of Llama models.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    a("--lr-warmup-init", type=float, default=t.lr_warmup_init)
    a("--lr-decay-iters", type=int, default=t.lr_decay_iters)
    a("--lr-decay-style", choices=LR_DECAY_STYLES, default=t.lr_decay_style)
    a("--lr-wsd-decay-iters", type=int, default=t.lr_wsd_decay_iters)
    a("--lr-wsd-decay-style", choices=WSD_DECAY_STYLES, default=t.lr_wsd_decay_style)
    a("--weight-decay", type=float, default=t.weight_decay)
    a("--adam-beta1", type=float, default=t.adam_beta1)
    a("--adam-beta2", type=float, default=t.adam_beta2)
    a("--adam-eps", type=float, default=t.adam_eps)
    a("--clip-grad", type=float, default=t.clip_grad)
    a("--bf16", action="store_true", default=t.bf16)
    a("--recompute-activations", action="store_true", default=t.recompute_activations)
    a("--data-path", nargs="+", default=t.data_path, metavar="[WEIGHT] PREFIX")
    a("--split", default=t.split)
    a("--data-cache-path", default=t.data_cache_path)
    a("--train-data-path", nargs="+", default=t.train_data_path, metavar="[WEIGHT] PREFIX")
    a("--test-data-path", nargs="+", default=t.test_data_path, metavar="[WEIGHT] PREFIX")
    a("--valid-data-path", nargs="+", default=t.valid_data_path, metavar="NAME=PREFIX")
    a("--tokenizer-model", default=t.tokenizer_model)
    a("--load", default=t.load)
    a("--ckpt-step", type=int, default=t.ckpt_step)
    a("--accept-changed-data", action="store_true", default=t.accept_changed_data)
    # Megatron spells this one with an underscore; the all-dashes form is accepted too.
    a("--override-opt_param-scheduler", "--override-opt-param-scheduler", dest="override_opt_param_scheduler",
      action="store_true", default=t.override_opt_param_scheduler)
    a("--no-load-optim", action="store_true", default=t.no_load_optim)
    a("--no-load-rng", action="store_true", default=t.no_load_rng)
    a("--finetune", action="store_true", default=t.finetune)
    a("--save", default=t.save)
    a("--save-interval", type=int, default=t.save_interval)
    a("--keep-latest-k", type=int, default=t.keep_latest_k)
    a("--eval-interval", type=int, default=t.eval_interval)
    a("--eval-iters", type=int, default=t.eval_iters)
    a("--eval-tasks", nargs="+", default=t.eval_tasks, metavar="TASK[,TASK...]")
    a("--eval-tasks-path", default=t.eval_tasks_path)
    a("--eval-tasks-interval", type=int, default=t.eval_tasks_interval)
    a("--eval-tasks-limit", type=int, default=t.eval_tasks_limit)
    a("--wandb-project", default=t.wandb_project)
    a("--wandb-exp-name", default=t.wandb_exp_name)
    a("--wandb-save-dir", default=t.wandb_save_dir)
    a("--tensorboard-dir", default=t.tensorboard_dir)
    a("--log-interval", type=int, default=t.log_interval)
    a("--seed", type=int, default=t.seed)
    a("--model-config", default=t.model_config)
    a("--hf-checkpoint", default=t.hf_checkpoint)
    a("--max-nonfinite-steps", type=int, default=t.max_nonfinite_steps)
    a("--exit-interval", type=int, default=t.exit_interval)
    a("--distributed-timeout-minutes", type=int, default=t.distributed_timeout_minutes)
    a("--peak-tflops", type=float, default=t.peak_tflops)
    a("--skip-train", action="store_true", default=t.skip_train)
    a("--reset-position-ids", action="store_true", default=t.reset_position_ids)
    a("--reset-attention-mask", action="store_true", default=t.reset_attention_mask)
    a("--eod-mask-loss", action="store_true", default=t.eod_mask_loss)
    a("--ds_config", "--deepspeed_config", "--ds-config", dest="ds_config", default=t.ds_config)
    a("--sat-comm-sparse", choices=COMM_SPARSE_CHOICES, default=t.sat_comm_sparse)
    a("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    a("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # accepted for compatibility
    docs = field_docs(TrainConfig)
    for act in p._actions:
        if act.help is None and act.dest in docs:
            act.help = _help(docs[act.dest])
    s, types, docs = SATConfig(), typing.get_type_hints(SATConfig), field_docs(SATConfig)
    for name in SAT_FLAG_FIELDS:
        choices = SAT_CHOICES.get(name)
        a("--" + sat_flag(name), type=None if choices else types[name], choices=choices, default=getattr(s, name),
          help=_help(docs.get(name)))
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


def run_definition(run: RunConfig, model_cfg: ModelConfig) -> dict:
    """The settings a resumed run must share with its checkpoint, by flag name: the LR and
    SAT schedules, the data order (seed, sample length, split) and SAT's selection (every
    --sat-* flag: a field added to SATConfig joins the definition, and check_resume must then
    give checkpoints saved without it the value they ran with). Megatron refuses to resume
    with different scheduler settings; so do we, naming each difference, unless the run
    starts a new stage (--override-opt_param-scheduler, --finetune; see check_resume). Batch
    sizes and the parallel layout may change (the data position is kept in samples).

    Values are the effective ones: --lr-decay-iters is stored resolved (its default is
    --train-iters), and the WSD keys are None unless the decay style is WSD (they do nothing
    otherwise, and must not refuse a resume)."""
    from sat_dist.train.lr import decay_iters_of

    t, s = run.train, run.sat
    wsd = t.lr_decay_style == "WSD"
    d = {"train-iters": t.train_iters, "lr": t.lr, "min-lr": t.min_lr, "lr-warmup-iters": t.lr_warmup_iters,
         "lr-warmup-init": t.lr_warmup_init, "lr-decay-iters": decay_iters_of(t),
         "lr-decay-style": t.lr_decay_style, "lr-wsd-decay-iters": t.lr_wsd_decay_iters if wsd else None,
         "lr-wsd-decay-style": t.lr_wsd_decay_style if wsd else None,
         "seed": t.seed, "seq-length": t.seq_length, "split": t.split,
         "rope_theta": model_cfg.rope_theta, "rope_scaling": model_cfg.rope_scaling, "norm_eps": model_cfg.norm_eps}
    d.update({sat_flag(name): getattr(s, name) for name in SAT_FLAG_FIELDS})
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
    train = TrainConfig(**{f.name: d[f.name] for f in dataclasses.fields(TrainConfig)}).validate()
    sat_flags = {name: d[sat_flag(name).replace("-", "_")] for name in SAT_FLAG_FIELDS}
    sat = SATConfig(seed=train.seed, **sat_flags).validate()
    if train.model_config is None and not train.hf_checkpoint:
        train.model_config = "tiny"
    model_path = model_config_path(train.model_config) if train.model_config else None
    return RunConfig(train, sat, model_path)


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
