"""Training checkpoints: save, and resume exactly, on the same or another parallel layout.

A checkpoint directory:
  latest                   the tag resume picks; replaced atomically, after everything else
  .deleting-iter_0000020/  an old checkpoint being removed (--keep-latest-k); never resumed
  iter_0000040/
    state_tp00_dp000.pt ..   each rank's share of its TP partition's full (DP-gathered) fp32
                             weights and Adam moments, by parameter name, plus its RNG state
    sat_dist.json            the manifest: iteration, consumed samples, layout, which file
                             holds which parameter, Adam step, LR scheduler state, model, and
                             the run definition (the LR and SAT schedules and the data order,
                             by flag name), the size and CRC-32 of every state file
                             (checked before a resume or an export reads it), and, for a run
                             logging to W&B, its run id ("wandb_run_id"; optional); written last,
                             so a save killed midway is never resumed. (Older manifests may
                             hold the SAT schedule a second time, as "sat_schedule", unread,
                             and no "files": their state files are not checksummed.)

The state is stored per parameter in the model's own layout rather than as DeepSpeed's flat
ZeRO partitions, so a checkpoint resumes at any TP x DP layout (sat_dist.checkpoint.reshard)
and exports to Hugging Face at any TP size. Every DP rank writes a share of the parameters
(balanced by size; the writes are parallel). Under ZeRO-3 each parameter and its moments are gathered onto
their owner only: 12 bytes per parameter reach the rank that writes them, and nothing the
others (ZeRO-1/2, whose flat partitions do not follow parameters, assemble them on every
rank).

This module is the file format (names, manifest, atomic writes, checks); what it stores is
read from and written to DeepSpeed through sat_dist.parallel.zero, and re-partitioned for
another TP size by sat_dist.checkpoint.reshard.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from sat_dist.checkpoint.reshard import overlapping_shards, reshard_local_from
from sat_dist.config import ModelConfig, SATConfig
from sat_dist.errors import SatDistError
from sat_dist.faults import fault_point
from sat_dist.model.comm import ParallelComm
from sat_dist.parallel import zero
from sat_dist.parallel.zero import MOMENTS

MANIFEST = "sat_dist.json"
LATEST = "latest"
DELETING = ".deleting-"  # prefix of a checkpoint being removed by prune_checkpoints
FORMAT = 1
# A state file: {"tensors": {parameter name: {"param": fp32 weight, "exp_avg": Adam moment or
# None, "exp_avg_sq": ...}}, "rng": {...}}; the tensors are TP-local and whole over DP.
ENTRY_KEYS = ("param", *MOMENTS)


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def state_file(tp_rank: int, dp_rank: int) -> str:
    return f"state_tp{tp_rank:02d}_dp{dp_rank:03d}.pt"


_TAG = re.compile(r"iter_(\d{7,})")


def complete_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, str]]:
    """(iteration, tag) of every checkpoint in `ckpt_dir` whose manifest reads and whose state
    files are all there at their recorded sizes, oldest first. (Checksums are read in full
    only by the resume or export that uses one: load_state_file.)"""
    d = Path(ckpt_dir)
    out = []
    if not d.is_dir():
        return out
    for sub in d.iterdir():
        m = _TAG.fullmatch(sub.name)
        if m is None or not (sub / MANIFEST).is_file():
            continue
        try:
            manifest = read_manifest(d, sub.name)
            missing_or_resized(d, sub.name, manifest)
        except SatDistError:
            continue
        out.append((int(m.group(1)), sub.name))
    return sorted(out)


def _listing(ckpt_dir: Path) -> str:
    """What a --load error offers instead: the complete checkpoints there and how to resume
    from the newest."""
    found = complete_checkpoints(ckpt_dir)
    if not found:
        return "it holds no complete checkpoint"
    its = ", ".join(tag for _, tag in found[-5:]) + (f" (and {len(found) - 5} older)" if len(found) > 5 else "")
    return (f"complete checkpoints there: {its}; resume from the newest with --load {ckpt_dir} "
            f"--ckpt-step {found[-1][0]}")


def latest_complete_tag(ckpt_dir: str | Path) -> Optional[str]:
    """The tag `latest` names, if it is complete (has a manifest); None if there is none."""
    d = Path(ckpt_dir)
    f = d / LATEST
    if not f.is_file():
        return None
    try:
        tag = f.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SatDistError(f"--load {d}: {f} is unreadable ({type(e).__name__}); {_listing(d)}")
    if not _TAG.fullmatch(tag) or not (d / tag / MANIFEST).is_file():
        raise SatDistError(f"--load {d}: latest names {tag[:40]!r}, which is not a complete checkpoint; "
                           f"{_listing(d)}")
    return tag


def read_manifest(ckpt_dir: str | Path, tag: str) -> dict:
    """The manifest of `tag`, schema-checked (types and ranges of what resume and export read)."""
    p = Path(ckpt_dir) / tag / MANIFEST
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SatDistError(f"checkpoint {p}: unreadable manifest ({type(e).__name__})")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SatDistError(f"checkpoint {p}: not a sat_dist checkpoint (format {FORMAT})")
    problem = _manifest_problem(m)
    if problem:
        raise SatDistError(f"checkpoint {p}: damaged manifest ({problem})")
    return m


def _manifest_problem(m: dict) -> Optional[str]:
    """What in a manifest is of the wrong type or out of range (None: nothing)."""
    def is_int(v, lo):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    for key, lo in (("iteration", 0), ("consumed_samples", 0), ("tensor_model_parallel_size", 1),
                    ("data_parallel_size", 1), ("optimizer_step", 0)):
        if not is_int(m.get(key), lo):
            return f"{key} is {m.get(key)!r}, not an integer >= {lo}"
    for key in ("owners", "model", "run_definition"):
        if not isinstance(m.get(key), dict):
            return f"{key} is {type(m.get(key)).__name__}, not an object"
    dp = m["data_parallel_size"]
    bad = [k for k, v in m["owners"].items() if not (is_int(v, 0) and v < dp)]
    if bad:
        return f"owners[{bad[0]!r}] is not a DP rank below {dp}"
    run_id = m.get("wandb_run_id")  # optional: only runs with --wandb-project record it
    if run_id is not None and not (isinstance(run_id, str) and run_id.strip()):
        return f"wandb_run_id is {run_id!r}, not a non-empty string"
    files = m.get("files")
    if files is not None:
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and is_int(v.get("size"), 0) and is_int(v.get("crc32"), 0) for v in files.values()):
            return "files is not a map of name -> {size, crc32}"
    return None


def missing_or_resized(ckpt_dir: str | Path, tag: str, manifest: dict) -> None:
    """Raise naming the first state file of `tag` that is missing, or (where the manifest
    records sizes) not of its recorded size. Stats only."""
    d = Path(ckpt_dir) / tag
    sizes = manifest.get("files") or {}
    for r in range(manifest["tensor_model_parallel_size"]):
        for dp in range(manifest["data_parallel_size"]):
            name = state_file(r, dp)
            f = d / name
            if not f.is_file():
                raise SatDistError(f"{tag}/{name} is missing")
            if name in sizes and f.stat().st_size != sizes[name]["size"]:
                raise SatDistError(f"{tag}/{name} has {f.stat().st_size} bytes, the manifest records "
                                   f"{sizes[name]['size']}")


def file_crc32(path: Path, chunk: int = 16 << 20) -> tuple[int, int]:
    """(size, CRC-32) of a file, read sequentially."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return size, crc
            crc = zlib.crc32(b, crc)
            size += len(b)


def check_output_dir(flag: str, path: Optional[str]) -> None:
    """One clear error when an output directory flag names (or lies under) an existing file."""
    if not path:
        return
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        what = "is" if probe == Path(path) else f"lies under {probe}, which is"
        raise SatDistError(f"{flag} {path} {what} an existing file, not a directory; choose a directory")


def check_save_dir(save: Optional[str], load: Optional[str]) -> None:
    """Refuse to train over someone's checkpoints unless resuming from them, and a --save
    that can never be written; before any rank starts (a bad --save would otherwise show
    only at the first save, after the training before it)."""
    if not save:
        return
    d = Path(save)
    check_output_dir("--save", save)
    probe = d
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise SatDistError(f"--save {save}: {probe} is not writable; choose a directory you can write")
    resuming = load is not None and Path(load).resolve() == d.resolve()
    if resuming or not d.is_dir():
        return
    found = complete_checkpoints(d)
    if (d / LATEST).is_file() or found:
        held = f"complete checkpoints {', '.join(tag for _, tag in found[-3:])}" if found else "a latest file"
        raise SatDistError(f"--save {save} already holds {held}; pass --load {save} to resume from them, or "
                           f"choose another --save directory (nothing there was changed)")


def save_checkpoint(engine, model, ckpt_dir: str, iteration: int, consumed_samples: int,
                    comm: ParallelComm, model_cfg: ModelConfig, stage3: bool, definition: dict,
                    extra: Optional[dict] = None, keep_latest_k: int = 0,
                    log: Callable[[str], None] = print) -> Path:
    """Collective over all ranks. `definition`: the run definition (the settings a resume
    must share, sat_dist.train.arguments.run_definition), checked by check_resume. `extra`:
    more manifest entries from the training loop (JSON values; e.g. the data position of
    every dataset of a blend, the first iteration of the current stage). `keep_latest_k` > 0:
    once `latest` names the new checkpoint, rank 0 removes older complete ones beyond that
    many (prune_checkpoints), logging each through `log`."""
    d = Path(ckpt_dir)
    tag = tag_of(iteration)
    rank = dist.get_rank()
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        partial = d / tag
        if partial.exists() and not (partial / MANIFEST).exists():
            shutil.rmtree(partial)  # left by a save that was killed; never resumed from
        partial.mkdir(exist_ok=True)
    dist.barrier()
    params = list(zero.unique_params(model))
    owners = balanced_owners({name: math.prod(zero.local_shape(p, stage3)) for name, p in params}, comm.dp_size)
    mine = {}
    for name, p in params:
        entry = zero.gather_param_state(engine.optimizer, p, stage3, owners[name], comm)  # collective over DP
        if entry is not None:  # this rank owns the parameter
            mine[name] = {k: (v.detach().float().cpu().clone() if v is not None else None) for k, v in entry.items()}
    record = _atomic_torch_save({"tensors": mine, "rng": _rng_state()},
                                d / tag / state_file(comm.tp_rank, comm.dp_rank))
    fault_point("kill-after-state-file", iteration)
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, (state_file(comm.tp_rank, comm.dp_rank), record))  # also the barrier
    if rank == 0:
        counters = zero.engine_counters(engine)
        manifest = {
            "format": FORMAT,
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "tensor_model_parallel_size": comm.tp_size,
            "data_parallel_size": comm.dp_size,
            "owners": owners,
            "optimizer_step": counters["optimizer_step"],
            "lr_scheduler": counters["lr_scheduler"],
            "skipped_steps": counters["skipped_steps"],
            "model": model_cfg.__dict__,
            "run_definition": definition,
            "files": dict(records),
            **(extra or {}),
        }
        _atomic_write(d / tag / MANIFEST, json.dumps(manifest, indent=2, default=_json_default) + "\n")
        _atomic_write(d / LATEST, tag + "\n")
        if keep_latest_k > 0:
            try:
                for old in prune_checkpoints(d, keep_latest_k):
                    log(f"removed checkpoint {old} from {d} (--keep-latest-k {keep_latest_k})")
            except SatDistError as e:  # this save is complete; the next one tries again
                log(f"warning: {e}")
    dist.barrier()
    return d / tag


def balanced_owners(sizes: dict[str, int], dp_size: int) -> dict[str, int]:
    """Which DP rank writes each parameter: largest first, each to the rank with the fewest
    elements so far (ties: the lowest rank), so every rank writes about 1/DP of the bytes
    even when two embeddings dominate a shallow model. The same on every rank (the sizes are
    the TP-local shapes, equal over TP ranks); the manifest records it, so a resume reads
    whatever mapping the save used."""
    load = [(0, r) for r in range(dp_size)]
    owners = {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # sorted() is stable: ties keep model order
        n, r = heapq.heappop(load)
        owners[name] = r
        heapq.heappush(load, (n + sizes[name], r))
    return owners


def _iteration_of(name: str) -> Optional[int]:
    head, _, num = name.partition("_")
    return int(num) if head == "iter" and num.isdigit() else None


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> list[str]:
    """Remove the oldest complete checkpoints (iter_* directories with a manifest) of
    `ckpt_dir` so that at most `keep` remain: the one `latest` names, whatever its iteration
    (after a roll-back it may not be the newest), and the newest others by iteration. The
    tags removed, oldest first. Files only (no collectives): rank 0 calls it after a save.

    Safe against a kill anywhere: a checkpoint is first renamed (atomically) to
    .deleting-iter_*, which resume never reads, then deleted; such leftovers are removed at
    the start of the next call. Incomplete iter_* directories are neither counted nor
    touched (the next save of that iteration replaces them); without a `latest` file
    nothing is removed."""
    if keep < 1:
        raise SatDistError(f"--keep-latest-k: got {keep}; allowed: an integer >= 1 here (0 keeps every checkpoint)")
    d = Path(ckpt_dir)
    try:
        for p in d.glob(DELETING + "*"):
            if p.is_dir():
                shutil.rmtree(p)
        latest = (d / LATEST).read_text().strip() if (d / LATEST).is_file() else None
        if latest is None:
            return []
        complete = sorted((it, p.name) for p in d.iterdir()
                          if (it := _iteration_of(p.name)) is not None and (p / MANIFEST).is_file())
        others = [tag for _, tag in complete if tag != latest]
        keep_others = keep - 1 if any(tag == latest for _, tag in complete) else keep
        doomed = others[:max(len(others) - keep_others, 0)]
        for tag in doomed:
            hidden = d / (DELETING + tag)
            os.rename(d / tag, hidden)  # from here on it is not a checkpoint
            fault_point("kill-during-prune", _iteration_of(tag))
            shutil.rmtree(hidden)
    except OSError as e:
        raise SatDistError(f"--keep-latest-k: could not remove old checkpoints in {d} "
                           f"({e.strerror or e}); the next save tries again")
    return doomed


# What a run definition held before a key joined it: the value those runs effectively had.
# (Checkpoints from before --sat-granularity selected afresh for every micro-batch; before
# --lr-decay-iters the decay ended at --train-iters; before rope_scaling RoPE was plain;
# before --sat-compensation and --sat-sparse-pass SAT ran uncompensated in both passes.)
_BACKFILL = {"sat-granularity": lambda d: "micro-batch", "sat-compensation": lambda d: "none",
             "sat-sparse-pass": lambda d: "both", "lr-warmup-init": lambda d: 0.0,
             "lr-decay-iters": lambda d: d.get("train-iters"), "lr-wsd-decay-iters": lambda d: None,
             "lr-wsd-decay-style": lambda d: None, "rope_scaling": lambda d: None,
             # only --sat-selection pps reads it, which older checkpoints could not run
             "sat-pps-floor": lambda d: SATConfig.pps_floor, "sat-omission-mlp-layers": lambda d: "",
             # before --sat-wgrad-tokens every weight gradient was exact
             "sat-wgrad-tokens": lambda d: 1.0, "sat-wgrad-sampling": lambda d: SATConfig.wgrad_sampling,
             "sat-wgrad-schedule": lambda d: SATConfig.wgrad_schedule, "sat-wgrad-tokens-head": lambda d: 1.0,
             "sat-wgrad-tokens-linears": lambda d: "", "sat-budget": lambda d: 0.0,
             "sat-budget-interval": lambda d: SATConfig.budget_interval,
             "sat-budget-min-tokens": lambda d: SATConfig.budget_min_tokens}

OVERRIDE_FLAG = "--override-opt_param-scheduler"


def schedule_key(key: str) -> bool:
    """Whether --override-opt_param-scheduler lets a run-definition key change: the LR
    schedule, --train-iters and the SAT flags. The others (data order, model numerics, and
    any key added later, until it is classed here) change only with --finetune."""
    return key in ("train-iters", "lr", "min-lr") or key.startswith(("lr-", "sat-"))


def saved_definition(manifest: dict) -> dict:
    """The checkpoint's run definition, keys it was saved without filled with the values it
    effectively ran with."""
    d = dict(manifest["run_definition"])
    for key, value in _BACKFILL.items():
        if key not in d:
            d[key] = value(d)
    return d


def definition_changes(manifest: dict, definition: dict) -> list[str]:
    """The run-definition keys in which this run differs from the checkpoint's."""
    saved = saved_definition(manifest)
    return [k for k in definition if saved.get(k) != definition[k]]


def _shown(saved: dict, definition: dict, keys: list[str]) -> str:
    shown = "; ".join(f"--{k} {saved.get(k)} (this run: {definition[k]})" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_resume(ckpt_dir: str, model_cfg: ModelConfig, definition: dict, override: bool = False,
                 finetune: bool = False, save: Optional[str] = None,
                 ckpt_step: Optional[int] = None) -> tuple[str, dict]:
    """(tag, manifest) of the checkpoint --load resumes; one clear error if it cannot.
    Reads only files: call it before starting any process group. Any TP x DP layout that
    can hold the model may resume it.

    What may differ from the checkpoint's run definition (Megatron-LM's stage flags):
    nothing on a plain resume; with `override` (--override-opt_param-scheduler) the LR
    schedule, --train-iters and the --sat-* flags (a new stage from the checkpoint's
    iteration, which --train-iters must then exceed); with `finetune` anything but the
    model's shape (weights only; everything else starts at 0). `save`: the run's --save,
    which --finetune must not share with --load once it holds checkpoints (a rerun would
    restart the stage instead of resuming it). `ckpt_step`: resume that iteration's
    checkpoint instead of `latest`'s (--ckpt-step)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise SatDistError(f"--load {ckpt_dir}: no such directory")
    if _TAG.fullmatch(d.name) and (d / MANIFEST).is_file():
        raise SatDistError(f"--load {ckpt_dir} is one checkpoint; --load takes the directory that holds them: "
                           f"--load {d.parent} --ckpt-step {int(d.name[5:])}")
    if ckpt_step is not None:
        tag = tag_of(ckpt_step)
        if not (d / tag / MANIFEST).is_file():
            raise SatDistError(f"--ckpt-step {ckpt_step}: {d / tag} is not a complete checkpoint; {_listing(d)}")
    else:
        tag = latest_complete_tag(d)
    if tag is None:
        if complete_checkpoints(d):
            raise SatDistError(f"--load {ckpt_dir}: its {LATEST} file is missing; {_listing(d)}")
        raise SatDistError(f"--load {ckpt_dir}: no checkpoint there (no {LATEST} file and no complete iter_*); "
                           f"check the path, or drop --load to start a new run")
    try:
        m = read_manifest(d, tag)
    except SatDistError as e:
        raise SatDistError(f"--load {ckpt_dir}: {e}; {_listing(d)}") from None
    try:
        saved_model = ModelConfig(**m["model"])
        saved_def = saved_definition(m)
        _ = m["owners"]
        _ = (m["iteration"], m["consumed_samples"], m["tensor_model_parallel_size"], m["data_parallel_size"])
    except (KeyError, TypeError) as e:
        raise SatDistError(f"--load {ckpt_dir}: {tag}/{MANIFEST} is damaged ({type(e).__name__}: {e})")
    check_same_model(saved_model, model_cfg, f"--load {ckpt_dir}: checkpoint {tag}",
                     "use the --model-config it was trained with")
    if finetune and save and Path(save).resolve() == d.resolve():
        raise SatDistError(f"--finetune --load {ckpt_dir} --save {save}: the directory already holds this run's "
                           f"checkpoints ({tag}), and --finetune would restart the stage from iteration 0 over "
                           f"them; drop --finetune to resume the stage from its own checkpoints")
    diff = [] if finetune else definition_changes(m, definition)
    data = [k for k in diff if not schedule_key(k)]
    if data:
        what = ("--finetune (load the weights only; iteration, data position, optimizer and schedules start "
                "at 0) with another --save")
        head = (f"{OVERRIDE_FLAG} lets the LR schedule, --train-iters and the --sat-* flags change, not these"
                if override else "these change the data order or the model")
        raise SatDistError(f"--load {ckpt_dir}: checkpoint {tag} was trained with {_shown(saved_def, definition, data)}"
                           f"; {head}: resume with the checkpoint's values, or start a new stage with {what}")
    if diff and not override:
        raise SatDistError(f"--load {ckpt_dir}: checkpoint {tag} was trained with {_shown(saved_def, definition, diff)}"
                           f"; resume with the checkpoint's values, or pass {OVERRIDE_FLAG} to continue from its "
                           f"iteration with these (a new stage: the LR follows the new flags, the SAT schedule "
                           f"restarts over the remaining iterations)")
    if diff and definition["train-iters"] <= m["iteration"]:
        raise SatDistError(f"--train-iters: got {definition['train-iters']}; allowed: more than the checkpoint's "
                           f"iteration {m['iteration']} ({OVERRIDE_FLAG} starts a new stage there and trains to "
                           f"--train-iters)")
    try:
        missing_or_resized(d, tag, m)
    except SatDistError as e:
        raise SatDistError(f"--load {ckpt_dir}: {e}: the checkpoint is damaged; {_listing(d)}") from None
    return tag, m


def restore_checkpoint(engine, model, ckpt_dir: str, tag: str, manifest: dict, comm: ParallelComm,
                       model_cfg: ModelConfig, stage3: bool, load_optim: bool = True, load_rng: bool = True,
                       lr_position: Optional[int] = None) -> None:
    """Load weights, Adam moments and step, LR schedule (and RNG on the same layout) of `tag`
    into a freshly built engine, re-partitioning from the saved TP x DP layout to this one.

    `load_optim` False (--no-load-optim, --finetune): the weights only; Adam starts afresh
    (moments zero, step 0: its bias correction then treats the first update as the first,
    which zero moments need) and the LR schedule is not loaded. `lr_position`: put the LR
    schedule (the flags' own, as build_engine made it) at this step instead of loading the
    saved one: the new stage's LR at the checkpoint's iteration (--override-opt_param-scheduler,
    --no-load-optim); None with load_optim loads the saved schedule, None without it leaves
    the schedule at step 0 (--finetune). `load_rng` False (--no-load-rng, --finetune): the
    random generators keep this run's seeding."""
    d = Path(ckpt_dir) / tag
    old_tp, owners = manifest["tensor_model_parallel_size"], manifest["owners"]
    # The checksums are read on a side thread while the state loads (zlib and file reads
    # release the GIL; the loads then find the pages cached); nothing trains, and nothing is
    # saved, before every rank has agreed that every file is intact.
    checking = _start_check(d, manifest)
    files: dict[tuple[int, int], dict] = {}

    def stored(name: str, r: int) -> dict:
        key = (r, owners[name])
        if key not in files:
            try:
                files[key] = load_state_file(d / state_file(*key))
            except UnreadableStateFile:
                bad, reason = checking.result()  # damaged bytes: say so, if this rank's check found it
                if bad < len(_state_files(manifest)):
                    raise UnreadableStateFile(d / _state_files(manifest)[bad], reason) from None
                raise
        entry = files[key]["tensors"].get(name)
        if entry is None:
            raise SatDistError(f"--load {ckpt_dir}: {tag}/{state_file(*key)} lacks {name}; the checkpoint is damaged")
        return entry

    keys = ENTRY_KEYS if load_optim else ("param",)
    if load_optim:
        zero.ensure_adam_state(engine.optimizer, manifest["optimizer_step"])
    for name, p in zero.unique_params(model):
        if name not in owners:
            raise SatDistError(f"--load {ckpt_dir}: {tag} has no {name}; it was saved by another model")
        if old_tp == comm.tp_size:  # this rank's own TP shard, as stored: no other shard is read
            entry = stored(name, comm.tp_rank)
            local = {k: entry[k] for k in keys if entry.get(k) is not None}
        else:  # another TP size: only the old shards that overlap this rank's, and their overlapping rows
            first = stored(name, (overlapping_shards(name, model_cfg, old_tp, comm.tp_size, comm.tp_rank) or [0])[0])
            local = {k: reshard_local_from(name, lambda r, k=k: stored(name, r)[k], model_cfg, old_tp,
                                           comm.tp_size, comm.tp_rank)
                     for k in keys if first.get(k) is not None}
        zero.write_param_state(engine.optimizer, p, name, local, comm, stage3)
    zero.finish_param_writes(engine.optimizer, stage3)
    agree_intact(d, manifest, checking.result())
    if load_optim or lr_position is not None:
        # --finetune keeps the fresh engine's counters (iteration 0, nothing consumed, LR step 0)
        zero.restore_engine_counters(engine, manifest["iteration"], manifest["consumed_samples"],
                                     manifest.get("lr_scheduler") if lr_position is None else None,
                                     manifest.get("skipped_steps", 0), lr_position)
    same_layout = (old_tp, manifest["data_parallel_size"]) == (comm.tp_size, comm.dp_size)
    if same_layout and load_rng:
        own = files.get((comm.tp_rank, comm.dp_rank)) or load_state_file(d / state_file(comm.tp_rank, comm.dp_rank))
        _set_rng_state(own.get("rng"))


def _state_files(manifest: dict) -> list[str]:
    return [state_file(r, dp) for r in range(manifest["tensor_model_parallel_size"])
            for dp in range(manifest["data_parallel_size"])]


def _start_check(d: Path, manifest: dict):
    """Start checking this rank's share of the state files (file i by rank i mod world) on a
    side thread; its result: (index of the first damaged file or len(files), reason)."""
    from concurrent.futures import ThreadPoolExecutor

    names = _state_files(manifest)
    records = manifest.get("files") or {}
    rank, world = dist.get_rank(), dist.get_world_size()

    def check():
        for i in range(rank, len(names), world):
            if names[i] not in records:
                continue  # a manifest written before checksums
            try:
                load_state_file(d / names[i], manifest, check_only=True)
            except UnreadableStateFile as e:
                return i, e.reason
        return len(names), ""

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(check)
    pool.shutdown(wait=False)
    return future


def agree_intact(d: Path, manifest: dict, mine: tuple[int, str]) -> None:
    """All ranks agree on the checks of _start_check: if any file is damaged, every rank
    raises naming it. Collective over all ranks."""
    names = _state_files(manifest)
    bad, reason = mine
    flag = torch.tensor([bad], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    first = int(flag)
    if first < len(names):
        raise UnreadableStateFile(d / names[first], reason if first == bad else "its bytes do not match the "
                                  "manifest's checksum (found by another rank): the file is damaged")


class UnreadableStateFile(SatDistError):
    """A state file torch.load cannot read; `reason` is why, in one line."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path}: unreadable ({reason}); resume from an earlier checkpoint with "
                         f"--ckpt-step N (its directory lists the others)")
        self.path, self.reason = Path(path), reason


def load_state_file(path: str | Path, manifest: Optional[dict] = None, check_only: bool = False) -> Optional[dict]:
    """A state file (state_file()), memory-mapped: only the tensors asked for are read from
    disk. With the manifest (which records each file's size and CRC-32) the file is first
    read through once and checked: damaged bytes are refused, not loaded. Raises
    UnreadableStateFile if it is damaged or torch.load cannot read it."""
    path = Path(path)
    record = ((manifest or {}).get("files") or {}).get(path.name)
    if record is not None:
        try:
            size, crc = file_crc32(path)
        except OSError as e:
            raise UnreadableStateFile(path, e.strerror or type(e).__name__)
        if (size, crc) != (record["size"], record["crc32"]):
            raise UnreadableStateFile(path, f"its bytes do not match the manifest's checksum (size {size}, "
                                            f"CRC-32 {crc:08x}; recorded {record['size']}, {record['crc32']:08x}): "
                                            f"the file is damaged")
    if check_only:
        return None
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise UnreadableStateFile(path, str(e).splitlines()[0] if str(e) else type(e).__name__)


def _json_default(o):
    if torch.is_tensor(o):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_same_model(theirs: ModelConfig, mine: ModelConfig, what: str,
                     fix: str = "make them describe the same model") -> None:
    """One error naming every shape field in which two model configs differ."""
    a, b = _shape_fields(theirs), _shape_fields(mine)
    if a != b:
        diff = ", ".join(f"{k}={a[k]} vs {b[k]}" for k in sorted(k for k in a if a[k] != b[k]))
        raise SatDistError(f"{what} is of another model ({diff}); {fix}")


def _shape_fields(cfg: ModelConfig) -> dict:
    keys = ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
            "num_query_groups", "vocab_size", "tie_word_embeddings")
    return {k: getattr(cfg, k) for k in keys}


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(s: Optional[dict]) -> None:
    if not s:
        return
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _write_failed(path, tmp, e)


class _Checksummed:
    """A binary file that keeps the size and CRC-32 of what is written through it (the
    bytes are in memory already: no second read)."""

    def __init__(self, f):
        self.f, self.size, self.crc = f, 0, 0

    def write(self, b) -> int:
        self.crc = zlib.crc32(b, self.crc)
        self.size += memoryview(b).nbytes
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _atomic_torch_save(obj, path: Path) -> dict:
    """Write `obj` durably to `path`; its {"size", "crc32"}."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            out = _Checksummed(f)
            torch.save(obj, out)
            f.flush()
            os.fsync(f.fileno())  # durable before the manifest that points at it
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a short write as RuntimeError
        _write_failed(path, tmp, e)
    return {"size": out.size, "crc32": out.crc}


def _write_failed(path: Path, tmp: Path, e: BaseException) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass
    reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
    raise SatDistError(f"checkpoint: could not write {path} ({reason}); is the disk full or the quota "
                       f"reached? The previous checkpoint is still the one --load picks")
