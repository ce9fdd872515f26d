"""Data blends (--data-path W1 P1 W2 P2 ...): proportions per global batch against the
weights, each dataset's own sample order, and resume from the saved positions, compared with
hand computations and with each dataset read on its own."""

import math
import random

import numpy as np
import pytest
import torch

from sat_dist.data.blend import (
    BlendedDataset,
    DataPosition,
    batch_counts,
    dataset_key,
    parse_blend,
    position_from_manifest,
)
from sat_dist.data.indexed import IndexedDatasetWriter
from sat_dist.data.packing import build_packed_datasets
from sat_dist.errors import SatDistError

EOS = 1
SEQ = 3


def _dataset(tmp_path, name, first_id, docs=40):
    """A dataset whose every token id lies in [first_id, first_id + 100): a sample tells
    which dataset it came from."""
    rng = np.random.default_rng(first_id)
    with IndexedDatasetWriter(tmp_path / name, np.uint16) as w:
        for _ in range(docs):
            w.add_document(rng.integers(first_id, first_id + 100, size=int(rng.integers(2, 9))))
        w.finalize()
    return str(tmp_path / name)


def _blend(prefixes, weights, seed=7):
    parts = [build_packed_datasets(p, SEQ, EOS, seed=seed, split="1")["train"] for p in prefixes]
    return BlendedDataset(parts, weights, [dataset_key(p) for p in prefixes], seed)


def _source(row: torch.Tensor) -> int:
    """Which dataset a sample came from: the hundreds of its first non-EOS id."""
    ids = [int(x) for x in row if int(x) != EOS]
    return ids[0] // 100 - 1


def test_parse_blend_normalises_and_refuses_malformed():
    assert parse_blend(["/d/a"], "--data-path") == [(1.0, "/d/a")]
    assert parse_blend(["3", "/d/a", "1", "/d/b"], "--data-path") == [(0.75, "/d/a"), (0.25, "/d/b")]
    assert parse_blend(["0.9", "/d/new", "0.1", "/d/old"], "--data-path")[1] == pytest.approx((0.1, "/d/old"))
    for values, msg in [
        (["0.5"], "a weight without a dataset prefix"),
        (["0.5", "/d/a", "0.5"], "got 3 values"),
        (["half", "/d/a", "1", "/d/b"], "weight 'half' of /d/a is not a number"),
        (["0", "/d/a", "1", "/d/b"], "weight 0 of /d/a: allowed: a finite number > 0"),
        (["-1", "/d/a", "1", "/d/b"], "weight -1 of /d/a"),
        (["inf", "/d/a", "1", "/d/b"], "weight inf of /d/a"),
        (["nan", "/d/a", "1", "/d/b"], "weight nan of /d/a"),
        (["/d/a", "1", "/d/b", "1"], "weight '/d/a' of 1 is not a number"),
        (["/d/a", "/d/b"], "2 prefixes without weights"),
        (["1", "2", "1", "/d/b"], "'2' after weight 1 looks like a weight"),
        (["1", "/d/a", "1", "/d/a.bin"], "/d/a.bin appears twice"),
    ]:
        with pytest.raises(SatDistError, match=None) as e:
            parse_blend(values, "--data-path")
        assert msg in str(e.value), (values, str(e.value))


def test_batch_counts_hand_example():
    """0.9/0.1 in batches of 8: 7.2/0.8 per batch, worked out by hand from the rule (floor,
    then the extra sample to the dataset furthest behind its share): after 5 batches the
    blend holds exactly 36/4."""
    drawn, seen = [0, 0], []
    for _ in range(5):
        c = batch_counts([0.9, 0.1], drawn, 8)
        seen.append(c)
        drawn = [a + b for a, b in zip(drawn, c)]
    assert seen == [[7, 1], [7, 1], [8, 0], [7, 1], [7, 1]]
    assert drawn == [36, 4]


@pytest.mark.parametrize("seed", range(6))
def test_every_batch_is_as_close_to_the_weights_as_integers_allow(seed):
    """Random weights and batch sizes, 400 batches: each count is floor(w*G) or ceil(w*G),
    the counts sum to G, and every dataset's cumulative count stays within one sample of
    w * (samples drawn)."""
    rnd = random.Random(seed)
    k = rnd.randint(2, 6)
    raw = [rnd.uniform(0.01, 1) for _ in range(k)]
    weights = [w / sum(raw) for w in raw]
    G = rnd.choice([1, 3, 8, 30, 256])
    drawn = [0] * k
    for _ in range(400):
        c = batch_counts(weights, drawn, G)
        assert sum(c) == G
        for w, n in zip(weights, c):
            assert math.floor(w * G) <= n <= math.ceil(w * G)
        drawn = [a + b for a, b in zip(drawn, c)]
        total = sum(drawn)
        for w, d in zip(weights, drawn):
            assert abs(d - w * total) < 1 + 1e-9


def test_blend_batches_follow_the_weights_and_each_dataset_its_own_order(tmp_path):
    a, b, c = (_dataset(tmp_path, n, i) for n, i in (("a", 100), ("b", 200), ("c", 300)))
    weights = [0.6, 0.3, 0.1]
    blend = _blend([a, b, c], weights)
    alone = [_blend([p], [1.0]).datasets[0] for p in (a, b, c)]
    G, steps = 10, 40  # several epochs of the small datasets
    pos = blend.start()
    taken = [0, 0, 0]
    for _ in range(steps):
        rows = [torch.cat((x, y[:, -1:]), 1) for x, y in blend.step_batches(pos, G, 5)]
        rows = torch.cat(rows)  # [G, seq + 1]
        by_source = [[], [], []]
        for row in rows:
            by_source[_source(row)].append(row.tolist())
        for d, (w, got) in enumerate(zip(weights, by_source)):
            assert math.floor(w * G) <= len(got) <= math.ceil(w * G)
            # the next samples of dataset d in its own shuffled order, none skipped or repeated
            want = [alone[d].sample(g).tolist() for g in range(taken[d], taken[d] + len(got))]
            assert sorted(got) == sorted(want)
            taken[d] += len(got)
        assert len(set(map(_source, rows[:5]))) > 1 or len(set(map(_source, rows[5:]))) > 1  # mixed, not sorted
        blend.advance(pos, G)
    assert pos.consumed == {blend.keys[d]: taken[d] for d in range(3)}
    assert taken == [240, 120, 40]


@pytest.mark.parametrize("dp_size,mb", [(2, 1), (2, 5), (5, 2)])
def test_dp_ranks_union_is_the_global_batch(tmp_path, dp_size, mb):
    blend = _blend([_dataset(tmp_path, "a", 100), _dataset(tmp_path, "b", 200)], [0.7, 0.3])
    pos = blend.start()
    for _ in range(4):
        single = torch.cat([x for x, _ in blend.step_batches(pos, 10, 10)])
        ranks = torch.cat([x for r in range(dp_size) for x, _ in blend.step_batches(pos, 10, mb, r, dp_size)])
        assert torch.equal(ranks, single)
        blend.advance(pos, 10)


def test_single_dataset_keeps_the_order_before_blends(tmp_path):
    """One prefix reads sample g = consumed + i, DP rank r the r-th contiguous share: the data
    order of runs (and checkpoints) from before blends."""
    p = _dataset(tmp_path, "a", 100)
    blend = _blend([p], [1.0])
    ds = blend.datasets[0]
    pos = blend.start()
    for step in range(5):
        for r in range(2):
            got = torch.cat([x for x, _ in blend.step_batches(pos, 8, 2, r, 2)])
            want = np.stack([ds.sample(g) for g in range(step * 8 + r * 4, step * 8 + r * 4 + 4)])[:, :-1]
            assert torch.equal(got, torch.from_numpy(want))
        blend.advance(pos, 8)
    old_manifest = {"consumed_samples": 40}  # a checkpoint from before blends
    assert position_from_manifest(old_manifest, blend).consumed == {blend.keys[0]: 40}


def test_resume_continues_every_dataset_even_with_another_batch_size(tmp_path):
    prefixes = [_dataset(tmp_path, "a", 100), _dataset(tmp_path, "b", 200)]

    def rows(blend, pos, G, steps):
        out = []
        for _ in range(steps):
            out += [r.tolist() for x, _ in blend.step_batches(pos, G, G) for r in x]
            blend.advance(pos, G)
        return out

    full_blend = _blend(prefixes, [0.8, 0.2])
    full = rows(full_blend, full_blend.start(), 10, 12)
    first = _blend(prefixes, [0.8, 0.2])
    pos = first.start()
    head = rows(first, pos, 10, 5)
    manifest = {"data_positions": pos.to_manifest(), "consumed_samples": 50}
    fresh = _blend(prefixes, [0.8, 0.2])  # a new process: only the manifest carried over
    tail = rows(fresh, fresh.start(position_from_manifest(manifest, fresh)), 10, 7)
    assert head + tail == full  # bit-exact continuation

    # Another global batch size after the resume: every dataset continues at its own position.
    other = _blend(prefixes, [0.8, 0.2])
    pos2 = other.start(position_from_manifest(manifest, other))
    after = rows(other, pos2, 4, 10)
    per_source = {0: [], 1: []}
    for r in head + after:
        per_source[_source(torch.tensor(r))].append(r)
    for d, ds in enumerate(other.datasets):
        want = [ds.sample(g)[:-1].tolist() for g in range(len(per_source[d]))]
        assert sorted(per_source[d]) == sorted(want)  # every sample of its order once, none skipped
    assert abs(len(per_source[1]) - 0.2 * 90) < 1  # still within a sample of the weight


def test_a_new_blend_keeps_positions_and_counts_its_share_from_its_start(tmp_path):
    """Stage 1 on `new` alone; stage 2 replays `old` at 0.1: `new` continues where stage 1
    left it, `old` starts at 0, and stage 2's batches hold 0.9/0.1 from its first batch on
    (no catch-up of the samples `old` "missed" in stage 1)."""
    new, old = _dataset(tmp_path, "new", 100), _dataset(tmp_path, "old", 200)
    stage1 = _blend([new], [1.0])
    pos = stage1.start()
    for _ in range(6):
        stage1.advance(pos, 10)
    saved = {"data_positions": pos.to_manifest(), "consumed_samples": 60}
    stage2 = _blend([new, old], [0.9, 0.1])
    pos2 = stage2.start(position_from_manifest(saved, stage1))
    assert pos2.consumed == {stage2.keys[0]: 60, stage2.keys[1]: 0}
    for _ in range(5):
        rows = torch.cat([x for x, _ in stage2.step_batches(pos2, 10, 10)])
        assert sorted(_source(r) for r in rows) == [0] * 9 + [1]
        stage2.advance(pos2, 10)
    assert pos2.consumed == {stage2.keys[0]: 105, stage2.keys[1]: 5}
    # A stage-2 checkpoint resumes stage 2's proportions (same blend: its start is kept).
    again = stage2.start(position_from_manifest({"data_positions": pos2.to_manifest()}, stage2))
    assert again.blend_start == {stage2.keys[0]: 60, stage2.keys[1]: 0}


def test_position_of_an_old_checkpoint_cannot_seed_a_blend(tmp_path):
    blend = _blend([_dataset(tmp_path, "a", 100), _dataset(tmp_path, "b", 200)], [0.5, 0.5])
    with pytest.raises(SatDistError, match="predates data blends"):
        position_from_manifest({"consumed_samples": 40}, blend)
    assert DataPosition().to_manifest() == {"consumed": {}, "blend_start": {}, "weights": {}, "fingerprints": {}}


def test_a_moved_dataset_keeps_its_position(tmp_path):
    """The same files under another path (node-local scratch, a symlink): found by their
    documents and tokens, not restarted at sample 0; other data under the old name is not."""
    import shutil

    a, b = _dataset(tmp_path, "a", 100), _dataset(tmp_path, "b", 200)
    blend = _blend([a, b], [0.75, 0.25])
    pos = blend.start()
    for _ in range(4):
        blend.advance(pos, 8)
    saved = {"data_positions": pos.to_manifest()}
    (tmp_path / "scratch").mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(a + suffix, tmp_path / "scratch" / f"a{suffix}")
    moved_a = str(tmp_path / "scratch" / "a")
    moved = _blend([moved_a, b], [0.75, 0.25])
    got = moved.start(position_from_manifest(saved, moved))
    assert got.consumed[moved.keys[0]] == 24 and got.consumed[moved.keys[1]] == 8
    assert got.blend_start == {moved.keys[0]: 0, moved.keys[1]: 0}  # the same blend goes on
    assert "is now" in moved.start_notes[0]
    rows = torch.cat([x for x, _ in moved.step_batches(got, 8, 8)])
    ref = torch.cat([x for x, _ in blend.step_batches(pos, 8, 8)])
    assert torch.equal(rows, ref)  # exactly the batch the unmoved run reads next
    other = _blend([_dataset(tmp_path, "c", 300), b], [0.75, 0.25])  # other data: starts at 0, said so
    got = other.start(position_from_manifest(saved, other))
    assert got.consumed[other.keys[0]] == 0 and "start at sample 0" in other.start_notes[0]
