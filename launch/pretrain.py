#!/usr/bin/env python
"""SAT continual pre-training of Llama models.

  deepspeed launch/pretrain.py --ds_config configs/ds_zero3.json [flags]
  torchrun --nproc-per-node N launch/pretrain.py [flags]
  srun python launch/pretrain.py [flags]        (see launch/slurm/)

With no flags it trains the embedded default: a tiny Llama on the Python standard library,
with SAT on, writing TensorBoard events and a checkpoint under runs/default/.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sat_dist.errors import SatDistError  # noqa: E402

DEFAULT_RUN = Path("runs/default")


def main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the deepspeed launcher does not set it
    # Before torch is imported (it reads this once): CPU tensors of 2 MB and more get
    # transparent huge pages. Fresh large CPU allocations (gradients, optimizer temporaries)
    # otherwise page-fault 4 KB at a time: zero-filling a new 360 MB tensor took 0.28 s
    # without and 0.07 s with, on the project's CPU machine.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # Other packages' notices that a user cannot act on: DeepSpeed calls torch.distributed's
    # old collective names every step; megatron-core announces its fallbacks on import.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="megatron")
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


def _run(argv) -> int:
    from sat_dist.train.preemption import PreemptionFlag

    PreemptionFlag.install()  # before anything slow: a SLURM signal during start-up is kept
    from sat_dist.config import ModelConfig
    from sat_dist.train.arguments import parse_args, run_definition

    run = parse_args(argv)
    t = run.train
    default_job = t.data_path is None
    if default_job:
        # The embedded default: its own data, TensorBoard and checkpoints under runs/default.
        t.tensorboard_dir = t.tensorboard_dir or str(DEFAULT_RUN / "tensorboard")
        t.save = t.save or str(DEFAULT_RUN / "checkpoints")
        if t.load is None and (Path(t.save) / "latest").is_file():
            t.load = t.save  # run it again: it resumes (or says it is done)

    import torch.distributed as dist

    from sat_dist.checkpoint.hf import load_hf_checkpoint
    from sat_dist.checkpoint.state import check_resume, check_same_model, check_save_dir
    from sat_dist.model.llama import check_tensor_parallel
    from sat_dist.parallel.state import init_distributed
    from sat_dist.train.engine import build_engine, deepspeed_config
    from sat_dist.train.loop import train

    # Every check that needs no process group runs first: bad input fails in a second, with
    # one line, before any rank starts work or touches a file.
    hf_sd = None
    if t.hf_checkpoint:
        model_cfg, hf_sd = load_hf_checkpoint(t.hf_checkpoint)
        if run.model_config_path is not None:  # both given: they must describe the same model
            check_same_model(ModelConfig.from_file(run.model_config_path), model_cfg,
                             f"--model-config {t.model_config} and --hf-checkpoint {t.hf_checkpoint}")
    else:
        model_cfg = ModelConfig.from_file(run.model_config_path)
    tp = t.tensor_model_parallel_size
    check_tensor_parallel(model_cfg, tp, run.sat.align_mlp if run.sat.schedule != "dense" else 1)
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    if world % tp:
        raise SatDistError(f"--tensor-model-parallel-size {tp} does not divide the world size {world}; "
                           f"launch a multiple of {tp} processes")
    ds = deepspeed_config(t, world // tp)
    if (t.save or t.load) and ds.get("zero_optimization", {}).get("stage", 0) != 3:
        # ZeRO-1/2 link their Adam state to parameters lazily and leave some fragments empty,
        # so the per-parameter checkpoint cannot be gathered there (seen with DeepSpeed 0.19).
        raise SatDistError(f"--save/--load need ZeRO stage 3 (configs/ds_zero3.json or ds_zero3_offload.json); "
                           f"{t.ds_config} uses stage {ds.get('zero_optimization', {}).get('stage', 0)}")
    if not default_job:
        datasets = _open_data(t, model_cfg, world // tp)
    check_save_dir(t.save, t.load)
    resume = check_resume(t.load, model_cfg, run_definition(run, model_cfg)) if t.load else None
    comm = init_distributed(t.tensor_model_parallel_size)
    rank0 = dist.get_rank() == 0
    log = (lambda msg: print(msg, flush=True)) if rank0 else (lambda msg: None)
    if default_job:
        from sat_dist.data.default_corpus import prepare_default_data

        if rank0:
            prepare_default_data(DEFAULT_RUN / "data", log)
        dist.barrier()
        t.data_path, t.tokenizer_model = prepare_default_data(DEFAULT_RUN / "data", log)
        datasets = _open_data(t, model_cfg, comm.dp_size)
    log(f"model {model_cfg.name}: {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, "
        f"ffn {model_cfg.ffn_hidden_size}, heads {model_cfg.num_attention_heads}/{model_cfg.num_query_groups} | "
        f"TP {comm.tp_size} x DP {comm.dp_size} | SAT {run.sat.schedule} metric={run.sat.metric} "
        f"selection={run.sat.selection} omission attn/mlp={run.sat.omission_attn}/{run.sat.omission_mlp}")
    eng = build_engine(model_cfg, run.sat, t, comm, hf_sd if resume is None else None)
    train(run, eng, comm, model_cfg, datasets, resume, log)
    return 0


def _open_data(t, model_cfg, dp_size):
    from sat_dist.data.packing import build_packed_datasets, build_whole_dataset
    from sat_dist.data.tokenizer import load_tokenizer
    from sat_dist.train.arguments import valid_data_sets

    tok = load_tokenizer(t.tokenizer_model)
    if tok.vocab_size > model_cfg.vocab_size:
        raise SatDistError(f"--tokenizer-model {t.tokenizer_model} has {tok.vocab_size} tokens, more than the "
                           f"model's vocab_size {model_cfg.vocab_size}; use the model's tokenizer or a "
                           f"model config with vocab_size >= {tok.vocab_size}")
    datasets = build_packed_datasets(t.data_path, t.seq_length, tok.eos_id, t.seed, t.split,
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


if __name__ == "__main__":
    sys.exit(main())
