#!/usr/bin/env python
"""Calibrate sampled weight gradients (--sat-wgrad-tokens) on a pretrained model: each
product's relative variance at every keep fraction, and where a FLOP budget should go.

On a few micro-batches of training data (one process, TP 1, float32), every decoder
linear's (and the LM head's) backward records its tokens' scores ||dy_t|| ||x_t|| and its
exact weight gradient G. For a keep fraction k the relative variance of the pps estimate,
E||G_hat - G||^2 / ||G||^2, is then sum_t (1 - p_t) / p_t * score_t^2 / ||G||^2 with p_t
the capped probabilities of k (independent draws; the systematic draw training uses is
not worse, tests/test_wgrad_tokens.py). It prints the curves (mean over the products of a
kind and layer band) and, for each --propose MEAN, the per-product keep fractions whose
FLOP-weighted mean is MEAN with the least summed variance (sat_dist.sat.wgrad_allocation),
as the flags to pass:

    python tools/wgrad_calibrate.py --hf-checkpoint DIR --data TRAIN_PREFIX --batches 2 \\
        --propose 0.25 0.1 [--head] [--out calibration.json]

--head lets the LM head's keep be chosen too (its FLOPs join the budget); without it the
head stays exact. The "gap" column is what --sat-budget measures at a uniform keep: the
mean of the products' relative variances.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sat_fidelity import batches  # noqa: E402

from sat_dist.checkpoint.hf import load_hf_checkpoint, shard_hf_state_dict  # noqa: E402
from sat_dist.config import SATConfig  # noqa: E402
from sat_dist.errors import SatDistError  # noqa: E402
from sat_dist.model.llama import LlamaModel  # noqa: E402
from sat_dist.model.sat_state import PRODUCTS, SATState  # noqa: E402
from sat_dist.sat.token_sampling import keep_tokens, poisson_variance  # noqa: E402
from sat_dist.sat.wgrad_allocation import allocate_keeps  # noqa: E402
from sat_dist.train.metrics import product_flops  # noqa: E402

GRID = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)


class Recorder:
    """Stands in for a TokenSampler: records the product's token scores and ||G||^2, and
    returns the operands whole (the backward stays exact)."""

    def __init__(self, out: dict, name: tuple):
        self.out, self.name = out, name

    def operands(self, x, dy):
        scores = (x.double().pow(2).sum(-1) * dy.double().pow(2).sum(-1)).sqrt()
        self.out.setdefault(self.name, []).append((scores, float((dy.t().double() @ x.double()).pow(2).sum())))
        return x, dy


def curves_of(records: dict, grid) -> dict:
    """(layer, product) -> [relative variance at each keep of `grid`], averaged over the
    recorded micro-batches."""
    out = {}
    for name, batches_ in records.items():
        T = batches_[0][0].numel()
        out[name] = [sum(float(poisson_variance(s, keep_tokens(T, k))) / g for s, g in batches_) / len(batches_)
                     for k in grid]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-checkpoint", required=True)
    p.add_argument("--data", required=True, help="a training data prefix (not the sets you evaluate on)")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--propose", nargs="*", type=float, default=[], metavar="MEAN",
                   help="FLOP-weighted mean keep fractions to allocate")
    p.add_argument("--head", action="store_true", help="allocate the LM head's keep too")
    p.add_argument("--out", help="write the curves and proposals as JSON here")
    a = p.parse_args(argv)
    try:
        for m in a.propose:
            if not 0 < m <= 1:
                raise SatDistError(f"--propose {m}: a keep fraction in (0, 1]")
        model_cfg, sd = load_hf_checkpoint(a.hf_checkpoint)
        data = batches(a.data, a.batches, a.micro_batch_size, a.seq_length, a.seed)
    except SatDistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = SATState(SATConfig(schedule="constant", omission_mlp=0.0, wgrad_tokens=0.5))
    model = LlamaModel(model_cfg, state).float()
    model.load_state_dict(shard_hf_state_dict(sd, model_cfg, 1, 0))
    records: dict = {}
    state.wgrad_sampler = lambda layer, product, sharded: Recorder(records, (layer, product))
    for step, (ids, labels) in enumerate(data):
        state.set_step(step, 0, 0.0, 0.0, wgrad=1.0)
        model.zero_grad(set_to_none=True)
        model(ids, labels).float().mean().backward()
    L = model_cfg.num_layers
    names = [(layer, prod) for layer in range(L) for prod in PRODUCTS] + ([(L, "head")] if a.head else [])
    curves = curves_of(records, GRID)
    flops = product_flops(model_cfg)
    flops["head"] = model_cfg.hidden_size * model_cfg.vocab_size
    costs = [flops[prod] for _, prod in names]
    gi = {k: i for i, k in enumerate(GRID)}
    print("| keep | gap (mean over products) | " + " | ".join(PRODUCTS) + " | head |")
    print("|---|---|" + "---|" * (len(PRODUCTS) + 1))
    for k in (0.5, 0.25, 0.1, 0.05):
        dec = [curves[(layer, prod)][gi[k]] for layer in range(L) for prod in PRODUCTS]
        per = [sum(curves[(layer, prod)][gi[k]] for layer in range(L)) / L for prod in PRODUCTS]
        print(f"| {k} | {sum(dec) / len(dec):.3f} | " + " | ".join(f"{v:.3f}" for v in per)
              + f" | {curves[(L, 'head')][gi[k]]:.3f} |")
    report = {"grid": GRID, "curves": {f"{layer}/{prod}": v for (layer, prod), v in curves.items()}, "proposals": {}}
    for mean in a.propose:
        keeps = allocate_keeps([curves[n] for n in names], GRID, costs, mean)
        chosen = dict(zip(names, keeps))
        linears = ",".join(f"{chosen[(layer, prod)]:g}" for layer in range(L) for prod in PRODUCTS)
        head = chosen.get((L, "head"), 1.0)
        total = sum(curves[n][gi[chosen[n]]] for n in names) / len(names)
        uniform = sum(curves[n][gi[mean]] if mean in gi else float("nan") for n in names) / len(names)
        print(f"\npropose {mean:g}: mean relative variance {total:.3f} (uniform {mean:g}: {uniform:.3f})\n"
              f"  --sat-wgrad-tokens-linears {linears}" + (f" --sat-wgrad-tokens-head {head:g}" if a.head else ""))
        report["proposals"][str(mean)] = {"linears": linears, "head": head, "mean_variance": total,
                                          "uniform_variance": uniform}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
