"""How often a training step would wait on the host on a GPU, counted on CPU through the real
entry point, engine and loop (tests/host_syncs.py says what is counted).

The bound that matters: the count per micro-batch must not grow with the model's depth, or
the host could never queue a GPU step ahead. The only per-layer reads allowed are comm-sparse
ZeRO-3's layouts of a new selection (collective sizes must be known on the host): one per
product, on the micro-batch that makes the step's selection, none on the others.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.host_syncs import HostSyncCounter
from tests.launchers import REPO, _flags

STEPS = 3
PER_MICRO = 2
"""Host reads allowed per micro-batch outside comm-sparse's layouts (0 measured; the bound
leaves room for a log line's read, not for one per layer)."""


def _census(rank, world, flags):
    from sat_dist.train.engine import Engine
    from sat_dist.train.main import main

    counter = HostSyncCounter()
    call, backward = Engine.__call__, Engine.backward

    def counted_call(self, *a, **k):
        counter.bucket = ("micro", self.sat.step, self.sat.micro) if torch.is_grad_enabled() else "eval"
        counter.counts[counter.bucket] += 0  # present even when nothing is read
        return call(self, *a, **k)

    def counted_backward(self, loss):
        try:
            return backward(self, loss)
        finally:
            counter.bucket = "loop"

    Engine.__call__, Engine.backward = counted_call, counted_backward  # this forked rank only
    with counter:
        rc = main(flags)
    where = [f"{b} {name} {at}: {n}" for (b, name, at), n in counter.where.most_common(12)]
    return rc, dict(counter.counts), where


def _run(corpus, tmp_path, layers: int, comm_sparse: str):
    cfg = json.loads((REPO / "configs" / "model" / "tiny-test.json").read_text())
    cfg.update(num_layers=layers, name=f"tiny-{layers}")
    path = tmp_path / f"tiny-{layers}.json"
    path.write_text(json.dumps(cfg))
    flags = _flags(corpus, **{"model-config": str(path), "train-iters": STEPS, "eval-interval": 1000,
                              "sat-schedule": "constant", "sat-metric": "activation", "sat-selection": "topk",
                              "sat-comm-sparse": comm_sparse, "log-interval": 1})
    (rc, counts, where), _ = run_ranks(2, _census, flags, timeout=300)
    assert rc == 0, where
    micro = {k[1:]: v for k, v in counts.items() if isinstance(k, tuple)}
    assert len(micro) == STEPS * 2, (micro, where)  # global batch 8 = 2 ranks x micro-batch 2 x 2 micro-batches
    # Step 0 is DeepSpeed's warm-up: ZeRO-3 records its parameter trace and checks it agrees
    # over the ranks (a host read per parameter, once per run).
    first = [micro[(s, 0)] for s in range(1, STEPS)]
    rest = [micro[(s, 1)] for s in range(1, STEPS)]
    return first, rest, counts.get("loop", 0), where


@pytest.mark.parametrize("comm_sparse", ["off", "on"])
def test_host_reads_per_micro_batch_do_not_grow_with_depth(corpus, tmp_path, comm_sparse):
    first2, rest2, loop2, where2 = _run(corpus, tmp_path, 2, comm_sparse)
    first4, rest4, loop4, where4 = _run(corpus, tmp_path, 4, comm_sparse)
    # the micro-batches after the step's first: nothing per layer
    assert rest2 == rest4 and max(rest4) <= PER_MICRO, (rest2, rest4, where4)
    # the loop around the engine: per step, whatever the depth
    assert loop2 == loop4, (loop2, loop4, where4)
    if comm_sparse == "off":
        assert first2 == first4 and max(first4) <= PER_MICRO, (first2, first4, where4)
    else:
        # one layout read per product (4 per layer) for the step's new selections, no more
        assert all(b - a == 4 * (4 - 2) for a, b in zip(first2, first4)), (first2, first4, where4)
        assert max(first2) <= PER_MICRO + 4 * 2, (first2, where2)
    print(Counter({"first micro-batch, 4 layers": max(first4), "later micro-batches": max(rest4),
                   "loop per run": loop4}))
