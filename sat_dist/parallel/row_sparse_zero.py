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

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sat_dist.errors import SatDistError
from sat_dist.model.sat_state import UNSETTLED
from sat_dist.model.token_sampler import weight_grad_operands
from sat_dist.parallel.zero_bytes import scoring_bytes
from sat_dist.sat.importance import attention_scores, mlp_scores, no_reduce

PHASES = ("forward_gather", "backward_gather", "grad_reduce", "scoring")
"""What bytes_moved counts, per rank: the collectives' traffic by what they are for."""

REDUCE_WINDOW = 4
"""Kept-row gradient reduce-scatters in flight before the oldest is waited for: one layer's
products. Each holds its kept-row gradient until done, so the window bounds that memory; the
rest are waited for at the end of the backward (finish_backward)."""

MIN_CHUNK = 16
"""Uneven shares are packed and unpacked with one index_select/index_copy over chunks of
gcd(partition, row) elements; below this chunk size the index would outweigh the data and
the shares are copied one slice per rank instead."""


class Collectives:
    """The two asynchronous collectives comm-sparse issues, over one DP group: a seam for the
    tests that record issue and wait order (a recording subclass)."""

    def __init__(self, group):
        self.group = group

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, tag: str):
        """Start all-gathering `inp` of every rank into `out`; returns a handle with wait()."""
        return dist.all_gather_into_tensor(out, inp, group=self.group, async_op=True)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, tag: str):
        """Start summing `inp` over the ranks, this rank's share into `out`; a handle."""
        return dist.reduce_scatter_tensor(out, inp, group=self.group, async_op=True)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        dist.all_reduce(t, op=op, group=self.group)


class RowSparseZero:
    """Kept-row gathers and reduces of ZeRO-3 partitioned 2-D weights over one DP group.

    On a GPU the step never waits on the host here except once per product and selection
    (the layout of a new selection: collective sizes must be known on the host); layouts and
    their index tensors are cached for the rest of the step. Gathers run one product ahead
    of use (`register_order`) and gradient reduces are waited for a layer behind, all by
    `finish_backward`."""

    def __init__(self, optimizer, group, metric: str, keep_for_backward: frozenset = frozenset(),
                 check_selections: bool = True):
        self.opt = optimizer
        self.keep_for_backward = keep_for_backward
        """ids of the weights whose gathered rows are kept from forward to backward (not
        gathered again), where DeepSpeed would keep whole weights (reuse_distance_keeps); with
        activation recompute all of them (the kept rows are then held by the recomputation
        only, for one layer's backward)."""
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.comm = Collectives(group)
        self.metric = metric
        self.comm_dtype = getattr(optimizer, "communication_data_type", None)
        self.accum_dtype = optimizer.gradient_accumulation_dtype
        self.scoring_route = "auto"
        """auto: the cheaper of "tokens" and "weights" (below) per scoring; tests force one."""
        self.check_selections = check_selections
        """Compare a checksum of every new selection over the DP group (one 16-byte all-reduce
        per product and step, folded into the layout's one host read): a replica that chose
        other rows would make the collectives' sizes disagree, which NCCL does not check."""
        self.overlap: Optional[bool] = None
        """Run collectives ahead (gathers) and behind (reduces) of the compute that needs them.
        None: on CUDA only. On a CPU the collectives' copies run on the same cores as the
        compute, so overlap only adds contention and held memory (measured at 7B width, DP 2 on
        2 cores: 9-17% slower steps, +1.5 GB per rank); tests set True to check the order."""
        self.bytes_moved = {k: 0 for k in PHASES}
        """Bytes each rank sends (ring algorithms: all-gather and reduce-scatter (q-1)/q of the
        full buffer, all-reduce twice that), accumulated since the last reset."""
        self._static: dict = {}  # (id(p), tag) -> _Layout of rows fixed for the run
        self._dynamic: dict = {}  # id(p) -> (selection, _Layout) of the latest selection
        self._gathers: dict = {}  # id(p) -> _Gather in flight (prefetched)
        self._reduces: list = []  # _Reduce in flight, oldest first
        self._order: list = []  # [(p, peek, layer)] SAT products in forward order
        self._position: dict = {}  # id(p) -> index in _order
        self._used: dict = {}  # id(p) -> _Layout of p's latest forward

    def register_order(self, products: list) -> None:
        """products: [(p, peek, layer)] in the order the forward uses them; peek() -> (rows,
        selection) of p this micro-batch when already settled, else UNSETTLED. Lets gathers run
        ahead."""
        self._order = list(products)
        self._position = {id(p): i for i, (p, _, _) in enumerate(self._order)}

    # ------------------------------------------------------------------ layout

    def _layout(self, p: torch.nn.Parameter, rows: Optional[torch.Tensor], selection=None) -> "_Layout":
        """Where rows `rows` (sorted; None: all) of p lie in the DP partitions. Rows on the host
        are a layout fixed for the run (cached by `selection`, a tag); rows on the device are a
        selection's (cached while `selection`, the selection's own tensor, is current)."""
        if rows is None or isinstance(selection, str):
            key = (id(p), selection or "all")
            if key not in self._static:
                self._static[key] = self._host_layout(p, rows)
            return self._static[key]
        if rows.numel() == 0 or selection is None:  # not cached: nothing says when it changes
            return self._host_layout(p, rows) if rows.numel() == 0 else self._device_layout(p, rows)
        cached = self._dynamic.get(id(p))
        if cached is not None and cached[0] is selection:
            return cached[1]
        lay = self._device_layout(p, rows)
        self._dynamic[id(p)] = (selection, lay)
        return lay

    def _host_layout(self, p: torch.nn.Parameter, rows: Optional[torch.Tensor]) -> "_Layout":
        R, h = p.ds_shape
        rows = torch.arange(R) if rows is None else rows.cpu()
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
        a = int(full[self.rank])
        b = int(torch.searchsorted(starts, bounds[self.rank + 1], right=False))
        first = int(rows[a]) if b > a else -1
        last = int(rows[b - 1]) if b > a else -1
        dev = p.ds_tensor.device
        return self._finish_layout(p, (before[1:] - before[:-1]).tolist(), a, b, first, last,
                                   (rows[a:b] - int(bounds[self.rank]) // h).to(dev), before.to(dev), rows.numel())

    def _device_layout(self, p: torch.nn.Parameter, rows: torch.Tensor) -> "_Layout":
        """As _host_layout for rows on the device, with one host read for the whole layout."""
        R, h = p.ds_shape
        numel, n, k = R * h, p.partition_numel(), rows.numel()
        dev = rows.device
        bounds = (torch.arange(self.world + 1, device=dev, dtype=torch.int64) * n).clamp_max(numel)
        starts = rows * h
        ends = starts + h
        full = torch.searchsorted(ends, bounds, right=True)
        partial = (bounds - starts[full.clamp_max(k - 1)]).clamp_min(0) * (full < k)
        before = full * h + partial  # [world + 1]
        a = full[self.rank: self.rank + 1]
        b = torch.searchsorted(starts, bounds[self.rank + 1: self.rank + 2], right=False)
        first = rows[a.clamp_max(k - 1)]
        last = rows[(b - 1).clamp(0, k - 1)]
        packed = [before[1:] - before[:-1], a, b, first, last]
        if self.check_selections and self.world > 1:
            # position-weighted sum of the rows, and its negation: MAX over the group of both
            # equals (s, -s) only if every replica holds the same sum
            pos = torch.arange(1, k + 1, device=dev, dtype=torch.int64)
            s = ((rows + 1) * pos).sum().remainder(2 ** 40).view(1)
            check = torch.cat((s, -s, torch.tensor([k, -k], device=dev, dtype=torch.int64)))
            self.comm.all_reduce(check, op=dist.ReduceOp.MAX)
            packed.append(check)
        host = torch.cat(packed).tolist()  # the one host read of this selection's layout
        w = self.world
        counts, (ai, bi, fi, li) = host[:w], host[w: w + 4]
        if self.check_selections and self.world > 1:
            s_max, neg_min, k_max, negk_min = host[w + 4: w + 8]
            if s_max != -neg_min or k_max != -negk_min:
                raise SatDistError(f"comm-sparse ZeRO-3: the data-parallel replicas selected different rows of a "
                                   f"{R}x{h} weight (their scores or seeds differ); the collectives would "
                                   f"disagree in size. Run with --sat-comm-sparse off and report this")
        fi, li = (fi, li) if bi > ai else (-1, -1)
        return self._finish_layout(p, counts, ai, bi, fi, li, rows[ai:bi] - min(self.rank * n, numel) // h,
                                   before, k)

    def _finish_layout(self, p, counts, a, b, first, last, idx, before, k) -> "_Layout":
        R, h = p.ds_shape
        numel, n = R * h, p.partition_numel()
        lo, hi = min(self.rank * n, numel), min((self.rank + 1) * n, numel)
        row_lo = lo // h
        # elements of my rows outside my partition, at the head and the tail
        head = lo - row_lo * h if b > a and first == row_lo else 0
        tail = max(0, (last + 1) * h - hi) if b > a else 0
        width = max(counts)
        chunks = None
        if self.world > 1 and any(c != width for c in counts):
            g = math.gcd(n, h)
            if g >= MIN_CHUNK:
                # chunk c of the kept rows lies in the share of rank q (before[q] <= c*g <
                # before[q+1]), at offset c*g - before[q] of that rank's padded slot
                c = torch.arange(k * h // g, device=before.device, dtype=torch.int64)
                q = torch.searchsorted(before[1:] // g, c, right=True)
                chunks = (q * (width // g) + c - (before[:-1] // g)[q], g)
        return _Layout(counts, width, a, b, lo, hi, row_lo, head, tail, idx, chunks)

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

    # ------------------------------------------------------------------ gather

    @torch.no_grad()
    def _start_gather(self, p: torch.nn.Parameter, lay: "_Layout", phase: str) -> "_Gather":
        mine = self._local_rows(p, lay).index_select(0, lay.idx)  # [my rows, h]
        if self.world == 1:
            return _Gather(None, mine, lay, phase)
        send = mine.reshape(-1)[lay.head: mine.numel() - lay.tail]  # this rank's share
        if send.numel() < lay.width:  # padded to the fullest rank's share
            send = F.pad(send, (0, lay.width - send.numel()))
        recv = send.new_empty(self.world * lay.width)
        work = self.comm.all_gather(recv, send.contiguous(), phase)
        self.bytes_moved[phase] += (self.world - 1) * lay.width * recv.element_size()
        return _Gather(work, recv, lay, phase)

    def _finish_gather(self, g: "_Gather", h: int) -> torch.Tensor:
        if g.work is None:
            return g.buf
        g.work.wait()
        lay, recv = g.lay, g.buf
        if all(c == lay.width for c in lay.counts):
            return recv.view(-1, h)
        if lay.counts[-1] < lay.width and all(c == lay.width for c in lay.counts[:-1]):
            return recv[: sum(lay.counts)].view(-1, h)  # only the last share is short (all rows)
        if lay.chunks is not None:
            index, size = lay.chunks
            return recv.view(-1, size).index_select(0, index).view(-1, h)
        return torch.cat([recv[q * lay.width: q * lay.width + c] for q, c in enumerate(lay.counts)]).view(-1, h)

    def start_rows(self, p: torch.nn.Parameter, lay: "_Layout", phase: str) -> "_Gather":
        """The gather of the rows of `lay` of p: the one prefetched, or started now."""
        pending = self._gathers.pop(id(p), None)
        if pending is not None and (pending.lay is not lay or pending.phase != phase):
            self._finish_gather(pending, p.ds_shape[1])  # issued for other rows: drained, unused
            pending = None
        return pending or self._start_gather(p, lay, phase)

    def gather_rows(self, p: torch.nn.Parameter, lay: "_Layout", phase: str) -> torch.Tensor:
        """The rows of `lay` of p, [k, h] in p's dtype, on every DP rank. Collective."""
        return self._finish_gather(self.start_rows(p, lay, phase), p.ds_shape[1])

    def _prefetch(self, p: torch.nn.Parameter, step: int, phase: str) -> None:
        """Start gathering the product `step` places after p in forward order (-1: before),
        if its rows are settled and it will gather in `phase`."""
        i = self._position.get(id(p))
        if i is None or not 0 <= i + step < len(self._order) or not self._overlapping(p):
            return
        q, peek, layer = self._order[i + step]
        if id(q) in self._gathers or (phase == "backward_gather" and id(q) in self.keep_for_backward):
            return
        if phase == "backward_gather":
            lay = self._used.get(id(q))  # the rows its forward used this micro-batch
            if lay is None:
                return
        else:
            if torch._C._current_graph_task_id() != -1 and layer != self._order[i][2]:
                return  # an activation recompute inside the backward: the next layer's ran already

            settled = peek()
            if settled is UNSETTLED:
                return
            rows, selection = settled
            lay = self._layout(q, rows, selection)
        self._gathers[id(q)] = self._start_gather(q, lay, phase)

    # ------------------------------------------------------------------ reduce

    @torch.no_grad()
    def reduce_rows(self, p: torch.nn.Parameter, lay: "_Layout", grad: torch.Tensor) -> None:
        """Average the gradient grad [k, h] of the rows of `lay` over DP and add each rank's
        share to DeepSpeed's gradient partition of p (zeros for the other rows). Collective,
        asynchronous: the write happens when the reduce is waited for (at the latest in
        finish_backward). `grad` is consumed (scaled in place)."""
        flat = grad.reshape(-1)
        dtype = self.comm_dtype or flat.dtype
        flat = flat.to(dtype) if flat.dtype != dtype else flat
        flat.div_(self.world)  # pre-divided, as DeepSpeed's reduce_scatter_coalesced
        if self.world == 1:
            self._write_share(p, lay, flat)
            return
        width = lay.width
        if all(c == width for c in lay.counts):
            send = flat
        else:
            send = flat.new_zeros(self.world * width)
            if lay.chunks is not None:
                index, size = lay.chunks
                send.view(-1, size).index_copy_(0, index, flat.view(-1, size))
            else:
                offset = 0
                for q, c in enumerate(lay.counts):
                    send[q * width: q * width + c] = flat[offset: offset + c]
                    offset += c
        share = send.new_empty(width)
        work = self.comm.reduce_scatter(share, send.contiguous(), "grad_reduce")
        self.bytes_moved["grad_reduce"] += (self.world - 1) * width * share.element_size()
        self._reduces.append(_Reduce(work, p, lay, share, send))
        while len(self._reduces) > (REDUCE_WINDOW if self._overlapping(p) else 0):
            self._finish_reduce(self._reduces.pop(0))

    def _finish_reduce(self, r: "_Reduce") -> None:
        r.work.wait()
        self._write_share(r.p, r.lay, r.share[: r.lay.counts[self.rank]])

    def _overlapping(self, p: torch.nn.Parameter) -> bool:
        return self.overlap if self.overlap is not None else p.ds_tensor.is_cuda

    def finish_backward(self) -> None:
        """Wait for every reduce in flight and write its share (the engine calls this after
        each backward, before DeepSpeed's step reads the gradient partitions)."""
        while self._reduces:
            self._finish_reduce(self._reduces.pop(0))
        for g in self._gathers.values():  # prefetched for a product that did not run
            if g.work is not None:
                g.work.wait()
        self._gathers.clear()

    def _write_share(self, p: torch.nn.Parameter, lay: "_Layout", share: torch.Tensor) -> None:
        if lay.hi <= lay.lo:
            return  # this rank's partition of p is all padding
        h = p.ds_shape[1]
        part = torch.zeros(p.partition_numel(), dtype=self.accum_dtype, device=p.ds_tensor.device)
        if lay.b > lay.a:
            if lay.aligned(h):
                part[: lay.hi - lay.lo].view(-1, h).index_copy_(0, lay.idx, share.view(-1, h).to(part.dtype))
            else:
                placed = share.new_zeros((lay.b - lay.a) * h)
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
        self.comm.all_gather(out, xs, "scoring").wait()
        self.bytes_moved["scoring"] += (self.world - 1) * xs.numel() * xs.element_size()
        return out

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self.comm.all_reduce(t)
            self.bytes_moved["scoring"] += 2 * (self.world - 1) * t.numel() * t.element_size() // self.world
        return t

    @torch.no_grad()
    def _row_products(self, p: torch.nn.Parameter, rows: torch.Tensor, tag: str, xs: torch.Tensor) -> torch.Tensor:
        """xs @ W[rows]^T in fp32, [tokens, len(rows)]: partial products over each rank's
        partition, summed by one all-reduce. rows: sorted, on the host, fixed for the run (tag)."""
        lay = self._layout(p, rows, tag)
        out = torch.zeros(xs.shape[0], rows.numel(), dtype=torch.float32, device=xs.device)
        if lay.b > lay.a:
            local = self._local_rows(p, lay).index_select(0, lay.idx)
            out[:, lay.a:lay.b] = xs.float() @ local.float().t()
        return self._all_reduce(out)

    @torch.no_grad()
    def _row_norms(self, p: torch.nn.Parameter, units: int) -> torch.Tensor:
        """L2 norm of each unit's rows (p viewed as [units, rows per unit, h]), fp32 [units]."""
        R = p.ds_shape[0]
        lay = self._layout(p, None)
        sq = torch.zeros(R, dtype=torch.float32, device=p.ds_tensor.device)
        if lay.b > lay.a:
            sq[lay.a:lay.b] = torch.linalg.vector_norm(self._local_rows(p, lay), dim=1, dtype=torch.float32).pow(2)
        return self._all_reduce(sq).view(units, -1).sum(1).sqrt()

    def _whole(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self.gather_rows(p, self._layout(p, None), "scoring")

    def _tokens_route(self, x: torch.Tensor, token_stride: int, rows: int, h: int, weight_bytes: int) -> bool:
        """Whether scoring moves fewer bytes by gathering the scored tokens (and all-reducing
        the [tokens, rows] products) than by gathering the `rows` weight rows it reads: the
        tokens' side grows with the DP size, the weights' does not (docs/SAT.md)."""
        if self.world == 1 or self.scoring_route != "auto":
            return self.world > 1 and self.scoring_route == "tokens"
        mine = -(-x[..., 0].numel() // token_stride)  # scored tokens on this rank
        tokens, weights = scoring_bytes(self.world, mine, rows, h, x.element_size(), weight_bytes)
        return tokens < weights

    @torch.no_grad()  # scores steer the selection only; nothing of them is saved for backward
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
            z = self._row_products(fc1, torch.arange(2 * f), "all", xs)  # [tokens, 2f]: gate, up pre-activations
            reduce = no_reduce
        else:
            xs = x.reshape(-1, h)[::token_stride]  # this rank's scored tokens
            z = xs.float() @ self._whole(fc1).float().t()
        a = F.silu(z[:, :f]) * z[:, f:]
        return mlp_scores(self.metric, xs, None, None, reduce, generator, 1, activations=a,
                          down_norms=self._row_norms(fc2, f))

    @torch.no_grad()  # scores steer the selection only; nothing of them is saved for backward
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
            values = self._row_products(qkv, v_rows, "values", xs)  # [tokens, G*d]
            reduce = no_reduce
        else:
            xs = x.reshape(-1, h)[::token_stride]
            values = xs.float() @ self.gather_rows(qkv, self._layout(qkv, v_rows, "values"), "scoring").float().t()
        return attention_scores(self.metric, xs, None, None, r, d, reduce, generator, 1,
                                values=values, out_norms=self._row_norms(proj, G))

    # ------------------------------------------------------------------ products

    def linear(self, x: torch.Tensor, p: torch.nn.Parameter, rows: Optional[torch.Tensor],
               kept_in: bool = False, sampler=None, selection: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x @ W[rows]^T (kept_in=False: the rows are output features) or x @ W[rows]
        (kept_in=True: x holds only the kept input features); rows: sorted, on the weight's
        device (SAT's selections are), None: all. selection: the step's selection tensor the
        rows come from (its layout is cached while it is current). sampler: a TokenSampler
        (the weight gradient from the tokens it draws) or None."""
        lay = self._used[id(p)] = self._layout(p, rows, selection)
        return _RowSparseLinear.apply(x, _Ref(p), self, lay, kept_in, sampler)


class _Layout(NamedTuple):
    """Where a product's rows lie in the DP partitions of its weight (RowSparseZero._layout)."""

    counts: list
    """Elements of the rows in each rank's partition (every share is padded to the largest)."""
    width: int
    """max(counts): the size of each rank's slot in the collectives."""
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
    chunks: Optional[tuple]
    """(index, g): for uneven shares, where each g-element chunk of the kept rows lies in the
    padded [world * width] buffer (None: even shares, or chunks too small to index)."""

    def aligned(self, h: int) -> bool:
        """The partition starts and ends on row boundaries."""
        return self.lo == self.row_lo * h and (self.hi - self.lo) % h == 0

    def touched_rows(self, h: int) -> int:
        return -(-(self.hi - self.row_lo * h) // h)


class _Gather(NamedTuple):
    work: object  # the collective's handle (None: nothing to wait for)
    buf: torch.Tensor  # [world * width] the padded shares (or, at DP 1, the rows)
    lay: _Layout
    phase: str


class _Reduce(NamedTuple):
    work: object
    p: torch.nn.Parameter
    lay: _Layout
    share: torch.Tensor  # [width] this rank's reduced share, once done
    send: torch.Tensor  # held until done: the collective reads it


class _Ref:
    """Hands the parameter to the autograd function without making it an input: its gradient
    is reduced here, and DeepSpeed's per-parameter gradient hook must not fire for it."""

    def __init__(self, p):
        self.p = p


class _RowSparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ref, zero, lay, kept_in, sampler):
        g = zero.start_rows(ref.p, lay, "forward_gather")
        zero._prefetch(ref.p, 1, "forward_gather")  # the next product's rows, while this one waits and computes
        w = zero._finish_gather(g, ref.p.ds_shape[1])  # [k, h]
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
        g = zero.start_rows(p, lay, "backward_gather") if w is None else None
        zero._prefetch(p, -1, "backward_gather")  # the product whose backward comes next
        if g is not None:
            w = zero._finish_gather(g, p.ds_shape[1])
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
    if z.get("zero_hpz_partition_size", 1) not in (1, None):
        # Its kept-row gathers read the primary partitions over the whole DP group: the
        # backward's would cross nodes where DeepSpeed's stay on the node's secondary copy.
        return (f"ZeRO++ hierarchical partitioning is on (zero_hpz_partition_size "
                f"{z['zero_hpz_partition_size']}), whose in-node backward gathers comm-sparse would bypass")
    return None
