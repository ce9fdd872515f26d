"""megatron-core's indexed dataset (PREFIX.bin + PREFIX.idx), written and read with numpy.

The bytes are exactly those of `megatron.core.datasets.indexed_dataset` (MMIDIDX version 1):
files from Megatron-LM's preprocess_data.py read here, ours read there (tests/test_data.py
checks both directions). We do not call megatron-core's classes because importing
megatron.core costs ~4 s (it pulls in the transformer stack) in every preprocessing worker,
and its reader asserts instead of saying which file is broken and how to fix it.

PREFIX.idx, little endian:
    9 bytes  b"MMIDIDX\\x00\\x00"
    u64      version, 1
    u8       token dtype code (uint16 = 8, int32 = 4; see _DTYPE_CODES)
    u64      S, number of sequences
    u64      D, number of document boundaries (documents + 1)
    i32[S]   sequence lengths in tokens
    i64[S]   byte offset of each sequence in .bin
    i64[D]   document boundaries as sequence indices: 0, ..., S
   [i8[S]    sequence modes, multimodal datasets only; ignored here]
PREFIX.bin holds the tokens of every sequence back to back.

Our writer stores one document as one sequence (Megatron's layout without
--split-sentences); the reader also accepts documents made of several sequences.
"""

from __future__ import annotations

import array
import os
import struct
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from sat_dist.errors import SatDistError

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                6: np.float64, 7: np.float32, 8: np.uint16}
_CODE_OF = {np.dtype(v): k for k, v in _DTYPE_CODES.items()}
_REDO = "re-run tools/preprocess_data.py"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits with room to spare (Megatron's < 65500 rule), else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def dataset_prefix(path: str | Path) -> str:
    """PREFIX from PREFIX, PREFIX.bin or PREFIX.idx."""
    s = str(path)
    return s[:-4] if s.endswith((".bin", ".idx")) else s


class IndexedDatasetWriter:
    """Streams documents into PREFIX.bin/.idx; nothing at PREFIX is replaced until finalize().

    Both files are written under temporary names and renamed at the end, so an interrupted
    or failed run leaves an existing dataset untouched. Use as a context manager: leaving the
    block without finalize() (e.g. on an exception) deletes the temporary files.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type):
        self.prefix = dataset_prefix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF or self.dtype.kind not in "iu":
            raise SatDistError(f"indexed dataset {self.prefix}: token dtype {self.dtype} is not "
                               "an integer type megatron-core knows; use uint16 or int32")
        self._max = np.iinfo(self.dtype).max
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp{os.getpid()}"
        self._bin_tmp = self.prefix + ".bin" + tag
        self._idx_tmp = self.prefix + ".idx" + tag
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = array.array("q")  # 8 bytes per document, not a Python int each
        self._last = array.array("q")  # each document's last token (0 if empty): PREFIX.doclast.npz
        self.num_tokens = 0
        self._done = False

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document (one sequence); an empty one is stored with length 0."""
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() > self._max):
            # A silent wrap-around here would corrupt training data with no error anywhere.
            raise SatDistError(f"indexed dataset {self.prefix}: token id {int(arr.max())} does "
                               f"not fit {self.dtype}; write with dtype=token_dtype(vocab_size)")
        if arr.size >= 2**31:
            raise SatDistError(f"indexed dataset {self.prefix}: a document of {arr.size} tokens "
                               "exceeds the format's int32 length; split it")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(arr.size)
        self._last.append(int(arr.reshape(-1)[-1]) if arr.size else 0)
        self.num_tokens += int(arr.size)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        """Write the index, then move both files into place (.bin first, .idx last)."""
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64)
        s = lengths.size
        pointers = np.zeros(s, dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, 1, _CODE_OF[self.dtype], s, s + 1))
            f.write(lengths.astype(np.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(s + 1, dtype=np.int64).tobytes())
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(self._idx_tmp, self.prefix + ".idx")
        # the document index beside it (sat_dist.data.doc_ends), so start-up never reads the .bin
        from sat_dist.data import doc_ends

        bounds = np.zeros(s + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        doc_ends.write(doc_ends.cache_file(self.prefix),
                       np.frombuffer(self._last, dtype=np.int64).astype(self.dtype),
                       doc_ends.fingerprint(bounds, self.prefix + ".idx", self.prefix + ".bin"))
        self._done = True

    def abort(self) -> None:
        self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.abort()


class IndexedDatasetReader:
    """Memory-mapped PREFIX.bin/.idx, checked on open; every problem is a one-line SatDistError.

    Documents are token ranges: document d is tokens[doc_bounds[d]:doc_bounds[d + 1]].
    """

    def __init__(self, prefix: str | Path, vocab_size: Optional[int] = None):
        self.prefix = dataset_prefix(prefix)
        self.idx_path = self.prefix + ".idx"
        self.bin_path = self.prefix + ".bin"
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise SatDistError(f"{p}: file not found; {_REDO} --output-prefix {self.prefix}")
        self.dtype, lengths, pointers, doc_index = self._read_index()
        # token offset where each sequence starts, plus the end: [S + 1]
        seq_starts = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=seq_starts[1:])
        if not np.array_equal(pointers, seq_starts[:-1] * self.dtype.itemsize):
            raise SatDistError(f"{self.idx_path}: sequence offsets disagree with the lengths: "
                               f"corrupt index; {_REDO}")
        self.num_tokens = int(seq_starts[-1])
        # the only per-document array kept: 8 bytes a document
        self.doc_bounds = seq_starts[doc_index]  # [documents + 1] token offsets

        expected = self.num_tokens * self.dtype.itemsize
        actual = os.path.getsize(self.bin_path)
        if actual < expected:
            raise SatDistError(f"{self.bin_path}: is shorter than .idx says ({actual} of "
                               f"{expected} bytes): truncated; {_REDO}")
        if actual > expected:
            raise SatDistError(f"{self.bin_path}: is longer than .idx says ({actual} vs "
                               f"{expected} bytes): .bin and .idx are from different runs; {_REDO}")
        if self.num_tokens == 0:
            raise SatDistError(f"{self.prefix}: empty dataset ({len(self)} documents, 0 tokens); "
                               f"check the input of tools/preprocess_data.py")
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        if vocab_size is not None:
            self.check_dtype_fits(vocab_size)

    def _read_index(self):
        size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise SatDistError(f"{self.idx_path}: {len(head)} bytes, shorter than the "
                                   f"{_HEADER.size}-byte header: truncated or empty; {_REDO}")
            magic, version, code, s, d = _HEADER.unpack(head)
            if magic != _MAGIC:
                raise SatDistError(f"{self.idx_path}: not a megatron indexed dataset index "
                                   f"(bad magic bytes); {_REDO}")
            if version != 1:
                raise SatDistError(f"{self.idx_path}: index version {version} is unsupported; "
                                   f"allowed: 1; {_REDO}")
            if code not in _DTYPE_CODES:
                raise SatDistError(f"{self.idx_path}: unknown token dtype code {code}; {_REDO}")
            dtype = np.dtype(_DTYPE_CODES[code])
            if dtype.kind not in "iu":
                raise SatDistError(f"{self.idx_path}: tokens are stored as {dtype}, not integers; "
                                   f"allowed: uint16, int32; {_REDO}")
            body = s * 4 + s * 8 + d * 8
            # megatron's multimodal variant appends one int8 mode per sequence
            if size - _HEADER.size not in (body, body + s):
                what = "truncated" if size - _HEADER.size < body else "has trailing bytes"
                raise SatDistError(f"{self.idx_path}: {what} ({size} bytes, header says "
                                   f"{_HEADER.size + body}); {_REDO}")
            lengths = np.fromfile(f, dtype="<i4", count=s).astype(np.int64)
            pointers = np.fromfile(f, dtype="<i8", count=s)
            doc_index = np.fromfile(f, dtype="<i8", count=d)
        if d < 1 or doc_index[0] != 0 or doc_index[-1] != s or np.any(np.diff(doc_index) < 0):
            raise SatDistError(f"{self.idx_path}: document boundaries are not 0..{s} in "
                               f"order: corrupt index; {_REDO}")
        if s and lengths.min() < 0:
            raise SatDistError(f"{self.idx_path}: negative sequence length: corrupt index; {_REDO}")
        return dtype, lengths, pointers, doc_index

    def __len__(self) -> int:
        """Number of documents."""
        return self.doc_bounds.size - 1

    def __getitem__(self, d: int) -> np.ndarray:
        """Tokens of document d: [doc_len], a view into the memory map."""
        if not -len(self) <= d < len(self):
            raise IndexError(f"document {d} out of range [0, {len(self)})")
        d %= len(self)
        return self.tokens[self.doc_bounds[d]:self.doc_bounds[d + 1]]

    def check_dtype_fits(self, vocab_size: int) -> None:
        """Fail if the stored dtype cannot hold this vocabulary's ids (a tokenizer mismatch)."""
        top = np.iinfo(self.dtype).max
        if vocab_size - 1 > top:
            raise SatDistError(f"{self.idx_path}: tokens are stored as {self.dtype} (max id {top}) "
                               f"but the tokenizer has {vocab_size} ids: tokenized with another "
                               f"tokenizer; {_REDO} with this one")

    def check_token_range(self, vocab_size: int, chunk: int = 1 << 24) -> None:
        """Scan every token for an id outside [0, vocab_size): O(tokens), ~1 s per GB."""
        self.check_dtype_fits(vocab_size)
        for start in range(0, self.num_tokens, chunk):
            part = self.tokens[start:start + chunk]
            lo, hi = int(part.min()), int(part.max())
            if lo < 0 or hi >= vocab_size:
                bad = hi if hi >= vocab_size else lo
                raise SatDistError(f"{self.bin_path}: token id {bad} outside the tokenizer's "
                                   f"[0, {vocab_size}): tokenized with another tokenizer; "
                                   f"{_REDO} with this one")


__all__ = ["IndexedDatasetWriter", "IndexedDatasetReader", "token_dtype", "dataset_prefix"]
