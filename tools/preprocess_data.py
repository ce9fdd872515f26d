#!/usr/bin/env python
"""Tokenize text into megatron-core's indexed dataset, PREFIX.bin + PREFIX.idx.

One document per text file, or per line of a JSONL file. Like Megatron-LM's
tools/preprocess_data.py, with directories walked for code corpora:

    python tools/preprocess_data.py --input /usr/lib/python3.11 --glob '*.py' \\
        --tokenizer-model tokenizer.model --output-prefix data/stdlib --workers 8 --append-eod
    python tools/preprocess_data.py --input corpus.jsonl --json-key text ...

Every document starts with the tokenizer's BOS, as Megatron-LM's Llama tokenizers and
transformers' `tokenizer(text)` do (Llama-2 and Llama-3 were pretrained so): the text's ids
come from the tokenizer without special tokens, then BOS goes first, exactly once.
Tokenizers without a BOS, or whose BOS is their EOS (GPT-2, SmolLM2), or that say they add
none (tokenizer_config.json "add_bos_token": false, a tokenizer.json post-processor without
BOS), get none; --no-bos leaves it out always. PREFIX.tokenizer.json records the tokenizer
and "bos": true/false (sat_dist.data.tokenizer.tokenizer_record); a training run refuses a
blend of datasets with and without BOS.

Output order is input order whatever --workers is. Existing output is replaced only once the
new one is complete. Bad input: one line "error: ..." on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from sat_dist.data.indexed import IndexedDatasetWriter, token_dtype  # noqa: E402
from sat_dist.data.tokenizer import (  # noqa: E402
    document_ids,
    load_tokenizer,
    tokenizer_record,
    write_tokenizer_record,
)
from sat_dist.errors import SatDistError  # noqa: E402

EMPTY, UNDECODABLE = "empty", "undecodable"
_worker = {}  # per-process: the tokenizer and settings, set by _init_worker


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="text files, JSONL files or directories (walked recursively, hidden "
                        "entries skipped, files matching --glob)")
    p.add_argument("--glob", default="*",
                   help="file-name pattern for files found in directories, e.g. '*.py' (default *)")
    p.add_argument("--json-key", default=None,
                   help="read every input as JSONL and take this key's text; without it, "
                        "*.jsonl files use the key 'text' and other files are plain text")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece tokenizer.model or HF tokenizer.json")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--append-eod", action="store_true", help="end every document with EOS")
    p.add_argument("--no-bos", action="store_true",
                   help="do not start documents with BOS (default: they start with the tokenizer's "
                        "BOS, as transformers' tokenizer(text) does, where the tokenizer has one "
                        "other than its EOS)")
    p.add_argument("--skip-undecodable", action="store_true",
                   help="skip text files that are not UTF-8 instead of failing")
    return p.parse_args(argv)


def find_inputs(inputs: list[str], pattern: str) -> list[Path]:
    """Files named, plus files under directories matching the pattern, in sorted order."""
    files = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [Path(root) / n for n in names
                          if not n.startswith(".") and fnmatch(n, pattern)]
            files += sorted(found)
        else:
            raise SatDistError(f"--input {raw}: no such file or directory")
    if not files:
        raise SatDistError(f"--input {' '.join(inputs)}: no files match --glob {pattern!r}")
    return files


def work_items(files: list[Path], json_key: str | None):
    """Yield (kind, source, payload): one per text file, one per non-blank JSONL line."""
    for f in files:
        key = json_key or ("text" if f.suffix == ".jsonl" else None)
        if key is None:
            yield ("text", str(f), None)
            continue
        try:
            with open(f, "rb") as fh:  # binary: records end at b"\n" only, as JSONL says
                for lineno, raw in enumerate(fh, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise SatDistError(f"{f}:{lineno}: not UTF-8; JSONL must be "
                                           "UTF-8") from None
                    if line.strip():
                        yield ("json", f"{f}:{lineno}", (key, line))
        except OSError as e:
            raise SatDistError(f"{f}: cannot read ({e.strerror})") from None


def batched(items, max_items: int, max_chars: int = 1 << 20):
    # Several documents per task, so the pickling round trip is paid per batch, not per line.
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item[2][1]) if item[2] else 0
        if len(batch) >= max_items or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _init_worker(tokenizer_path: str, append_eod: bool, skip_undecodable: bool, bos: bool = True) -> None:
    tok = load_tokenizer(tokenizer_path)
    _worker.update(tok=tok, dtype=token_dtype(tok.vocab_size), eod=append_eod,
                   skip=skip_undecodable, bos=bos and tok.add_bos)


def _document_text(kind: str, source: str, payload) -> str | None:
    if kind == "text":
        try:
            # bytes, then decode: read_text would turn \r\n into \n and change the document
            return Path(source).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            if _worker["skip"]:
                return None
            raise SatDistError(f"{source}: not UTF-8 text (byte {e.start}); remove it, narrow "
                               "--glob, or pass --skip-undecodable") from None
        except OSError as e:
            raise SatDistError(f"{source}: cannot read ({e.strerror})") from None
    key, line = payload
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise SatDistError(f"{source}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or key not in record:
        raise SatDistError(f"{source}: no key {key!r} in this JSON line; set --json-key")
    if not isinstance(record[key], str):
        raise SatDistError(f"{source}: {key!r} is {type(record[key]).__name__}, not a string")
    text = record[key]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape (\ud800): valid JSON, not text
        if _worker["skip"]:
            return None
        raise SatDistError(f"{source}: {key!r} holds a lone surrogate escape at character {e.start} (not "
                           f"encodable text); fix the line or pass --skip-undecodable") from None
    return text


def _tokenize_batch(batch) -> list:
    """Worker: each item becomes a token array, or EMPTY / UNDECODABLE when skipped."""
    tok, out = _worker["tok"], []
    for kind, source, payload in batch:
        text = _document_text(kind, source, payload)
        if text is None:
            out.append(UNDECODABLE)
        elif not text:
            out.append(EMPTY)
        else:
            ids = document_ids(tok, text, bos=_worker["bos"], eod=_worker["eod"])
            out.append(np.asarray(ids, dtype=_worker["dtype"]))
    return out


def check_output_prefix(prefix: str) -> None:
    """One clear error, before any tokenizing, when --output-prefix cannot be written."""
    parent = Path(prefix).parent
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SatDistError(f"--output-prefix {prefix}: {probe} is an existing file, not a directory; choose a "
                           f"prefix in a directory")
    if not os.access(probe, os.W_OK):
        raise SatDistError(f"--output-prefix {prefix}: {probe} is not writable")
    for suffix in (".bin", ".idx"):
        if Path(prefix + suffix).is_dir():
            raise SatDistError(f"--output-prefix {prefix}: {prefix + suffix} is a directory; choose another prefix")


def run(args: argparse.Namespace) -> str:
    if args.workers < 1:
        raise SatDistError(f"--workers: got {args.workers}; allowed: an integer >= 1")
    check_output_prefix(args.output_prefix)
    files = find_inputs(args.input, args.glob)
    _init_worker(args.tokenizer_model, args.append_eod, args.skip_undecodable, not args.no_bos)  # fail early
    tok, dtype, bos = _worker["tok"], _worker["dtype"], _worker["bos"]
    any_jsonl = args.json_key is not None or any(f.suffix == ".jsonl" for f in files)
    batches = batched(work_items(files, args.json_key), max_items=256 if any_jsonl else 8)

    from tqdm import tqdm

    skipped = collections.Counter()
    t0 = time.time()
    bar = tqdm(total=None if any_jsonl else len(files), unit="doc", disable=None, file=sys.stderr)
    with IndexedDatasetWriter(args.output_prefix, dtype) as writer:
        for results in _map_ordered(batches, args):
            for r in results:
                if isinstance(r, str):
                    skipped[r] += 1
                else:
                    writer.add_document(r)
            bar.update(len(results))
            bar.set_postfix(tokens=writer.num_tokens, refresh=False)
        bar.close()
        if writer.num_documents == 0:
            raise SatDistError(f"--input: all {sum(skipped.values())} documents are empty or "
                               "skipped; nothing to write")
        writer.finalize()
    # Which tokenizer made the data, and whether documents start with BOS: a training run
    # refuses a blend of datasets made with different tokenizers or mixing BOS and no BOS,
    # or data made with another tokenizer than its --tokenizer-model.
    write_tokenizer_record(writer.prefix, tokenizer_record(args.tokenizer_model, tok, bos=bos))
    notes = ", ".join(f"{n} {why} skipped" for why, n in sorted(skipped.items()))
    return (f"wrote {writer.prefix}.bin/.idx: {writer.num_documents} documents, "
            f"{writer.num_tokens} tokens, {dtype.name}, vocab {tok.vocab_size}, "
            f"bos {tok.bos_id if bos else 'none'}, eos {tok.eos_id}"
            f"{'; ' + notes if notes else ''} ({time.time() - t0:.1f} s)")


def _map_ordered(batches, args):
    """Results of _tokenize_batch in input order, with a bounded number of batches in flight
    (Pool.imap would read a huge JSONL into its queue as fast as it can)."""
    if args.workers == 1:
        yield from map(_tokenize_batch, batches)
        return
    import multiprocessing as mp

    with mp.Pool(args.workers, _init_worker,
                 (args.tokenizer_model, args.append_eod, args.skip_undecodable, not args.no_bos)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_tokenize_batch, (batch,)))
            if len(pending) >= 4 * args.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
    except SatDistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; existing output left unchanged", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk while writing: one line
        print(f"error: --output-prefix {args.output_prefix}: cannot write ({e.strerror or e}); existing output "
              f"left unchanged", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
