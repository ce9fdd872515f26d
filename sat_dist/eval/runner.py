"""--eval-tasks during training: when to run, how to run on every rank, where results go.

Each evaluation scores the loaded tasks (sat_dist.eval.tasks) with the harness's own
evaluator on `SatDistLM` (sat_dist.eval.harness_adapter): the dense model at that iteration.
Results go to TensorBoard (and W&B) as `eval/TASK/METRIC` (`eval/TASK/METRIC/FILTER` for a
filter other than the harness's "none"; groups as their own TASK), its time as
`eval-tasks-time`, and to a JSON file per evaluation: `eval_tasks/iter_NNNNNNN.json` in
--save (else in --tensorboard-dir). The training loop keeps that time out of
`iteration-time`, and the random generators are put back as they were, so an evaluation
changes nothing about the training that follows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sat_dist.eval.tasks import EvalTasks

BOOTSTRAP_ITERS = 1000
"""Resamples for the standard errors of the metrics that have no closed form (lm-eval's
command line draws 100000, in a process pool that a training process must not fork)."""


class DownstreamEval:
    def __init__(self, tasks: EvalTasks, t, model_cfg):
        self.tasks, self.t, self.model_cfg = tasks, t, model_cfg
        self.interval = t.eval_tasks_interval if t.eval_tasks_interval is not None else t.eval_interval
        base = t.save or t.tensorboard_dir
        self.out_dir = Path(base) / "eval_tasks" if base else None
        self._lm = None

    def due(self, iteration: int) -> bool:
        """Whether an evaluation runs after step `iteration` (the end of training is the
        loop's business)."""
        return bool(self.interval) and iteration % self.interval == 0

    def _adapter(self, eng, comm):
        if self._lm is None:
            from sat_dist.data.tokenizer import load_tokenizer
            from sat_dist.eval.harness_adapter import SatDistLM

            t = self.t
            self._lm = SatDistLM(eng, comm, load_tokenizer(t.tokenizer_model), self.model_cfg.max_position_embeddings,
                                 tokens_per_batch=t.micro_batch_size * t.seq_length)
        return self._lm

    def run(self, eng, comm, iteration: int, consumed_samples: int, log=print) -> dict[str, float]:
        """Evaluate every task on every rank; returns the scalars (the same on every rank)."""
        import logging

        from lm_eval.evaluator import evaluate

        rank0 = dist.get_rank() == 0
        logging.getLogger("lm_eval").setLevel(logging.WARNING if rank0 else logging.ERROR)
        lm = self._adapter(eng, comm)
        t0 = time.perf_counter()
        rng = _rng_state()
        saved_env = os.environ.get("DISABLE_MULTIPROC")
        os.environ["DISABLE_MULTIPROC"] = "1"  # the harness's bootstrap would fork a process pool
        try:
            with _no_progress_bars():
                res = evaluate(lm=lm, task_dict=self.tasks.loaded, limit=self.tasks.limit,
                               bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, write_out=False)
        finally:
            if saved_env is None:
                os.environ.pop("DISABLE_MULTIPROC", None)
            else:
                os.environ["DISABLE_MULTIPROC"] = saved_env
            _set_rng_state(rng)
        seconds = time.perf_counter() - t0
        scalars = metric_scalars(res)
        scalars["eval-tasks-time"] = seconds
        if rank0:
            self._write(res, iteration, consumed_samples, seconds)
            shown = " | ".join(f"{tag[len('eval/'):]}: {v:.4f}" for tag, v in scalars.items()
                               if tag.startswith("eval/") and "_stderr" not in tag)
            log(f" downstream evaluation at iteration {iteration} | {shown} | {seconds:.1f} s")
        return scalars

    def _write(self, res: dict, iteration: int, consumed_samples: int, seconds: float) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"iteration": iteration, "consumed_samples": consumed_samples, "tasks": self.tasks.names,
                  "limit": self.tasks.limit, "lm_eval_version": self.tasks.harness_version, "seconds": seconds,
                  **{k: res.get(k) for k in ("results", "groups", "group_subtasks", "versions", "n-shot",
                                             "higher_is_better", "n-samples")}}
        path = self.out_dir / f"iter_{iteration:07d}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, path)


def metric_scalars(res: dict) -> dict[str, float]:
    """{"eval/TASK/METRIC": value} of every numeric metric in the harness's results (tasks
    and groups); "METRIC,FILTER" keys become METRIC for the filter "none", METRIC/FILTER else."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (res.get(section) or {}).items():
            for key, value in metrics.items():
                # metrics are "METRIC,FILTER"; the rest ("alias", "sample_len", ...) describe the task
                if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    continue
                metric, _, filt = key.partition(",")
                tag = f"eval/{task}/{metric}" + (f"/{filt}" if filt and filt != "none" else "")
                out[tag] = float(value)
    return out


@contextlib.contextmanager
def _no_progress_bars():
    """The harness draws a progress bar per task while it builds the requests, on every rank
    (each is rank 0 of 1 to it): none in a training log."""
    import functools

    import lm_eval.api.task as task_module

    bar = getattr(task_module, "tqdm", None)
    if bar is not None:
        task_module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            task_module.tqdm = bar


def _rng_state() -> dict:
    s = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["random"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"])

