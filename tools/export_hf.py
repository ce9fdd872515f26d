#!/usr/bin/env python
"""Turn a sat_dist training checkpoint (any TP size, any ZeRO stage) into an HF Llama directory.

  python tools/export_hf.py --load CKPT_DIR [--iteration N] --output HF_DIR [--dtype bf16]

Reads the manifest and the per-rank state files the trainer writes (weights by name, in the
model's layout); DeepSpeed's zero_to_fp32 cannot undo tensor parallelism.
"""

from __future__ import annotations

import argparse
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
        read_manifest,
        state_file,
        tag_of,
    )
    from sat_dist.config import ModelConfig

    d = Path(load)
    if not d.is_dir():
        raise SatDistError(f"--load {load}: no such directory")
    tag = tag_of(iteration) if iteration is not None else latest_complete_tag(d)
    if tag is None or not (d / tag / MANIFEST).is_file():
        raise SatDistError(f"--load {load}: no complete checkpoint {'(no latest)' if tag is None else tag}")
    m = read_manifest(d, tag)
    cfg = ModelConfig(**m["model"])
    shards = [{} for _ in range(m["tensor_model_parallel_size"])]
    for r, shard in enumerate(shards):
        for dp in range(m["data_parallel_size"]):
            f = d / tag / state_file(r, dp)
            if not f.is_file():
                raise SatDistError(f"--load {load}: {f.name} missing in {tag}; the checkpoint is incomplete")
            try:
                state = load_state_file(f)
            except UnreadableStateFile as e:
                raise SatDistError(f"--load {load}: {f.name} is unreadable ({e.reason})")
            shard.update({name: entry["param"] for name, entry in state["tensors"].items()})
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise SatDistError(f"--output {output} exists and is not empty; choose a new directory")
    sd = merge_tp_state_dicts(shards, cfg)
    sd = {k: v.to(getattr(torch, DTYPES[dtype])) for k, v in sd.items()}
    try:
        save_hf_checkpoint(out, cfg, sd, dtype=DTYPES[dtype])
    except OSError as e:
        raise SatDistError(f"--output {output}: cannot write ({e.strerror or e})")
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
    except SatDistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
