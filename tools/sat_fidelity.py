#!/usr/bin/env python
"""How much SAT's sparse forward changes a pretrained model: the loss of the model with
the units SAT would omit left out, against the dense loss, on the same batches.

Before a continual pre-training run, this tells which metric, selection, unit kind and
rate keep the model's function: every sparse step trains that sparse function, so a
setting that moves the loss by more than the run will gain can not end close to dense
(docs/EXPERIMENTS.md). Forward passes only, one process, TP=1, float32, on the GPU if
there is one.

    python tools/sat_fidelity.py --hf-checkpoint DIR --data NAME=PREFIX [NAME=PREFIX ...] \\
        --setting metric=maxip,selection=sampling,attn=0.3,mlp=0.3 \\
        --setting metric=activation,selection=topk,attn=0,mlp=0.3 ...

A setting is comma-separated key=value pairs: metric, selection, temperature, attn, mlp
(omission rates), stride (--sat-token-stride), align (--sat-align-mlp), comp
(--sat-compensation), pass (--sat-sparse-pass); unset keys take the project's defaults. Batches:
--batches micro-batches of --micro-batch-size x --seq-length tokens from random offsets
(seeded) of each dataset; each micro-batch selects afresh, as a training step does. Prints
a Markdown table of the mean loss per dataset and its increase over dense. --gradients
adds, per dataset, how far the setting's gradient (all parameters, one backward per micro-
batch) is from the dense gradient on the same batch: its cosine similarity and relative
error ||g - g_dense|| / ||g_dense||. That is the measure for --sat-sparse-pass backward,
whose forward (and so its loss increase) is exactly dense's. --draws D makes D backwards per
batch, each selecting afresh, and adds the relative error of their mean: what a random
selection's error keeps once optimizer steps have averaged its noise (its bias).

Uneven rates per layer (--sat-omission-mlp-layers): `layers=R0:R1:...` in a setting gives
one MLP rate per layer (its mean is the headline rate). --per-layer RATES measures every
layer alone: the loss increase with only that layer's MLP sparse at each rate, the first
--setting giving the metric, selection and stride. Run it on training data, not on the sets
you will evaluate on. --propose MEAN [MEAN ...] then picks the rate of every layer that
keeps the summed increase least at that mean (the same FLOPs as the mean everywhere:
sat_dist.sat.layer_rates), prints the flags, and measures the proposal against the uniform
rate jointly (the sum assumes the layers' increases add up; the joint row checks it).

    python tools/sat_fidelity.py --hf-checkpoint DIR --data new=TRAIN_PREFIX --batches 1 \\
        --setting metric=activation,selection=topk,stride=1 --per-layer 0.333,0.5,0.667,0.833 --propose 0.333 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from sat_dist.checkpoint.hf import load_hf_checkpoint, shard_hf_state_dict  # noqa: E402
from sat_dist.config import SATConfig  # noqa: E402
from sat_dist.data.indexed import IndexedDatasetReader  # noqa: E402
from sat_dist.errors import SatDistError  # noqa: E402
from sat_dist.model.llama import LlamaModel  # noqa: E402
from sat_dist.model.sat_state import SATState  # noqa: E402
from sat_dist.sat.layer_rates import allocate_layer_rates  # noqa: E402
from sat_dist.sat.selection import layer_keep_count  # noqa: E402

KEYS = {"metric": ("metric", str), "selection": ("selection", str), "temperature": ("temperature", float),
        "floor": ("pps_floor", float),
        "attn": ("omission_attn", float), "mlp": ("omission_mlp", float), "stride": ("token_stride", int),
        "align": ("align_mlp", int), "comp": ("compensation", str), "pass": ("sparse_pass", str),
        "layers": ("omission_mlp_layers", str)}


def parse_setting(text: str) -> SATConfig:
    values = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in KEYS:
            raise SatDistError(f"--setting {text!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(KEYS)}")
        field, kind = KEYS[key.strip()]
        try:
            values[field] = kind(value.strip())
        except ValueError:
            raise SatDistError(f"--setting {text!r}: {key}={value!r} is not a {kind.__name__}")
    layers = values.pop("omission_mlp_layers", "").replace(":", ",")  # layers=0:0.5 (a comma separates keys)
    cfg = SATConfig(schedule="constant").with_mlp_layer_rates(layers)  # the headline rate: their mean
    cfg = dataclasses.replace(cfg, **values)  # unless mlp= sets it
    cfg.validate()
    return cfg


def batches(prefix: str, n: int, mbs: int, seq: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = IndexedDatasetReader(prefix)
    if ds.num_tokens <= seq + 1:
        raise SatDistError(f"{prefix}: {ds.num_tokens} tokens, fewer than one sample of --seq-length {seq}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        offs = rng.integers(0, ds.num_tokens - seq - 1, mbs)
        t = torch.from_numpy(np.stack([ds.tokens[o:o + seq + 1].astype(np.int64) for o in offs]))
        out.append((t[:, :-1], t[:, 1:]))
    return out


@torch.no_grad()
def mean_loss(model: LlamaModel, state: SATState, cfg: SATConfig | None, data) -> float:
    state.cfg = cfg
    state._made.clear()
    losses = []
    for step, (ids, labels) in enumerate(data):
        if cfg is not None:
            state.set_step(step, 0, attn=cfg.omission_attn, mlp=cfg.omission_mlp)
        losses.append(model(ids, labels).float().mean())
    return float(torch.stack(losses).mean())


def gradient(model: LlamaModel, state: SATState, cfg: SATConfig | None, step: int, ids, labels) -> torch.Tensor:
    """The flattened gradient of the mean loss of one micro-batch, all parameters."""
    state.cfg = cfg
    state._made.clear()
    if cfg is not None:
        state.set_step(step, 0, attn=cfg.omission_attn, mlp=cfg.omission_mlp)
    model.zero_grad(set_to_none=True)
    model(ids, labels).float().mean().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def gradient_distance(model: LlamaModel, state: SATState, cfg: SATConfig, data, dense_grads,
                      draws: int = 1) -> tuple[float, float, float]:
    """(mean cosine similarity, mean relative error, mean relative error of the mean of
    `draws` gradients) of the setting's gradients against dense's. Each draw selects afresh
    (another step's generator): for a deterministic selection the last equals the second; for
    an unbiased one (pps) it falls like 1/sqrt(draws), what is left being the bias."""
    cos, rel, rel_mean = [], [], []
    for step, ((ids, labels), g_dense) in enumerate(zip(data, dense_grads)):
        total = None
        for d in range(draws):
            g = gradient(model, state, cfg, step * draws + d, ids, labels)
            cos.append(float(torch.nn.functional.cosine_similarity(g, g_dense, dim=0)))
            rel.append(float((g - g_dense).norm() / g_dense.norm()))
            total = g if total is None else total + g
        rel_mean.append(float((total / draws - g_dense).norm() / g_dense.norm()))
    return sum(cos) / len(cos), sum(rel) / len(rel), sum(rel_mean) / len(rel_mean)


def parse_rates(text: str, flag: str) -> list[float]:
    try:
        rates = [float(v) for v in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(0.0 < r < 1.0 for r in rates):
        raise SatDistError(f"{flag}: got {text!r}; allowed: comma-separated rates in (0, 1), e.g. 0.333,0.5,0.667")
    return rates


def with_layer_rates(base: SATConfig, rates: list[float]) -> SATConfig:
    """`base` with one MLP rate per layer (the headline rate their mean)."""
    return base.with_mlp_layer_rates(",".join(f"{r:.6g}" for r in rates)).validate()


def effective_mlp_omission(cfg: SATConfig, ffn: int, layers: int) -> float:
    """The mean fraction of MLP channels really omitted at the setting's full rate, after the
    keep counts' alignment (what the FLOPs follow)."""
    kept = [layer_keep_count(ffn, cfg.omission_mlp, cfg.align_mlp, cfg, "mlp", i) for i in range(layers)]
    return 1.0 - sum(kept) / (ffn * layers)


def per_layer(model, state, base: SATConfig, sets, dense, rates, proposals, n_layers, ffn) -> None:
    """--per-layer: each layer alone at each rate, then the proposals (see the docstring)."""
    base = dataclasses.replace(base, omission_mlp_layers="", omission_mlp=0.0)

    def increase(cfg: SATConfig) -> float:  # mean over the data sets
        return sum(mean_loss(model, state, cfg, data) - dense[n] for n, data in sets.items()) / len(sets)

    print("| layer | " + " | ".join(f"MLP {r:g} alone" for r in rates) + " |\n|" + "---|" * (len(rates) + 1),
          flush=True)
    costs = []
    for layer in range(n_layers):
        costs.append([increase(with_layer_rates(base, [r if i == layer else 0.0 for i in range(n_layers)]))
                      for r in rates])
        print(f"| {layer} | " + " | ".join(f"{c:+.6f}" for c in costs[-1]) + " |", flush=True)
    print("\n| rates | mean (effective) | summed per-layer increase | measured increase |\n|---|---|---|---|")
    for mean in proposals:
        chosen = list(allocate_layer_rates(costs, rates, mean))
        uneven = with_layer_rates(base, chosen)
        uniform = dataclasses.replace(base, omission_mlp=mean).validate()
        summed = sum(costs[i][rates.index(r)] for i, r in enumerate(chosen) if r)
        for what, cfg, pred in (("uniform", uniform, None), ("per layer", uneven, summed)):
            eff = effective_mlp_omission(cfg, ffn, n_layers)
            print(f"| {what} {mean:g} | {cfg.omission_mlp:.4f} ({eff:.4f}) | "
                  f"{'' if pred is None else f'{pred:+.4f}'} | {increase(cfg):+.4f} |", flush=True)
        print(f"\n  flags for {mean:g}: --sat-omission-mlp {uneven.omission_mlp:.6g} "
              f"--sat-omission-mlp-layers {uneven.omission_mlp_layers}\n", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-checkpoint", required=True)
    p.add_argument("--data", nargs="+", required=True, metavar="NAME=PREFIX")
    p.add_argument("--setting", action="append", required=True, help="KEY=VALUE,... (repeatable)")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gradients", action="store_true",
                   help="also compare each setting's gradient with the dense gradient (one backward per batch)")
    p.add_argument("--draws", type=int, default=1,
                   help="with --gradients: backwards per batch, each selecting afresh; adds the relative "
                        "error of their mean (the bias, once the draws average the noise out)")
    p.add_argument("--per-layer", metavar="RATES",
                   help="measure each layer's MLP alone at these comma-separated rates (base: the first --setting)")
    p.add_argument("--propose", nargs="+", type=float, default=[], metavar="MEAN",
                   help="with --per-layer: per-layer rates of least summed increase at each mean rate")
    a = p.parse_args(argv)
    try:
        if a.draws < 1:
            raise SatDistError(f"--draws: got {a.draws}; allowed: an integer >= 1")
        settings = [(s, parse_setting(s)) for s in a.setting]
        layer_grid = parse_rates(a.per_layer, "--per-layer") if a.per_layer else None
        if a.propose and layer_grid is None:
            raise SatDistError("--propose needs --per-layer RATES (the rates each layer may take)")
        bad = [m for m in a.propose if not 0.0 <= m <= max(layer_grid or [0.0])]
        if bad:
            raise SatDistError(f"--propose: got {bad[0]:g}; allowed: a mean in [0, {max(layer_grid):g}] "
                               f"(the highest --per-layer rate)")
        sets = {}
        for entry in a.data:
            name, sep, prefix = entry.partition("=")
            if not sep or not name or not prefix:
                raise SatDistError(f"--data {entry!r}: expected NAME=PREFIX")
            sets[name] = batches(prefix, a.batches, a.micro_batch_size, a.seq_length, a.seed + len(sets))
        model_cfg, sd = load_hf_checkpoint(a.hf_checkpoint)
        for text, cfg in settings:
            if cfg.mlp_layer_rates is not None and len(cfg.mlp_layer_rates) != model_cfg.num_layers:
                raise SatDistError(f"--setting {text!r}: {len(cfg.mlp_layer_rates)} layer rates for a model of "
                                   f"{model_cfg.num_layers} layers")
        align = max(s.align_mlp for _, s in settings)
        state = SATState(dataclasses.replace(SATConfig(), align_mlp=align))
        model = LlamaModel(model_cfg, state).float().eval()
        model.load_state_dict(shard_hf_state_dict(sd, model_cfg, 1, 0))
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        model.to(dev)
        sets = {n: [(ids.to(dev), lab.to(dev)) for ids, lab in data] for n, data in sets.items()}
    except SatDistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dense = {name: mean_loss(model, state, None, data) for name, data in sets.items()}
    if layer_grid is not None:
        print("dense loss: " + ", ".join(f"{n} {v:.4f}" for n, v in dense.items()), flush=True)
        per_layer(model, state, settings[0][1], sets, dense, layer_grid, a.propose, model_cfg.num_layers,
                  model_cfg.ffn_hidden_size)
        return 0
    head = ["setting"] + [f"{n} loss (dense {dense[n]:.4f})" for n in sets] + [f"{n} increase" for n in sets]
    if a.gradients:
        dense_grads = {n: [gradient(model, state, None, i, ids, lab) for i, (ids, lab) in enumerate(data)]
                       for n, data in sets.items()}
        head += [f"{n} gradient cosine, rel. error" for n in sets]
        if a.draws > 1:
            head += [f"{n} rel. error of the mean of {a.draws}" for n in sets]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    for text, cfg in settings:
        sparse = {name: mean_loss(model, state, cfg, data) for name, data in sets.items()}
        row = [text] + [f"{sparse[n]:.6f}" for n in sets] + [f"{sparse[n] - dense[n]:+.4f}" for n in sets]
        if a.gradients:
            means = []
            for n, data in sets.items():
                c, r, rm = gradient_distance(model, state, cfg, data, dense_grads[n], a.draws)
                row.append(f"{c:.4f}, {r:.3f}")
                means.append(f"{rm:.3f}")
            row += means if a.draws > 1 else []
        print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
