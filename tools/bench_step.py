#!/usr/bin/env python
"""Benchmark whole training steps through the real engine: dense vs SAT vs a peer.

  python tools/bench_step.py --width 7b --layers 2 --seq 512 --ranks 2 --tp 2 \
      --ds-config configs/ds_zero3.json --omissions 0.3,0.3 0.5,0.5 --peer --out step.json

Each arm is launched with torchrun (gloo on CPU, NCCL on GPU) and builds its engine with
DeepSpeed exactly as training does:
  sat_dist  sat_dist's Llama through sat_dist.train.engine.build_engine; dense and every
            (attention, MLP) omission pair run in ONE process, alternating setting by
            setting each round (order reversed every other round), so the ratios are taken
            side by side under the same machine load.
  peer      Hugging Face transformers' LlamaForCausalLM (sdpa attention) under the same
            DeepSpeed config, data-parallel only (transformers has no Megatron TP).
Per setting it reports the median step time over the measured rounds and the spread,
tokens/s, the speedup over dense, the step's FLOP-ideal speedup (whole-model executed
FLOPs: projections, MLP, attention scores and the LM head, Megatron's accounting) and their
ratio, the peak memory per rank during that setting's steps (CPU: resident set sampled
every 2 ms; GPU: max allocated), and the time split into forward, backward and optimizer
step. One extra instrumented step per setting times the collectives (made blocking for
that step only) split into ZeRO (data-parallel) and tensor-parallel communication.

A benchmark, not a test: results go to docs/PERFORMANCE.md with device, date, commit and
command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WIDTHS = {
    "7b": dict(hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, num_query_groups=32),
    "13b": dict(hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40, num_query_groups=40),
    "70b-gqa": dict(hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, num_query_groups=8),
    "tiny": dict(hidden_size=256, ffn_hidden_size=768, num_attention_heads=4, num_query_groups=4),
    # the experiment's model (docs/EXPERIMENTS.md): use with --layers 30 --vocab 49152
    "smollm2-135m": dict(hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
                         tie_word_embeddings=True, rope_theta=100000.0),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", choices=sorted(WIDTHS), default="7b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=None, help="default: micro-batch x DP")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (CPU; default: cores / ranks)")
    p.add_argument("--ds-config", default=str(REPO / "configs" / "ds_zero3.json"))
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--recompute", action="store_true", help="--recompute-activations")
    p.add_argument("--omissions", nargs="*", default=["0.3,0.3", "0.5,0.5"],
                   help="settings attn,mlp[,wgrad[,head]]: attention and MLP omission rates, and the keep fractions "
                        "of the decoder's and the LM head's sampled weight gradients (--sat-wgrad-tokens, "
                        "--sat-wgrad-tokens-head; default 1: exact). Dense always runs")
    p.add_argument("--sat-wgrad-sampling", default=None, help="--sat-wgrad-sampling of sat_dist (pps, topk)")
    p.add_argument("--sat-granularity", default=None, help="--sat-granularity of sat_dist (step, micro-batch)")
    p.add_argument("--align-mlp", type=int, default=128)
    p.add_argument("--sat-metric", default=None, help="--sat-metric of sat_dist (default: the project's)")
    p.add_argument("--sat-selection", default=None, help="--sat-selection of sat_dist (default: the project's)")
    p.add_argument("--sat-compensation", default=None, help="--sat-compensation of sat_dist (none, mean)")
    p.add_argument("--sat-sparse-pass", default=None,
                   help="--sat-sparse-pass of sat_dist (both, backward, weight-grad)")
    p.add_argument("--sat-token-stride", type=int, default=None, help="--sat-token-stride of sat_dist")
    p.add_argument("--sat-comm-sparse", choices=["auto", "on", "off"], default="auto",
                   help="--sat-comm-sparse of sat_dist (comm-sparse ZeRO-3 for SAT's weights). auto decides once, "
                        "on the SAT config's own rates (0, 0.1), not on --omissions: give on or off to measure one")
    p.add_argument("--sat-omission-mlp-layers", default=None,
                   help="--sat-omission-mlp-layers of sat_dist: one MLP rate per layer; an --omissions MLP rate m "
                        "then runs every layer at its own rate times m / (the rates' mean), with the keep counts "
                        "of a ladder run (so m at the mean and at its rungs times the training's)")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds (one step per setting each)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    p.add_argument("--peer", action="store_true", help="also run transformers' LlamaForCausalLM")
    p.add_argument("--no-thp", action="store_true",
                   help="CPU: leave THP_MEM_ALLOC_ENABLE off (launch/pretrain.py turns it on)")
    p.add_argument("--no-sat-dist", action="store_true", help="run only the peer")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one step per setting (torch.profiler, rank 0): top N ops in the JSON")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--worker", choices=["sat_dist", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- driver

def main(argv=None) -> int:
    a = parse(argv)
    if a.worker:
        return worker(a)
    if a.ranks % a.tp:
        print(f"error: --tp {a.tp} does not divide --ranks {a.ranks}", file=sys.stderr)
        return 2
    import torch

    report = {"device": _device_name(), "date": time.strftime("%Y-%m-%d"), "commit": _commit(),
              "command": " ".join(["python", "tools/bench_step.py", *(argv if argv is not None else sys.argv[1:])]),
              "torch": torch.__version__, "config": {k: v for k, v in vars(a).items()
                                                     if k not in ("worker", "result", "out")}}
    arms = [] if a.no_sat_dist else ["sat_dist"]
    arms += ["peer"] if a.peer else []
    for arm in arms:
        report[arm] = launch(a, arm, argv if argv is not None else sys.argv[1:])
        if report[arm] is None:
            return 1
    if "sat_dist" in report and "peer" in report:
        ours = next(r for r in report["sat_dist"]["settings"] if r["omission"] == [0.0, 0.0])
        peer = report["peer"]["settings"][0]
        report["dense_vs_peer_tokens_per_s"] = round(ours["tokens_per_s"] / peer["tokens_per_s"], 3)
    text = json.dumps(report, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(summary(report))
    return 0


def launch(a, arm: str, argv: list[str]) -> dict | None:
    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "result.json"
        threads = a.threads or max(1, (os.cpu_count() or 1) // a.ranks)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        # launch/pretrain.py sets this for training (see there); both arms get the same.
        env["THP_MEM_ALLOC_ENABLE"] = "0" if a.no_thp else "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks),
               "--master-port", str(_free_port()), str(Path(__file__).resolve()), *argv,
               "--worker", arm, "--result", str(result)]
        r = subprocess.run(cmd, env=env, cwd=REPO)
        if r.returncode != 0 or not result.is_file():
            print(f"error: the {arm} arm failed (exit {r.returncode})", file=sys.stderr)
            return None
        return json.loads(result.read_text())


def summary(report: dict) -> str:
    lines = [f"{report['device']} | {report['date']} | {report['commit']} | {report['command']}",
             "| arm | omission attn,mlp | wgrad keep decoder,head | step s (median, min-max) | tokens/s | speedup "
             "| FLOP-ideal | of ideal "
             "| peak mem/rank GB | fwd / bwd / opt s | ZeRO / TP comm s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in ("sat_dist", "peer"):
        for r in report.get(arm, {}).get("settings", []):
            lo, hi = min(r["step_s"]), max(r["step_s"])
            lines.append(
                f"| {arm} | {r['omission'][0]},{r['omission'][1]} "
                f"| {r.get('wgrad_keep', 1.0):g},{r.get('wgrad_keep_head', 1.0):g} "
                f"| {r['median_step_s']:.2f} ({lo:.2f}-{hi:.2f}) "
                f"| {r['tokens_per_s']:.1f} | {r['speedup']:.3f} | {r['flop_ideal_speedup']:.3f} "
                f"| {r['fraction_of_ideal']:.3f} | {r['peak_memory_gb']:.2f} "
                f"| {r['forward_s']:.2f} / {r['backward_s']:.2f} / {r['optimizer_s']:.2f} "
                f"| {r['comm_zero_s']:.2f} / {r['comm_tp_s']:.2f} |")
    moved = any(sum(r.get("zero_bytes_per_rank", {}).values()) for arm in ("sat_dist", "peer")
                for r in report.get(arm, {}).get("settings", []))
    if not moved:  # one rank: nothing crosses the DP group
        return "\n".join(lines + _peer_line(report))
    lines += ["", "ZeRO bytes sent per rank per step, MB (ring accounting; the instrumented step):",
              "| arm | omission attn,mlp | forward gather | backward gather | gradient reduce | other "
              "(scoring, optimizer step) | total | of dense | ZeRO comm s, of dense |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in ("sat_dist", "peer"):
        rows = report.get(arm, {}).get("settings", [])
        dense_total = dense_comm = None
        for r in rows:
            b = r.get("zero_bytes_per_rank", {})
            fg, bg, gr = b.get("forward_gather", 0), b.get("backward_gather", 0), b.get("backward_reduce", 0)
            total = sum(b.values())
            other = total - fg - bg - gr
            if dense_total is None:
                dense_total, dense_comm = total or 1, r["comm_zero_s"] or 1.0
            lines.append(f"| {arm} | {r['omission'][0]},{r['omission'][1]} | {fg / 1e6:.0f} | {bg / 1e6:.0f} "
                         f"| {gr / 1e6:.0f} | {other / 1e6:.0f} | {total / 1e6:.0f} | {total / dense_total:.3f} "
                         f"| {r['comm_zero_s']:.2f}, {r['comm_zero_s'] / dense_comm:.3f} |")
    rows = [r for r in report.get("sat_dist", {}).get("settings", [])
            if r.get("sat_weight_bytes_per_rank") and any(r["sat_weight_bytes_per_rank"].values())]
    if rows:
        lines += ["", "SAT weights through comm-sparse ZeRO-3, MB per rank per step: measured (its own counters) "
                  "vs the arithmetic (sat_dist/parallel/zero_bytes.py; shares padded to the fullest rank's, "
                  "its expectation for a uniformly random choice of the kept units: a real selection's padding "
                  "differs by draw and by how its scores cluster):",
                  "| omission attn,mlp | forward gather | backward gather | gradient reduce | scoring |",
                  "| --- | --- | --- | --- | --- |"]
        for r in rows:
            got, model = r["sat_weight_bytes_per_rank"], r["bytes_model_per_rank"]
            cells = " | ".join(f"{got[k] / 1e6:.1f} vs {model[k] / 1e6:.1f}"
                               for k in ("forward_gather", "backward_gather", "grad_reduce", "scoring"))
            lines.append(f"| {r['omission'][0]},{r['omission'][1]} | {cells} |")
    return "\n".join(lines + _peer_line(report))


def _peer_line(report: dict) -> list[str]:
    if "dense_vs_peer_tokens_per_s" in report:
        return [f"sat_dist dense / peer tokens/s: {report['dense_vs_peer_tokens_per_s']}"]
    return []


# --------------------------------------------------------------------------- worker

def worker(a) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from sat_dist.config import ModelConfig, SATConfig
    from sat_dist.parallel.state import destroy_distributed, init_distributed
    from sat_dist.parallel.zero_bytes import step_bytes
    from sat_dist.train.arguments import TrainConfig
    from sat_dist.train.metrics import model_flops

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    comm = init_distributed(a.tp if a.worker == "sat_dist" else 1)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cfg = ModelConfig(**WIDTHS[a.width], num_layers=a.layers, vocab_size=a.vocab,
                      max_position_embeddings=max(a.seq, 4096), name=f"{a.width}-width").validate()
    t = TrainConfig(tensor_model_parallel_size=comm.tp_size, micro_batch_size=a.micro_batch,
                    global_batch_size=a.global_batch, seq_length=a.seq, train_iters=10**6, lr=1e-5,
                    min_lr=0.0, lr_warmup_iters=0, lr_decay_style="constant", bf16=a.dtype == "bf16",
                    recompute_activations=a.recompute, ds_config=a.ds_config,
                    sat_comm_sparse=a.sat_comm_sparse if a.worker == "sat_dist" else "off")
    if a.worker == "sat_dist":
        sat_kw = {k: v for k, v in (("granularity", a.sat_granularity), ("metric", a.sat_metric),
                                    ("wgrad_sampling", a.sat_wgrad_sampling),
                                    ("selection", a.sat_selection), ("compensation", a.sat_compensation),
                                    ("sparse_pass", a.sat_sparse_pass), ("token_stride", a.sat_token_stride))
                  if v}
        # per-layer rates: a ladder run's keep counts at the --omissions rates (the rungs')
        schedule = "ladder" if a.sat_omission_mlp_layers else "constant"
        sat_cfg = SATConfig(schedule=schedule, align_mlp=a.align_mlp, **sat_kw)
        sat_cfg = sat_cfg.with_mlp_layer_rates(a.sat_omission_mlp_layers or "").validate()
        from sat_dist.train.engine import build_engine

        eng = build_engine(cfg, sat_cfg, t, comm)
        engine, sat, ds = eng.engine, eng.sat, eng.ds_config
        settings = [(0.0, 0.0, 1.0, 1.0)] + [_setting(o) for o in a.omissions]
    else:
        engine, ds = build_peer(cfg, t, comm)
        sat, settings = None, [(0.0, 0.0, 1.0, 1.0)]
    accum = ds["gradient_accumulation_steps"]
    gbs = ds["train_batch_size"]
    gen = torch.Generator().manual_seed(1234 + comm.dp_rank)
    batches = [torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), generator=gen) for _ in range(accum)]
    tp_group = None
    if comm.tp_size > 1:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
    comm_timer = CommTimer(tp_group)
    mem = PeakMemory(dev)
    step = [0]

    def one_step(attn: float, mlp: float, wgrad: float = 1.0, head: float = 1.0, timed_comm: bool = False) -> dict:
        phases = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
        if sat is not None:  # this setting's sampled weight gradients (all layers read sat.cfg)
            sat.cfg = dataclasses.replace(sat_cfg, wgrad_tokens=wgrad, wgrad_tokens_head=head)
        if timed_comm:
            comm_timer.install()
        t_start = _now(dev)
        for micro, ids in enumerate(batches):
            if sat is not None:
                sat.set_step(step[0], micro, attn, mlp, wgrad=1.0)
            x, y = ids[:, :-1].to(dev), ids[:, 1:].to(dev)
            comm_timer.phase = "forward"
            t0 = _now(dev)
            if sat is not None:
                loss = engine(x, y).float().mean()
            else:
                loss = engine(input_ids=x, labels=x).loss  # transformers shifts the labels itself
            t1 = _now(dev)
            comm_timer.phase = "backward"
            engine.backward(loss)
            t2 = _now(dev)
            comm_timer.phase = "step"
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            t3 = _now(dev)
            phases["forward_s"] += t1 - t0
            phases["backward_s"] += t2 - t1
            phases["optimizer_s"] += t3 - t2
        phases["step_s"] = _now(dev) - t_start
        if timed_comm:
            phases.update(comm_timer.remove())
        step[0] += 1
        return phases

    rows = {s: {"times": [], "phases": [], "peak": 0.0} for s in settings}
    for rnd in range(a.warmup + a.rounds):
        order = settings if rnd % 2 == 0 else list(reversed(settings))
        for s in order:
            mem.reset()
            out = one_step(*s)
            rows[s]["peak"] = max(rows[s]["peak"], mem.peak())
            if rnd >= a.warmup:
                rows[s]["times"].append(out["step_s"])
                rows[s]["phases"].append(out)
    row_zero = eng.model.layers[0].mlp.row_zero if a.worker == "sat_dist" else None
    comm_split, row_bytes = {}, {}
    for s in settings:
        if row_zero is not None:
            row_zero.bytes_moved = {k: 0 for k in row_zero.bytes_moved}
        comm_split[s] = one_step(*s, timed_comm=True)
        row_bytes[s] = dict(row_zero.bytes_moved) if row_zero is not None else None
    profiles = {}
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        for s in settings:
            with profile(activities=acts) as prof:
                one_step(*s)
            sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            profiles[str(s)] = prof.key_averages().table(sort_by=sort, row_limit=a.profile).splitlines()
    mem.stop()
    kept = {}
    if sat is not None:
        for s in settings:
            sat.set_step(step[0], 0, *s[:2])
            with torch.no_grad():
                engine(batches[0][:, :-1].to(dev), batches[0][:, 1:].to(dev))
            kept[s] = _keep_fractions(sat, cfg.num_layers)
    # Each rank's numbers; the report takes the slowest rank's time and the largest memory.
    mine = {str(s): {"times": rows[s]["times"], "phases": rows[s]["phases"], "peak": rows[s]["peak"],
                     "comm": comm_split[s]} for s in settings}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        dense_flops = model_flops(cfg, gbs, a.seq)
        settings_out = []
        for s in settings:
            times = [max(r[str(s)]["times"][i] for r in everyone) for i in range(a.rounds)]
            med = statistics.median(times)
            ka, km = kept.get(s, (1.0, 1.0))
            executed = model_flops(cfg, gbs, a.seq, ka, km, a.sat_sparse_pass or "both", s[2], s[3])
            phase = {k: statistics.median(p[k] for p in everyone[0][str(s)]["phases"])
                     for k in ("forward_s", "backward_s", "optimizer_s")}
            c = everyone[0][str(s)]["comm"]
            elt = 2 if a.dtype == "bf16" else 4
            regather = row_zero is None or len(row_zero.keep_for_backward) < 4 * cfg.num_layers
            model = step_bytes(cfg, comm.dp_size, comm.tp_size, a.micro_batch * a.seq, accum, ka, km,
                               a.sat_token_stride or 8, w_bytes=elt, g_bytes=4, x_bytes=elt, regather=regather,
                               metric=a.sat_metric or SATConfig.metric)
            settings_out.append({"sat_weight_bytes_per_rank": row_bytes.get(s), "bytes_model_per_rank": model,
                                 "omission": list(s[:2]), "wgrad_keep": s[2], "wgrad_keep_head": s[3],
                                 "keep_fraction_attn": ka, "keep_fraction_mlp": km,
                                 "step_s": [round(x, 4) for x in times], "median_step_s": med,
                                 "tokens_per_s": gbs * a.seq / med, **phase,
                                 "comm_zero_s": c.get("zero", 0.0), "comm_tp_s": c.get("tp", 0.0),
                                 "zero_bytes_per_rank": c.get("bytes", {}),
                                 "instrumented_step_s": c["step_s"],
                                 "peak_memory_gb": max(r[str(s)]["peak"] for r in everyone) / 2**30,
                                 "dense_flops": dense_flops, "executed_flops": executed,
                                 "flop_ideal_speedup": dense_flops / executed,
                                 "profile_rank0": profiles.get(str(s), [])})
        dense_med = settings_out[0]["median_step_s"]
        for r in settings_out:
            r["speedup"] = dense_med / r["median_step_s"]
            r["fraction_of_ideal"] = r["speedup"] / r["flop_ideal_speedup"]
        Path(a.result).write_text(json.dumps({
            "arm": a.worker, "tp": comm.tp_size, "dp": comm.dp_size, "world": dist.get_world_size(),
            "threads_per_rank": torch.get_num_threads(), "global_batch": gbs, "grad_accum": accum,
            "zero_stage": ds.get("zero_optimization", {}).get("stage", 0), "settings": settings_out}, indent=2))
    dist.barrier()
    destroy_distributed()
    return 0


def build_peer(cfg, t, comm):
    """transformers' LlamaForCausalLM under DeepSpeed with the very config sat_dist uses."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from sat_dist.train.engine import deepspeed_config

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    ds = deepspeed_config(t, comm.dp_size)
    hf = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_query_groups, vocab_size=cfg.vocab_size,
                     max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
                     tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf._attn_implementation = "sdpa"
    torch.manual_seed(t.seed)
    stage3 = ds.get("zero_optimization", {}).get("stage", 0) == 3
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage3):
        model = LlamaForCausalLM(hf)
    model.config.use_cache = False
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds,
                                           dist_init_required=False)
    return engine, ds


def _setting(text: str) -> tuple[float, float, float, float]:
    """attn,mlp[,wgrad[,head]] -> (attn, mlp, wgrad keep, head keep)."""
    v = [float(x) for x in text.split(",")]
    if not 2 <= len(v) <= 4:
        raise SystemExit(f"error: --omissions {text!r}: give attn,mlp[,wgrad[,head]]")
    return tuple(v + [1.0] * (4 - len(v)))


def _keep_fractions(sat, layers: int) -> tuple[float, float]:
    out = []
    for kind in ("attn", "mlp"):
        ks = [sat.kept[(i, kind)] for i in range(layers)]
        out.append(sum(k / n for k, n in ks) / len(ks))
    return tuple(out)


def _now(dev) -> float:
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


class CommTimer:
    """Times every collective for one step: each call is made blocking (async handles are
    waited at once) and its wall time added to "tp" (the tensor-parallel group) or "zero"
    (anything else: DeepSpeed's data-parallel all-gathers, reduce-scatters, all-reduces)."""

    NAMES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "reduce_scatter",
             "broadcast", "all_reduce_coalesced", "_all_gather_base", "_reduce_scatter_base")

    def __init__(self, tp_group):
        self.tp_group = tp_group
        self.saved: list = []
        self.totals: dict = {}
        self.bytes: dict = {}
        self.phase = "forward"

    def _wrap(self, fn):
        name = getattr(fn, "__name__", "")

        def timed(*args, **kwargs):
            import torch.distributed as dist

            group = kwargs.get("group")
            if group is None or group is not self.tp_group:
                self._count(name, args, kwargs, dist.get_world_size(group))
            t0 = time.perf_counter()
            work = fn(*args, **kwargs)
            if kwargs.get("async_op", False) and work is not None:
                work.wait()
            if dist.get_backend() == "nccl":
                import torch

                torch.cuda.synchronize()
            key = "tp" if group is not None and group is self.tp_group else "zero"
            self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - t0
            return work
        return timed

    def _count(self, name: str, args, kwargs, world: int) -> None:
        """Bytes this rank sends in a ZeRO collective, as a ring algorithm moves them
        (all-gather and reduce-scatter: (q-1)/q of the whole buffer; all-reduce: twice that),
        by what it is for: gathers (all-gather, broadcast) and reduces, in forward, backward
        and the optimizer step."""
        import torch

        tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        tensors += [t for v in list(args) + list(kwargs.values()) if isinstance(v, (list, tuple))
                    for t in v if isinstance(t, torch.Tensor)]
        if not tensors or world <= 1:
            return
        big = max(t.numel() * t.element_size() for t in tensors)
        if "all_reduce" in name:
            kind, sent = "reduce", 2 * (world - 1) * big // world
        elif "reduce_scatter" in name:
            kind, sent = "reduce", (world - 1) * big // world
        elif "broadcast" in name:
            kind, sent = "gather", big
        else:  # all-gathers: the output is the whole buffer
            kind, sent = "gather", (world - 1) * big // world
        key = f"{self.phase}_{kind}"
        self.bytes[key] = self.bytes.get(key, 0) + sent

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.totals = {}
        self.bytes = {}
        try:
            # DeepSpeed's backend keeps its own references to the all-gather and
            # reduce-scatter functions; the module attributes below do not reach those.
            from deepspeed.comm import comm as ds_comm

            if ds_comm.cdb is not None:
                for attr in ("all_gather_function", "reduce_scatter_function"):
                    fn = getattr(ds_comm.cdb, attr, None)
                    if fn is not None:
                        self.saved.append((ds_comm.cdb, attr, fn))
                        setattr(ds_comm.cdb, attr, self._wrap(fn))
        except ImportError:
            pass
        for mod in (dist, c10d):
            for name in self.NAMES:
                fn = getattr(mod, name, None)
                if fn is not None:
                    self.saved.append((mod, name, fn))
                    setattr(mod, name, self._wrap(fn))

    def remove(self) -> dict:
        for obj, name, fn in reversed(self.saved):
            setattr(obj, name, fn)
        self.saved = []
        return dict(self.totals, bytes=dict(self.bytes))


class PeakMemory:
    """Peak memory of this rank since the last reset: GPU max allocated, or on CPU the
    resident set size sampled every 2 ms from /proc (ru_maxrss cannot be reset)."""

    def __init__(self, dev):
        self.dev = dev
        self._peak = 0
        self._stop = threading.Event()
        if dev.type != "cuda":
            self._page = os.sysconf("SC_PAGE_SIZE")
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.002)

    def reset(self) -> None:
        if self.dev.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self._peak = self._rss()

    def peak(self) -> float:
        if self.dev.type == "cuda":
            import torch

            return float(torch.cuda.max_memory_allocated())
        return float(max(self._peak, self._rss()))

    def stop(self) -> None:
        self._stop.set()


def _device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores"


def _commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO).stdout.strip()
        return r.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
