"""The per-step SAT state a model's layers read: rates, step, and how to select units.

One `SATState` is shared by all layers of a model. The training loop sets the step, the
micro-batch and the rates before each forward; each SAT module asks `kept_units` for the
indices of the units of its local partition to keep (None means: all, run dense).

A selection is made once per (layer, kind) and selection key, then reused: the key is the
optimizer step (granularity "step") or the (step, micro-batch) pair ("micro-batch"). So an
activation-recompute pass never scores, all-reduces or samples again, and with
granularity "step" neither do the step's later micro-batches.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from sat_dist.config import SATConfig
from sat_dist.model.comm import SINGLE_PROCESS, ParallelComm
from sat_dist.model.token_sampler import TokenSampler, WGradProbe
from sat_dist.sat.selection import layer_keep_count, pps_units, select_units, selection_generator

KINDS = ("attn", "mlp")
PRODUCTS = ("qkv", "proj", "fc1", "fc2")
"""A decoder layer's linear products, in the order of --sat-wgrad-tokens-linears."""
ScoresOut = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
UNSETTLED = object()
"""SATState.peek: the selection is made when the layer runs."""


class SATState:
    def __init__(self, cfg: Optional[SATConfig], comm: ParallelComm = SINGLE_PROCESS):
        self.cfg = cfg
        self.comm = comm
        self.step = 0
        self.micro = 0
        self.rates = {"attn": 0.0, "mlp": 0.0}
        # (layer, kind) -> global unit indices to keep, bypassing importance (tests, replays;
        # a forced selection has no mean activations, so it is never compensated)
        self.forced: dict[tuple[int, str], torch.Tensor] = {}
        # (layer, kind) -> (kept, total) in this rank's partition at the last forward
        self.kept: dict[tuple[int, str], tuple[int, int]] = {}
        # (layer, kind) -> local indices kept at the last forward (None: all)
        self.selected: dict[tuple[int, str], Optional[torch.Tensor]] = {}
        # (layer, kind) -> (selection key, kept indices, mean activations or None,
        #                  Horvitz-Thompson weights 1/pi of the kept units or None)
        self._made: dict[tuple[int, str], tuple] = {}

        self.wgrad = 0.0
        """The omitted token shares' multiplier this step (OmissionSchedule.wgrad_fraction)."""
        self.wgrad_scale = 1.0
        """The quality budget's multiplier of every keep fraction (1 without --sat-budget)."""
        self.probe: Optional[WGradProbe] = None
        """Set by the loop on a budget probe micro-batch: the samplers draw twice into it."""

    def set_step(self, step: int, micro: int = 0, attn: float = 0.0, mlp: float = 0.0, wgrad: float = 0.0) -> None:
        self.step, self.micro = int(step), int(micro)
        self.rates = {"attn": float(attn), "mlp": float(mlp)}
        self.wgrad = float(wgrad)

    def wgrad_keep(self, layer: int, product: str) -> float:
        """The fraction of tokens the weight gradient of `product` ("qkv", "proj", "fc1", "fc2",
        or "head" with layer = the layer count) is computed from this step (1: exact)."""
        cfg = self.cfg
        if cfg is None or self.wgrad <= 0.0:
            return 1.0
        if product == "head":
            keep = cfg.wgrad_tokens_head
        else:
            keeps = cfg.wgrad_linear_keeps
            keep = cfg.wgrad_tokens if keeps is None else keeps[layer * len(PRODUCTS) + PRODUCTS.index(product)]
        if cfg.budget > 0 and keep < 1.0:
            keep = min(1.0, max(cfg.budget_min_tokens, keep * self.wgrad_scale))
        return 1.0 - (1.0 - keep) * self.wgrad

    def wgrad_sampler(self, layer: int, product: str, sharded: Optional[str]) -> Optional[TokenSampler]:
        """The TokenSampler of `product`'s weight gradient in this micro-batch, or None (exact).
        sharded: "x" or "dy", the operand that TP splits by features (None at TP 1)."""
        keep = self.wgrad_keep(layer, product)
        if keep >= 1.0:
            return None
        key = (self.cfg.seed, self.step, self.micro, layer, product, self.comm.dp_rank)
        return TokenSampler(keep, self.cfg.wgrad_sampling, key, sharded if self.comm.tp_size > 1 else None,
                            self.comm.sum_over_tp, self.probe)

    def align(self, kind: str) -> int:
        if self.cfg is None:
            return 1
        return self.cfg.align_attn if kind == "attn" else self.cfg.align_mlp

    def kept_units(self, layer: int, kind: str, n_local: int, device: torch.device,
                   scores_fn: Callable[[torch.Generator, int], ScoresOut]) -> Optional[torch.Tensor]:
        """Local indices of the kept units of `kind` in `layer`, or None for all.

        scores_fn(generator, token_stride) -> [n_local] scores reduced over data parallel, or
        (scores, mean activations [n_local]) when the layer compensates (`selection_mean`).
        """
        forced = self.forced.get((layer, kind))
        if forced is not None:
            idx = self._local_forced(forced, n_local, device)
            self._made.pop((layer, kind), None)
            return self._record(layer, kind, idx, idx.numel(), n_local)
        if self.cfg is None:
            return self._record(layer, kind, None, n_local, n_local)
        k, key = self._keep_and_key(layer, kind, n_local)
        if k >= n_local:
            return self._record(layer, kind, None, n_local, n_local)
        micro = key[1]
        made = self._made.get((layer, kind))
        if made is None or made[0] != key:
            # Seeded from the selection key, never from global RNG state: every DP replica of
            # this partition draws the same units.
            gen = selection_generator(self.cfg.seed, self.step, micro, layer, self.comm.tp_rank, kind, device)
            scores = scores_fn(gen, self.cfg.token_stride)
            scores, mean = scores if isinstance(scores, tuple) else (scores, None)
            weights = None
            if self.cfg.selection == "pps":
                idx, weights = pps_units(scores, k, gen, self.cfg.pps_floor)
            else:
                idx = select_units(scores, k, self.cfg.selection, self.cfg.temperature, gen)
            made = self._made[(layer, kind)] = (key, idx, mean, weights)
        return self._record(layer, kind, made[1], k, n_local)

    def _keep_and_key(self, layer: int, kind: str, n_local: int) -> tuple[int, tuple]:
        """The units of (layer, kind) to keep now, and the key of their selection."""
        k = layer_keep_count(n_local, self.rates[kind], self.align(kind), self.cfg, kind, layer)
        micro = self.micro if self.cfg.granularity == "micro-batch" else 0
        return k, (self.step, micro, k)

    def peek(self, layer: int, kind: str, n_local: int):
        """What kept_units will return for (layer, kind) in this micro-batch if that is settled
        without scoring (all units, or a selection made earlier under the same key), else
        UNSETTLED: lets comm-sparse ZeRO-3 gather a product's rows before the product runs."""
        if (layer, kind) in self.forced:
            return UNSETTLED
        if self.cfg is None:
            return None
        k, key = self._keep_and_key(layer, kind, n_local)
        if k >= n_local:
            return None
        made = self._made.get((layer, kind))
        return made[1] if made is not None and made[0] == key else UNSETTLED

    def selection_mean(self, layer: int, kind: str) -> Optional[torch.Tensor]:
        """The mean activations [n_local] that came with the current selection of (layer, kind)
        (None if its scores_fn gave none, or the units were forced)."""
        made = self._made.get((layer, kind))
        return None if made is None else made[2]

    def selection_weights(self, layer: int, kind: str) -> Optional[torch.Tensor]:
        """The weights 1/pi [k] of the current kept units of (layer, kind) under --sat-selection
        pps, in the order of the kept indices (None for other selections, or forced units)."""
        made = self._made.get((layer, kind))
        return None if made is None else made[3]

    @property
    def compensate_mlp(self) -> bool:
        return self.cfg is not None and self.cfg.enabled and self.cfg.compensation == "mean"

    @property
    def mlp_backward_only(self) -> bool:
        """--sat-sparse-pass backward or weight-grad (the MLP's forward runs dense), at a
        nonzero MLP rate this step."""
        return (self.cfg is not None and self.cfg.enabled and self.cfg.sparse_pass in ("backward", "weight-grad")
                and self.rates["mlp"] > 0)

    @property
    def mlp_exact_input_grad(self) -> bool:
        """--sat-sparse-pass weight-grad: the MLP's input gradient is computed dense."""
        return self.cfg is not None and self.cfg.sparse_pass == "weight-grad"

    def _record(self, layer: int, kind: str, idx, k: int, n_local: int):
        self.kept[(layer, kind)] = (k, n_local)
        self.selected[(layer, kind)] = idx
        return idx

    def _local_forced(self, forced: torch.Tensor, n_local: int, device) -> torch.Tensor:
        lo = self.comm.tp_rank * n_local
        mine = forced[(forced >= lo) & (forced < lo + n_local)] - lo
        return mine.sort().values.to(device)
