#!/usr/bin/env python
"""Run the arms of the dense-vs-SAT continual pre-training experiment (docs/EXPERIMENTS.md).

Every arm continues SmolLM2-135M (made by tools/setup_cpt_experiment.py) on the new domain
with the same initial weights, seed, data order, batch and LR schedule; only the SAT flags
differ (and, for the equal-wall-clock arm, the number of steps). Both held-out sets are
logged during training as named validation sets (`lm loss validation/new`, `.../old`), on
the same held-out samples in every arm.

    python tools/cpt_experiment.py list
    python tools/cpt_experiment.py run dense sat-default ...   # in order; resumable
    python tools/cpt_experiment.py run --all
    python tools/cpt_experiment.py run dense:x4 ...     # 4x the steps, same LR/SAT schedule shape

An arm writes OUT/runs/ARM/{train.log, tensorboard/, checkpoints/} and, when it has
finished, OUT/runs/ARM/done. Running an arm again resumes from its last checkpoint (runs
may span sessions); a finished arm is skipped. Plot and table: tools/plot_runs.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# 40 steps x 4 x 512 tokens = 81,920 tokens (2.5% of new_train): a dense arm takes about
# 11 minutes of training on 2 CPU cores, plus 80 s per evaluation (8 micro-batches of each
# held-out set; the same samples in every arm).
ITERS = 40
COMMON = [
    "--ds_config", "configs/ds_zero3.json",
    "--seq-length", "512", "--micro-batch-size", "4", "--global-batch-size", "4",
    "--lr", "1e-4", "--min-lr", "1e-5", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
    "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234",
    "--eval-interval", "20", "--eval-iters", "8", "--log-interval", "1", "--save-interval", "20",
]

def sat(metric: str, selection: str, attn: str, mlp: str, *more: str) -> list[str]:
    """A ladder arm's flags (every SAT flag spelled out, whatever the project's defaults)."""
    return ["--sat-schedule", "ladder", "--sat-metric", metric, "--sat-selection", selection,
            "--sat-omission-attn", attn, "--sat-omission-mlp", mlp, *more]


def wg(keep: str, *more: str) -> list[str]:
    """A sampled-weight-gradient arm's flags (issue [O]): no unit omitted, every decoder linear's weight
    gradient from `keep` of each micro-batch's tokens, every step (constant schedule, no dense end)."""
    return ["--sat-schedule", "constant", "--sat-omission-attn", "0", "--sat-omission-mlp", "0",
            "--sat-wgrad-tokens", keep, *more]


# tools/wgrad_calibrate.py --hf-checkpoint runs/cpt_setup/smollm2-135m --data runs/cpt_setup/data/new_train
#   --batches 2 --propose 0.25 0.1 --head (docs/experiments/wgrad_calibration.json)
CAL_025 = ("0.15,0.4,0.2,0.3,0.15,0.4,0.2,0.25,0.15,0.4,0.2,0.1,0.15,0.4,0.2,0.3,0.15,0.5,0.2,"
           "0.3,0.2,0.5,0.25,0.3,0.25,0.5,0.25,0.4,0.2,0.5,0.25,0.4,0.25,0.5,0.3,0.4,0.3,0.5,"
           "0.3,0.2,0.4,0.5,0.3,0.4,0.3,0.5,0.3,0.05,0.3,0.5,0.3,0.4,0.4,0.5,0.25,0.4,0.3,"
           "0.5,0.25,0.4,0.3,0.5,0.25,0.4,0.3,0.5,0.25,0.4,0.3,0.5,0.25,0.4,0.3,0.5,0.25,0.4,"
           "0.3,0.5,0.2,0.3,0.3,0.4,0.25,0.4,0.3,0.5,0.25,0.4,0.4,0.5,0.25,0.4,0.4,0.5,0.25,"
           "0.3,0.3,0.5,0.25,0.3,0.3,0.5,0.25,0.3,0.3,0.5,0.25,0.3,0.3,0.5,0.25,0.4,0.4,0.5,"
           "0.25,0.25,0.4,0.5,0.3,0.4")
CAL_01 = ("0.05,0.15,0.07,0.1,0.07,0.15,0.07,0.1,0.07,0.2,0.1,0.05,0.07,0.2,0.1,0.15,0.07,0.2,"
           "0.1,0.15,0.07,0.2,0.1,0.15,0.1,0.2,0.1,0.15,0.07,0.2,0.1,0.15,0.1,0.2,0.1,0.15,"
           "0.1,0.25,0.1,0.1,0.15,0.2,0.1,0.15,0.15,0.2,0.1,0.02,0.1,0.2,0.1,0.15,0.15,0.25,"
           "0.1,0.15,0.15,0.2,0.1,0.15,0.1,0.2,0.1,0.15,0.15,0.2,0.1,0.15,0.1,0.2,0.1,0.15,"
           "0.15,0.2,0.1,0.15,0.1,0.2,0.07,0.1,0.1,0.2,0.1,0.15,0.1,0.2,0.1,0.15,0.15,0.2,0.1,"
           "0.15,0.15,0.2,0.1,0.15,0.15,0.2,0.1,0.15,0.15,0.2,0.1,0.15,0.15,0.2,0.1,0.15,0.1,"
           "0.2,0.1,0.15,0.15,0.2,0.1,0.1,0.15,0.2,0.1,0.15")

LAYERS_033 = ("0,0,0,0,0.333333,0.666667,0.333333,0.333333,0,0.333333,0.5,0.333333,0.666667,0.5,0.333333,"
              "0.333333,0.333333,0.5,0.5,0.333333,0.5,0.5,0.333333,0.333333,0.5,0.5,0.333333,0.333333,0.333333,0")
"""--sat-omission-mlp-layers of the layers-0.33 arm (SmolLM2-135M's 30 layers, mean 1/3)."""

# name -> (what it tests, extra flags). Flags not given take the project's defaults.
ARMS: dict[str, tuple[str, list[str]]] = {
    "base": ("the starting model, evaluated only (--skip-train): the curves' point at 0 tokens",
             ["--skip-train", "--sat-schedule", "dense"]),
    "dense": ("dense continual pre-training (SAT off)", ["--sat-schedule", "dense"]),
    "sat-paper": ("the paper's reading before this experiment: maxip, sampling T=0.05, "
                  "omission 0.3/0.3, ladder 0.6/3 rungs/0.1", sat("maxip", "sampling", "0.3", "0.3")),
    "mlp-only": ("as sat-paper, attention dense", sat("maxip", "sampling", "0", "0.3")),
    "mlp-only-topk": ("as mlp-only, top-k selection", sat("maxip", "topk", "0", "0.3")),
    "mlp-act": ("MLP only, activation metric, top-k, omission 0.3", sat("activation", "topk", "0", "0.3")),
    "mlp-act-0.2": ("MLP only, activation metric, top-k, omission 0.2", sat("activation", "topk", "0", "0.2")),
    "mlp-act-0.1": ("MLP only, activation metric, top-k, omission 0.1", sat("activation", "topk", "0", "0.1")),
    "mlp-act-0.2-long-dense": ("as mlp-act-0.2 with a longer ladder: sparse 0.4, 4 rungs, dense 0.3",
                               sat("activation", "topk", "0", "0.2", "--sat-sparse-fraction", "0.4",
                                   "--sat-ladder-steps", "4", "--sat-dense-fraction", "0.3")),
    "mlp-act-0.2-stride1": ("as mlp-act-0.2, scores from every token (--sat-token-stride 1)",
                            sat("activation", "topk", "0", "0.2", "--sat-token-stride", "1")),
    "mlp-act-micro": ("as mlp-act, selection per micro-batch (micro-batch 1, 4 per step)",
                      sat("activation", "topk", "0", "0.3", "--sat-granularity", "micro-batch",
                          "--micro-batch-size", "1")),
    # SAT that pays (issue [K]): the levers at MLP rates >= 0.3. Backward-only arms score every
    # token (stride 1): the dense forward has all the activations already.
    "bwd-0.5": ("MLP 0.5 in the backward only (dense forward), activation metric from every token, top-k",
                sat("activation", "topk", "0", "0.5", "--sat-sparse-pass", "backward", "--sat-token-stride", "1")),
    "bwd-0.75": ("MLP 0.75 in the backward only (dense forward), activation metric from every token, top-k",
                 sat("activation", "topk", "0", "0.75", "--sat-sparse-pass", "backward", "--sat-token-stride", "1")),
    "bwd-0.75-pps": ("as bwd-0.75, channels drawn with probability proportional to their score and "
                     "their gradient weighted by 1/pi (an unbiased sparse backward)",
                     sat("activation", "pps", "0", "0.75", "--sat-sparse-pass", "backward", "--sat-token-stride", "1")),
    "wgrad-0.9": ("MLP 0.9 in the weight gradients only (dense forward and input gradient), activation "
                  "metric from every token, top-k",
                  sat("activation", "topk", "0", "0.9", "--sat-sparse-pass", "weight-grad", "--sat-token-stride", "1")),
    # Uneven rates per layer at the FLOPs of 0.333 everywhere: proposed by tools/sat_fidelity.py
    # --per-layer 0.3333333,0.5,0.6666667,0.8333333 --propose 0.3333333 on one batch of each
    # domain's training data (docs/EXPERIMENTS.md); layers 0-3 and 29 stay dense.
    "layers-0.33": ("MLP 0.333 in both passes on average, per-layer rates calibrated on the starting model, "
                    "activation metric, top-k",
                    sat("activation", "topk", "0", "0.333333", "--sat-omission-mlp-layers", LAYERS_033)),
    "layers-0.33-comp": ("as layers-0.33, fluctuation metric and the omitted channels' means added back",
                         sat("fluctuation", "topk", "0", "0.333333", "--sat-omission-mlp-layers", LAYERS_033,
                             "--sat-compensation", "mean")),
    "comp-0.3": ("MLP 0.3 in both passes, fluctuation metric, omitted channels' means added back, top-k",
                 sat("fluctuation", "topk", "0", "0.3", "--sat-compensation", "mean")),
    # Replay (issue [H]), run after the LR schedule took Megatron's definition (step 0 at the
    # warmup's start): dense-h is the dense arm again at that code, the reference of the two
    # replay arms. "sat-default" takes the project's SAT defaults.
    "dense-h": ("dense, at the code of the replay arms", ["--sat-schedule", "dense"]),
    "dense-replay": ("dense, 10% of each batch replayed from the old domain (--data-path 0.9 new 0.1 old)",
                     ["--sat-schedule", "dense"]),
    "sat-replay": ("the project's SAT defaults, with 10% replay", []),
    # Sparse training that pays (issue [O]): exact forward and input gradients, weight gradients
    # from a sample of the tokens (pps: probability proportional to ||dy_t|| ||x_t||, weighted 1/p).
    "wg-0.5": ("every decoder linear's weight gradient from half of the tokens (pps, unbiased)", wg("0.5")),
    "wg-0.25": ("every decoder linear's weight gradient from a quarter of the tokens (pps, unbiased)", wg("0.25")),
    "wg-0.1": ("every decoder linear's weight gradient from a tenth of the tokens (pps, unbiased)", wg("0.1")),
    "wg-0.25-topk": ("as wg-0.25, the quarter with the largest ||dy_t|| ||x_t||, unweighted (biased)",
                     wg("0.25", "--sat-wgrad-sampling", "topk")),
    "wg-0.25-head": ("as wg-0.25, the LM head's weight gradient from a quarter of the tokens too",
                     wg("0.25", "--sat-wgrad-tokens-head", "0.25")),
    "wg-0.1-head": ("as wg-0.1, the LM head's weight gradient from a tenth of the tokens too",
                    wg("0.1", "--sat-wgrad-tokens-head", "0.1")),
    "wg-0.25-mlp0.1": ("as wg-0.25-head, with the project's MLP omission (activation, top-k, 0.1, ladder)",
                       ["--sat-schedule", "ladder", "--sat-metric", "activation", "--sat-selection", "topk",
                        "--sat-omission-attn", "0", "--sat-omission-mlp", "0.1", "--sat-wgrad-tokens", "0.25",
                        "--sat-wgrad-tokens-head", "0.25"]),
    "wg-cal-0.25": ("per-product keep fractions calibrated on the starting model at the FLOPs of wg-0.25-head "
                    "(tools/wgrad_calibrate.py --propose 0.25 --head)",
                    wg("0.25", "--sat-wgrad-tokens-linears", CAL_025, "--sat-wgrad-tokens-head", "0.07")),
    "wg-cal-0.1": ("per-product keep fractions calibrated on the starting model at the FLOPs of wg-0.1-head",
                   wg("0.1", "--sat-wgrad-tokens-linears", CAL_01, "--sat-wgrad-tokens-head", "0.03")),
    "budget-0.4": ("quality budget: relative variance 0.4 (about a quarter of the tokens on the starting model), "
                   "probed every 5 steps, starting from wg-0.25-head's keeps",
                   wg("0.25", "--sat-wgrad-tokens-head", "0.25", "--sat-budget", "0.4", "--sat-budget-interval", "5")),
    "budget-1.0": ("quality budget: relative variance 1.0 (between a tenth and a quarter of the tokens), probed "
                   "every 5 steps", wg("0.25", "--sat-wgrad-tokens-head", "0.25", "--sat-budget", "1.0",
                                       "--sat-budget-interval", "5")),
    "dense-seed2": ("dense, seed 4321 (data order)", ["--sat-schedule", "dense", "--seed", "4321"]),
    "wg-0.25-seed2": ("as wg-0.25, seed 4321 (data order, held-out samples and token draws)",
                      wg("0.25", "--seed", "4321")),
    "wg-cal-0.25-seed2": ("as wg-cal-0.25, seed 4321 (data order and token draws)",
                          wg("0.25", "--sat-wgrad-tokens-linears", CAL_025, "--sat-wgrad-tokens-head", "0.07",
                             "--seed", "4321")),
}

REPLAY_SHARE = {"dense-replay": 0.1, "sat-replay": 0.1}
"""Arms whose training data is a blend of new_train with this share of old_train."""


def data_flags(out: Path, arm: str) -> list[str]:
    data = out / "data"
    share = REPLAY_SHARE.get(base_name(arm))
    if share is None:
        return ["--data-path", str(data / "new_train")]
    return ["--data-path", str(1 - share), str(data / "new_train"), str(share), str(data / "old_train")]


def arm_dir(out: Path, arm: str) -> Path:
    return out / "runs" / arm.replace(":", "-")


def base_name(arm: str) -> str:
    """The ARMS entry of `arm` (NAME, NAME@STEPS or NAME:xF)."""
    return arm.split("@")[0].split(":")[0]


def length_factor(arm: str) -> int:
    """F of NAME:xF (1 otherwise): the run is F times as long, with the same shape of LR and
    SAT schedules (warmup, evaluation and save intervals scale with it; the SAT ladder is
    defined in fractions of the run already). Evaluations and saves come at twice the
    interval (F/2 times it), so a long arm still has a few points on its curve."""
    if ":x" not in arm:
        return 1
    return int(arm.split(":x")[1])


def scaled_common(factor: int) -> list[str]:
    out = list(COMMON)
    for flag, f in (("--lr-warmup-iters", factor), ("--eval-interval", max(1, factor // 2)),
                    ("--save-interval", max(1, factor // 2))):
        i = out.index(flag)
        out[i + 1] = str(int(out[i + 1]) * f)
    return out


def command(out: Path, arm: str, iters: int) -> list[str]:
    _, flags = ARMS[base_name(arm)]
    d = arm_dir(out, arm)
    data = out / "data"
    model = out / "smollm2-135m"
    return [sys.executable, str(ROOT / "launch" / "pretrain.py"), *scaled_common(length_factor(arm)),
            "--hf-checkpoint", str(model), "--tokenizer-model", str(model / "tokenizer.json"),
            *data_flags(out, arm), "--split", "100,0,0",
            "--valid-data-path", f"new={data / 'new_heldout'}", f"old={data / 'old_heldout'}",
            "--train-iters", str(iters), *flags,
            "--tensorboard-dir", str(d / "tensorboard"),
            *([] if "--skip-train" in flags else ["--save", str(d / "checkpoints")]),
            # resume where a previous session stopped
            *(["--load", str(d / "checkpoints")] if (d / "checkpoints").is_dir() else [])]


def run_arm(out: Path, arm: str, iters: int) -> int:
    d = arm_dir(out, arm)
    if (d / "done").exists():
        print(f"[{arm}] finished before: skipped ({d / 'done'})", flush=True)
        return 0
    d.mkdir(parents=True, exist_ok=True)
    cmd = command(out, arm, iters)
    # One process on all cores: torch's intra-op threads (launch/pretrain.py defaults to 1).
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    print(f"[{arm}] {time.strftime('%H:%M:%S')} {' '.join(cmd)}", flush=True)
    with open(d / "train.log", "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc == 0:
        (d / "done").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    print(f"[{arm}] {time.strftime('%H:%M:%S')} exit {rc}", flush=True)
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["list", "run"])
    p.add_argument("arms", nargs="*",
                   help="arm names; NAME@STEPS runs arm NAME for STEPS steps (the equal-wall-clock arm); "
                        "NAME:xF runs it F times as long with the same schedule shapes (in runs/NAME-xF)")
    p.add_argument("--all", action="store_true", help="run every arm, in the listed order")
    p.add_argument("--out", default="runs/cpt_setup", help="the set-up folder (default runs/cpt_setup)")
    a = p.parse_args(argv)
    out = (ROOT / a.out).resolve() if not Path(a.out).is_absolute() else Path(a.out)
    if a.action == "list":
        for name, (what, flags) in ARMS.items():
            print(f"{name:20s} {what}\n{'':20s} {' '.join(flags)}")
        return 0
    arms = list(ARMS) if a.all else a.arms
    if not arms:
        p.error("name the arms to run, or --all")
    for arm in arms:
        if base_name(arm) not in ARMS:
            p.error(f"unknown arm {arm!r}; `list` shows them")
        if ":" in arm and not (arm.split(":", 1)[1][:1] == "x" and arm.split(":x", 1)[1].isdigit()
                               and int(arm.split(":x", 1)[1]) >= 1):
            p.error(f"arm {arm!r}: the length suffix is :xF with F an integer >= 1 (e.g. dense:x4)")
    if not (out / "smollm2-135m" / "config.json").exists():
        p.error(f"{out}/smollm2-135m not found: run tools/setup_cpt_experiment.py --out {a.out} first")
    failed = 0
    for arm in arms:
        iters = int(arm.split("@")[1]) if "@" in arm else ITERS * length_factor(arm)
        failed += run_arm(out, arm, iters) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
