"""Which DP rank writes which parameter of a checkpoint: balanced by bytes."""

import random

from sat_dist.checkpoint.state import balanced_owners


def test_by_hand():
    sizes = {"emb": 10, "a": 1, "b": 1, "head": 10, "c": 1}
    assert balanced_owners(sizes, 2) == {"emb": 0, "head": 1, "a": 0, "b": 1, "c": 0}
    assert balanced_owners(sizes, 1) == dict.fromkeys(sizes, 0)


def test_every_rank_gets_about_a_share():
    rng = random.Random(0)
    for dp in (2, 3, 8):
        sizes = {f"p{i}": rng.choice((1, 7, 100, 4096)) for i in range(200)}
        owners = balanced_owners(sizes, dp)
        load = [sum(n for k, n in sizes.items() if owners[k] == r) for r in range(dp)]
        # greedy largest-first: no rank exceeds another by more than the largest item
        assert max(load) - min(load) <= max(sizes.values()), (dp, load)
        assert set(owners) == set(sizes)
