"""Training checkpoints: save, and resume exactly.

A checkpoint directory:
  latest                 the tag resume picks; replaced atomically, after everything else
  iter_0000040/
    DeepSpeed's files      model and ZeRO optimizer partitions, LR schedule, RNG states
    model_tp00.pt ...      each TP rank's full local weights (gathered over DP), fp32: what
                           tools/export_hf.py reads, whatever the ZeRO stage
    sat_dist.json          the manifest: iteration, consumed samples, layout, model, SAT
                           schedule; written last, so a save killed midway is never resumed
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from sat_dist.config import ModelConfig
from sat_dist.errors import SatDistError
from sat_dist.parallel.comm import ParallelComm

MANIFEST = "sat_dist.json"
LATEST = "latest"


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_complete_tag(ckpt_dir: str | Path) -> Optional[str]:
    """The tag `latest` names, if it is complete (has a manifest); None if there is none."""
    d = Path(ckpt_dir)
    f = d / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not (d / tag / MANIFEST).is_file():
        raise SatDistError(f"checkpoint {d}: latest names {tag!r}, which is incomplete or missing; "
                           f"point {f} at a complete iter_* directory (one with {MANIFEST})")
    return tag


def read_manifest(ckpt_dir: str | Path, tag: str) -> dict:
    p = Path(ckpt_dir) / tag / MANIFEST
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SatDistError(f"checkpoint {p}: unreadable manifest ({type(e).__name__})")


def check_save_dir(save: Optional[str], load: Optional[str]) -> None:
    """Refuse to train over someone's checkpoints unless resuming from them."""
    if not save:
        return
    if (Path(save) / LATEST).is_file() and (not load or Path(load).resolve() != Path(save).resolve()):
        raise SatDistError(f"--save {save} already holds checkpoints (latest: "
                           f"{(Path(save) / LATEST).read_text().strip()}); pass --load {save} to resume "
                           f"from them, or choose another --save directory")


def save_checkpoint(engine, model, ckpt_dir: str, iteration: int, consumed_samples: int,
                    comm: ParallelComm, model_cfg: ModelConfig, sat_schedule: dict, stage3: bool,
                    extra: Optional[dict] = None) -> Path:
    from sat_dist.train.engine import gather_local_weights

    d = Path(ckpt_dir)
    tag = tag_of(iteration)
    rank = dist.get_rank()
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        partial = d / tag
        if partial.exists() and not (partial / MANIFEST).exists():
            shutil.rmtree(partial)  # left by a save that was killed; never resumed from
    dist.barrier()
    client = {"iteration": iteration, "consumed_samples": consumed_samples, "rng": _rng_state()}
    engine.save_checkpoint(str(d), tag=tag, client_state=client, save_latest=False)
    weights = gather_local_weights(model, stage3)
    if comm.dp_rank == 0:
        _atomic_torch_save(weights, d / tag / f"model_tp{comm.tp_rank:02d}.pt")
    dist.barrier()
    if rank == 0:
        manifest = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "tensor_model_parallel_size": comm.tp_size,
            "data_parallel_size": comm.dp_size,
            "model": model_cfg.__dict__,
            "sat_schedule": sat_schedule,
            **(extra or {}),
        }
        _atomic_write(d / tag / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _atomic_write(d / LATEST, tag + "\n")
    dist.barrier()
    return d / tag


def check_resume(ckpt_dir: str, comm: ParallelComm, model_cfg: ModelConfig) -> tuple[str, dict]:
    """(tag, manifest) of the checkpoint --load resumes; one clear error if it cannot.
    Reads only the manifest: call it before building the engine."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise SatDistError(f"--load {ckpt_dir}: no such directory")
    tag = latest_complete_tag(d)
    if tag is None:
        raise SatDistError(f"--load {ckpt_dir}: no checkpoint there (no {LATEST} file); "
                           f"drop --load to start fresh")
    m = read_manifest(d, tag)
    saved = ModelConfig(**m["model"])
    mine, theirs = _shape_fields(model_cfg), _shape_fields(saved)
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs[k])
        raise SatDistError(f"--load {ckpt_dir}: checkpoint {tag} is of another model "
                           f"({', '.join(f'{k}={theirs[k]} vs {mine[k]}' for k in diff)}); "
                           f"use the --model-config it was trained with")
    if m["tensor_model_parallel_size"] != comm.tp_size:
        raise SatDistError(f"--load {ckpt_dir}: checkpoint {tag} was saved at --tensor-model-parallel-size "
                           f"{m['tensor_model_parallel_size']}, this run uses {comm.tp_size}; resume with "
                           f"--tensor-model-parallel-size {m['tensor_model_parallel_size']}")
    if m["data_parallel_size"] != comm.dp_size:
        raise SatDistError(f"--load {ckpt_dir}: checkpoint {tag} was saved with data-parallel size "
                           f"{m['data_parallel_size']}, this run has {comm.dp_size}; launch "
                           f"{m['data_parallel_size'] * comm.tp_size} processes")
    return tag, m


def restore_checkpoint(engine, ckpt_dir: str, tag: str) -> None:
    """Load model, optimizer, LR schedule and RNG states of `tag` into the engine."""
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise SatDistError(f"--load {ckpt_dir}: DeepSpeed could not read {tag}")
    _set_rng_state((client or {}).get("rng"))


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
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
