#!/usr/bin/env python
"""The bytes model of comm-sparse ZeRO-3 at Llama-2 7B/13B scale, as a markdown table.

  python tools/zero_bytes_model.py --dp 64 256 --omissions 0,0.1 0.3,0.3 0.5,0.5

For each model, DP size and (attention, MLP) omission pair: the bytes one rank sends per
optimizer step for SAT's weights with whole-weight ZeRO-3 and with comm-sparse (forward
gather, backward gather, gradient reduce, scoring; every share padded to the fullest rank's),
how far the padding lifts comm-sparse's gathers above the kept rows, comm-sparse's bytes for
SAT's weights over the whole-weight path's and what `--sat-comm-sparse auto` decides on them
(on at <= AUTO_MAX_RATIO), the rest of the model's (embedding, LM head, norms; the same in
both), the whole step's ratio, and the time at a given per-GPU bandwidth. Keep counts are
the run's (SATConfig's alignment, a ladder's highest rates). Arithmetic only
(sat_dist.parallel.zero_bytes); tools/bench_step.py measures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sat_dist.config import ModelConfig, SATConfig  # noqa: E402
from sat_dist.parallel.zero_bytes import AUTO_MAX_RATIO, sat_ratio, sat_rows, step_bytes  # noqa: E402
from sat_dist.sat.selection import keep_count  # noqa: E402
from sat_dist.train.arguments import MODEL_CONFIG_DIR  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["llama2-7b", "llama2-13b"])
    p.add_argument("--dp", type=int, nargs="+", default=[64, 256])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step")
    p.add_argument("--omissions", nargs="+", default=["0,0.1", "0.3,0.3", "0.5,0.5"])
    p.add_argument("--token-stride", type=int, default=8)
    p.add_argument("--align-mlp", type=int, default=SATConfig.align_mlp, help="--sat-align-mlp")
    p.add_argument("--gbps", type=float, default=45.0, help="GB/s per GPU between nodes")
    a = p.parse_args(argv)
    print(f"per rank per optimizer step; TP={a.tp}, micro-batch {a.micro_batch} x {a.seq} tokens, "
          f"{a.global_batch} sequences a step, bf16 weights gathered, fp32 gradients reduced, "
          f"token stride {a.token_stride}; time at {a.gbps:g} GB/s")
    print("| model | DP | grad. accum. | omission attn,mlp | SAT weights whole GB | comm-sparse GB: fwd / bwd / "
          "reduce / scoring | padding over kept rows | SAT weights, of whole (auto) | rest GB "
          "| step bytes, of whole | time s, whole -> comm-sparse |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in a.models:
        cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / f"{name}.json")
        rows = sat_rows(cfg, a.tp)
        groups, f = cfg.num_query_groups // a.tp, cfg.ffn_hidden_size // a.tp
        for dp in a.dp:
            ga = a.global_batch // (dp * a.micro_batch)
            for o in a.omissions:
                oa, om = (float(v) for v in o.split(","))
                sat = SATConfig(omission_attn=oa, omission_mlp=om, align_mlp=a.align_mlp).validate()
                ka = keep_count(groups, oa, sat.align_attn, sat, "attn") / groups
                km = keep_count(f, om, sat.align_mlp, sat, "mlp") / f
                b = step_bytes(cfg, dp, a.tp, a.micro_batch * a.seq, ga, ka, km, a.token_stride)
                rest = b["other_gather"] + b["other_reduce"]
                sparse = b["forward_gather"] + b["backward_gather"] + b["grad_reduce"] + b["scoring"]
                whole = b["dense_sat_weights"]
                kept = ((rows["qkv"] + rows["proj"]) * ka + (rows["fc1"] + rows["fc2"]) * km) * cfg.hidden_size
                padding = b["forward_gather"] / (cfg.num_layers * ga * (dp - 1) / dp * kept * 2) - 1
                ratio = sat_ratio(b)
                print(f"| {name} | {dp} | {ga} | {o} | {whole / 1e9:.1f} | {b['forward_gather'] / 1e9:.1f} / "
                      f"{b['backward_gather'] / 1e9:.1f} / {b['grad_reduce'] / 1e9:.1f} / {b['scoring'] / 1e9:.2f} "
                      f"| +{100 * padding:.0f}% | {ratio:.3f} ({'on' if ratio <= AUTO_MAX_RATIO else 'off'}) "
                      f"| {rest / 1e9:.1f} | {(sparse + rest) / (whole + rest):.3f} "
                      f"| {(whole + rest) / a.gbps / 1e9:.1f} -> {(sparse + rest) / a.gbps / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
