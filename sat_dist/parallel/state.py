"""Process groups from megatron-core's parallel_state, turned into the model's hooks.

Layout (megatron-core's default order): consecutive global ranks form a tensor-parallel
group; ranks with the same TP rank across those groups form a data-parallel group.
"""

from __future__ import annotations

import inspect
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from sat_dist.errors import SatDistError
from sat_dist.model.comm import ParallelComm, _cross_entropy


def local_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a rank: LOCAL_RANK on a node whose ranks see all its GPUs, 0 when
    each task sees only its own (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES per rank)."""
    return local_rank % max(visible, 1)


def init_distributed(tp_size: int, timeout_minutes: int = 10) -> ParallelComm:
    """Join the job's process group (env:// from torchrun, deepspeed or srun) and build the
    TP and DP groups. One process without launcher variables runs as world size 1.
    timeout_minutes: of every collective (--distributed-timeout-minutes)."""
    if not dist.is_initialized():
        _env_from_slurm()
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_device_index(int(os.environ.get("LOCAL_RANK", 0)),
                                                     torch.cuda.device_count()))
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    data_parallel_size(dist.get_world_size(), tp_size)
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        kw = {"distributed_timeout_minutes": timeout_minutes}
        if "create_gloo_process_groups" in inspect.signature(ps.initialize_model_parallel).parameters:
            # No extra gloo groups (megatron-core >= 0.13 can skip them): nothing here uses
            # them, and on multi-NIC nodes without GLOO_SOCKET_IFNAME their creation can hang.
            kw["create_gloo_process_groups"] = False
        ps.initialize_model_parallel(tensor_model_parallel_size=tp_size, **kw)
    return comm_from_parallel_state()


def launch_world_size() -> int:
    """The number of processes launched (WORLD_SIZE from torchrun or deepspeed, SLURM_NTASKS
    from srun, 1 without a launcher), read before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def ranks_per_node() -> int:
    """Processes launched on this node, read before any process group exists: LOCAL_WORLD_SIZE
    (torchrun), LOCAL_SIZE (deepspeed), SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE ("8(x4)"
    from srun), else the world size (one node)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = os.environ.get(key, "").split("(")[0].split(",")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return launch_world_size()


def hpz_size_for_layout(per_node: int, tp_size: int, dp_size: int) -> int:
    """zero_hpz_partition_size "auto": the DP replicas of one TP partition on a node
    (per_node / TP), so that the backward's gathers stay inside the node; 1 (off) where the
    whole DP group is on one node, where the second partition would only cost memory."""
    size = math.gcd(max(1, per_node // tp_size), dp_size)
    return 1 if size >= dp_size else size


def data_parallel_size(world: int, tp_size: int) -> int:
    """world / TP; one clear error when TP does not divide the world size."""
    if tp_size < 1 or world % tp_size:
        raise SatDistError(f"--tensor-model-parallel-size {tp_size} does not divide the world size {world}; "
                           f"launch a multiple of {tp_size} processes")
    return world // tp_size


def comm_from_parallel_state() -> ParallelComm:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import mappings, vocab_parallel_cross_entropy

    tp_size = ps.get_tensor_model_parallel_world_size()
    dp_group = ps.get_data_parallel_group()
    dp_size = ps.get_data_parallel_world_size()

    def reduce_over_dp(t: torch.Tensor, op: str) -> torch.Tensor:
        if dp_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=dp_group)
        return t

    comm = ParallelComm(
        tp_size=tp_size,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        reduce_over_dp=reduce_over_dp,
        dp_size=dp_size,
        dp_rank=ps.get_data_parallel_rank(),
        dp_group=dp_group,
    )
    if tp_size > 1:
        comm.copy_to_tp = mappings.copy_to_tensor_model_parallel_region
        comm.reduce_from_tp = mappings.reduce_from_tensor_model_parallel_region
        comm.vocab_cross_entropy = lambda logits, target: vocab_parallel_cross_entropy(logits.float(), target)
        tp_group = ps.get_tensor_model_parallel_group()

        def sum_over_tp(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            dist.all_reduce(t, group=tp_group)
            return t
        comm.sum_over_tp = sum_over_tp
    else:
        comm.vocab_cross_entropy = _cross_entropy
    return comm


def hpz_partition_group(comm: ParallelComm, size: int):
    """The group of ZeRO++ hierarchical partitioning (`zero_hpz_partition_size`): `size`
    consecutive DP replicas of this rank's TP partition, which hold a second, group-local
    partition of the weights so that the backward's all-gathers stay inside a node.

    DeepSpeed builds that group from consecutive GLOBAL ranks and ignores the TP layout: at
    TP > 1 it would mix ranks that hold different TP shards of a weight and gather them into
    one tensor, silently wrong. This builds it inside the DP group instead, and registers it
    as DeepSpeed's (its ZeRO-3 optimizer reads the module-level group). Collective over the
    world: every rank creates every group, in the same order."""
    from deepspeed.utils import groups

    if size < 1 or comm.dp_size % size:
        raise SatDistError(f"--ds_config: zero_optimization.zero_hpz_partition_size {size} does not divide the "
                           f"data-parallel size {comm.dp_size}; set it to the GPUs per node / TP "
                           f"(a divisor of {comm.dp_size})")
    mine = tuple(dist.get_process_group_ranks(comm.dp_group)) if comm.dp_group is not None else (dist.get_rank(),)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    found = None
    for dp_ranks in sorted(set(every)):
        for start in range(0, len(dp_ranks), size):
            members = list(dp_ranks[start:start + size])
            group = dist.new_group(members)
            if dist.get_rank() in members:
                found = group
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = found
    return found


class MegatronMPU:
    """The `mpu` DeepSpeed expects, over megatron-core's groups (their names differ)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    # Some DeepSpeed code paths ask for the tensor-parallel names directly.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def destroy_distributed() -> None:
    """Tear down groups; without destroy_process_group a rank now and then aborts at exit."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _env_from_slurm() -> None:
    """Map srun's variables to env:// ones when no launcher set RANK."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        raise SatDistError("srun without MASTER_ADDR: export MASTER_ADDR (the first node) and MASTER_PORT "
                           "in the batch script, as launch/slurm/*.sbatch do")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
