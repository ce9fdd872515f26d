"""Every access to DeepSpeed's parameter and optimizer state, in one place.

Under ZeRO-3 a parameter's data is partitioned over its data-parallel group (p.ds_shape is
its TP-local shape, p.shape is empty); under ZeRO-1/2 the fp32 master weights and Adam
moments are partitioned flat. This module reads and writes them whole, per parameter, by
DeepSpeed's public helpers where it has them. Functions that gather or scatter are
collectives over the DP group: every DP rank must call them, in the same order.
Used by sat_dist.train.engine (weights in) and sat_dist.checkpoint.state (save, resume).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from sat_dist.errors import SatDistError
from sat_dist.model.comm import ParallelComm

MOMENTS = ("exp_avg", "exp_avg_sq")
"""Adam's per-parameter state keys."""


def unique_params(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) once each (a tied LM head shares the embedding's)."""
    seen = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def local_shape(p: torch.nn.Parameter, stage3: bool) -> tuple[int, ...]:
    """The parameter's TP-local shape (not its ZeRO-3 partition's)."""
    return tuple(p.ds_shape if stage3 else p.shape)


def full_fp32(p: torch.nn.Parameter, stage3: bool) -> torch.Tensor:
    """The fp32 master copy of p, whole (gathered over DP). Collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)
    if full is None:  # no ZeRO partitioning of this parameter: p is its own master
        return p.detach()
    return full.reshape(p.ds_shape if stage3 else p.shape)


def set_full_fp32(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set the fp32 master copy of p from its whole (TP-local) value."""
    from deepspeed.utils import safe_set_full_fp32_param

    # The value stays where it is (a resume's is memory-mapped on the CPU): DeepSpeed cuts this
    # rank's partition out of it first, so only that slice is read and copied to the device.
    safe_set_full_fp32_param(p, value.to(torch.float32))


def relink_moments(optimizer) -> None:
    """Point every parameter's ZeRO-1/2 fragment at its Adam state as it is now.

    DeepSpeed's ZeRO-1/2 (and bf16) optimizers link each parameter to its slice of Adam's
    state once, after stepping the FIRST param group, when the other groups have no state
    yet: the parameters of those groups (here the norms, no weight decay) are then linked to
    nothing and their moments can be neither read nor written (DeepSpeed 0.19). A no-op under
    ZeRO-3, whose parameters do not use these links."""
    inner = _inner(optimizer)
    lp_groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "bf16_groups", None)
    hp_flats = getattr(optimizer, "single_partition_of_fp32_groups", None) or \
        getattr(optimizer, "fp32_groups_flat_partition", None)
    if not lp_groups or not hp_flats:
        return
    for lps, flat in zip(lp_groups, hp_flats):
        if flat in inner.state:
            for lp in lps:
                if getattr(lp, "_hp_mapping", None) is not None:
                    lp._hp_mapping.set_optim_state_fragment(flat, inner.state[flat])


def full_moment(optimizer, p: torch.nn.Parameter, key: str) -> Optional[torch.Tensor]:
    """Adam moment `key` of p, whole; None before the first optimizer step. Collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if adam_step(optimizer) is None:
        return None  # no optimizer step yet: the moments do not exist
    if hasattr(p, "_hp_mapping"):
        relink_moments(optimizer)
    full = safe_get_full_optimizer_state(p, key)
    if full is None:
        state = _inner(optimizer).state.get(p, {})
        full = state.get(key)
    return None if full is None else full.reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)


def set_full_moment(optimizer, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
    """Set Adam moment `key` of p from its whole value (call ensure_adam_state first)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    if hasattr(p, "_hp_mapping"):
        relink_moments(optimizer)
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        safe_set_full_optimizer_state(p, value.to(torch.float32), key)  # sliced first, as set_full_fp32
    else:
        _inner(optimizer).state[p][key].copy_(value)


def _inner(optimizer):
    """The torch optimizer under DeepSpeed's ZeRO wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def adam_step(optimizer) -> Optional[int]:
    """Adam's step count; None before the first step."""
    for state in _inner(optimizer).state.values():
        if "step" in state:
            return int(state["step"])
    return None


def ensure_adam_state(optimizer, step: Optional[int]) -> None:
    """Create the (lazily made) Adam state at `step`, so that saved moments can be written into it."""
    if step is None:
        return
    inner = _inner(optimizer)
    # The tensors Adam steps: ZeRO-3's and ZeRO-1/2's flat fp32 partitions, else the params.
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None) or \
        getattr(optimizer, "single_partition_of_fp32_groups", None) or \
        [p for group in inner.param_groups for p in group["params"]]
    # torch's fused (and capturable) AdamW keeps `step` on the parameter's device and refuses
    # a CPU one there; the other implementations keep it on the CPU.
    on_device = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
    for p in flats:
        st = inner.state[p]
        for key in MOMENTS:
            if key not in st:
                st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        old = st.get("step")
        if old is None or torch.is_tensor(old):
            st["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
        else:
            st["step"] = step


@torch.no_grad()
def load_local_weights(model: torch.nn.Module, local: Optional[dict[str, torch.Tensor]], comm: ParallelComm,
                       stage3: bool) -> None:
    """Write a TP rank's local tensors into the (possibly ZeRO-3 partitioned) model. Under
    ZeRO-3, ranks other than DP rank 0 pass None: they only take part in the collectives."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(local)) if local is not None else []
    if missing:
        raise SatDistError(f"weights: missing {missing[0]} (and {len(missing) - 1} more)")
    for name, p in params.items():
        write_local_weight(p, name, None if local is None else local[name], comm, stage3)


@torch.no_grad()
def write_local_weight(p: torch.nn.Parameter, name: str, value: Optional[torch.Tensor], comm: ParallelComm,
                       stage3: bool) -> None:
    """Write one parameter's TP-local tensor; a collective over the DP group under ZeRO-3,
    where only DP rank 0 needs the value (the others may pass None)."""
    import deepspeed

    shape = local_shape(p, stage3)
    if value is not None and tuple(value.shape) != shape:
        raise SatDistError(f"weights: {name} has shape {tuple(value.shape)}, the model expects {shape}")
    # DeepSpeed 0.19 reads modifier_rank as a rank WITHIN the parameter's DP group (it maps
    # it to a global rank itself); older notes say global. Either way a wrong reading drops
    # or scrambles the write silently, so the write is read back and checked.
    with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=stage3):
        if not stage3 or comm.dp_rank == 0:
            p.copy_(value.to(p.dtype))
    with deepspeed.zero.GatheredParameters([p], enabled=stage3):
        if value is not None and not torch.equal(p.detach().cpu(), value.to(p.dtype)):
            raise SatDistError(f"weights: writing {name} into the ZeRO-3 partitions did not take "
                               f"(DeepSpeed {deepspeed.__version__}); please report this")


@torch.no_grad()
def init_fp32_masters(model: torch.nn.Module, local: Optional[dict[str, torch.Tensor]], comm: ParallelComm,
                      stage3: bool) -> None:
    """Set every fp32 master weight from the checkpoint's own values. DeepSpeed makes the
    masters from the model's parameters, which under --bf16 hold the weights rounded to bf16;
    without this a run starts from a rounded model. Under ZeRO-3 only DP rank 0 holds `local`
    and broadcasts each tensor (every rank cuts its own partition from the whole value):
    a collective over the DP group, in load_local_weights' order."""
    import torch.distributed as dist

    for name, p in model.named_parameters():
        value = None if local is None else local[name]
        if stage3 and comm.dp_size > 1:
            whole = torch.empty(local_shape(p, stage3), dtype=torch.float32, device=p.device)
            if comm.dp_rank == 0:
                whole.copy_(value)
            dist.broadcast(whole, src=dist.get_global_rank(comm.dp_group, 0), group=comm.dp_group)
            value = whole
        set_full_fp32(p, value)


def gather_param_state(optimizer, p: torch.nn.Parameter, stage3: bool, owner: int,
                       comm: ParallelComm) -> Optional[dict[str, Optional[torch.Tensor]]]:
    """{"param": fp32 master, each of MOMENTS: Adam moment or None}, whole (TP-local), on DP
    rank `owner` only (None on the others). Collective: every DP rank calls it for every
    parameter, in the same order. Under ZeRO-3 each rank sends its partition to the owner (a
    gather: 12 bytes per parameter reach the owner, none the others); ZeRO-1/2 partitions do
    not follow parameter boundaries, so there DeepSpeed's all-reduce assembles them."""
    if not (stage3 and hasattr(p, "ds_id") and comm.dp_size > 1):
        state = {"param": full_fp32(p, stage3)}
        for key in MOMENTS:
            state[key] = full_moment(optimizer, p, key)
        return state if comm.dp_rank == owner else None
    state = {"param": _gather_z3(p, None, owner, comm)}
    stepped = adam_step(optimizer) is not None
    for key in MOMENTS:
        state[key] = _gather_z3(p, key, owner, comm) if stepped else None
    return state if comm.dp_rank == owner else None


def _gather_z3(p: torch.nn.Parameter, key: Optional[str], owner: int, comm: ParallelComm) -> Optional[torch.Tensor]:
    """ZeRO-3: p's fp32 master (key None) or Adam moment `key`, whole on DP rank `owner`.
    Rank r of the DP group holds elements [r * n, (r + 1) * n) of the flattened, padded value."""
    import torch.distributed as dist

    part, _ = p._z3_optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=True, optim_state_key=key)
    part = part.to(p.ds_tensor.device).contiguous()  # an offloaded (CPU) partition goes via the device
    mine = comm.dp_rank == owner
    parts = [torch.empty_like(part) for _ in range(comm.dp_size)] if mine else None
    dist.gather(part, parts, dst=dist.get_global_rank(comm.dp_group, owner), group=comm.dp_group)
    if not mine:
        return None
    return torch.cat(parts)[:p.ds_numel].reshape(p.ds_shape)


def write_param_state(optimizer, p: torch.nn.Parameter, name: str, state: dict[str, torch.Tensor],
                      comm: ParallelComm, stage3: bool) -> None:
    """Write a parameter's whole TP-local weight (into the model and the fp32 master) and its
    Adam moments (those in `state`); the inverse of gather_param_state. Collective."""
    if _writes_partitions(optimizer, p, stage3):
        # ZeRO-3: every rank cuts its own partition of the master (and of each moment) from
        # the memory-mapped value, so it reads 1/DP of it and nothing is communicated; the
        # model's own partitions follow from the masters in finish_param_writes.
        if tuple(state["param"].shape) != local_shape(p, stage3):
            raise SatDistError(f"weights: {name} has shape {tuple(state['param'].shape)}, the model expects "
                               f"{local_shape(p, stage3)}")
    else:
        # Under ZeRO-3 only DP rank 0's value is written (and broadcast): the others need not read it.
        write_local_weight(p, name, state["param"] if not stage3 or comm.dp_rank == 0 else None, comm, stage3)
    set_full_fp32(p, state["param"])
    for key in MOMENTS:
        if key in state:
            set_full_moment(optimizer, p, key, state[key])


def _writes_partitions(optimizer, p: torch.nn.Parameter, stage3: bool) -> bool:
    """Whether write_param_state can leave the model's ZeRO-3 partitions to finish_param_writes:
    p is partitioned and DeepSpeed keeps the model's partitions in flat buffers beside the
    fp32 masters (not when parameters are offloaded to NVMe, where they are swapped instead)."""
    return (stage3 and hasattr(p, "ds_id") and hasattr(optimizer, "fp32_partitioned_groups_flat")
            and all(f is not None for f in getattr(optimizer, "fp16_partitioned_groups_flat", [None])))


@torch.no_grad()
def finish_param_writes(optimizer, stage3: bool) -> None:
    """After write_param_state for every parameter: under ZeRO-3, copy the fp32 masters into
    the model's partitions (rounding to bf16 where the model is bf16), as DeepSpeed's step
    does after an update, then let DeepSpeed refresh what it keeps beside them (hpZ's
    secondary partitions, the whole copies of small persistent parameters). Collective."""
    if not stage3 or not hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return
    if any(f is None for f in getattr(optimizer, "fp16_partitioned_groups_flat", [None])):
        return  # write_param_state wrote the model's weights itself
    for lp, hp in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
        if hp.numel():
            lp.data.copy_(hp.data)
    optimizer.checkpoint_event_epilogue()


def engine_counters(engine) -> dict:
    """What a resume needs of the DeepSpeed engine beyond the parameters: Adam's step, the LR
    schedule's state and the count of skipped (non-finite) steps."""
    return {
        "optimizer_step": adam_step(engine.optimizer),
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
    }


def restore_engine_counters(engine, iteration: int, consumed_samples: int, lr_scheduler: Optional[dict],
                            skipped_steps: int, lr_position: Optional[int] = None) -> None:
    """Set the engine's step and sample counters and LR schedule (as engine_counters saved
    them). `lr_position`: instead of loading a saved schedule, put the engine's own (the
    flags') at this step (a new stage continues the iteration count with its own LR)."""
    sched = engine.lr_scheduler
    if sched is not None and lr_position is not None:
        # Each group's lr from its base lr (this run's --lr) and the flags' factor, as
        # LambdaLR computes it (its step() would warn that no optimizer step came first).
        sched.last_epoch = lr_position
        lrs = [base * factor(lr_position) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
    elif sched is not None and lr_scheduler:
        sched.load_state_dict(lr_scheduler)
        # load_state_dict restores the schedule's position but not the learning rate the
        # optimizer uses for its next step; without this the first resumed step is off.
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = iteration
    engine.global_samples = consumed_samples
    engine.skipped_steps = skipped_steps
