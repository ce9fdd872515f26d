#!/usr/bin/env python
"""Turn a sat_dist training checkpoint (any TP size, any ZeRO stage) into an HF Llama directory.

  python tools/export_hf.py --load CKPT_DIR [--iteration N] --output HF_DIR [--dtype bf16]

Reads the manifest and the per-rank state files the trainer writes (weights by name, in the
model's layout); DeepSpeed's zero_to_fp32 cannot undo tensor parallelism.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sat_dist.errors import SatDistError  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def export(load: str, output: str, iteration: int | None = None, dtype: str = "fp32") -> Path:
    import torch

    from sat_dist.checkpoint.hf import merge_tp_state_dicts, save_hf_checkpoint
    from sat_dist.checkpoint.state import (
        MANIFEST,
        UnreadableStateFile,
        latest_complete_tag,
        load_state_file,
        missing_or_resized,
        read_manifest,
        state_file,
        tag_of,
    )
    from sat_dist.config import ModelConfig

    d = Path(load)
    if not d.is_dir():
        raise SatDistError(f"--load {load}: no such directory")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is an existing file" if not out.is_dir() else "exists and is not empty"
        raise SatDistError(f"--output {output} {what}; choose a new directory")
    tag = tag_of(iteration) if iteration is not None else latest_complete_tag(d)
    if tag is None or not (d / tag / MANIFEST).is_file():
        raise SatDistError(f"--load {load}: no complete checkpoint {'(no latest)' if tag is None else tag}"
                           "; pass --iteration N of a complete iter_* there")
    m = read_manifest(d, tag)
    try:
        missing_or_resized(d, tag, m)
        cfg = ModelConfig(**m["model"]).validate()
    except (SatDistError, TypeError) as e:
        raise SatDistError(f"--load {load}: {e}; the checkpoint is damaged, export another with --iteration N")
    shards = [{} for _ in range(m["tensor_model_parallel_size"])]
    for r, shard in enumerate(shards):
        for dp in range(m["data_parallel_size"]):
            f = d / tag / state_file(r, dp)
            try:
                state = load_state_file(f, m)  # checked against the manifest's checksum first
            except UnreadableStateFile as e:
                raise SatDistError(f"--load {load}: {tag}/{f.name} is unreadable ({e.reason}); export another "
                                   f"checkpoint with --iteration N")
            shard.update({name: entry["param"] for name, entry in state["tensors"].items()})
    sd = merge_tp_state_dicts(shards, cfg)
    sd = {k: v.to(getattr(torch, DTYPES[dtype])) for k, v in sd.items()}
    # Written beside the target and renamed at the end: a failed export (a full disk) leaves
    # nothing that looks like a model.
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_hf_checkpoint(tmp, cfg, sd, dtype=DTYPES[dtype])
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except Exception as e:  # OSError, safetensors' SafetensorError (a short write): nothing may remain
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise SatDistError(f"--output {output}: cannot write ({reason}); nothing was left there")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint directory (the trainer's --save)")
    p.add_argument("--iteration", type=int, default=None, help="which iter_* (default: latest)")
    p.add_argument("--output", required=True, help="new HF directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = p.parse_args(argv)
    try:
        out = export(args.load, args.output, args.iteration, args.dtype)
    except (SatDistError, ValueError) as e:  # ValueError: a damaged manifest's model
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
