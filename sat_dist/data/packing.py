"""Packed, shuffled, resumable training samples over an indexed dataset.

The token stream is every document in file order, each followed by EOS (a document that
already ends with EOS, e.g. preprocessed with --append-eod, gets no second one, so both
preprocessing modes give the same stream). With s = seq_length, sample k of the stream is
stream[k*s : k*s + s + 1], Megatron's cut: consecutive samples share one boundary token, so
every token but the first is a label exactly once. Input is sample[:-1], labels sample[1:].
Attention is not reset at document boundaries (Megatron's default).

Splits ("969,30,1" = train, valid, test weights) are contiguous ranges of stream samples,
taken before any shuffling: sizes are exact for any number of documents (a corpus of a few
huge files splits as well as one of many small ones). The price: the document at a boundary
has its start in one split and its end in the next.

Each split is shuffled on its own, per epoch, by numpy Generators seeded from
(seed, split, epoch); global state is never touched. The position in a dataset is one
integer, the samples consumed from it: sample g of a split (g counts across epochs) is
sample perm_{g // n}[g % n] of its range. Which samples make a global batch, and which of
them each data-parallel rank takes, is sat_dist.data.blend's (a single --data-path prefix is
a blend of one: step i of global batch G uses g in [i*G, (i+1)*G), DP rank r of D the r-th
contiguous G/D of it). A run restored with its positions continues exactly, at any DP size.

A validation set of its own (--valid-data-path) is a whole dataset: every sample of its
stream, no split, shuffled like the valid split (split index 1).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from sat_dist.data.doc_ends import last_tokens
from sat_dist.data.indexed import IndexedDatasetReader
from sat_dist.errors import SatDistError

SPLIT_NAMES = ("train", "valid", "test")


class TokenStream:
    """The documents of an indexed dataset as one virtual token stream with EOS separators."""

    def __init__(self, reader: IndexedDatasetReader, eos_id: int, cache_dir: Optional[str | Path] = None):
        self.reader = reader
        self.eos_id = int(eos_id)
        bounds = reader.doc_bounds
        lengths = np.diff(bounds)  # [docs]
        # from PREFIX.doclast.npz, not the .bin: start-up reads the index only (doc_ends)
        last = last_tokens(reader, cache_dir)  # [docs]
        has_eos = (lengths > 0) & (last == self.eos_id)
        # stream offset where each document starts, plus the end: [docs + 1]
        self._starts = np.zeros(len(reader) + 1, dtype=np.int64)
        np.cumsum(lengths + (~has_eos), out=self._starts[1:])
        self.num_tokens = int(self._starts[-1])

    def read(self, start: int, count: int) -> np.ndarray:
        """stream[start : start + count] as int64: [count]."""
        if start < 0 or start + count > self.num_tokens:
            raise IndexError(f"stream range [{start}, {start + count}) outside "
                             f"[0, {self.num_tokens})")
        out = np.empty(count, dtype=np.int64)
        doc = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos, filled = start, 0
        while filled < count:
            offset = int(pos - self._starts[doc])
            first, end = (int(b) for b in self.reader.doc_bounds[doc:doc + 2])
            if offset < end - first:
                n = min(end - first - offset, count - filled)
                out[filled:filled + n] = self.reader.tokens[first + offset:first + offset + n]
            else:  # the EOS we insert after this document
                n = 1
                out[filled] = self.eos_id
            filled += n
            pos += n
            if pos == self._starts[doc + 1]:
                doc += 1
        return out


class PackedDataset:
    """One split: `len()` samples of seq_length + 1 tokens, reshuffled every epoch."""

    def __init__(self, stream: TokenStream, seq_length: int, first_sample: int, num_samples: int,
                 seed: int, split_index: int = 0, name: str = "train", whole: bool = False):
        self.stream = stream
        self.seq_length = seq_length
        self.first_sample = first_sample
        self.num_samples = num_samples
        self.seed = seed
        self.split_index = split_index
        self.name = name
        self.whole = whole
        """The dataset's every sample (a --valid-data-path set), not a share of a split."""
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        """Samples per epoch."""
        return self.num_samples

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of an epoch: [len(self)], a function of (seed, split, epoch) only."""
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, self.split_index, epoch])
            perm = rng.permutation(self.num_samples)
            self._perms[epoch] = perm
            while len(self._perms) > 2:  # a global batch spans at most two epochs
                self._perms.popitem(last=False)
        return perm

    def sample(self, index: int) -> np.ndarray:
        """Tokens of the index-th sample served (counted across epochs): [seq_length + 1]."""
        epoch, pos = divmod(int(index), self.num_samples)
        k = self.first_sample + int(self.permutation(epoch)[pos])
        return self.stream.read(k * self.seq_length, self.seq_length + 1)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.sample(index)


def parse_split(split: str) -> list[float]:
    """Megatron's "--split": "969,30,1" (or "98,2", "100") -> train/valid/test weights."""
    parts = [p for p in str(split).replace("/", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not w >= 0 for w in weights) or not weights[0] > 0:
        raise SatDistError(f"data.split: got {split!r}; allowed: 1 to 3 comma-separated "
                           "weights >= 0 for train,valid,test with train > 0, e.g. 969,30,1")
    return weights + [0.0] * (3 - len(weights))


def split_sample_ranges(num_samples: int, weights: list[float]) -> list[tuple[int, int]]:
    """Contiguous [first, end) sample ranges proportional to the weights, covering all."""
    cum = np.cumsum(weights) / sum(weights)
    ends = [int(round(c * num_samples)) for c in cum]
    ends[-1] = num_samples
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def build_packed_datasets(prefix: str | Path, seq_length: int, eos_id: int, seed: int = 1234,
                          split: str = "969,30,1", vocab_size: Optional[int] = None,
                          cache_dir: Optional[str | Path] = None) -> dict[str, PackedDataset]:
    """Open PREFIX.bin/.idx and return the splits with a weight > 0: {"train": ..., ...}.

    vocab_size, when given, checks the stored dtype can hold the tokenizer's ids (cheap);
    a full id-range scan is IndexedDatasetReader.check_token_range.
    """
    if not isinstance(seq_length, int) or seq_length < 1:
        raise SatDistError(f"data.seq_length: got {seq_length!r}; allowed: an integer >= 1")
    if not isinstance(seed, int) or seed < 0:
        raise SatDistError(f"data.seed: got {seed!r}; allowed: an integer >= 0")
    weights = parse_split(split)
    stream = TokenStream(IndexedDatasetReader(prefix, vocab_size=vocab_size), eos_id, cache_dir)
    total = (stream.num_tokens - 1) // seq_length
    out = {}
    for i, (name, w, (lo, hi)) in enumerate(zip(SPLIT_NAMES, weights,
                                               split_sample_ranges(total, weights))):
        if w == 0:
            continue
        if hi == lo:
            raise SatDistError(f"data: the {name} split of {prefix} gets 0 of {total} samples "
                               f"({stream.num_tokens} tokens, seq_length {seq_length}); use more "
                               f"data, a shorter seq_length, or a larger {name} weight in "
                               "the split")
        out[name] = PackedDataset(stream, seq_length, lo, hi - lo, seed, i, name)
    return out


def build_whole_dataset(prefix: str | Path, seq_length: int, eos_id: int, seed: int = 1234,
                        vocab_size: Optional[int] = None, name: str = "valid", split_index: int = 1,
                        scan_ids: bool = True, cache_dir: Optional[str | Path] = None) -> PackedDataset:
    """All of PREFIX.bin/.idx as one dataset (a validation, training or test set of its
    own), shuffled like the split `split_index` (0 train, 1 valid, 2 test).

    With vocab_size, the dtype is checked against it, and with scan_ids every token id too
    (a set made with another tokenizer would index past the embedding); validation sets are
    small enough to scan, training sets are checked batch by batch instead.
    """
    reader = IndexedDatasetReader(prefix, vocab_size=vocab_size)
    if vocab_size is not None and scan_ids:
        reader.check_token_range(vocab_size)
    stream = TokenStream(reader, eos_id, cache_dir)
    total = (stream.num_tokens - 1) // seq_length
    if total == 0:
        raise SatDistError(f"{prefix}: {stream.num_tokens} tokens (EOS separators included), not one sample "
                           f"of seq_length {seq_length} + 1; use more data or a shorter seq_length")
    return PackedDataset(stream, seq_length, 0, total, seed, split_index, name, whole=True)


__all__ = ["TokenStream", "PackedDataset", "parse_split", "split_sample_ranges",
           "build_packed_datasets", "build_whole_dataset", "SPLIT_NAMES"]
