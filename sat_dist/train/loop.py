"""The training loop: data -> SAT rates -> step -> metrics -> checkpoints."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from sat_dist.checkpoint.state import definition_changes, restore_checkpoint, save_checkpoint
from sat_dist.config import ModelConfig
from sat_dist.data.blend import BlendedDataset, position_from_manifest
from sat_dist.data.documents import document_inputs
from sat_dist.errors import SatDistError
from sat_dist.faults import fault_point
from sat_dist.model.comm import ParallelComm
from sat_dist.model.token_sampler import WGradProbe
from sat_dist.sat.budget import WGradBudget
from sat_dist.sat.schedule import OmissionSchedule
from sat_dist.sat.selection import layer_keep_count
from sat_dist.train.arguments import RunConfig, run_definition
from sat_dist.train.engine import Engine
from sat_dist.train.metrics import ExecutedFlops, TensorBoardLog, device_peak_flops, product_flops
from sat_dist.train.preemption import PreemptionFlag


@dataclass
class Progress:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_in_row: int = 0
    skipped_total: int = 0
    preempted: bool = False


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _mean_over_dp(x: torch.Tensor, comm: ParallelComm) -> torch.Tensor:
    if comm.dp_size > 1:
        x = x.clone()
        dist.all_reduce(x, group=comm.dp_group)
        x /= comm.dp_size
    return x


def micro_batch_loss(eng: Engine, ids: torch.Tensor, labels: torch.Tensor, run: RunConfig, source,
                     dev: torch.device) -> torch.Tensor:
    """Scalar loss of one micro-batch (ids, labels [b, s] from `source`, a dataset): the mean
    per-token loss or, with --reset-position-ids / --reset-attention-mask / --eod-mask-loss,
    the document-aware forward and Megatron's masked mean (sat_dist.data.documents)."""
    t = run.train
    if dev.type == "cuda":  # pinned and asynchronous: the copy does not drain the stream
        ids, labels = ids.pin_memory().to(dev, non_blocking=True), labels.pin_memory().to(dev, non_blocking=True)
    else:
        ids, labels = ids.to(dev), labels.to(dev)
    if not (t.reset_position_ids or t.reset_attention_mask or t.eod_mask_loss):
        return eng(ids, labels).float().mean()
    doc = document_inputs(ids, int(source.eos_id), reset_position_ids=t.reset_position_ids,
                          reset_attention_mask=t.reset_attention_mask, eod_mask_loss=t.eod_mask_loss)
    return doc.mean_loss(eng(ids, labels, **doc.model_inputs()).float())


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


def eval_micro_batches(ds: BlendedDataset, run: RunConfig, dp_size: int) -> int:
    """Micro-batches per DP rank per evaluation: --eval-iters, or fewer for a whole
    set (--valid-data-path, --test-data-path) too small for them, so that no sample counts
    twice. The split's validation set keeps --eval-iters (its samples repeat if it is smaller)."""
    t = run.train
    if not ds.whole:
        return t.eval_iters
    return min(t.eval_iters, ds.samples_without_repeat() // (t.micro_batch_size * dp_size))


def keep_counts_line(schedule: OmissionSchedule, model_cfg: ModelConfig, tp_size: int) -> str:
    """What every rung of the run really keeps per TP partition, by kind (rounding can make
    it differ from the nominal rates, and make rungs coincide)."""
    cfg = schedule.cfg
    units = {"attn": (model_cfg.num_query_groups // tp_size, cfg.align_attn, "groups"),
             "mlp": (model_cfg.ffn_hidden_size // tp_size, cfg.align_mlp, "channels")}
    rungs = []
    for rates in schedule.rungs():
        kept, omitted = [], []
        for kind, rate in zip(("attn", "mlp"), rates):
            n, align, what = units[kind]
            ks = [layer_keep_count(n, rate, align, cfg, kind, i) for i in range(model_cfg.num_layers)]
            k = sum(ks) / len(ks)
            # --sat-omission-mlp-layers: the layers' range and mean
            counts = f"{ks[0]}" if min(ks) == max(ks) else f"{min(ks)}-{max(ks)} (mean {k:.0f})"
            kept.append(f"{kind} {counts}/{n} {what}")
            omitted.append(f"{1 - k / n:.3f}")
        rungs.append(f"{rates[0]:.3g}/{rates[1]:.3g} -> {', '.join(kept)} (omitted {'/'.join(omitted)})")
    return "SAT keep counts per TP partition: rung rates attn/mlp " + "; ".join(rungs)


@torch.no_grad()
def evaluate(eng: Engine, valid: BlendedDataset, run: RunConfig, comm: ParallelComm,
             micro_batches: Optional[int] = None) -> float:
    """Mean validation loss of the DENSE model (SAT off) on the first `micro_batches`
    (default --eval-iters) micro-batches of every DP rank."""
    t = run.train
    dev = _device()
    eng.train(False)
    eng.sat.set_step(0, 0, 0.0, 0.0)
    total = torch.zeros((), device=dev)
    gbs = (micro_batches or t.eval_iters) * t.micro_batch_size * comm.dp_size
    n = 0
    for ids, labels in valid.step_batches(None, gbs, t.micro_batch_size, comm.dp_rank, comm.dp_size):
        total += micro_batch_loss(eng, ids, labels, run, valid, dev)
        n += 1
    eng.train()
    return float(_mean_over_dp(total / n, comm))


class Trainer:
    """One training run: owns the progress, the SAT schedule and the logs; `run()` trains to
    --train-iters (or --exit-interval), or until preempted."""

    def __init__(self, run: RunConfig, eng: Engine, comm: ParallelComm, model_cfg: ModelConfig,
                 datasets: dict[str, BlendedDataset], log=print, definition: Optional[dict] = None,
                 downstream=None):
        t = self.t = run.train
        self.run_cfg, self.eng, self.comm, self.model_cfg, self.log = run, eng, comm, model_cfg, log
        # What every checkpoint records for check_resume (the caller may have made it already).
        self.definition = definition if definition is not None else run_definition(run, model_cfg)
        self.rank0 = dist.get_rank() == 0
        self.dev = _device()
        self.gbs = eng.ds_config["train_batch_size"]
        self.stage_start = 0  # iteration at which this training stage began (see resume)
        self.schedule = OmissionSchedule(run.sat, t.train_iters - self.stage_start, self.stage_start)
        self.train_ds = datasets["train"]
        self.data_pos = self.train_ds.start()  # samples taken from each dataset (restored on resume)
        self.test_set = datasets.get("test")
        # "valid" (the split's, or a bare --valid-data-path prefix) logs as `lm loss
        # validation`; "valid/NAME" as `lm loss validation/NAME`.
        self.valid_sets = {k: (ds, eval_micro_batches(ds, run, comm.dp_size))
                           for k, ds in datasets.items() if k == "valid" or k.startswith("valid/")}
        self.flops = ExecutedFlops(model_cfg, self.gbs, t.seq_length, run.sat.sparse_pass)
        self._product_flops = product_flops(model_cfg)
        self.budget = None
        if run.sat.budget > 0:
            sat = run.sat
            keeps = list(sat.wgrad_linear_keeps or [sat.wgrad_tokens]) + [sat.wgrad_tokens_head]
            self.budget = WGradBudget.for_keeps(sat.budget, keeps, sat.budget_min_tokens)
            eng.sat.wgrad_scale = self.budget.scale
        self.last = t.exit_interval if 0 < t.exit_interval < t.train_iters else t.train_iters
        self.peak = self._peak_flops(t)
        self.p = Progress()
        self.tb: Optional[TensorBoardLog] = None
        self.downstream = downstream  # --eval-tasks (sat_dist.eval.runner.DownstreamEval) or None
        self.wandb_resume_id: Optional[str] = None  # the W&B run a resumed checkpoint logged to
        self._saved_at: Optional[int] = None  # iteration of the last checkpoint known complete

    def _peak_flops(self, t) -> Optional[float]:
        """Per-GPU peak FLOP/s for throughput/mfu: --peak-tflops, else the device's (bf16 or
        fp32 as the run trains); None on CPU or an unknown GPU (then no MFU is logged)."""
        if t.peak_tflops is not None:
            return t.peak_tflops * 1e12
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
        if not t.bf16:
            self.log(f"warning: training on {name} in fp32 (--bf16 not given): several times slower than bf16 "
                     f"and more memory; pass --bf16 unless fp32 is meant")
        peak = device_peak_flops(name, t.bf16)
        if peak is None:
            self.log(f"warning: no peak FLOP/s known for {name}: throughput/mfu is not logged; pass --peak-tflops")
        return peak

    def resume(self, tag: str, manifest: dict) -> None:
        """Continue from checkpoint `tag` of --load (check_resume allowed it), as Megatron-LM's
        stage flags say:
          plain --load: everything: weights, Adam, LR and SAT schedules, iteration, data
            position, RNG (on the same layout), and the stage the checkpoint was in.
          --override-opt_param-scheduler: as plain, but the LR is the flags' schedule at the
            checkpoint's iteration; if the flags differ from the checkpoint's, a new stage
            begins there: the SAT schedule spans [iteration, --train-iters).
          --no-load-optim: weights, iteration and data position; Adam starts afresh (zero
            moments, step 0), and so does the LR schedule (Megatron loads the scheduler with
            the optimizer: the LR warms up again while the iteration count continues).
          --no-load-rng: the random generators keep this run's seeding.
          --finetune: the weights only; iteration, data position, Adam, and the LR and SAT
            schedules start at 0 (a new stage from another run's checkpoint).
        The data position is every dataset's own (sat_dist.data.blend), found by path or,
        for moved files, by their fingerprint."""
        t, p = self.t, self.p
        saved_iteration = manifest["iteration"]
        if t.finetune:
            lr_position = None  # nothing of the optimizer or its schedule is loaded
        elif t.no_load_optim:
            # Megatron keeps the LR scheduler with the optimizer state: not loaded, it starts at
            # its step 0 (the warmup again) while the iteration count continues.
            lr_position = 0
        elif t.override_opt_param_scheduler:
            lr_position = saved_iteration  # the flags' schedule at the checkpoint's iteration
        else:
            lr_position = None
        t0 = time.perf_counter()
        restore_checkpoint(self.eng.engine, self.eng.model, t.load, tag, manifest, self.comm, self.model_cfg,
                           self.eng.stage3, load_optim=not (t.finetune or t.no_load_optim),
                           load_rng=not (t.finetune or t.no_load_rng), lr_position=lr_position)
        load_s = time.perf_counter() - t0
        if t.finetune:
            p.iteration, p.consumed_samples, self.stage_start = 0, 0, 0
        else:
            p.iteration, p.consumed_samples = saved_iteration, manifest["consumed_samples"]
            self.data_pos = self.train_ds.start(position_from_manifest(manifest, self.train_ds),
                                                restart_changed=t.accept_changed_data)
            if self.budget is not None and isinstance(manifest.get("sat_budget"), dict):
                self.budget.restore(manifest["sat_budget"])  # the scale the run had reached
                self.eng.sat.wgrad_scale = self.budget.scale
            self._saved_at = p.iteration
            self.wandb_resume_id = manifest.get("wandb_run_id")
            new_stage = t.override_opt_param_scheduler and bool(definition_changes(manifest, self.definition))
            self.stage_start = saved_iteration if new_stage else manifest.get("stage_start_iteration", 0)
        self.schedule = OmissionSchedule(self.run_cfg.sat, t.train_iters - self.stage_start, self.stage_start)
        if self.rank0:
            layout = (f"TP {manifest['tensor_model_parallel_size']} x DP {manifest['data_parallel_size']}"
                      f" -> TP {self.comm.tp_size} x DP {self.comm.dp_size}")
            if t.finetune:
                self.log(f"loaded the weights of {t.load} ({tag}; {layout}) for --finetune: iteration, data, "
                         f"optimizer and schedules start at 0")
            else:
                self.log(f"resumed from {t.load} at iteration {p.iteration} "
                         f"({p.consumed_samples} samples consumed; {layout}; loaded in {load_s:.1f} s)")
            new = [f for f, on in (("Adam state", t.no_load_optim), ("RNG state", t.no_load_rng)) if on]
            if new and not t.finetune:
                self.log(f"not loaded from the checkpoint: {', '.join(new)}")
            if not t.finetune and new_stage:
                self.log(f"a new stage begins at iteration {self.stage_start}: LR and SAT schedules from the flags "
                         f"(SAT over iterations {self.stage_start}-{t.train_iters})")
            if t.finetune:
                changed = definition_changes(manifest, self.definition)
                if changed:  # anything may change under --finetune: say what did
                    self.log(f"--finetune: this run differs from {tag}'s in {', '.join('--' + k for k in changed)}")
            for note in self.train_ds.start_notes:
                self.log(note)

    def run(self) -> Progress:
        t, p = self.t, self.p
        start_iter = p.iteration
        if p.iteration >= self.last and self.rank0:
            self.log(f"nothing to train: the checkpoint is at iteration {p.iteration} of {self.last}")
        from sat_dist.train.wandb_log import open_scalar_logs

        self.tb = open_scalar_logs(self.run_cfg, self.rank0, self.eng.ds_config,
                                   {"tensor_model_parallel_size": self.comm.tp_size,
                                    "data_parallel_size": self.comm.dp_size}, self.wandb_resume_id, self.dev, self.log)
        if self.rank0:
            self._describe()
        if t.skip_train:
            if not self.valid_sets and self.test_set is None and self.downstream is None:
                raise SatDistError("--skip-train: no validation set to evaluate (the --split gives the "
                                   "validation share 0); give --valid-data-path or a nonzero share")
            try:
                self._validate()
                self._test()
                self._eval_tasks()
            finally:
                self.tb.close()
            return p
        preemption = PreemptionFlag.install()
        self._interval_start = time.perf_counter()
        try:
            preempted = preemption.any_rank(self.dev)  # a signal during start-up or resume
            while p.iteration < self.last and not preempted:
                preempted = self._step(preemption)
                if p.iteration == self.last:
                    break
                paused = time.perf_counter()
                if self.valid_sets and t.eval_interval and p.iteration % t.eval_interval == 0:
                    self._validate()
                if t.save_interval and p.iteration % t.save_interval == 0:
                    self._save()
                if self.downstream is not None and self.downstream.due(p.iteration):
                    self._eval_tasks()
                # iteration-time measures training steps only, not evaluation or saving.
                self._interval_start += time.perf_counter() - paused
            if preempted and p.iteration < self.last:
                self._save()
                if self.rank0:
                    what = "saved checkpoint" if t.save else "nothing saved (no --save)"
                    self.log(f"preempted ({preemption.received or 'signal on another rank'}): "
                             f"{what} at iteration {p.iteration}")
                p.preempted = True
                return p
            if p.iteration > start_iter:
                if self.valid_sets:
                    self._validate()
                self._save()
                if p.iteration == t.train_iters:
                    self._test()
                if p.skipped_in_row:
                    # The run did not end on a good model: not a success, whatever else went well.
                    good = f"the last checkpoint in {t.save}" if t.save else "no checkpoint (no --save)"
                    raise SatDistError(f"the last {p.skipped_in_row} step(s) were non-finite (updates skipped), so "
                                       f"no checkpoint was written at iteration {p.iteration}; resume from {good} "
                                       f"with a lower --lr, or check the data")
                self._eval_tasks()
        finally:
            preemption.restore()
            self.tb.close()
        return p

    def _describe(self) -> None:
        """Start-up lines: the keep counts SAT will really use, and what each validation
        set evaluates."""
        if self.run_cfg.sat.enabled:
            self.log(keep_counts_line(self.schedule, self.model_cfg, self.comm.tp_size))
        t = self.t
        if len(self.train_ds.keys) > 1:
            self.log(f"training blend: {self.train_ds.describe()}; per global batch of {self.gbs}: "
                     + ", ".join(f"{w * self.gbs:.2f}" for w in self.train_ds.weights) + " samples")
        for key, (ds, iters) in self.valid_sets.items():
            if not ds.whole:
                continue
            fewer = (f" (fewer than --eval-iters {t.eval_iters}: the set has {len(ds)} samples)"
                     if iters < t.eval_iters else "")
            name = f" {key[len('valid/'):]}" if key != "valid" else ""
            self.log(f"validation set{name}: {', '.join(ds.keys)}, {len(ds)} samples of {t.seq_length} tokens; "
                     f"{iters} micro-batch{'es' if iters > 1 else ''} of {t.micro_batch_size} per DP rank per "
                     f"evaluation{fewer}")

    def _step(self, preemption: PreemptionFlag) -> bool:
        """One optimizer step; returns whether any rank asked to stop (one all-reduce, the
        step's only host synchronisation, carries both the loss and that flag)."""
        t, p, eng = self.t, self.p, self.eng
        attn_rate, mlp_rate = self.schedule.rates(p.iteration)
        wgrad = self.schedule.wgrad_fraction(p.iteration)
        budget = self.budget
        # A budget probe: the step's first micro-batch draws its weight gradients twice.
        probe = (WGradProbe() if budget is not None and wgrad > 0
                 and p.iteration % self.run_cfg.sat.budget_interval == 0 else None)
        loss_sum = torch.zeros((), device=self.dev)
        for micro, (ids, labels) in enumerate(self.train_ds.step_batches(
                self.data_pos, self.gbs, t.micro_batch_size, self.comm.dp_rank, self.comm.dp_size)):
            eng.sat.set_step(p.iteration, micro, attn_rate, mlp_rate, wgrad)
            eng.sat.probe = probe if micro == 0 else None
            self._check_token_ids(labels)
            loss = micro_batch_loss(eng, ids, labels, self.run_cfg, self.train_ds, self.dev)
            eng.backward(loss)
            eng.step()
            loss_sum += loss.detach()
        eng.sat.probe = None
        p.iteration += 1
        p.consumed_samples += self.gbs
        self.train_ds.advance(self.data_pos, self.gbs)
        fault_point("sigusr1", p.iteration)
        # One all-reduce (and one host sync) per step carries the loss, the stop votes and the
        # gradient norm. TP ranks hold equal losses, so the mean over all ranks is the mean
        # over DP; every rank holds the same (global) gradient norm.
        world = dist.get_world_size()
        gn = eng.grad_norm()
        gn = torch.as_tensor(float("nan") if gn is None else gn, dtype=torch.float32, device=self.dev)
        stop = torch.tensor(float(preemption.requested()), device=self.dev)
        variances = None if probe is None else probe.relative_variances()
        gap = torch.zeros((), device=self.dev) if variances is None else variances.mean().float().to(self.dev)
        stats = torch.stack([loss_sum / eng.grad_accum, stop, gn.reshape(()) / world, gap / world])
        dist.all_reduce(stats)
        loss_total, stop_votes, gn, gap = stats.tolist()
        loss = loss_total / world
        scalars = {"lm loss": loss, "learning-rate": eng.lr(), "grad-norm": gn,
                   "sat/omission-rate-attn": attn_rate, "sat/omission-rate-mlp": mlp_rate}
        wgrad_keep, head_keep = self._wgrad_keeps()
        if self.run_cfg.sat.samples_wgrad:
            scalars.update({"sat/wgrad-keep": wgrad_keep, "sat/wgrad-keep-head": head_keep})
        if probe is not None:
            # The same all-reduced gap on every rank: every rank takes the same new scale.
            scalars.update({"sat/quality-gap": gap, "sat/budget-scale": budget.update(gap)})
            eng.sat.wgrad_scale = budget.scale
        # ZeRO's step discards an update whose gradient norm is NaN/Inf (DeepSpeed 0.19); here
        # it is counted, and a run that keeps diverging stops before it can save garbage.
        if math.isfinite(loss) and math.isfinite(gn):
            p.skipped_in_row = 0
        else:
            p.skipped_in_row += 1
            p.skipped_total += 1
            if self.rank0:
                self.log(f" iteration {p.iteration:8d}/{t.train_iters:8d} | non-finite lm loss {loss} / grad norm "
                         f"{gn}: update skipped | number of skipped iterations: {p.skipped_total}")
            if p.skipped_in_row >= t.max_nonfinite_steps:
                self.tb.scalars(p.iteration, {"skipped-iterations": p.skipped_total})
                raise SatDistError(
                    f"{p.skipped_in_row} non-finite steps in a row (last at iteration {p.iteration}); stopped "
                    f"without saving, so resume picks the last good checkpoint; lower --lr or check the data")
        scalars["skipped-iterations"] = p.skipped_total
        kept_attn, keep_attn = _kept(eng.sat, "attn", self.model_cfg.num_layers)
        kept_mlp, keep_mlp = _kept(eng.sat, "mlp", self.model_cfg.num_layers)
        # Keep counts are whole (aligned) units per TP partition, so the rate applied differs
        # from the nominal one (3 KV groups at 0.3 keep 2: 0.33): log what was really omitted.
        scalars.update({"sat/kept-units-attn": kept_attn, "sat/kept-units-mlp": kept_mlp,
                        "sat/effective-omission-rate-attn": 1.0 - keep_attn,
                        "sat/effective-omission-rate-mlp": 1.0 - keep_mlp})
        self.flops.add_step(keep_attn, keep_mlp, wgrad_keep, head_keep)
        if p.iteration % t.log_interval == 0 or p.iteration == self.last:
            scalars.update(self._throughput())
            if self.rank0:
                self._console(scalars)
        self.tb.scalars(p.iteration, scalars)
        return stop_votes > 0

    def _check_token_ids(self, tokens: torch.Tensor) -> None:
        """Ids past the vocabulary (data made with another tokenizer) would index out of the
        embedding: a device assert on GPU. The batch is still on the CPU: no sync."""
        top = int(tokens.max())
        if top >= self.model_cfg.vocab_size:
            flag = "--data-path" if self.t.data_path else "--train-data-path"
            data = " ".join(self.t.data_path or self.t.train_data_path)
            raise SatDistError(f"{flag} {data}: token id {top} at iteration {self.p.iteration + 1} "
                               f"is outside the model's vocabulary ({self.model_cfg.vocab_size}); the data was "
                               f"made with another tokenizer: re-run tools/preprocess_data.py")

    def _throughput(self) -> dict:
        """Averages over the steps since the last log line (one device sync per log line)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        steps, dense, executed = self.flops.take()
        steps = max(steps, 1)
        elapsed = (now - self._interval_start) / steps
        dense, executed = dense / steps, executed / steps
        self._interval_start = now
        world, seq = dist.get_world_size(), self.t.seq_length
        mem_tag, mem = _max_memory()
        out = {"iteration-time": elapsed,
               "throughput/tokens-per-sec": self.gbs * seq / elapsed,
               "throughput/model-tflops-per-gpu": dense / elapsed / 1e12 / world,
               "throughput/executed-tflops-per-gpu": executed / elapsed / 1e12 / world,
               mem_tag: mem}
        if self.peak:
            out["throughput/mfu"] = dense / elapsed / world / self.peak
        return out

    def _console(self, s: dict) -> None:
        p, t = self.p, self.t
        eta = s["iteration-time"] * (self.last - p.iteration)
        self.log(f" iteration {p.iteration:8d}/{t.train_iters:8d} | consumed samples: {p.consumed_samples:10d} "
                 f"| elapsed time per iteration (ms): {s['iteration-time'] * 1000:.1f} "
                 f"| learning rate: {s['learning-rate']:.3E} | lm loss: {s['lm loss']:.6E} "
                 f"| grad norm: {s['grad-norm']:.3f} | tokens/s: {s['throughput/tokens-per-sec']:.0f} "
                 f"| model TFLOP/s/GPU: {s['throughput/model-tflops-per-gpu']:.3f} "
                 f"| SAT omitted attn/mlp: {s['sat/effective-omission-rate-attn']:.3f}/"
                 f"{s['sat/effective-omission-rate-mlp']:.3f} "
                 f"| number of skipped iterations: {p.skipped_total} "
                 f"| ETA: {time.strftime('%H:%M:%S', time.gmtime(eta))}")

    def _validate(self) -> None:
        for key, (ds, iters) in self.valid_sets.items():
            vloss = evaluate(self.eng, ds, self.run_cfg, self.comm, iters)
            ppl = math.exp(min(vloss, 50.0))
            name = key[len("valid"):]  # "" or "/NAME"
            self.tb.scalars(self.p.iteration, {f"lm loss validation{name}": vloss,
                                               f"lm loss validation ppl{name}": ppl})
            if not self.rank0:
                continue
            if name:
                self.log(f" validation at iteration {self.p.iteration} | lm loss validation{name}: {vloss:.6E} "
                         f"| lm loss validation ppl{name}: {ppl:.3f}")
            else:
                self.log(f" validation at iteration {self.p.iteration} | lm loss: {vloss:.6E} | lm loss PPL: {ppl:.3f}")

    def _test(self) -> None:
        """The test set (the split's test share, or --test-data-path), once at the end of
        training, as Megatron does: `lm loss test`."""
        if self.test_set is None:
            return
        iters = eval_micro_batches(self.test_set, self.run_cfg, self.comm.dp_size)
        if iters < 1:
            if self.rank0:
                self.log(f"test set skipped: {len(self.test_set)} samples, fewer than one micro-batch per DP rank")
            return
        loss = evaluate(self.eng, self.test_set, self.run_cfg, self.comm, iters)
        ppl = math.exp(min(loss, 50.0))
        self.tb.scalars(self.p.iteration, {"lm loss test": loss, "lm loss test ppl": ppl})
        if self.rank0:
            self.log(f" test at iteration {self.p.iteration} | lm loss test: {loss:.6E} | lm loss test ppl: {ppl:.3f}")

    def _eval_tasks(self) -> None:
        """--eval-tasks on the dense model now (every rank takes part); once per iteration (the
        interval's evaluation at the last step is the end of training's too)."""
        if self.downstream is not None and getattr(self, "_tasks_at", None) != self.p.iteration:
            self._tasks_at = self.p.iteration
            self.tb.scalars(self.p.iteration, self.downstream.run(self.eng, self.comm, self.p.iteration,
                                                                  self.p.consumed_samples, self.log))

    def _wgrad_keeps(self) -> tuple[float, float]:
        """(FLOP-weighted mean keep fraction of the decoder products' weight gradients, the LM
        head's) at the last step's settings: 1, 1 when nothing is sampled."""
        sat = self.eng.sat
        if not self.run_cfg.sat.samples_wgrad:
            return 1.0, 1.0
        w = self._product_flops
        total = sum(w.values()) * self.model_cfg.num_layers
        keep = sum(w[prod] * sat.wgrad_keep(layer, prod) for layer in range(self.model_cfg.num_layers) for prod in w)
        return keep / total, sat.wgrad_keep(self.model_cfg.num_layers, "head")

    def _manifest_extra(self) -> dict:
        """What the loop adds to a checkpoint's manifest: the data position of every dataset,
        and the quality budget's scale."""
        extra = {"data_positions": self.data_pos.to_manifest()}
        if self.budget is not None:
            extra["sat_budget"] = self.budget.state()
        if getattr(self.tb, "wandb_run_id", None):
            extra["wandb_run_id"] = self.tb.wandb_run_id  # a resume continues this W&B run
        return extra

    def _save(self) -> None:
        p = self.p
        if not self.t.save or p.iteration == self._saved_at:
            return  # nowhere to save, or this iteration's checkpoint is already complete
        if p.skipped_in_row:  # resume must pick a checkpoint from before a non-finite streak
            if self.rank0:
                self.log(f"not saving at iteration {p.iteration}: {p.skipped_in_row} non-finite step(s) in a row")
            return
        t0 = time.perf_counter()
        save_checkpoint(self.eng.engine, self.eng.model, self.t.save, p.iteration, p.consumed_samples,
                        self.comm, self.model_cfg, self.eng.stage3, self.definition,
                        extra={**self._manifest_extra(), "stage_start_iteration": self.stage_start},
                        keep_latest_k=self.t.keep_latest_k, log=self.log)
        self._saved_at = p.iteration
        if self.rank0:
            self.log(f"saved checkpoint at iteration {p.iteration} to {self.t.save} ({time.perf_counter() - t0:.1f} s)")


def train(run: RunConfig, eng: Engine, comm: ParallelComm, model_cfg: ModelConfig,
          datasets: dict[str, BlendedDataset], resume: Optional[tuple[str, dict]] = None,
          log=print, definition: Optional[dict] = None, downstream=None) -> Progress:
    """Train; `resume` is check_resume()'s (tag, manifest) when continuing a checkpoint;
    `definition` the run definition it was checked against (made here when None);
    `downstream` the --eval-tasks evaluation (sat_dist.eval.runner), or None."""
    trainer = Trainer(run, eng, comm, model_cfg, datasets, log, definition, downstream)
    if resume is not None:
        trainer.resume(*resume)
    return trainer.run()
