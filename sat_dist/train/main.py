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
    except KeyboardInterrupt:  # Ctrl-C a second time (the first asks for a checkpoint)
        print("error: interrupted twice (Ctrl-C): stopped without saving; the last checkpoint is the one "
              "--load picks", file=sys.stderr, flush=True)
        return 130
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
    """The embedded default job: its data, TensorBoard events and checkpoints in runs/default/
    (no data, model or checkpoint flags of one's own)."""
    embedded_data: bool
    """Training on the embedded corpus (no --data-path or --train-data-path)."""
    datasets: Optional[dict]
    """Opened datasets; None on the embedded corpus, which rank 0 makes once the process
    group exists."""
    eval_tasks: Optional[object] = None
    """--eval-tasks, found and loaded (sat_dist.eval.tasks.EvalTasks), or None."""


def plan_run(argv: Optional[list[str]] = None) -> RunPlan:
    """Parse and check everything that needs no process group (raises SatDistError)."""
    from sat_dist.checkpoint.state import check_output_dir, check_resume, check_save_dir
    from sat_dist.model.llama import check_layer_rates, check_tensor_parallel
    from sat_dist.parallel.state import data_parallel_size, launch_world_size
    from sat_dist.train.arguments import parse_args, run_definition
    from sat_dist.train.engine import comm_sparse_wanted, deepspeed_config

    run = parse_args(argv)
    t = run.train
    embedded = _embedded_data(t)
    default_job = embedded and t.model_config in (None, "tiny") and not t.hf_checkpoint
    if default_job:
        # The embedded default: its own data, TensorBoard and checkpoints under runs/default.
        t.tensorboard_dir = t.tensorboard_dir or str(DEFAULT_RUN / "tensorboard")
        t.save = t.save or str(DEFAULT_RUN / "checkpoints")
        if t.load is None and (Path(t.save) / "latest").is_file():
            t.load = t.save  # run it again: it resumes (or says it is done)
    model_cfg, hf_sd = _model(run)
    if embedded:
        from sat_dist.data.default_corpus import VOCAB_SIZE

        if model_cfg.vocab_size < VOCAB_SIZE:  # said now, not after the corpus is prepared
            raise SatDistError(f"--model-config {t.model_config} has vocab_size {model_cfg.vocab_size}, smaller than "
                               f"the embedded corpus' tokenizer ({VOCAB_SIZE} tokens); give --data-path and "
                               f"--tokenizer-model of data made for this model, or a model config with vocab_size "
                               f">= {VOCAB_SIZE}")
    tp = t.tensor_model_parallel_size
    check_tensor_parallel(model_cfg, tp, run.sat.align_mlp if run.sat.enabled else 1)
    check_layer_rates(model_cfg, run.sat)
    dp = data_parallel_size(launch_world_size(), tp)
    ds = deepspeed_config(t, dp)
    # "on" where it cannot run: the error, before the ranks
    comm_sparse_wanted(t.sat_comm_sparse, run.sat, ds, model_cfg, t, dp)
    check_save_dir(t.save, t.load)  # before the datasets: opening them can take a while
    check_output_dir("--tensorboard-dir", t.tensorboard_dir)
    check_output_dir("--wandb-save-dir", t.wandb_save_dir)
    if t.wandb_project:
        from sat_dist.train.wandb_log import require_wandb

        require_wandb()
    datasets = None if embedded else open_datasets(t, model_cfg, dp)
    definition = run_definition(run, model_cfg)
    resume = check_resume(t.load, model_cfg, definition, override=t.override_opt_param_scheduler,
                          finetune=t.finetune, save=t.save, ckpt_step=t.ckpt_step) if t.load else None
    if resume is not None and datasets is not None and not t.finetune and not t.accept_changed_data:
        # the data a run resumes must be the data it was trained on: refused before any rank starts
        from sat_dist.data.blend import position_from_manifest, raise_changed

        changed = datasets["train"].changed_since(position_from_manifest(resume[1], datasets["train"]))
        if changed:
            raise_changed(changed)
    eval_tasks = None
    if t.eval_tasks:  # a task unknown, or whose data is not here: one line, before any rank starts
        from sat_dist.eval.tasks import load_eval_tasks

        eval_tasks = load_eval_tasks(t.eval_tasks, t.eval_tasks_path, t.eval_tasks_limit)
    return RunPlan(run, model_cfg, hf_sd, dp, ds, definition, resume, default_job, embedded, datasets, eval_tasks)


def _embedded_data(t: TrainConfig) -> bool:
    """Whether the run trains on the embedded corpus (no --data-path or --train-data-path).
    Flags that only make sense with data of one's own are refused rather than ignored."""
    if t.data_path or t.train_data_path:
        if t.data_path and t.train_data_path:
            raise SatDistError("--data-path and --train-data-path: give one (--data-path is split by --split; "
                               "--train-data-path is read whole, with --valid-data-path and --test-data-path)")
        return False
    fix = ("give --data-path (and --tokenizer-model) for your own data; without them pretrain.py trains on the "
           "embedded corpus, tokenized with its own tokenizer")
    if t.hf_checkpoint:
        raise SatDistError(f"--hf-checkpoint {t.hf_checkpoint} needs data tokenized with its tokenizer: {fix}")
    if t.tokenizer_model:
        raise SatDistError(f"--tokenizer-model {t.tokenizer_model} is the tokenizer of --data-path, which is not "
                           f"given: {fix}, or drop --tokenizer-model")
    if t.test_data_path:
        raise SatDistError("--test-data-path needs --data-path or --train-data-path (and --tokenizer-model)")
    return True


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
    """{"train", "valid", "test", "valid/NAME": BlendedDataset}: the --data-path blend's splits
    (or the --train-data-path and --test-data-path blends, read whole) and every
    --valid-data-path set, checked against the tokenizer, the model's vocabulary and the
    micro-batch."""
    from sat_dist.data.blend import BlendedDataset, dataset_key, parse_blend
    from sat_dist.data.packing import SPLIT_NAMES, build_packed_datasets, build_whole_dataset
    from sat_dist.data.tokenizer import load_tokenizer, tokenizer_record

    tok = load_tokenizer(t.tokenizer_model)
    if tok.vocab_size > model_cfg.vocab_size:
        raise SatDistError(f"--tokenizer-model {t.tokenizer_model} has {tok.vocab_size} tokens, more than the "
                           f"model's vocab_size {model_cfg.vocab_size}; use the model's tokenizer or a "
                           f"model config with vocab_size >= {tok.vocab_size}")
    run_tok = tokenizer_record(t.tokenizer_model, tok)
    datasets: dict = {}

    def blend_of(flag: str, values: list[str], split: Optional[str]) -> dict:
        """{split name: BlendedDataset} of one blend flag."""
        blend = parse_blend(values, flag)
        check_tokenizers(flag, [p for _, p in blend], run_tok, t.tokenizer_model)
        parts: dict[str, list] = {}
        for w, prefix in blend:
            try:
                if split is not None:
                    opened = build_packed_datasets(prefix, t.seq_length, tok.eos_id, t.seed, split,
                                                   vocab_size=model_cfg.vocab_size, cache_dir=t.data_cache_path)
                else:
                    name = "train" if flag == "--train-data-path" else "test"
                    opened = {name: build_whole_dataset(prefix, t.seq_length, tok.eos_id, t.seed,
                                                        model_cfg.vocab_size, name, SPLIT_NAMES.index(name),
                                                        scan_ids=name != "train", cache_dir=t.data_cache_path)}
            except SatDistError as e:
                raise SatDistError(f"{flag} {prefix}: {e}" if len(blend) > 1 else str(e)) from None
            for name, ds in opened.items():
                parts.setdefault(name, []).append((w, dataset_key(prefix), ds))
        return {name: BlendedDataset([d for _, _, d in ps], [w for w, _, _ in ps], [k for _, k, _ in ps],
                                     t.seed, name) for name, ps in parts.items()}

    if t.data_path:
        datasets.update(blend_of("--data-path", t.data_path, t.split))
    if t.train_data_path:
        datasets.update(blend_of("--train-data-path", t.train_data_path, None))
    if t.test_data_path:
        datasets.update(blend_of("--test-data-path", t.test_data_path, None))  # replaces the split's test set
    for key, prefix in valid_data_sets(t.valid_data_path).items():
        entry = prefix if key == "valid" else f"{key[len('valid/'):]}={prefix}"
        try:
            check_tokenizers("--valid-data-path", [prefix], run_tok, t.tokenizer_model)
            ds = build_whole_dataset(prefix, t.seq_length, tok.eos_id, t.seed, model_cfg.vocab_size, key,
                                     cache_dir=t.data_cache_path)
        except SatDistError as e:
            raise SatDistError(f"--valid-data-path {entry}: {e}") from None
        if len(ds) < t.micro_batch_size * dp_size:
            raise SatDistError(f"--valid-data-path {entry}: {len(ds)} sample{'s' if len(ds) > 1 else ''} of "
                               f"{t.seq_length} tokens, fewer than one micro-batch per DP rank "
                               f"({t.micro_batch_size} x DP {dp_size}); use a larger set or a smaller "
                               f"--micro-batch-size")
        datasets[key] = BlendedDataset.single(ds, dataset_key(prefix))  # a bare prefix replaces the split's
    return datasets


def check_tokenizers(flag: str, prefixes: list[str], run_tok: dict, tokenizer_model: str) -> None:
    """Datasets that record their tokenizer (PREFIX.tokenizer.json, tools/preprocess_data.py)
    must all have been made with --tokenizer-model; a blend of datasets made with different
    tokenizers is named as such, and so is one that mixes datasets whose documents start with
    BOS and datasets whose documents do not (a record without "bos" means no BOS). Datasets
    without a record are checked by their token ids only."""
    from sat_dist.data.blend import dataset_key
    from sat_dist.data.tokenizer import read_tokenizer_record, record_bos

    records = {p: read_tokenizer_record(dataset_key(p)) for p in prefixes}
    made = {p: r for p, r in records.items() if r is not None}
    vocabs = {r["vocab_sha256"] for r in made.values()}
    fix = "re-run tools/preprocess_data.py with the run's tokenizer"
    if len(vocabs) > 1:
        shown = "; ".join(f"{p} by {r.get('tokenizer', '?')} ({r['vocab_sha256'][:12]})" for p, r in made.items())
        raise SatDistError(f"{flag}: the blend's datasets were made with different tokenizers ({shown}); {fix}")
    for p, r in made.items():
        if r["vocab_sha256"] != run_tok["vocab_sha256"]:
            raise SatDistError(f"{flag} {p}: made with tokenizer {r.get('tokenizer', '?')} (vocabulary "
                               f"{r['vocab_sha256'][:12]}), not --tokenizer-model {tokenizer_model} (vocabulary "
                               f"{run_tok['vocab_sha256'][:12]}); {fix}, or pass the tokenizer it was made with")
    with_bos = [p for p, r in made.items() if record_bos(r)]
    without_bos = [p for p, r in made.items() if not record_bos(r)]
    if with_bos and without_bos:
        raise SatDistError(f"{flag}: the blend mixes datasets whose documents start with BOS ({', '.join(with_bos)}) "
                           f"and datasets whose documents do not ({', '.join(without_bos)}), as their "
                           f"PREFIX.tokenizer.json records say; re-run tools/preprocess_data.py for one of them "
                           f"(it adds BOS by default, --no-bos leaves it out) so that all agree")


def _run(argv) -> int:
    from sat_dist.train.preemption import PreemptionFlag, term_when_parent_dies

    PreemptionFlag.install()  # before anything slow: a SLURM signal during start-up is kept
    term_when_parent_dies()  # a launcher that dies (signalled, killed) stops its ranks with a save
    plan = plan_run(argv)
    run, t, model_cfg = plan.run, plan.run.train, plan.model_cfg

    import torch.distributed as dist

    from sat_dist.parallel.state import init_distributed
    from sat_dist.train.engine import build_engine, comm_sparse_line
    from sat_dist.train.loop import train

    comm = init_distributed(t.tensor_model_parallel_size, t.distributed_timeout_minutes)
    rank0 = dist.get_rank() == 0
    log = (lambda msg: print(msg, flush=True)) if rank0 else (lambda msg: None)
    datasets = plan.datasets
    if plan.embedded_data:
        from sat_dist.data.default_corpus import prepare_default_data

        if rank0:
            prepare_default_data(DEFAULT_RUN / "data", log)
        dist.barrier()
        prefix, t.tokenizer_model = prepare_default_data(DEFAULT_RUN / "data", log)
        t.data_path = [str(prefix)]
        if not plan.default_job:
            log(f"no --data-path: training on the embedded corpus ({prefix}); checkpoints and TensorBoard events "
                f"go only where --save and --tensorboard-dir say")
        datasets = open_datasets(t, model_cfg, plan.dp_size)
    s = run.sat
    log(f"model {model_cfg.name}: {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, "
        f"ffn {model_cfg.ffn_hidden_size}, heads {model_cfg.num_attention_heads}/{model_cfg.num_query_groups} | "
        f"TP {comm.tp_size} x DP {comm.dp_size} | SAT {s.schedule} metric={s.metric} "
        f"selection={s.selection} omission attn/mlp={s.omission_attn}/{s.omission_mlp}")
    hf_sd = plan.hf_state_dict if plan.resume is None else None  # a resume takes the checkpoint's weights
    eng = build_engine(model_cfg, s, t, comm, hf_sd, ds_config=plan.ds_config)
    log(comm_sparse_line(t.sat_comm_sparse, s, plan.ds_config, model_cfg, t, comm.dp_size))
    downstream = None
    if plan.eval_tasks is not None:
        from sat_dist.eval.runner import DownstreamEval

        downstream = DownstreamEval(plan.eval_tasks, t, model_cfg)
    train(run, eng, comm, model_cfg, datasets, plan.resume, log, definition=plan.definition, downstream=downstream)
    return 0
