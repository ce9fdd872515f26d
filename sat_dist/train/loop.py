"""The training loop: data -> SAT rates -> step -> metrics -> checkpoints."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from sat_dist.checkpoint.state import restore_checkpoint, save_checkpoint
from sat_dist.config import ModelConfig
from sat_dist.data.packing import PackedDataset
from sat_dist.errors import SatDistError
from sat_dist.parallel.comm import ParallelComm
from sat_dist.sat.schedule import OmissionSchedule
from sat_dist.train.arguments import RunConfig
from sat_dist.train.engine import Engine
from sat_dist.train.metrics import TensorBoardLog, model_flops

H100_PEAK_BF16 = 989e12


@dataclass
class Progress:
    iteration: int = 0
    consumed_samples: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    losses: list = field(default_factory=list)
    """(iteration, lm loss) of every step, on every rank (tests read it)."""


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _mean_over_dp(x: torch.Tensor, comm: ParallelComm) -> torch.Tensor:
    if comm.dp_size > 1:
        x = x.clone()
        dist.all_reduce(x, group=comm.dp_group)
        x /= comm.dp_size
    return x


def _kept(sat, kind: str, layers: int) -> tuple[float, float]:
    """(mean kept units per layer over all TP ranks, kept fraction) at the last forward."""
    ks = [sat.kept.get((i, kind)) for i in range(layers)]
    ks = [k for k in ks if k is not None]
    if not ks:
        return 0.0, 1.0
    kept = sum(k for k, _ in ks) / len(ks) * sat.comm.tp_size
    return kept, sum(k / n for k, n in ks) / len(ks)


def _max_memory() -> tuple[str, float]:
    if torch.cuda.is_available():
        return "memory/max-allocated-bytes", float(torch.cuda.max_memory_allocated())
    return "memory/max-rss-bytes", float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


@torch.no_grad()
def evaluate(eng: Engine, valid: PackedDataset, run: RunConfig, comm: ParallelComm) -> float:
    """Mean validation loss of the DENSE model (SAT off) on the first eval_iters batches."""
    t = run.train
    dev = _device()
    eng.engine.eval()
    eng.sat.set_step(0, 0, 0.0, 0.0)
    total = torch.zeros((), device=dev)
    gbs = t.eval_iters * t.micro_batch_size * comm.dp_size
    n = 0
    for ids, labels in valid.step_batches(0, gbs, t.micro_batch_size, comm.dp_rank, comm.dp_size):
        total += eng.engine(ids.to(dev), labels.to(dev)).float().mean()
        n += 1
    eng.engine.train()
    return float(_mean_over_dp(total / n, comm))


def train(run: RunConfig, eng: Engine, comm: ParallelComm, model_cfg: ModelConfig,
          datasets: dict[str, PackedDataset], resume: Optional[tuple[str, dict]] = None,
          log=print) -> Progress:
    """Train to --train-iters (or --exit-interval); `resume` is check_resume()'s (tag, manifest)."""
    t = run.train
    rank0 = dist.get_rank() == 0
    dev = _device()
    gbs = eng.ds_config["train_batch_size"]
    stage3 = eng.ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    schedule = OmissionSchedule(run.sat, t.train_iters)
    p = Progress()
    if resume is not None:
        tag, m = resume
        restore_checkpoint(eng.engine, t.load, tag)
        p.iteration, p.consumed_samples = m["iteration"], m["consumed_samples"]
        if m["sat_schedule"] != schedule.state_dict() and rank0:
            log(f"note: keeping the checkpoint's SAT schedule {m['sat_schedule']} over the flags' "
                f"{schedule.state_dict()}")
        schedule.load_state_dict(m["sat_schedule"])
        if rank0:
            log(f"resumed from {t.load} at iteration {p.iteration} ({p.consumed_samples} samples consumed)")
    train_ds, valid_ds = datasets["train"], datasets.get("valid")
    tb = TensorBoardLog(t.tensorboard_dir, rank0)
    last = t.exit_interval if 0 < t.exit_interval < t.train_iters else t.train_iters
    peak = H100_PEAK_BF16 if torch.cuda.is_available() else None
    interval_start, interval_steps = time.perf_counter(), 0
    start_iter = p.iteration
    if p.iteration >= last and rank0:
        log(f"nothing to train: the checkpoint is at iteration {p.iteration} of {last}; raise "
            f"--train-iters to continue")

    def save():
        save_checkpoint(eng.engine, eng.model, t.save, p.iteration, p.consumed_samples, comm, model_cfg,
                        schedule.state_dict(), stage3)
        if rank0:
            log(f"saved checkpoint at iteration {p.iteration} to {t.save}")

    while p.iteration < last:
        attn_rate, mlp_rate = schedule.rates(p.iteration)
        loss_sum = torch.zeros((), device=dev)
        for micro, (ids, labels) in enumerate(train_ds.step_batches(
                p.consumed_samples, gbs, t.micro_batch_size, comm.dp_rank, comm.dp_size)):
            eng.sat.set_step(p.iteration, micro, attn_rate, mlp_rate)
            loss = eng.engine(ids.to(dev), labels.to(dev)).float().mean()
            eng.engine.backward(loss)
            eng.engine.step()
            loss_sum += loss.detach()
        p.iteration += 1
        p.consumed_samples += gbs
        interval_steps += 1
        loss = float(_mean_over_dp(loss_sum / eng.grad_accum, comm))  # the step's one host sync
        p.losses.append((p.iteration, loss))
        if not math.isfinite(loss):
            raise SatDistError(f"iteration {p.iteration}: non-finite loss {loss}; lower --lr or check the data")

        lr = eng.engine.get_lr()[0]
        gn = eng.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else float("nan")
        kept_attn, keep_attn = _kept(eng.sat, "attn", model_cfg.num_layers)
        kept_mlp, keep_mlp = _kept(eng.sat, "mlp", model_cfg.num_layers)
        scalars = {"lm loss": loss, "learning-rate": lr, "grad-norm": gn,
                   "sat/omission-rate-attn": attn_rate, "sat/omission-rate-mlp": mlp_rate,
                   "sat/kept-units-attn": kept_attn, "sat/kept-units-mlp": kept_mlp}
        log_now = p.iteration % t.log_interval == 0 or p.iteration == last
        if log_now:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - interval_start) / interval_steps
            interval_start, interval_steps = time.perf_counter(), 0
            world = dist.get_world_size()
            tokens = gbs * t.seq_length
            dense = model_flops(model_cfg, gbs, t.seq_length)
            executed = model_flops(model_cfg, gbs, t.seq_length, keep_attn, keep_mlp)
            mem_tag, mem = _max_memory()
            scalars.update({
                "iteration-time": elapsed,
                "throughput/tokens-per-sec": tokens / elapsed,
                "throughput/model-tflops-per-gpu": dense / elapsed / 1e12 / world,
                "throughput/executed-tflops-per-gpu": executed / elapsed / 1e12 / world,
                mem_tag: mem,
            })
            if peak:
                scalars["throughput/mfu"] = dense / elapsed / world / peak
            if rank0:
                eta = elapsed * (last - p.iteration)
                log(f" iteration {p.iteration:8d}/{t.train_iters:8d} | consumed samples: {p.consumed_samples:10d} "
                    f"| elapsed time per iteration (ms): {elapsed * 1000:.1f} | learning rate: {lr:.3E} "
                    f"| lm loss: {loss:.6E} | grad norm: {gn:.3f} | tokens/s: {tokens / elapsed:.0f} "
                    f"| model TFLOP/s/GPU: {dense / elapsed / 1e12 / world:.3f} "
                    f"| SAT omission attn/mlp: {attn_rate:.2f}/{mlp_rate:.2f} "
                    f"| ETA: {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        tb.scalars(p.iteration, scalars)

        if valid_ds is not None and t.eval_interval and p.iteration % t.eval_interval == 0 and p.iteration < last:
            _log_validation(eng, valid_ds, run, comm, p, tb, rank0, log)
        if t.save and t.save_interval and p.iteration % t.save_interval == 0 and p.iteration < last:
            save()

    if p.iteration > start_iter or resume is None:
        if valid_ds is not None:
            _log_validation(eng, valid_ds, run, comm, p, tb, rank0, log)
        if t.save:
            save()
    tb.close()
    return p


def _log_validation(eng, valid_ds, run, comm, p, tb, rank0, log) -> None:
    vloss = evaluate(eng, valid_ds, run, comm)
    ppl = math.exp(min(vloss, 50.0))
    tb.scalars(p.iteration, {"lm loss validation": vloss, "lm loss validation ppl": ppl})
    if rank0:
        log(f" validation at iteration {p.iteration} | lm loss: {vloss:.6E} | lm loss PPL: {ppl:.3f}")
