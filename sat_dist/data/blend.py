"""Data blends: several datasets mixed by weight, with a resumable position in each.

`--data-path 0.9 /data/new 0.1 /data/old` (Megatron-LM's syntax; a bare PREFIX is a blend
of one) trains on a mix whose every global batch holds each dataset's share as closely as
integers allow: with weight w and global batch G a dataset gets floor(w*G) or ceil(w*G)
samples, and which datasets get the extra sample is decided by how far each has fallen
behind its weight since the blend began, so the cumulative count of every dataset stays
within one sample of w * (samples drawn) while the global batch size stays the same (a
resume with another one can add a fraction of a sample). Nothing is random in the counts; the order of the
samples inside a global batch is shuffled, seeded by (--seed, samples drawn), so that every
DP rank sees the mix and not one dataset.

Each dataset keeps its own shuffled, epoch-by-epoch sample order (PackedDataset); the blend's
position is the number of samples taken from each dataset, by prefix (`DataPosition`). It is
saved in every checkpoint, so a resume on any TP x DP layout, or with another global batch
size, continues every dataset exactly where it stopped. A new blend (other weights, or other
datasets, e.g. a continual pre-training stage that adds replay) keeps every dataset's
position and starts its own proportions from there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from sat_dist.data.packing import PackedDataset
from sat_dist.errors import SatDistError

_BLEND_FORMAT = "write one PREFIX, or pairs WEIGHT PREFIX, e.g. 0.9 /data/new_text_document 0.1 /data/old_text_document"


def parse_blend(values: list[str], flag: str) -> list[tuple[float, str]]:
    """`--data-path` values -> [(normalised weight, prefix)]: one PREFIX, or W1 P1 W2 P2 ...
    Weights must be finite numbers > 0; a prefix may appear once."""
    values = [str(v) for v in values or []]
    if not values:
        raise SatDistError(f"{flag}: no dataset given; {_BLEND_FORMAT}")
    if len(values) == 1:
        if _is_float(values[0]):
            raise SatDistError(f"{flag} {values[0]}: a weight without a dataset prefix; {_BLEND_FORMAT}")
        return [(1.0, values[0])]
    if not any(_is_float(v) for v in values):
        raise SatDistError(f"{flag}: {len(values)} prefixes without weights; give each its weight "
                           f"(Megatron's unweighted list is not supported); {_BLEND_FORMAT}")
    if len(values) % 2:
        raise SatDistError(f"{flag}: got {len(values)} values ({' '.join(values)}); {_BLEND_FORMAT}")
    pairs = []
    for w, prefix in zip(values[0::2], values[1::2]):
        if not _is_float(w):
            raise SatDistError(f"{flag}: weight {w!r} of {prefix} is not a number; {_BLEND_FORMAT}")
        weight = float(w)
        if not (math.isfinite(weight) and weight > 0):
            raise SatDistError(f"{flag}: weight {w} of {prefix}: allowed: a finite number > 0 "
                               f"(leave a dataset out rather than give it weight 0)")
        if _is_float(prefix):
            raise SatDistError(f"{flag}: {prefix!r} after weight {w} looks like a weight, not a prefix; "
                               f"{_BLEND_FORMAT}")
        pairs.append((weight, prefix))
    keys = [dataset_key(p) for _, p in pairs]
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise SatDistError(f"{flag}: {pairs[i][1]} appears twice; give each dataset once, with the sum of "
                               f"its weights")
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def dataset_key(prefix: str) -> str:
    """How a dataset is named in checkpoints: its prefix as given, normalised (a trailing
    .bin/.idx and redundant separators removed)."""
    p = str(prefix)
    for suffix in (".bin", ".idx"):
        if p.endswith(suffix):
            p = p[: -len(suffix)]
    return os.path.normpath(p)


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def batch_counts(weights: list[float], drawn: list[int], gbs: int) -> list[int]:
    """Samples each dataset gives to the next global batch of `gbs`, after `drawn[d]`
    samples taken from dataset d since the blend began: floor(w*G) or ceil(w*G) each, summing
    to G; the extra samples go to the datasets furthest behind w * (drawn + G)."""
    total = sum(drawn) + gbs
    base = [math.floor(w * gbs) for w in weights]
    extra = gbs - sum(base)
    # How far behind its share each dataset would be with only `base` this batch (ties: order).
    behind = [w * total - d - b for w, d, b in zip(weights, drawn, base)]
    order = sorted(range(len(weights)), key=lambda i: (-behind[i], i))
    for i in order[:extra]:
        base[i] += 1
    return base


@dataclass
class DataPosition:
    """Samples consumed from each dataset (by dataset_key), over the whole run, and where
    the current blend began (its proportions count from there)."""

    consumed: dict[str, int] = field(default_factory=dict)
    blend_start: dict[str, int] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    """The weights of the blend that began at blend_start."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    """What each dataset is, whatever its path: documents and tokens of its files. A dataset
    moved to another path (node-local scratch, a symlink, relative vs absolute) is found by
    it and keeps its position."""

    def to_manifest(self) -> dict:
        return {"consumed": dict(self.consumed), "blend_start": dict(self.blend_start),
                "weights": dict(self.weights), "fingerprints": dict(self.fingerprints)}


class BlendedDataset:
    """Datasets mixed by weight (one dataset: weight 1, exactly that dataset's order)."""

    def __init__(self, parts: list[PackedDataset], weights: list[float], keys: list[str], seed: int,
                 name: str = "train"):
        if not (len(parts) == len(weights) == len(keys)) or not parts:
            raise SatDistError("data: a blend needs as many weights and keys as datasets (at least one)")
        self.datasets, self.weights, self.keys, self.seed, self.name = parts, list(weights), list(keys), seed, name
        self.start_notes: list[str] = []

    @classmethod
    def single(cls, ds: PackedDataset, key: str) -> "BlendedDataset":
        return cls([ds], [1.0], [key], ds.seed, ds.name)

    @property
    def eos_id(self) -> int:
        """The EOD id that joins documents (the run's tokenizer's EOS, the same in every dataset)."""
        return self.datasets[0].stream.eos_id

    @property
    def whole(self) -> bool:
        """Every dataset is read whole (a --valid-data-path set), not a share of a split."""
        return all(p.whole for p in self.datasets)

    def __len__(self) -> int:
        """Samples per epoch over all datasets."""
        return sum(len(p) for p in self.datasets)

    def samples_without_repeat(self) -> int:
        """How many samples the blend serves from its start before some dataset repeats one:
        a dataset of n samples and weight w lasts about n / w."""
        return int(min(len(d) / w for d, w in zip(self.datasets, self.weights)))

    def fingerprints(self) -> dict[str, str]:
        return {k: f"{len(d.stream.reader)} documents, {d.stream.reader.num_tokens} tokens"
                for k, d in zip(self.keys, self.datasets)}

    def changed_since(self, position: DataPosition) -> list[tuple[str, str, str]]:
        """(key, fingerprint then, fingerprint now) of every dataset of this blend that the
        checkpoint's position knows under the same path but with other contents (documents
        appended, or another corpus made under the same prefix)."""
        prints = self.fingerprints()
        return [(k, position.fingerprints[k], prints[k]) for k in self.keys
                if position.fingerprints.get(k) not in (None, prints[k])]

    def start(self, position: Optional[DataPosition] = None, restart_changed: bool = False) -> DataPosition:
        """The position to read from: `position` (restored from a checkpoint) continued by
        this blend. A checkpoint of another blend (other weights or datasets) keeps each
        dataset's position, and this blend's proportions start counting there. A dataset
        whose path changed is recognised by its fingerprint. A dataset whose contents changed
        under the same path (changed_since) is refused, unless `restart_changed`
        (--accept-changed-data): it then starts again at sample 0. What did not carry over is
        in `self.start_notes` (for the log)."""
        pos = position or DataPosition()
        prints = self.fingerprints()
        changed = [k for k, _, _ in self.changed_since(pos)] if position is not None else []
        if changed and not restart_changed:
            raise_changed(self.changed_since(pos))
        renamed = _match_moved(pos, prints)  # old key -> new key
        old = {renamed.get(k, k): v for k, v in pos.consumed.items() if k not in changed}
        consumed = {k: old.get(k, 0) for k in self.keys}
        consumed.update({k: v for k, v in old.items() if k not in consumed})  # kept for later stages
        weights = dict(zip(self.keys, self.weights))
        saved_weights = {renamed.get(k, k): w for k, w in pos.weights.items()}
        same_blend = saved_weights and set(saved_weights) == set(weights) and all(
            math.isclose(saved_weights[k], weights[k], rel_tol=1e-9) for k in weights)
        start = ({renamed.get(k, k): v for k, v in pos.blend_start.items()} if same_blend
                 else {k: consumed[k] for k in self.keys})
        self.start_notes = [f"data: {a} of the checkpoint is now {b} (same documents and tokens): "
                            f"its position {consumed[b]} carries over" for a, b in renamed.items()]
        self.start_notes += [f"data: {k} changed since the checkpoint (--accept-changed-data): it starts again "
                             f"at sample 0" for k in changed]
        if position is not None:
            fresh = [k for k in self.keys if k not in old]
            left = [k for k in old if k not in self.keys and old[k]]
            if fresh and left:
                self.start_notes.append(f"data: {', '.join(fresh)} start at sample 0, and the checkpoint's "
                                        f"{', '.join(left)} are not in this blend (their positions are kept)")
        fingerprints = {k: v for k, v in pos.fingerprints.items() if k not in renamed}
        fingerprints.update(prints)
        return DataPosition(consumed, start, weights, fingerprints)

    def _next_counts(self, pos: DataPosition, gbs: int) -> tuple[list[int], int]:
        """(samples of each dataset in the next global batch, samples drawn since the blend began)."""
        drawn = [pos.consumed[k] - pos.blend_start[k] for k in self.keys]
        return batch_counts(self.weights, drawn, gbs), sum(drawn)

    def global_batch(self, pos: DataPosition, gbs: int) -> list[tuple[int, int]]:
        """The next global batch: (dataset index, sample index in that dataset) per slot."""
        counts, drawn = self._next_counts(pos, gbs)
        slots = [(d, pos.consumed[k] + j) for d, (k, n) in enumerate(zip(self.keys, counts)) for j in range(n)]
        if len(self.datasets) > 1:
            rng = np.random.default_rng([self.seed, 0xB1E4D, drawn])
            slots = [slots[i] for i in rng.permutation(len(slots))]
        return slots

    def advance(self, pos: DataPosition, gbs: int) -> None:
        """Move `pos` past one global batch of `gbs`."""
        for k, n in zip(self.keys, self._next_counts(pos, gbs)[0]):
            pos.consumed[k] += n

    def step_batches(self, pos: Optional[DataPosition], global_batch_size: int, micro_batch_size: int,
                     dp_rank: int = 0, dp_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This DP rank's micro-batches of the global batch at `pos` (None: the start):
        (input_ids, labels), each a LongTensor [micro_batch_size, seq_length]. DP rank r of D
        takes the r-th contiguous G/D slots; `pos` is not moved (see advance)."""
        pos = self.start() if pos is None else pos
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise SatDistError(f"data: dp_rank {dp_rank} outside [0, dp_size={dp_size})")
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise SatDistError(f"data: global_batch_size {global_batch_size} is not a positive "
                               f"multiple of the data-parallel size {dp_size}")
        per_rank = global_batch_size // dp_size
        if micro_batch_size < 1 or per_rank % micro_batch_size:
            raise SatDistError(f"data: micro_batch_size {micro_batch_size} does not divide the "
                               f"{per_rank} samples per DP rank (global_batch_size "
                               f"{global_batch_size} / dp_size {dp_size})")
        mine = self.global_batch(pos, global_batch_size)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        for i in range(0, per_rank, micro_batch_size):
            rows = [self.datasets[d].sample(g) for d, g in mine[i:i + micro_batch_size]]
            tokens = torch.from_numpy(np.stack(rows))  # [micro_batch, seq + 1]
            yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def describe(self) -> str:
        return ", ".join(f"{w:.3g} {k} ({len(p)} samples)" for w, k, p in zip(self.weights, self.keys, self.datasets))


def raise_changed(changed: list[tuple[str, str, str]]) -> None:
    """One error naming the datasets whose contents changed under a resumed run."""
    k, then, now = changed[0]
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    raise SatDistError(f"--load: dataset {k} changed since the checkpoint (then {then}; now {now}){more}; its "
                       f"saved position would point into other data. Resume with the data the run was trained "
                       f"on, or pass --accept-changed-data (the changed datasets start again at sample 0), or "
                       f"start a new stage with --finetune")


def _match_moved(pos: DataPosition, prints: dict[str, str]) -> dict[str, str]:
    """{checkpoint key: blend key} for datasets of the checkpoint that are in the blend under
    another path: same fingerprint, the one dataset that has it on either side."""
    missing = {k: pos.fingerprints.get(k) for k in pos.consumed if k not in prints}
    new = [k for k in prints if k not in pos.consumed]
    out = {}
    for k, fp in missing.items():
        same = [n for n in new if fp and prints[n] == fp]
        if len(same) == 1 and sum(1 for f in missing.values() if f == fp) == 1:
            out[k] = same[0]
    return out


def position_from_manifest(manifest: dict, blend: BlendedDataset) -> DataPosition:
    """The data position a checkpoint saved; a checkpoint from before blends holds only
    consumed_samples, which is the position of its single dataset."""
    saved = manifest.get("data_positions")
    if saved is not None:
        return DataPosition({k: int(v) for k, v in saved["consumed"].items()},
                            {k: int(v) for k, v in saved["blend_start"].items()},
                            {k: float(v) for k, v in saved["weights"].items()},
                            dict(saved.get("fingerprints", {})))
    if len(blend.keys) == 1:
        k = blend.keys[0]
        return DataPosition({k: int(manifest["consumed_samples"])}, {k: 0}, {k: 1.0})
    raise SatDistError("--load: the checkpoint predates data blends and holds the position of one dataset only; "
                       "resume it with its single --data-path prefix, or start a new stage with --finetune")


__all__ = ["parse_blend", "dataset_key", "batch_counts", "DataPosition", "BlendedDataset", "position_from_manifest",
           "raise_changed"]
