"""lm-evaluation-harness's LM interface over the model being trained, on every rank.

`SatDistLM` scores the harness's requests with the run's own engine: the dense model (SAT
off, as validation runs it), its TP shards and its ZeRO-3 partitions as they are, so no
export and no second copy of the weights is needed. Every rank holds the same requests (the
harness builds them deterministically from the same task data and few-shot seed); the
batches are split over the data-parallel ranks, the TP ranks of a group run the same batches,
and the results are summed over the DP group so that every rank returns all of them. The
harness then sees one process (rank 0 of 1) on every rank.

Tokenization and scoring follow the harness's own `hf` backend, so that the numbers are the
same as `lm-eval --model hf` on the exported checkpoint: contexts are encoded as the
tokenizer encodes a text (with BOS where transformers' tokenizer adds one), an empty
context is the BOS (else EOS) token, sequences longer than the model's context are cut from
the left, and loglikelihood_rolling uses the harness's disjoint windows.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from sat_dist.errors import SatDistError

CACHED_TOKENS = 64_000_000
"""At most this many tokens of the tasks' texts are kept tokenized (256 MB per rank)."""


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def token_logprobs(local_logits: torch.Tensor, targets: torch.Tensor, comm) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), whether target is the argmax) per position, [b, s] each, from this TP
    rank's vocabulary shard of the logits [b, s, V/tp] (padded entries are -inf). Each rank's
    log-sum-exp, maximum and target logit (0 where the target is another rank's) go through
    one sum over the TP group, each into its own slot: adding zeros is exact, so this is an
    all-gather."""
    logits = local_logits.float()
    vocab_local = logits.shape[-1]
    start = comm.tp_rank * vocab_local
    mine = (targets >= start) & (targets < start + vocab_local)
    picked = logits.gather(-1, (targets - start).clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1)
    parts = torch.zeros((3, comm.tp_size) + tuple(targets.shape), dtype=torch.float32, device=logits.device)
    parts[0, comm.tp_rank] = torch.logsumexp(logits, dim=-1)
    parts[1, comm.tp_rank] = logits.max(dim=-1).values
    parts[2, comm.tp_rank] = torch.where(mine, picked, torch.zeros_like(picked))
    if comm.tp_size > 1:
        parts = comm.sum_over_tp(parts)
    lse = torch.logsumexp(parts[0], dim=0)
    top = parts[1].max(dim=0).values
    target = parts[2].sum(dim=0)
    return target - lse, target >= top


def _digest(windows: list[tuple[list[int], int]]) -> int:
    h = hashlib.blake2b(digest_size=7)
    for toks, n in windows:
        h.update(np.asarray(toks + [-1 - n], dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


@torch.no_grad()
def score_windows(eng, comm, windows: list[tuple[list[int], int]], tokens_per_batch: int,
                  check_same: bool = True) -> list[tuple[float, bool]]:
    """(sum of log p, all greedy) of the last n tokens of each window (tokens, n): the model
    reads tokens[:-1] and predicts tokens[1:]. Collective over all ranks: every rank passes
    the same windows and gets every result. Batches (longest first, right-padded) hold at
    most `tokens_per_batch` tokens, or one window; they go round-robin to the DP ranks, and a
    rank with fewer runs a one-token forward so that every rank's ZeRO-3 gathers match."""
    if not windows:
        return []
    dev = _device()
    dp, dpr = comm.dp_size, comm.dp_rank
    if check_same and dist.is_initialized() and dist.get_world_size() > 1:
        # The same requests on every rank is what makes the split right; a difference (a
        # rank's data or harness differs) would score wrong numbers without any error.
        d = torch.tensor([_digest(windows), -_digest(windows)], dtype=torch.int64, device=dev)
        dist.all_reduce(d, op=dist.ReduceOp.MIN)
        if int(d[0]) != -int(d[1]):
            raise SatDistError("--eval-tasks: the ranks built different requests from the same tasks (different "
                               "task data or lm-eval versions on the nodes?); every rank must see the same files")
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i][0]), i))
    batches: list[list[int]] = []
    j = 0
    while j < len(order):
        width = len(windows[order[j]][0]) - 1
        rows = max(1, tokens_per_batch // max(width, 1))
        batches.append(order[j:j + rows])
        j += rows
    per_rank = -(-len(batches) // dp) if batches else 0
    out = torch.zeros((len(windows), 2), dtype=torch.float64, device=dev)
    eng.train(False)
    eng.sat.set_step(0, 0, 0.0, 0.0)  # dense, as validation
    try:
        for k in range(per_rank):
            b = k * dp + dpr
            if b >= len(batches):
                eng.engine(torch.zeros((1, 1), dtype=torch.long, device=dev))  # keeps the DP ranks in step
                continue
            idx = batches[b]
            width = max(len(windows[i][0]) for i in idx) - 1
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            tgt = torch.zeros((len(idx), width), dtype=torch.long)
            scored = torch.zeros((len(idx), width), dtype=torch.bool)
            for r, i in enumerate(idx):
                toks, n = windows[i]
                L = len(toks) - 1
                ids[r, :L] = torch.tensor(toks[:-1])
                tgt[r, :L] = torch.tensor(toks[1:])
                scored[r, L - n:L] = True
            ids, tgt, scored = ids.to(dev), tgt.to(dev), scored.to(dev)
            logp, greedy = token_logprobs(eng.engine(ids), tgt, comm)
            logp = torch.where(scored, logp, torch.zeros_like(logp)).double().sum(dim=1)
            greedy = (greedy | ~scored).all(dim=1)
            rows = torch.tensor(idx, device=dev)
            out[rows, 0] = logp
            out[rows, 1] = greedy.double()
    finally:
        eng.train()
    if dp > 1:
        dist.all_reduce(out, group=comm.dp_group)  # each entry comes from one DP rank, zeros elsewhere
    res = out.cpu().tolist()
    return [(float(lp), bool(g > 0.5)) for lp, g in res]


class SatDistLM(TemplateLM):
    """The harness's LM over a sat_dist Engine (see the module's docstring)."""

    backend = "causal"

    def __init__(self, eng, comm, tokenizer, max_length: int, tokens_per_batch: int):
        super().__init__()
        self.eng, self.comm, self.tok = eng, comm, tokenizer
        self._max_length = int(max_length)
        self.tokens_per_batch = max(int(tokens_per_batch), 1)
        self._device = _device()
        # Every evaluation of a run asks for the same texts: each is tokenized once (that was
        # half of the harness's host time per request, on every rank), kept as int32 under a
        # digest of the text, up to CACHED_TOKENS tokens.
        self._encoded: dict[bytes, np.ndarray] = {}
        self._cached_tokens = 0

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        key = hashlib.blake2b(f"{add_special_tokens}|{string}".encode(), digest_size=16).digest()
        ids = self._encoded.get(key)
        if ids is not None:
            return ids.tolist()
        out = self._encode(string, add_special_tokens)
        if self._cached_tokens + len(out) <= CACHED_TOKENS:
            self._encoded[key] = np.asarray(out, dtype=np.int32)
            self._cached_tokens += len(out)
        return out

    def _encode(self, string: str, add_special_tokens: Optional[bool]) -> list[int]:
        ids = self.tok.encode(string)
        add = add_special_tokens if add_special_tokens is not None else True
        if add_special_tokens is None and self.tok.bos_id is not None:
            bos_text = self.tok.piece(self.tok.bos_id)
            if bos_text and string.startswith(bos_text):  # the text carries its BOS already
                add = False
        if add and self.tok.add_bos and ids[:1] != [self.tok.bos_id]:
            ids = [self.tok.bos_id] + ids
        return ids

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = True):
        return super().loglikelihood(requests, disable_tqdm=True)

    def _window(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[list[int], int]:
        if not context_enc or not continuation_enc:
            raise SatDistError("--eval-tasks: a request with an empty context or continuation after tokenization")
        n = len(continuation_enc)
        if n > self.max_length:
            raise SatDistError(f"--eval-tasks: a continuation of {n} tokens, longer than the model's context "
                               f"({self.max_length})")
        return (context_enc + continuation_enc)[-(self.max_length + 1):], n

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = True, **kwargs) -> list[tuple[float, bool]]:
        windows = [self._window(ctx, cont) for _, ctx, cont in requests]
        res = score_windows(self.eng, self.comm, windows, self.tokens_per_batch)
        for (pair, _, _), r in zip(requests, res):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True) -> list[float]:
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(self._window(ctx, cont))
                owner.append(k)
        res = score_windows(self.eng, self.comm, windows, self.tokens_per_batch)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, res):
            totals[k] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = True):
        raise SatDistError("--eval-tasks: generate_until (text generation) is not done during training; the "
                           "in-run evaluation scores log-likelihoods only. Evaluate generation tasks on an exported "
                           "checkpoint (tools/export_hf.py, then lm-eval --model hf)")
