#!/usr/bin/env python
"""Bytes read and seconds to open a corpus at start-up: the token stream's document index
from PREFIX.bin (before: one page a document) against PREFIX.doclast.npz (now).

    python tools/bench_startup.py --dir /tmp/startup --tokens 1e9 --out startup.json

Writes a synthetic corpus of --tokens uint16 tokens (documents of 1-2,000 tokens, about
1,000 on average) once, then measures each way on a cold page cache: the .bin's pages are
dropped first (posix_fadvise DONTNEED, no root needed), and the bytes the process read
from storage (/proc/self/io read_bytes) and its major page faults are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sat_dist.data import doc_ends  # noqa: E402
from sat_dist.data.indexed import IndexedDatasetReader, IndexedDatasetWriter  # noqa: E402
from sat_dist.data.packing import TokenStream  # noqa: E402

EOS = 2


def make_corpus(prefix: str, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    written = 0
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        while written < tokens:
            lengths = rng.integers(1, 2001, size=4096)
            block = rng.integers(3, 32000, size=int(lengths.sum()), dtype=np.uint16)
            for doc in np.split(block, np.cumsum(lengths)[:-1]):
                w.add_document(doc)
            written += block.size
        w.finalize()


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def measure(prefix: str, fn) -> dict:
    for p in (prefix + ".bin", prefix + ".idx", prefix + doc_ends.SUFFIX):
        if os.path.exists(p):
            drop_cache(p)
    b0, f0, t0 = read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt, time.perf_counter()
    fn()
    return {"seconds": round(time.perf_counter() - t0, 3), "bytes_read": read_bytes() - b0,
            "major_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="where the synthetic corpus is (made once)")
    p.add_argument("--tokens", type=float, default=1e9)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    prefix = str(a.dir / f"synthetic_{int(a.tokens):d}")
    if not os.path.exists(prefix + ".idx"):
        a.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        make_corpus(prefix, int(a.tokens))
        print(f"wrote {prefix} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    reader = IndexedDatasetReader(prefix)
    info = {"tokens": reader.num_tokens, "documents": len(reader), "bin_bytes": os.path.getsize(prefix + ".bin"),
            "idx_bytes": os.path.getsize(prefix + ".idx"),
            "doclast_bytes": os.path.getsize(prefix + doc_ends.SUFFIX)}
    rows = {"before: last tokens from the .bin": [], "now: PREFIX.doclast.npz": []}
    for _ in range(a.rounds):
        rows["before: last tokens from the .bin"].append(
            measure(prefix, lambda: doc_ends.compute(IndexedDatasetReader(prefix).tokens, reader.doc_bounds)))
        rows["now: PREFIX.doclast.npz"].append(measure(prefix, lambda: TokenStream(IndexedDatasetReader(prefix), EOS)))
    report = {"corpus": info, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rounds": rows}
    print("| open | seconds (median) | bytes read from storage (median) | major page faults (median) |")
    print("|---|---|---|---|")
    for name, rs in rows.items():
        med = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
        mb, faults = med["bytes_read"] / 1e6, med["major_page_faults"]
        print(f"| {name} | {med['seconds']:.2f} | {mb:,.1f} MB | {faults:,.0f} |")
    print(f"\ncorpus: {info}")
    if a.out:
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
