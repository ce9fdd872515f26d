"""DeepSpeed engine over the data-parallel group: ZeRO, optimizer, LR schedule, weights in.

The DeepSpeed JSON keeps what is DeepSpeed's (ZeRO stage, offload, communication); batch
sizes, clipping, bf16 and AdamW settings come from the flags, as in Megatron-LM. A JSON
value that contradicts a flag is an error rather than a silent choice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from sat_dist.config import ModelConfig, SATConfig, TrainConfig, read_json_object
from sat_dist.errors import SatDistError
from sat_dist.model.comm import ParallelComm
from sat_dist.model.layout import layout_of
from sat_dist.model.llama import LlamaModel
from sat_dist.model.sat_state import SATState
from sat_dist.parallel.row_sparse_zero import RowSparseZero, reuse_distance_keeps, unsupported_reason
from sat_dist.parallel.state import MegatronMPU, hpz_partition_group, hpz_size_for_layout, ranks_per_node
from sat_dist.parallel.zero import init_fp32_masters, load_local_weights
from sat_dist.train.lr import schedule_of

DEFAULT_DS_CONFIG = {"zero_optimization": {"stage": 3}}


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it has no zero_optimization)."""
    return ds.get("zero_optimization", {}).get("stage", 0)


def load_ds_config(path: Optional[str]) -> dict:
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    cfg = read_json_object(path, "--ds_config")
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2, 3):
        raise SatDistError(f"--ds_config {path}: zero_optimization.stage: got {stage!r}; allowed: 0, 1, 2, 3")
    return cfg


def fill_ds_config(ds: dict, t: TrainConfig, dp_size: int, where: str) -> dict:
    """Set the keys the flags own; refuse contradictions."""
    ds = copy.deepcopy(ds)
    gbs = t.global_batch_size or t.micro_batch_size * dp_size
    if gbs % (t.micro_batch_size * dp_size):
        raise SatDistError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size "
                           f"{t.micro_batch_size} x data-parallel size {dp_size}")
    owned = {
        "train_batch_size": gbs,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gbs // (t.micro_batch_size * dp_size),
        # DeepSpeed clips at 1.0 when unset: always set it explicitly.
        "gradient_clipping": t.clip_grad,
    }
    for key, value in owned.items():
        mine = ds.get(key, "auto")
        if mine != "auto" and mine != value:
            raise SatDistError(f"--ds_config {where}: {key}={mine} contradicts the flags ({value}); "
                               f"remove it from the JSON or set it to \"auto\"")
        ds[key] = value
    if ds.get("fp16", {}).get("enabled"):
        raise SatDistError(f"--ds_config {where}: fp16 is not supported; use --bf16")
    if "scheduler" in ds:
        raise SatDistError(f"--ds_config {where}: has a scheduler; the LR schedule comes from --lr, --min-lr, "
                           f"--lr-warmup-iters and --lr-decay-style: remove it from the JSON")
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") not in ("auto", bool(t.bf16)):
        raise SatDistError(f"--ds_config {where}: bf16.enabled={bf16['enabled']} contradicts the flags "
                           f"(--bf16 {'given' if t.bf16 else 'not given'}); remove it or set it to \"auto\"")
    bf16["enabled"] = bool(t.bf16)
    if t.bf16:
        # Under ZeRO, DeepSpeed accumulates gradients over micro-batches and reduces them over
        # the DP group in the model's dtype unless told otherwise: the 7B defaults sum 32 bf16
        # micro-batch gradients and reduce them over 32+ ranks in bf16. Megatron-LM and
        # torchtitan do both in fp32, and so do we unless the JSON sets these keys.
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        ds.setdefault("communication_data_type", "fp32")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise SatDistError(f"--ds_config {where}: optimizer.type {opt.get('type')!r}; allowed: AdamW")
    params = opt.setdefault("params", {})
    flags = {"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps, "weight_decay": t.weight_decay}
    for key, value in flags.items():
        mine = params.get(key, "auto")
        if mine != "auto" and (list(mine) if isinstance(mine, (list, tuple)) else mine) != value:
            raise SatDistError(f"--ds_config {where}: optimizer.params.{key}={mine} contradicts the flags "
                               f"({value}); remove it from the JSON or set it to \"auto\"")
    params.update(flags)
    opt["type"] = "AdamW"
    # torch's own AdamW, fused (one pass, no temporaries), on CPU and on CUDA: DeepSpeed's
    # FusedAdam is JIT-built with nvcc at first use on every node (a missing CUDA_HOME fails
    # the run, a killed build leaves a lock that hangs the next one). On CPU the default
    # single-tensor AdamW allocated sqrt/div temporaries of the whole partition: its phase was
    # 40% of a 7B-width ZeRO-3 step (docs/PERFORMANCE.md); fused measured 4.5x faster. A JSON
    # that sets torch_adam false gets DeepSpeed's op (prebuilt with DS_BUILD_FUSED_ADAM=1).
    params.setdefault("torch_adam", True)
    if params["torch_adam"]:
        params.setdefault("fused", True)
    if params.get("torch_adam"):
        params.setdefault("adam_w_mode", True)
    z = ds.get("zero_optimization", {})
    if z.get("zero_hpz_partition_size") == "auto":
        z["zero_hpz_partition_size"] = hpz_size_for_layout(ranks_per_node(), t.tensor_model_parallel_size, dp_size)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


@dataclass
class Engine:
    engine: object
    """The DeepSpeedEngine (the methods below are what the training loop uses of it)."""
    model: LlamaModel
    """The module inside the engine."""
    sat: SATState
    ds_config: dict
    grad_accum: int
    row_zero: Optional[RowSparseZero] = None
    """Comm-sparse ZeRO-3 of SAT's weights, or None (DeepSpeed gathers and reduces them whole)."""

    @property
    def stage3(self) -> bool:
        """ZeRO-3: parameters are partitioned over the DP group (gathered for use)."""
        return zero_stage(self.ds_config) == 3

    def __call__(self, ids: torch.Tensor, labels: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                 segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token loss of one micro-batch (the model's forward through the engine);
        position_ids, segment_ids [b, s]: document boundaries (sat_dist.data.documents)."""
        return self.engine(ids, labels, position_ids=position_ids, segment_ids=segment_ids)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the micro-batch's gradient (DeepSpeed scales it by 1 / grad_accum)."""
        self.engine.backward(loss)
        if self.row_zero is not None:  # comm-sparse's reduces still in flight
            self.row_zero.finish_backward()

    def step(self) -> None:
        """DeepSpeed's step: the optimizer and LR schedule step at the accumulation boundary."""
        self.engine.step()

    def grad_norm(self) -> Optional[float]:
        """Global gradient norm of the last optimizer step (None before the first)."""
        return self.engine.get_global_grad_norm()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def train(self, mode: bool = True) -> None:
        """Training (True) or evaluation (False) mode of the model."""
        self.engine.train(mode)


def deepspeed_config(t: TrainConfig, dp_size: int) -> dict:
    """The DeepSpeed config this run uses: --ds_config with the flags' values filled in."""
    return fill_ds_config(load_ds_config(t.ds_config), t, dp_size, t.ds_config or "(default)")


def build_engine(model_cfg: ModelConfig, sat_cfg: SATConfig, t: TrainConfig, comm: ParallelComm,
                 hf_state_dict: Optional[dict] = None, ds_config: Optional[dict] = None) -> Engine:
    """The model (SAT off for the dense schedule) inside DeepSpeed. `ds_config`: the run's
    DeepSpeed config when the caller has made it already (deepspeed_config)."""
    import deepspeed

    # On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce for inference at its first
    # init (30-70 s, and a build killed midway leaves a lock that hangs every later run).
    # Training never uses it; marking it unavailable skips the build.
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed's own comm layer must wrap the process group we made, or its config code
    # silently falls back to a world size of 1.
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    ds = ds_config if ds_config is not None else deepspeed_config(t, comm.dp_size)
    sat = SATState(sat_cfg if sat_cfg.enabled else None, comm)
    stage3 = zero_stage(ds) == 3
    row_sparse = comm_sparse_wanted(t.sat_comm_sparse, sat_cfg, ds, model_cfg, t, comm.dp_size)
    # Same seed on every DP replica of a TP partition (ZeRO-3 keeps one rank's init); a
    # different one per TP rank so that shards are not copies of each other.
    torch.manual_seed(t.seed + 1009 * comm.tp_rank)
    hpz = ds.get("zero_optimization", {}).get("zero_hpz_partition_size", 1)
    hpz_group = hpz_partition_group(comm, hpz) if stage3 and hpz > 1 else None
    with deepspeed.zero.Init(data_parallel_group=comm.dp_group, config_dict_or_path=ds, enabled=stage3,
                             mpu=MegatronMPU(), zero_param_parallel_group=hpz_group):
        model = LlamaModel(model_cfg, sat, comm, recompute=t.recompute_activations)
    if hf_state_dict is not None:
        from sat_dist.checkpoint.hf import shard_hf_state_dict

        # Under ZeRO-3 only DP rank 0 of each TP partition reads the weights (and only its
        # TP shard, one tensor at a time); the write broadcasts them to the DP group.
        reads = not stage3 or comm.dp_rank == 0
        local = shard_hf_state_dict(hf_state_dict, model_cfg, comm.tp_size, comm.tp_rank) if reads else None
        load_local_weights(model, local, comm, stage3)
    else:
        local = None
    groups = optimizer_param_groups(model)

    lr_of = schedule_of(t)

    def schedule(optimizer):
        # LambdaLR scales the optimizer's lr (--lr) by the factor. With --lr 0 every value is
        # 0 (validate keeps --min-lr and --lr-warmup-init within [0, --lr]), so the factor is
        # 0 rather than 0/0; with --lr-warmup-init > 0 the factor at step 0 is init/lr.
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_of(step) / t.lr if t.lr > 0 else 0.0)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds,
                                           lr_scheduler=schedule, mpu=MegatronMPU(),
                                           dist_init_required=False)
    if hf_state_dict is not None and t.bf16:
        # The bf16 parameters hold the checkpoint rounded; the masters take its own values.
        init_fp32_masters(model, local, comm, stage3)
    if row_sparse:
        sat_weights = [[layer.self_attention.qkv_weight, layer.self_attention.proj_weight, layer.mlp.fc1_weight,
                        layer.mlp.fc2_weight] for layer in model.layers]
        # Under activation recompute the forward's saved rows are dropped and the recomputed
        # forward's kept for the backward: two gathers per micro-batch, as DeepSpeed's.
        keep = frozenset(id(p) for ps in sat_weights for p in ps) if t.recompute_activations else \
            reuse_distance_keeps(sat_weights, model.output_layer.weight.ds_numel, ds)
        row_zero = RowSparseZero(engine.optimizer, comm.dp_group, sat_cfg.metric, keep)
        use_row_sparse_zero(model, row_zero)
    else:
        row_zero = None
    return Engine(engine, model, sat, ds, ds["gradient_accumulation_steps"], row_zero)


def comm_sparse_wanted(mode: str, sat_cfg: SATConfig, ds: dict, model_cfg: ModelConfig, t: TrainConfig,
                       dp_size: int) -> bool:
    """Whether --sat-comm-sparse MODE turns comm-sparse ZeRO-3 on for this run; "on" where it
    cannot run is an error naming why. "auto": on where it can run, DP > 1 and the bytes
    model predicts at most zero_bytes.AUTO_MAX_RATIO (0.75) of the whole-weight path's bytes for
    SAT's weights (why that line: its docstring)."""
    if mode == "off":
        return False
    reason = unsupported_reason(sat_cfg, ds)
    if reason is not None and mode == "on":
        raise SatDistError(f"--sat-comm-sparse on: cannot run because {reason}; use --sat-comm-sparse auto or off")
    if reason is not None:
        return False
    from sat_dist.parallel.zero_bytes import AUTO_MAX_RATIO

    return mode == "on" or (dp_size > 1 and _auto_prediction(sat_cfg, ds, model_cfg, t, dp_size)[0] <= AUTO_MAX_RATIO)


def _auto_prediction(sat_cfg: SATConfig, ds: dict, model_cfg: ModelConfig, t: TrainConfig,
                     dp_size: int) -> tuple[float, str]:
    """(ratio, words): comm-sparse's bytes per optimizer step for SAT's weights (padded kept
    rows, scoring) over the whole-weight path's, at the configured omission rates (a
    ladder's highest) and their aligned keep counts, this run's micro-batch, accumulation,
    dtypes and scoring metric; gathered again for backward unless ZeRO-3's reuse distance
    keeps every layer's weights (reuse_distance_keeps' rule for the bottom layer)."""
    from sat_dist.parallel.zero_bytes import sat_ratio, sat_rows, step_bytes
    from sat_dist.sat.selection import keep_count

    tp = t.tensor_model_parallel_size
    groups, f = model_cfg.num_query_groups // tp, model_cfg.ffn_hidden_size // tp
    keep_attn = keep_count(groups, sat_cfg.omission_attn, sat_cfg.align_attn, sat_cfg, "attn") / groups
    keep_mlp = keep_count(f, sat_cfg.omission_mlp, sat_cfg.align_mlp, sat_cfg, "mlp") / f
    z = ds.get("zero_optimization", {})
    layer = sum(sat_rows(model_cfg, tp).values()) * model_cfg.hidden_size
    head = model_cfg.padded_vocab_size(tp) // tp * model_cfg.hidden_size
    regather = t.recompute_activations or \
        2 * (model_cfg.num_layers - 1) * layer + head >= z.get("stage3_max_reuse_distance", 1_000_000_000)
    w_bytes = 2 if t.bf16 else 4
    g_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}.get(ds.get("communication_data_type"), w_bytes)
    b = step_bytes(model_cfg, dp_size, tp, t.micro_batch_size * t.seq_length, ds["gradient_accumulation_steps"],
                   keep_attn, keep_mlp, sat_cfg.token_stride, w_bytes=w_bytes, g_bytes=g_bytes, x_bytes=w_bytes,
                   regather=regather, metric=sat_cfg.metric)
    ratio = sat_ratio(b)
    return ratio, (f"predicted {ratio:.3f} of the whole-weight bytes for SAT's weights at DP {dp_size}, "
                   f"omission {sat_cfg.omission_attn:g},{sat_cfg.omission_mlp:g}")


def comm_sparse_line(mode: str, sat_cfg: SATConfig, ds: dict, model_cfg: ModelConfig, t: TrainConfig,
                     dp_size: int) -> str:
    """The start-up log line saying whether comm-sparse ZeRO-3 is on, and why."""
    from sat_dist.parallel.zero_bytes import AUTO_MAX_RATIO

    if mode == "off":
        return "comm-sparse ZeRO-3: off (--sat-comm-sparse off)"
    reason = unsupported_reason(sat_cfg, ds)
    if reason is not None:
        return f"comm-sparse ZeRO-3: off ({reason})"
    rows = "SAT's weights gathered and reduced by kept rows"
    if dp_size == 1:
        # One DP rank sends nothing: the kept-row bookkeeping would only cost (measured on
        # SmolLM2-135M at one rank, docs/PERFORMANCE.md), so auto keeps DeepSpeed's path.
        return f"comm-sparse ZeRO-3: on (--sat-comm-sparse on; {rows})" if mode == "on" else \
            "comm-sparse ZeRO-3: off (data-parallel size 1: no ZeRO traffic to thin)"
    ratio, predicted = _auto_prediction(sat_cfg, ds, model_cfg, t, dp_size)
    if mode == "on":
        return f"comm-sparse ZeRO-3: on (--sat-comm-sparse on; {predicted}; {rows})"
    if ratio <= AUTO_MAX_RATIO:
        return f"comm-sparse ZeRO-3: on (auto: {predicted}, on at <= {AUTO_MAX_RATIO:.2f}; {rows})"
    return (f"comm-sparse ZeRO-3: off (auto: {predicted}; on needs <= {AUTO_MAX_RATIO:.2f}; "
            f"--sat-comm-sparse on forces it)")


def use_row_sparse_zero(model: LlamaModel, zero: RowSparseZero) -> None:
    """Let every SAT module gather and reduce its weights through `zero` (kept rows only)."""
    for layer in model.layers:
        layer.self_attention.use_row_zero(zero)
        layer.mlp.use_row_zero(zero)
    zero.register_order([prod for layer in model.layers
                         for prod in layer.self_attention.row_products() + layer.mlp.row_products()])


def optimizer_param_groups(model: LlamaModel) -> list[dict]:
    """AdamW's parameter groups: weight decay where sat_dist.model.layout says so (not the norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if layout_of(name).weight_decay else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
