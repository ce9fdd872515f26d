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

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

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

    def _spans(self, p: torch.nn.Parameter, rows: torch.Tensor):
        """Where the kept rows' elements lie. rows: sorted row indices (CPU int64).
        Returns (counts [world] ints: kept elements in each rank's partition, my slice of
        rows (a, b), the first row of my partition, my element range lo, hi)."""
        R, h = p.ds_shape
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
        return counts, (a, b), lo // h, lo, hi

    def _local_rows(self, p: torch.nn.Parameter, lo: int, hi: int, row_lo: int) -> torch.Tensor:
        """My partition as whole rows [rows touched, h] (zeros outside it where a row is split)."""
        h = p.ds_shape[1]
        part = p.ds_tensor.reshape(-1)[: hi - lo]
        off = lo - row_lo * h
        n_rows = -(-(off + hi - lo) // h)
        if off == 0 and (hi - lo) % h == 0:
            return part.view(n_rows, h)
        buf = part.new_zeros(n_rows * h)
        buf[off: off + hi - lo] = part
        return buf.view(n_rows, h)

    @staticmethod
    def _trims(rows_mine: torch.Tensor, row_lo: int, lo: int, hi: int, h: int) -> tuple[int, int]:
        """Elements of my selected rows that lie outside my partition, at the head and the tail."""
        if rows_mine.numel() == 0:
            return 0, 0
        head = lo - row_lo * h if int(rows_mine[0]) == row_lo else 0
        last = int(rows_mine[-1])
        tail = max(0, (last + 1) * h - hi)
        return head, tail

    # ------------------------------------------------------------------ gather / reduce

    @torch.no_grad()
    def gather_rows(self, p: torch.nn.Parameter, rows: Optional[torch.Tensor], phase: str) -> torch.Tensor:
        """Rows `rows` (sorted; None: all) of p, [k, h] in p's dtype, on every DP rank. Collective."""
        R, h = p.ds_shape
        rows = torch.arange(R) if rows is None else rows.cpu()
        counts, (a, b), row_lo, lo, hi = self._spans(p, rows)
        mine = rows[a:b]
        head, tail = self._trims(mine, row_lo, lo, hi, h)
        width = max(counts)
        device = p.ds_tensor.device
        # this rank's share, written straight into the (padded) send buffer
        send = p.ds_tensor.new_zeros(width) if self.world > 1 else None
        idx = (mine - row_lo).to(device)
        if head == 0 and tail == 0 and (lo - row_lo * h) == 0 and (hi - lo) % h == 0:
            # the partition holds whole rows: select them without a copy of the partition
            whole_rows = p.ds_tensor.reshape(-1)[: hi - lo].view(-1, h)
            if send is None:
                return whole_rows.index_select(0, idx)
            torch.index_select(whole_rows, 0, idx, out=send[: counts[self.rank]].view(-1, h))
        else:
            local = self._local_rows(p, lo, hi, row_lo).index_select(0, idx).reshape(-1)
            local = local[head: local.numel() - tail]
            if send is None:
                return local.view(-1, h)
            send[: local.numel()] = local
        recv = send.new_empty(self.world * width)
        dist.all_gather_into_tensor(recv, send, group=self.group)
        self.bytes_moved[phase] += (self.world - 1) * width * recv.element_size()
        if all(c == width for c in counts):
            return recv.view(-1, h)
        return torch.cat([recv[q * width: q * width + c] for q, c in enumerate(counts)]).view(-1, h)

    @torch.no_grad()
    def reduce_rows(self, p: torch.nn.Parameter, rows: Optional[torch.Tensor], grad: torch.Tensor) -> None:
        """Average the kept rows' gradient grad [k, h] over DP and add each rank's share to
        DeepSpeed's gradient partition of p (zeros for the other rows). Collective; `grad` is
        consumed (scaled in place)."""
        R, h = p.ds_shape
        rows = torch.arange(R) if rows is None else rows.cpu()
        counts, (a, b), row_lo, lo, hi = self._spans(p, rows)
        flat = grad.reshape(-1)
        dtype = self.comm_dtype or flat.dtype
        flat = flat.to(dtype) if flat.dtype != dtype else flat
        flat.div_(self.world)  # pre-divided, as DeepSpeed's reduce_scatter_coalesced
        width = max(counts)
        if self.world > 1:
            if all(c == width for c in counts):
                send = flat
            else:
                send = flat.new_zeros(self.world * width)
                offset = 0
                for q, c in enumerate(counts):
                    send[q * width: q * width + c] = flat[offset: offset + c]
                    offset += c
            del flat
            share = send.new_empty(width)
            dist.reduce_scatter_tensor(share, send.contiguous(), group=self.group)
            del send
            self.bytes_moved["grad_reduce"] += (self.world - 1) * width * share.element_size()
            share = share[: counts[self.rank]]
        else:
            share = flat
        if hi <= lo:
            return  # this rank's partition of p is all padding
        mine = rows[a:b]
        head, tail = self._trims(mine, row_lo, lo, hi, h)
        part = torch.zeros(p.partition_numel(), dtype=self.accum_dtype, device=p.ds_tensor.device)
        if mine.numel():
            idx = (mine - row_lo).to(part.device)
            off = lo - row_lo * h
            if head == 0 and tail == 0 and off == 0 and (hi - lo) % h == 0:
                part[: hi - lo].view(-1, h).index_copy_(0, idx, share.view(-1, h).to(part.dtype))
            else:
                placed = share.new_zeros(mine.numel() * h)
                placed[head: placed.numel() - tail] = share
                whole = part.new_zeros(self._local_rows(p, lo, hi, row_lo).numel())
                whole.view(-1, h).index_copy_(0, idx, placed.view(-1, h).to(part.dtype))
                part[: hi - lo] = whole[off: off + hi - lo]
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
        _, h = p.ds_shape
        counts, (a, b), row_lo, lo, hi = self._spans(p, rows)
        out = torch.zeros(xs.shape[0], rows.numel(), dtype=torch.float32, device=xs.device)
        if b > a:
            local = _select(self._local_rows(p, lo, hi, row_lo), rows[a:b] - row_lo)
            out[:, a:b] = xs.float() @ local.float().t()
        return self._all_reduce(out)

    @torch.no_grad()
    def _row_norms(self, p: torch.nn.Parameter, units: int) -> torch.Tensor:
        """L2 norm of each unit's rows (p viewed as [units, rows per unit, h]), fp32 [units]."""
        R, h = p.ds_shape
        counts, (a, b), row_lo, lo, hi = self._spans(p, torch.arange(R))
        sq = torch.zeros(R, dtype=torch.float32, device=p.ds_tensor.device)
        if b > a:
            sq[a:b] = torch.linalg.vector_norm(self._local_rows(p, lo, hi, row_lo), dim=1, dtype=torch.float32).pow(2)
        return self._all_reduce(sq).view(units, -1).sum(1).sqrt()

    def _whole(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self.gather_rows(p, None, "scoring")

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
            values = xs.float() @ self.gather_rows(qkv, v_rows, "scoring").float().t()
        return attention_scores(self.metric, xs, None, None, r, d, reduce, generator, 1,
                                values=values, out_norms=self._row_norms(proj, G))

    # ------------------------------------------------------------------ products

    def linear(self, x: torch.Tensor, p: torch.nn.Parameter, rows: Optional[torch.Tensor],
               kept_in: bool = False) -> torch.Tensor:
        """x @ W[rows]^T (kept_in=False: the rows are output features) or x @ W[rows]
        (kept_in=True: x holds only the kept input features); rows None: all."""
        # The row indices go to the host once per product (forward and backward reuse them):
        # the shares are computed there.
        rows = None if rows is None else rows.sort().values.cpu()
        return _RowSparseLinear.apply(x, _Ref(p), self, rows, kept_in)


def _select(rows_view: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """rows_view[idx] (idx sorted, CPU): a view when idx is one contiguous run, else a copy."""
    if idx.numel() and int(idx[-1]) - int(idx[0]) + 1 == idx.numel():
        return rows_view.narrow(0, int(idx[0]), idx.numel())
    return rows_view.index_select(0, idx.to(rows_view.device))


class _Ref:
    """Hands the parameter to the autograd function without making it an input: its gradient
    is reduced here, and DeepSpeed's per-parameter gradient hook must not fire for it."""

    def __init__(self, p):
        self.p = p


class _RowSparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ref, zero, rows, kept_in):
        w = zero.gather_rows(ref.p, rows, "forward_gather")  # [k, h]
        # The gathered rows are kept for backward only where ZeRO-3 would keep the whole
        # weight; otherwise they are gathered again, as ZeRO-3 does.
        keep = id(ref.p) in zero.keep_for_backward
        ctx.save_for_backward(x, w if keep else None)
        ctx.ref, ctx.zero, ctx.rows, ctx.kept_in = ref, zero, rows, kept_in
        return torch.matmul(x, w) if kept_in else torch.matmul(x, w.t())

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        zero, p, rows = ctx.zero, ctx.ref.p, ctx.rows
        if w is None:
            w = zero.gather_rows(p, rows, "backward_gather")
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.kept_in:  # y = x @ w, w [k, h_out]
            grad_x = torch.matmul(grad_y, w.t()) if ctx.needs_input_grad[0] else None
            grad_w = x2.t() @ g2
        else:  # y = x @ w^T, w [k, h_in]
            grad_x = torch.matmul(grad_y, w) if ctx.needs_input_grad[0] else None
            grad_w = g2.t() @ x2
        zero.reduce_rows(p, rows, grad_w)
        return grad_x, None, None, None, None


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
