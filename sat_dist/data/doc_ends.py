"""Each document's last token, stored beside the index, so that start-up reads no corpus.

The token stream (sat_dist.data.packing.TokenStream) must know which documents already end
with EOS. Reading the last token of every document from PREFIX.bin touches nearly every
page of it: a 100B-token corpus means about 200 GB read per node at every launch. So the
last tokens live in a small file of their own, 2-4 bytes a document:

  PREFIX.doclast.npz      written by IndexedDatasetWriter.finalize (tools/preprocess_data.py)
                          or, for a dataset made before, computed once from PREFIX.bin and
                          cached beside it (or under --data-cache-path, for a read-only
                          dataset directory)

It holds `last` ([documents], the dataset's token dtype; 0 for an empty document) and
`fingerprint` (documents, tokens, .idx and .bin sizes, a hash of the document boundaries).
A file whose fingerprint does not match its dataset (another version of the dataset, or a
damaged file) is an error naming it; it is never overwritten. The cache is written
atomically (a temporary name, then rename), under an advisory lock so that the ranks of one
launch compute it once: the first takes the lock and writes, the others wait and read.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from sat_dist.errors import SatDistError

SUFFIX = ".doclast.npz"
_SPOT_CHECKS = 64
"""Documents whose stored last token is compared with PREFIX.bin at every open (64 pages)."""


def fingerprint(doc_bounds: np.ndarray, idx_path: str, bin_path: str) -> np.ndarray:
    """[documents, tokens, .idx bytes, .bin bytes, hash of the boundaries] as int64."""
    digest = hashlib.blake2b(np.ascontiguousarray(doc_bounds, dtype=np.int64).tobytes(), digest_size=8).digest()
    return np.array([doc_bounds.size - 1, int(doc_bounds[-1]), os.path.getsize(idx_path),
                     os.path.getsize(bin_path), int.from_bytes(digest, "little", signed=True)], dtype=np.int64)


def cache_file(prefix: str, cache_dir: Optional[str | Path] = None) -> Path:
    """Where the file of dataset `prefix` lives: beside it, or under cache_dir with a name
    made from the dataset's absolute path (two datasets never share a cache entry)."""
    if cache_dir is None:
        return Path(prefix + SUFFIX)
    tag = hashlib.blake2b(str(Path(prefix).resolve()).encode(), digest_size=8).hexdigest()
    return Path(cache_dir) / f"{Path(prefix).name}-{tag}{SUFFIX}"


def write(path: Path, last: np.ndarray, fp: np.ndarray) -> None:
    """Atomically: a reader sees no file or the whole file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, last=last, fingerprint=fp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read(path: Path, fp: np.ndarray, prefix: str) -> np.ndarray:
    fix = (f"delete {path} (it is rebuilt from the dataset at the next start) or re-run "
           f"tools/preprocess_data.py for {prefix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            last, stored = z["last"], z["fingerprint"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise SatDistError(f"{path}: unreadable document index ({type(e).__name__}: {e}); {fix}") from None
    if stored.shape != fp.shape or not np.array_equal(stored, fp) or last.shape != (fp[0],):
        raise SatDistError(f"{path}: made for another version of {prefix} (its documents, sizes or "
                           f"boundaries differ); {fix}")
    return last


def _spot_check(path: Path, last: np.ndarray, bin_path: str, dtype: np.dtype, doc_bounds: np.ndarray,
                prefix: str) -> None:
    """A few documents' stored last tokens against PREFIX.bin: a .bin rewritten with the same
    document lengths (another tokenizer of the same lengths, a copy gone wrong) is caught.
    Read with pread and readahead off: a page each, not the device's readahead window each."""
    n = last.size
    picks = np.unique(np.linspace(0, n - 1, num=min(n, _SPOT_CHECKS)).astype(np.int64))
    picks = picks[doc_bounds[picks + 1] > doc_bounds[picks]]  # non-empty documents
    fd = os.open(bin_path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        actual = np.array([np.frombuffer(os.pread(fd, dtype.itemsize, int(doc_bounds[d + 1] - 1) * dtype.itemsize),
                                         dtype=dtype)[0] for d in picks], dtype=dtype)
    finally:
        os.close(fd)
    if not np.array_equal(actual, last[picks]):
        raise SatDistError(f"{path}: its last tokens disagree with {prefix}.bin (the .bin was rewritten); "
                           f"delete {path} (it is rebuilt from the dataset at the next start)")


def compute(tokens: np.ndarray, doc_bounds: np.ndarray) -> np.ndarray:
    """Every document's last token from the tokens themselves (reads about one page a document)."""
    last = np.asarray(tokens[np.maximum(doc_bounds[1:] - 1, 0)]).copy()
    last[doc_bounds[1:] == doc_bounds[:-1]] = 0
    return last


def last_tokens(reader, cache_dir: Optional[str | Path] = None) -> np.ndarray:
    """The last token of every document of an opened IndexedDatasetReader: [documents]."""
    fp = fingerprint(reader.doc_bounds, reader.idx_path, reader.bin_path)
    beside = cache_file(reader.prefix)
    path = beside if beside.exists() or cache_dir is None else cache_file(reader.prefix, cache_dir)
    if not path.exists() and not _build(path, reader, fp):
        warnings.warn(f"{reader.prefix}: no document index {path} and its directory is not writable: "
                      f"reading every document's last token from the .bin at every start; pass "
                      f"--data-cache-path DIR (writable) to keep it there once", stacklevel=2)
        return compute(reader.tokens, reader.doc_bounds)
    last = _read(path, fp, reader.prefix)
    _spot_check(path, last, reader.bin_path, reader.dtype, reader.doc_bounds, reader.prefix)
    return last


def _build(path: Path, reader, fp: np.ndarray) -> bool:
    """Compute and write the file once (False: the directory is not writable). Under an
    advisory lock, re-checked once held, so that ranks starting together wait for the first
    instead of each reading the whole .bin."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")
    except OSError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks: every rank computes the same bytes
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        if not path.exists():
            write(path, compute(reader.tokens, reader.doc_bounds), fp)
    return True
