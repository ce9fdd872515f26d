"""The training run from the command line: flags -> a checked plan -> process groups ->
engine -> training loop. launch/pretrain.py is a few lines around `main(argv)`.

Every check that needs no process group runs first, in `plan_run`: bad input fails in a
second, with one `error:` line, before any rank starts work or touches a file. With no
--data-path the run is the embedded default job (a tiny Llama on the Python standard
library; data, TensorBoard events and checkpoints under runs/default/).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sat_dist.config import ModelConfig, TrainConfig, valid_data_sets
from sat_dist.errors import SatDistError
from sat_dist.train.arguments import RunConfig

DEFAULT_RUN = Path("runs/default")
"""The default job's directory (relative to the working directory)."""


def main(argv: Optional[list[str]] = None) -> int:
    """Run the training job `argv` describes (sys.argv[1:] when None). Returns the exit
    status: 0 done (or preempted and saved), 2 bad input or a failed run (SatDistError), 1 an
    I/O error; either failure prints one line, `error: ...`, on stderr."""
    try:
        return _run(argv)
    except SatDistError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # a full disk, a vanished directory: one line, not a traceback
        print(f"error: {e.strerror or e} ({e.filename or 'I/O'})", file=sys.stderr, flush=True)
        return 1
    finally:
        try:
            from sat_dist.parallel.state import destroy_distributed

            destroy_distributed()
        except Exception:
            pass


@dataclass
class RunPlan:
    """What the run will do, decided and checked before any process group exists."""

    run: RunConfig
    model_cfg: ModelConfig
    hf_state_dict: Optional[dict]
    """The --hf-checkpoint weights (lazily read tensors), or None."""
    dp_size: int
    """Data-parallel size: the launch's world size / TP."""
    ds_config: dict
    """The DeepSpeed config, flags filled in."""
    definition: dict
    """The run definition (what a resume must share with its checkpoint)."""
    resume: Optional[tuple[str, dict]]
    """(tag, manifest) of the checkpoint --load resumes, or None."""
    default_job: bool
    datasets: Optional[dict]
    """Opened datasets; None for the default job, whose data rank 0 makes once the process
    group exists."""


def plan_run(argv: Optional[list[str]] = None) -> RunPlan:
    """Parse and check everything that needs no process group (raises SatDistError)."""
    from sat_dist.checkpoint.state import check_resume, check_save_dir
    from sat_dist.model.llama import check_tensor_parallel
    from sat_dist.parallel.state import data_parallel_size, launch_world_size
    from sat_dist.train.arguments import parse_args, run_definition
    from sat_dist.train.engine import deepspeed_config, zero_stage

    run = parse_args(argv)
    t = run.train
    default_job = t.data_path is None
    if default_job:
        # The embedded default: its own data, TensorBoard and checkpoints under runs/default.
        t.tensorboard_dir = t.tensorboard_dir or str(DEFAULT_RUN / "tensorboard")
        t.save = t.save or str(DEFAULT_RUN / "checkpoints")
        if t.load is None and (Path(t.save) / "latest").is_file():
            t.load = t.save  # run it again: it resumes (or says it is done)
    model_cfg, hf_sd = _model(run)
    tp = t.tensor_model_parallel_size
    check_tensor_parallel(model_cfg, tp, run.sat.align_mlp if run.sat.enabled else 1)
    dp = data_parallel_size(launch_world_size(), tp)
    ds = deepspeed_config(t, dp)
    stage = zero_stage(ds)
    if (t.save or t.load) and stage != 3:
        # ZeRO-1/2 link their Adam state to parameters lazily and leave some fragments empty,
        # so the per-parameter checkpoint cannot be gathered there (seen with DeepSpeed 0.19).
        raise SatDistError(f"--save/--load need ZeRO stage 3 (configs/ds_zero3.json or ds_zero3_offload.json); "
                           f"{t.ds_config} uses stage {stage}")
    datasets = None if default_job else open_datasets(t, model_cfg, dp)
    check_save_dir(t.save, t.load)
    definition = run_definition(run, model_cfg)
    resume = check_resume(t.load, model_cfg, definition) if t.load else None
    return RunPlan(run, model_cfg, hf_sd, dp, ds, definition, resume, default_job, datasets)


def _model(run: RunConfig) -> tuple[ModelConfig, Optional[dict]]:
    """The model's shape, and the --hf-checkpoint weights if one is given."""
    from sat_dist.checkpoint.hf import load_hf_checkpoint
    from sat_dist.checkpoint.state import check_same_model

    t = run.train
    if not t.hf_checkpoint:
        return ModelConfig.from_file(run.model_config_path), None
    model_cfg, hf_sd = load_hf_checkpoint(t.hf_checkpoint)
    if run.model_config_path is not None:  # both given: they must describe the same model
        check_same_model(ModelConfig.from_file(run.model_config_path), model_cfg,
                         f"--model-config {t.model_config} and --hf-checkpoint {t.hf_checkpoint}")
    return model_cfg, hf_sd


def open_datasets(t: TrainConfig, model_cfg: ModelConfig, dp_size: int) -> dict:
    """The split's datasets and every --valid-data-path set, checked against the model's
    vocabulary and the micro-batch."""
    from sat_dist.data.packing import build_packed_datasets, build_whole_dataset
    from sat_dist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(t.tokenizer_model)
    if tok.vocab_size > model_cfg.vocab_size:
        raise SatDistError(f"--tokenizer-model {t.tokenizer_model} has {tok.vocab_size} tokens, more than the "
                           f"model's vocab_size {model_cfg.vocab_size}; use the model's tokenizer or a "
                           f"model config with vocab_size >= {tok.vocab_size}")
    datasets = build_packed_datasets(t.data_path[-1], t.seq_length, tok.eos_id, t.seed, t.split,
                                     vocab_size=model_cfg.vocab_size)
    for key, prefix in valid_data_sets(t.valid_data_path).items():
        entry = prefix if key == "valid" else f"{key[len('valid/'):]}={prefix}"
        try:
            ds = build_whole_dataset(prefix, t.seq_length, tok.eos_id, t.seed, model_cfg.vocab_size, key)
        except SatDistError as e:
            raise SatDistError(f"--valid-data-path {entry}: {e}") from None
        if len(ds) < t.micro_batch_size * dp_size:
            raise SatDistError(f"--valid-data-path {entry}: {len(ds)} sample{'s' if len(ds) > 1 else ''} of "
                               f"{t.seq_length} tokens, fewer than one micro-batch per DP rank "
                               f"({t.micro_batch_size} x DP {dp_size}); use a larger set or a smaller "
                               f"--micro-batch-size")
        datasets[key] = ds  # a bare prefix replaces the split's validation set
    return datasets


def _run(argv) -> int:
    from sat_dist.train.preemption import PreemptionFlag

    PreemptionFlag.install()  # before anything slow: a SLURM signal during start-up is kept
    plan = plan_run(argv)
    run, t, model_cfg = plan.run, plan.run.train, plan.model_cfg

    import torch.distributed as dist

    from sat_dist.parallel.state import init_distributed
    from sat_dist.train.engine import build_engine
    from sat_dist.train.loop import train

    comm = init_distributed(t.tensor_model_parallel_size)
    rank0 = dist.get_rank() == 0
    log = (lambda msg: print(msg, flush=True)) if rank0 else (lambda msg: None)
    datasets = plan.datasets
    if plan.default_job:
        from sat_dist.data.default_corpus import prepare_default_data

        if rank0:
            prepare_default_data(DEFAULT_RUN / "data", log)
        dist.barrier()
        prefix, t.tokenizer_model = prepare_default_data(DEFAULT_RUN / "data", log)
        t.data_path = [str(prefix)]
        datasets = open_datasets(t, model_cfg, plan.dp_size)
    s = run.sat
    log(f"model {model_cfg.name}: {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, "
        f"ffn {model_cfg.ffn_hidden_size}, heads {model_cfg.num_attention_heads}/{model_cfg.num_query_groups} | "
        f"TP {comm.tp_size} x DP {comm.dp_size} | SAT {s.schedule} metric={s.metric} "
        f"selection={s.selection} omission attn/mlp={s.omission_attn}/{s.omission_mlp}")
    hf_sd = plan.hf_state_dict if plan.resume is None else None  # a resume takes the checkpoint's weights
    eng = build_engine(model_cfg, s, t, comm, hf_sd, ds_config=plan.ds_config)
    train(run, eng, comm, model_cfg, datasets, plan.resume, log, definition=plan.definition)
    return 0
