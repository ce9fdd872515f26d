#!/usr/bin/env python
"""Benchmark one SAT Llama layer (attention + MLP), forward + backward, against its dense run.

  python tools/bench_sat.py --out bench.json                    # GPU: 7B and 13B shapes, bf16
  python tools/bench_sat.py --device cpu --shapes tiny --dtype fp32   # a smoke run anywhere

For each shape, sequence setting and (attn, mlp) omission pair it reports the median time
of a layer's fwd+bwd (selection and scoring included; settings alternate within every
round), the speedup over omission (0, 0),
the FLOP-ideal speedup (dense layer FLOPs / executed FLOPs) and their ratio; and the share
of the step that scoring + selection take. A benchmark, not a test: numbers go to
docs/PERFORMANCE.md with the device, date, commit and command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# As launch/pretrain.py does for training: huge pages for large CPU tensors (read once, at
# torch's import).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from sat_dist.config import ModelConfig, SATConfig  # noqa: E402
from sat_dist.model.llama import DecoderLayer  # noqa: E402
from sat_dist.model.sat_state import SATState  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, num_query_groups=32),
    "13b": dict(hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40, num_query_groups=40),
    "tiny": dict(hidden_size=256, ffn_hidden_size=768, num_attention_heads=4, num_query_groups=4),
}
SEQS = {"7b": [(4096, 1), (2048, 4)], "13b": [(4096, 1), (2048, 4)], "tiny": [(128, 2)]}
OMISSIONS = [(0.0, 0.0), (0.25, 0.25), (0.3, 0.3), (0.5, 0.5), (0.0, 0.5)]


def layer_flops(cfg: ModelConfig, tokens: int, seq: int, keep_attn: float, keep_mlp: float) -> float:
    """fwd+bwd FLOPs of one layer (Megatron's accounting, causal attention counted half)."""
    h, q = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_query_groups * cfg.head_dim
    proj = h * (q + 2 * kv) + q * h
    return 6 * tokens * (proj * keep_attn + 3 * h * cfg.ffn_hidden_size * keep_mlp) + 6 * tokens * seq * q * keep_attn


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, warmup: int, iters: int) -> float:
        """Median milliseconds of fn()."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def bench_shape(name: str, device, dtype, warmup: int, iters: int, token_stride: int,
                seqs: list[tuple[int, int]] | None = None, omissions=None) -> list[dict]:
    cfg = ModelConfig(**SHAPES[name], vocab_size=32000, name=name).validate()
    sat_cfg = SATConfig(align_mlp=128 if name != "tiny" else 32, token_stride=token_stride).validate()
    state = SATState(sat_cfg)
    torch.manual_seed(0)
    layer = DecoderLayer(cfg, 0, state, state.comm).to(device=device, dtype=dtype)
    timer = Timer(device)
    rows = []
    settings = omissions or OMISSIONS
    for seq, micro in seqs or SEQS[name]:
        x = torch.randn(micro, seq, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)

        def step(attn, mlp):
            # A new optimizer step each time: selections are reused within a step, and a
            # training step scores and selects once.
            state.set_step(state.step + 1, 0, attn=attn, mlp=mlp)
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad)

        # Settings alternate within every round (order reversed every other round), so that
        # the ratios are taken side by side under the same machine load.
        times = {s: [] for s in settings}
        for rnd in range(warmup + iters):
            for attn, mlp in (settings if rnd % 2 == 0 else list(reversed(settings))):
                ms = timer(lambda: step(attn, mlp), 0, 1)
                if rnd >= warmup:
                    times[(attn, mlp)].append(ms)
        dense_ms = statistics.median(times[(0.0, 0.0)])
        for attn, mlp in settings:
            ms = statistics.median(times[(attn, mlp)])
            state.set_step(state.step + 1, 0, attn=attn, mlp=mlp)
            layer(x)  # record the kept counts of this setting
            ka, na = state.kept[(0, "attn")]
            km, nm = state.kept[(0, "mlp")]
            tokens = seq * micro
            ideal = layer_flops(cfg, tokens, seq, 1, 1) / layer_flops(cfg, tokens, seq, ka / na, km / nm)
            speedup = dense_ms / ms
            select_ms = _selection_ms(layer, state, x, timer, warmup, iters) if (attn, mlp) != (0.0, 0.0) else 0.0
            rows.append({"shape": name, "seq": seq, "micro_batch": micro, "omission_attn": attn,
                         "omission_mlp": mlp, "kept_attn": ka, "kept_mlp": km, "ms": round(ms, 3),
                         "ms_min_max": [round(min(times[(attn, mlp)]), 3), round(max(times[(attn, mlp)]), 3)],
                         "speedup": round(speedup, 3), "flop_ideal_speedup": round(ideal, 3),
                         "fraction_of_ideal": round(speedup / ideal, 3),
                         "scoring_selection_ms": round(select_ms, 3),
                         "scoring_selection_share": round(select_ms / ms, 4)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _selection_ms(layer, state, x, timer, warmup, iters) -> float:
    """Time of both modules' scoring + selection alone (no products of the layer)."""
    from sat_dist.sat.importance import attention_scores, mlp_scores

    a, m = layer.self_attention, layer.mlp
    xa = layer.input_layernorm(x).detach()
    xm = layer.pre_mlp_layernorm(x).detach()

    def select():
        state.set_step(state.step + 1, 0, **state.rates)  # a new step: no reuse
        state.kept_units(0, "attn", a.groups, x.device, lambda g, s: attention_scores(
            state.cfg.metric, xa, a.qkv_weight, a.proj_weight, a.r, a.d, generator=g, token_stride=s))
        state.kept_units(0, "mlp", m.f, x.device, lambda g, s: mlp_scores(
            state.cfg.metric, xm, m.fc1_weight, m.fc2_weight, generator=g, token_stride=s))

    with torch.no_grad():
        return timer(select, warmup, iters)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["7b", "13b"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--token-stride", type=int, default=8)
    p.add_argument("--seqs", nargs="+", metavar="SEQxMICRO",
                   help="sequence settings, e.g. 512x1 (default: 4096x1 2048x4; tiny 128x2)")
    p.add_argument("--omissions", nargs="+", metavar="ATTN,MLP",
                   help="omission pairs besides 0,0 (default: 0.25,0.25 0.3,0.3 0.5,0.5 0,0.5)")
    p.add_argument("--out", help="write the JSON report here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --device cpu --shapes tiny", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    seqs = [tuple(int(v) for v in x.split("x")) for x in a.seqs] if a.seqs else None
    omissions = [(0.0, 0.0)] + [tuple(float(v) for v in o.split(",")) for o in a.omissions] if a.omissions else None
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
        "command": " ".join(["python", "tools/bench_sat.py", *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "layer": [row for name in a.shapes for row in bench_shape(name, device, dtype, a.warmup, a.iters,
                                                                   a.token_stride, seqs, omissions)],
    }
    text = json.dumps(report, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    else:
        print(text)
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
