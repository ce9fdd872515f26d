"""Weights & Biases logging (--wandb-project; Megatron-LM's flags): the TensorBoard scalars,
from global rank 0 only, and the run's config once per start.

Every scalar is logged with its iteration as the key `iteration`, which the run declares as
the x-axis of all its charts (W&B's own step is not used: after a resume from an earlier
checkpoint it would refuse the re-run iterations). The run's id is stored in each checkpoint's
manifest (`wandb_run_id`), so a resume continues the same W&B run; `--finetune` starts a new
one. WANDB_MODE=offline writes the run to disk with no network (`wandb sync` uploads it
later). wandb is imported only when --wandb-project is given.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from sat_dist.errors import SatDistError
from sat_dist.train.metrics import TensorBoardLog


def require_wandb() -> None:
    """One line naming the pip extra when wandb is not installed (nothing imported)."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise SatDistError("--wandb-project needs the wandb package, which is not installed: pip install "
                           "'sat_dist[wandb]' (in a checkout: pip install -e '.[wandb]')")


class ScalarLogs:
    """TensorBoard and W&B behind TensorBoardLog's interface (scalars, close)."""

    def __init__(self, tb: TensorBoardLog, wandb_run=None):
        self.tb, self.wandb_run = tb, wandb_run

    @property
    def wandb_run_id(self) -> Optional[str]:
        return self.wandb_run.id if self.wandb_run is not None else None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.tb.scalars(step, values)
        if self.wandb_run is not None and values:
            self.wandb_run.log({**values, "iteration": step})

    def close(self) -> None:
        self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def run_config(run, ds_config: dict, layout: dict) -> dict:
    """What W&B records as the run's config: every flag (training and SAT), the DeepSpeed
    config as the engine resolved it, and the parallel layout."""
    return {"flags": dataclasses.asdict(run.train), "sat": dataclasses.asdict(run.sat), "deepspeed": ds_config,
            **layout}


def open_scalar_logs(run, rank0: bool, ds_config: dict, layout: dict, resume_id: Optional[str],
                     device: torch.device, log=print) -> ScalarLogs | TensorBoardLog:
    """TensorBoardLog alone without --wandb-project; else both, W&B started on global rank
    0 (continuing run `resume_id` when given). Collective when W&B is on: every rank learns
    whether rank 0 could start it, so a failure stops all ranks with one line."""
    t = run.train
    tb = TensorBoardLog(t.tensorboard_dir, rank0)
    if not t.wandb_project:
        return tb
    wb, problem = None, ""
    if rank0:
        try:
            wb = _start(t, run_config(run, ds_config, layout), resume_id)
        except Exception as e:  # wandb raises its own types (UsageError, CommError, ...): one line
            problem = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    failed = torch.tensor(float(bool(problem)), device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(failed)
    if failed.item() > 0:
        tb.close()
        raise SatDistError(f"--wandb-project {t.wandb_project}: W&B could not start on rank 0"
                           + (f" ({problem})" if problem else "") + "; without network set WANDB_MODE=offline "
                           "(then `wandb sync DIR` uploads the run later)")
    if wb is not None:
        log(f"W&B: project {t.wandb_project}, run {wb.id}{f' ({wb.name})' if wb.name else ''}"
            f"{' (resumed)' if resume_id else ''}, files in {wb.dir}")
    return ScalarLogs(tb, wb)


def _start(t, config: dict, resume_id: Optional[str]):
    import wandb

    save_dir = t.wandb_save_dir or (str(Path(t.save) / "wandb") if t.save else None)
    if save_dir:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=t.wandb_project, name=t.wandb_exp_name, dir=save_dir, id=resume_id,
                     resume="allow" if resume_id else None)
    run.define_metric("iteration")
    run.define_metric("*", step_metric="iteration")
    run.config.update(config, allow_val_change=True)
    return run
