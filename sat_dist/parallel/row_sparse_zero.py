"""Communication-sparse ZeRO-3 for SAT's weights: gather and reduce only the kept rows.

Under ZeRO-3, DeepSpeed partitions each parameter flat over its data-parallel group (rank q
holds elements [q*n, (q+1)*n) of the flattened weight), all-gathers it whole before the
module's forward (and again before its backward once released) and reduce-scatters a
full-size gradient. SAT's products read only the kept rows of its weights, every DP replica
of a TP partition keeps the same rows, and the omitted rows' gradients are exactly zero. So
for SAT's weights (fc1, fc2, qkv, proj) this layer takes the gather and the reduce over:

  gather  each rank sends the elements of the kept rows that lie in its partition; in flat
          order the kept rows' elements split over the ranks contiguously, so the
          all-gathered shares, concatenated in rank order, are the kept rows, in order;
  reduce  each rank's kept-row gradient [k, h] is cut at the same offsets and
          reduce-scattered (pre-divided by the DP size and in DeepSpeed's communication
          dtype, as DeepSpeed's own reduce), and each rank's share is written, zeros
          elsewhere, into DeepSpeed's gradient partition through the optimizer's own
          `partition_grads` (which copies on the first micro-batch and accumulates after).

Everything else stays DeepSpeed's: the partitions, AdamW over them (omitted rows see zero
gradients: their moments decay and weight decay applies, as dense), global gradient-norm
clipping, optimizer offload, checkpoints. Shares differ in size between ranks; each
collective pads to the largest.

Scoring (the importance of every unit, made once per step before the first product) reads
every row of the weights it scores (fc1's, and qkv's value rows). Two routes give the same
scores; each scoring takes the one that moves fewer bytes:
  tokens   the scored tokens are all-gathered over DP ([dp * s/stride, h]); each rank
           computes the products of the rows in its partition and one all-reduce of
           [tokens, rows] completes them: every rank then scores every unit over the global
           tokens. Cheap while dp * s/stride is small against the rows' width h.
  weights  the rows scored are gathered whole (once per step) and each rank scores its own
           tokens, the statistics reduced over DP as on the dense path.
`wanda`, `maxip` and `magnitude` read whole weights and gather them whole for scoring.

Used by sat_dist.model.llama (the model sees only `linear`, `mlp_scores`,
`attention_scores`), attached by sat_dist.train.engine.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sat_dist.model.token_sampler import weight_grad_operands
from sat_dist.parallel.zero_bytes import scoring_bytes
from sat_dist.sat.importance import attention_scores, mlp_scores, no_reduce

PHASES = ("forward_gather", "backward_gather", "grad_reduce", "scoring")
"""What bytes_moved counts, per rank: the collectives' traffic by what they are for."""


class RowSparseZero:
    """Kept-row gathers and reduces of ZeRO-3 partitioned 2-D weights over one DP group."""

    def __init__(self, optimizer, group, metric: str, keep_for_backward: frozenset = frozenset()):
        self.opt = optimizer
        self.keep_for_backward = keep_for_backward
        """ids of the weights whose gathered rows are kept from forward to backward (not
        gathered again), where DeepSpeed would keep whole weights (reuse_distance_keeps)."""
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.metric = metric
        self.comm_dtype = getattr(optimizer, "communication_data_type", None)
        self.accum_dtype = optimizer.gradient_accumulation_dtype
        self.scoring_route = "auto"
        """auto: the cheaper of "tokens" and "weights" (below) per scoring; tests force one."""
        self.bytes_moved = {k: 0 for k in PHASES}
        """Bytes each rank sends (ring algorithms: all-gather and reduce-scatter (q-1)/q of the
        full buffer, all-reduce twice that), accumulated since the last reset."""

    # ------------------------------------------------------------------ layout

    def layout(self, p: torch.nn.Parameter, rows: Optional[torch.Tensor]) -> "_Layout":
        """Where rows `rows` (sorted, on the host; None: all) of p lie in the DP partitions.
        Made once per product: its forward gather, backward gather and reduce share it."""
        R, h = p.ds_shape
        rows = torch.arange(R) if rows is None else rows
        numel, n = R * h, p.partition_numel()
        starts = rows * h
        ends = starts + h
        bounds = torch.tensor([min(q * n, numel) for q in range(self.world + 1)], dtype=torch.int64)
        # kept elements before each flat position P: whole rows ending by P, plus the part
        # of the row P falls in
        full = torch.searchsorted(ends, bounds, right=True)
        partial = torch.zeros_like(bounds)
        inside = full < rows.numel()
        partial[inside] = (bounds[inside] - starts[full[inside]]).clamp_min(0)
        before = full * h + partial
        counts = (before[1:] - before[:-1]).tolist()
        lo, hi = int(bounds[self.rank]), int(bounds[self.rank + 1])
        a = int(torch.searchsorted(ends, torch.tensor(lo), right=True))
        b = int(torch.searchsorted(starts, torch.tensor(hi), right=False))
        mine = rows[a:b]  # the rows this rank holds (some of) elements of
        row_lo = lo // h
        # elements of my rows outside my partition, at the head and the tail
        head = lo - row_lo * h if mine.numel() and int(mine[0]) == row_lo else 0
        tail = max(0, (int(mine[-1]) + 1) * h - hi) if mine.numel() else 0
        return _Layout(counts, a, b, lo, hi, row_lo, head, tail, (mine - row_lo).to(p.ds_tensor.device))

    def _local_rows(self, p: torch.nn.Parameter, lay: "_Layout") -> torch.Tensor:
        """My partition as whole rows [rows touched, h] (zeros outside it where a row is split)."""
        h = p.ds_shape[1]
        part = p.ds_tensor.reshape(-1)[: lay.hi - lay.lo]
        if lay.aligned(h):
            return part.view(-1, h)
        off = lay.lo - lay.row_lo * h
        buf = part.new_zeros(lay.touched_rows(h) * h)
        buf[off: off + lay.hi - lay.lo] = part
        return buf.view(-1, h)

    # ------------------------------------------------------------------ gather / reduce

    @torch.no_grad()
    def gather_rows(self, p: torch.nn.Parameter, lay: "_Layout", phase: str) -> torch.Tensor:
        """The rows of `lay` of p, [k, h] in p's dtype, on every DP rank. Collective."""
        h = p.ds_shape[1]
        width = max(lay.counts)
        mine = self._local_rows(p, lay).index_select(0, lay.idx)  # [my rows, h]
        if self.world == 1:
            return mine
        send = mine.reshape(-1)[lay.head: mine.numel() - lay.tail]  # this rank's share
        if send.numel() < width:  # padded to the fullest rank's share
            send = torch.cat((send, send.new_zeros(width - send.numel())))
        recv = send.new_empty(self.world * width)
        dist.all_gather_into_tensor(recv, send.contiguous(), group=self.group)
        self.bytes_moved[phase] += (self.world - 1) * width * recv.element_size()
        if all(c == width for c in lay.counts):
            return recv.view(-1, h)
        return torch.cat([recv[q * width: q * width + c] for q, c in enumerate(lay.counts)]).view(-1, h)

    @torch.no_grad()
    def reduce_rows(self, p: torch.nn.Parameter, lay: "_Layout", grad: torch.Tensor) -> None:
        """Average the gradient grad [k, h] of the rows of `lay` over DP and add each rank's
        share to DeepSpeed's gradient partition of p (zeros for the other rows). Collective;
        `grad` is consumed (scaled in place)."""
        h = p.ds_shape[1]
        flat = grad.reshape(-1)
        dtype = self.comm_dtype or flat.dtype
        flat = flat.to(dtype) if flat.dtype != dtype else flat
        flat.div_(self.world)  # pre-divided, as DeepSpeed's reduce_scatter_coalesced
        width = max(lay.counts)
        if self.world > 1:
            if all(c == width for c in lay.counts):
                send = flat
            else:
                send = flat.new_zeros(self.world * width)
                offset = 0
                for q, c in enumerate(lay.counts):
                    send[q * width: q * width + c] = flat[offset: offset + c]
                    offset += c
            del flat
            share = send.new_empty(width)
            dist.reduce_scatter_tensor(share, send.contiguous(), group=self.group)
            del send
            self.bytes_moved["grad_reduce"] += (self.world - 1) * width * share.element_size()
            share = share[: lay.counts[self.rank]]
        else:
            share = flat
        if lay.hi <= lay.lo:
            return  # this rank's partition of p is all padding
        part = torch.zeros(p.partition_numel(), dtype=self.accum_dtype, device=p.ds_tensor.device)
        if lay.idx.numel():
            if lay.aligned(h):
                part[: lay.hi - lay.lo].view(-1, h).index_copy_(0, lay.idx, share.view(-1, h).to(part.dtype))
            else:
                placed = share.new_zeros(lay.idx.numel() * h)
                placed[lay.head: placed.numel() - lay.tail] = share
                whole = part.new_zeros(lay.touched_rows(h) * h)
                whole.view(-1, h).index_copy_(0, lay.idx, placed.view(-1, h).to(part.dtype))
                off = lay.lo - lay.row_lo * h
                part[: lay.hi - lay.lo] = whole[off: off + lay.hi - lay.lo]
        self.opt.partition_grads([p], [part])

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def _gather_tokens(self, x: torch.Tensor, token_stride: int) -> torch.Tensor:
        """The scored tokens of every DP rank, [dp * tokens, h] in rank order."""
        xs = x.reshape(-1, x.shape[-1])
        xs = (xs[::token_stride] if token_stride > 1 else xs).contiguous()
        if self.world == 1:
            return xs
        out = xs.new_empty(self.world * xs.shape[0], xs.shape[1])
        dist.all_gather_into_tensor(out, xs, group=self.group)
        self.bytes_moved["scoring"] += (self.world - 1) * xs.numel() * xs.element_size()
        return out

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
            self.bytes_moved["scoring"] += 2 * (self.world - 1) * t.numel() * t.element_size() // self.world
        return t

    @torch.no_grad()
    def _row_products(self, p: torch.nn.Parameter, rows: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """xs @ W[rows]^T in fp32, [tokens, len(rows)]: partial products over each rank's
        partition, summed by one all-reduce. rows sorted (CPU)."""
        lay = self.layout(p, rows)
        out = torch.zeros(xs.shape[0], rows.numel(), dtype=torch.float32, device=xs.device)
        if lay.b > lay.a:
            local = _select(self._local_rows(p, lay), rows[lay.a:lay.b] - lay.row_lo)
            out[:, lay.a:lay.b] = xs.float() @ local.float().t()
        return self._all_reduce(out)

    @torch.no_grad()
    def _row_norms(self, p: torch.nn.Parameter, units: int) -> torch.Tensor:
        """L2 norm of each unit's rows (p viewed as [units, rows per unit, h]), fp32 [units]."""
        R = p.ds_shape[0]
        lay = self.layout(p, None)
        sq = torch.zeros(R, dtype=torch.float32, device=p.ds_tensor.device)
        if lay.b > lay.a:
            sq[lay.a:lay.b] = torch.linalg.vector_norm(self._local_rows(p, lay), dim=1, dtype=torch.float32).pow(2)
        return self._all_reduce(sq).view(units, -1).sum(1).sqrt()

    def _whole(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self.gather_rows(p, self.layout(p, None), "scoring")

    def _tokens_route(self, x: torch.Tensor, token_stride: int, rows: int, h: int, weight_bytes: int) -> bool:
        """Whether scoring moves fewer bytes by gathering the scored tokens (and all-reducing
        the [tokens, rows] products) than by gathering the `rows` weight rows it reads: the
        tokens' side grows with the DP size, the weights' does not (docs/SAT.md)."""
        if self.world == 1 or self.scoring_route != "auto":
            return self.world > 1 and self.scoring_route == "tokens"
        mine = -(-x[..., 0].numel() // token_stride)  # scored tokens on this rank
        tokens, weights = scoring_bytes(self.world, mine, rows, h, x.element_size(), weight_bytes)
        return tokens < weights

    def mlp_scores(self, x: torch.Tensor, fc1: torch.nn.Parameter, fc2: torch.nn.Parameter, reduce,
                   generator: torch.Generator, token_stride: int) -> torch.Tensor:
        """Scores [f] of the MLP channels of this TP partition, as mlp_scores over the global
        micro-batch. reduce: the dense path's reduce over DP (of statistics over each rank's
        own tokens)."""
        f, h = fc2.ds_shape
        if self.metric == "random":
            return torch.rand(f, generator=generator, device=x.device)
        if self.metric not in ("activation", "fluctuation"):  # read whole weights
            return mlp_scores(self.metric, x, self._whole(fc1), self._whole(fc2), reduce, generator, token_stride)
        if self._tokens_route(x, token_stride, 2 * f, h, fc1.ds_tensor.element_size()):
            xs = self._gather_tokens(x, token_stride)  # every rank's scored tokens
            z = self._row_products(fc1, torch.arange(2 * f), xs)  # [tokens, 2f]: gate, up pre-activations
            reduce = no_reduce
        else:
            xs = x.reshape(-1, h)[::token_stride]  # this rank's scored tokens
            z = xs.float() @ self._whole(fc1).float().t()
        a = F.silu(z[:, :f]) * z[:, f:]
        return mlp_scores(self.metric, xs, None, None, reduce, generator, 1, activations=a,
                          down_norms=self._row_norms(fc2, f))

    def attention_scores(self, x: torch.Tensor, qkv: torch.nn.Parameter, proj: torch.nn.Parameter, r: int, d: int,
                         reduce, generator: torch.Generator, token_stride: int) -> torch.Tensor:
        """Scores [G] of the attention units (KV groups) of this TP partition."""
        h = qkv.ds_shape[1]
        G = qkv.ds_shape[0] // ((r + 2) * d)
        if self.metric == "random":
            return torch.rand(G, generator=generator, device=x.device)
        if self.metric not in ("activation", "fluctuation"):  # read whole weights
            return attention_scores(self.metric, x, self._whole(qkv), self._whole(proj), r, d, reduce, generator,
                                    token_stride)
        v_rows = (torch.arange(G)[:, None] * (r + 2) * d + (r + 1) * d + torch.arange(d)).reshape(-1)
        if self._tokens_route(x, token_stride, G * d, h, qkv.ds_tensor.element_size()):
            xs = self._gather_tokens(x, token_stride)
            values = self._row_products(qkv, v_rows, xs)  # [tokens, G*d]
            reduce = no_reduce
        else:
            xs = x.reshape(-1, h)[::token_stride]
            values = xs.float() @ self.gather_rows(qkv, self.layout(qkv, v_rows), "scoring").float().t()
        return attention_scores(self.metric, xs, None, None, r, d, reduce, generator, 1,
                                values=values, out_norms=self._row_norms(proj, G))

    # ------------------------------------------------------------------ products

    def linear(self, x: torch.Tensor, p: torch.nn.Parameter, rows: Optional[torch.Tensor],
               kept_in: bool = False, sampler=None) -> torch.Tensor:
        """x @ W[rows]^T (kept_in=False: the rows are output features) or x @ W[rows]
        (kept_in=True: x holds only the kept input features); rows: sorted (SAT's selections
        are), None: all. sampler: a TokenSampler (the weight gradient from the tokens it
        draws) or None."""
        # The shares are computed once per product, on the host (one transfer of the row
        # indices); forward gather, backward gather and reduce share them.
        lay = self.layout(p, None if rows is None else rows.cpu())
        return _RowSparseLinear.apply(x, _Ref(p), self, lay, kept_in, sampler)


def _select(rows_view: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """rows_view[idx] (idx sorted, CPU): a view when idx is one contiguous run, else a copy."""
    if idx.numel() and int(idx[-1]) - int(idx[0]) + 1 == idx.numel():
        return rows_view.narrow(0, int(idx[0]), idx.numel())
    return rows_view.index_select(0, idx.to(rows_view.device))


class _Layout(NamedTuple):
    """Where a product's rows lie in the DP partitions of its weight (RowSparseZero.layout)."""

    counts: list
    """Elements of the rows in each rank's partition (every share is padded to the largest)."""
    a: int
    """rows[a:b] are the rows this rank holds elements of."""
    b: int
    lo: int
    """This rank's partition: elements [lo, hi) of the flattened weight."""
    hi: int
    row_lo: int
    """The row element lo falls in."""
    head: int
    """Elements of the first of my rows before lo (a row split with the rank before)."""
    tail: int
    """Elements of the last of my rows from hi on (a row split with the rank after)."""
    idx: torch.Tensor
    """rows[a:b] - row_lo, on the weight's device."""

    def aligned(self, h: int) -> bool:
        """The partition starts and ends on row boundaries."""
        return self.lo == self.row_lo * h and (self.hi - self.lo) % h == 0

    def touched_rows(self, h: int) -> int:
        return -(-(self.hi - self.row_lo * h) // h)


class _Ref:
    """Hands the parameter to the autograd function without making it an input: its gradient
    is reduced here, and DeepSpeed's per-parameter gradient hook must not fire for it."""

    def __init__(self, p):
        self.p = p


class _RowSparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ref, zero, lay, kept_in, sampler):
        w = zero.gather_rows(ref.p, lay, "forward_gather")  # [k, h]
        # The gathered rows are kept for backward only where ZeRO-3 would keep the whole
        # weight; otherwise they are gathered again, as ZeRO-3 does.
        keep = id(ref.p) in zero.keep_for_backward
        ctx.save_for_backward(x, w if keep else None)
        ctx.ref, ctx.zero, ctx.lay, ctx.kept_in, ctx.sampler = ref, zero, lay, kept_in, sampler
        return torch.matmul(x, w) if kept_in else torch.matmul(x, w.t())

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        zero, p, lay = ctx.zero, ctx.ref.p, ctx.lay
        if w is None:
            w = zero.gather_rows(p, lay, "backward_gather")
        # [T, in], [T, out]: all tokens, or the drawn ones (--sat-wgrad-tokens)
        x2, g2 = weight_grad_operands(x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1]),
                                      ctx.sampler)
        if ctx.kept_in:  # y = x @ w, w [k, h_out]
            grad_x = torch.matmul(grad_y, w.t()) if ctx.needs_input_grad[0] else None
            grad_w = x2.t() @ g2
        else:  # y = x @ w^T, w [k, h_in]
            grad_x = torch.matmul(grad_y, w) if ctx.needs_input_grad[0] else None
            grad_w = g2.t() @ x2
        zero.reduce_rows(p, lay, grad_w)
        return grad_x, None, None, None, None, None


def reuse_distance_keeps(layer_params: list[list[torch.nn.Parameter]], head_numel: int, ds: dict) -> frozenset:
    """ids of the SAT weights whose gathered rows stay from forward to backward: ZeRO-3's
    rule for whole weights (stage3_max_reuse_distance, in parameters gathered between two
    uses; DeepSpeed's default 1e9). Between layer i's forward and its backward come the
    forwards and backwards of the layers above and the LM head. layer_params: each layer's
    SAT weights, bottom layer first."""
    limit = ds.get("zero_optimization", {}).get("stage3_max_reuse_distance", 1_000_000_000)
    sizes = [sum(p.ds_numel for p in ps) for ps in layer_params]
    keep = set()
    for i, ps in enumerate(layer_params):
        if 2 * sum(sizes[i + 1:]) + head_numel < limit:
            keep.update(id(p) for p in ps)
    return frozenset(keep)


def unsupported_reason(sat_cfg, ds: dict) -> Optional[str]:
    """Why comm-sparse ZeRO-3 cannot run with these settings (None: it can)."""
    z = ds.get("zero_optimization", {})
    if sat_cfg is None or not sat_cfg.enabled:
        return "SAT is off (--sat-schedule dense)"
    if z.get("stage", 0) != 3:
        return f"it is a ZeRO-3 mode and the DeepSpeed config has stage {z.get('stage', 0)}"
    if sat_cfg.sparse_pass != "both":
        return f"--sat-sparse-pass {sat_cfg.sparse_pass} runs the MLP's forward dense"
    if sat_cfg.compensation != "none":
        return f"--sat-compensation {sat_cfg.compensation} reads the omitted rows"
    if (z.get("offload_param") or {}).get("device", "none") not in ("none", None):
        return "parameters are offloaded (offload_param): their partitions are not in device memory"
    if (z.get("zero_quantized_weights") or z.get("zero_quantized_gradients")):
        return "ZeRO++ quantized weights or gradients are on"
    return None
