"""The embedded default job's data: the running Python's own standard library, on every
machine, tokenized with a SentencePiece model trained on it. Built once, offline, by rank 0.
Documents are laid out as tools/preprocess_data.py lays them out (BOS, text, EOS), with a
PREFIX.tokenizer.json record; a corpus made before (no BOS, no record) is reused as it is.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from sat_dist.data.indexed import IndexedDatasetWriter, token_dtype
from sat_dist.data.tokenizer import (
    document_ids,
    load_tokenizer,
    tokenizer_record,
    train_sentencepiece,
    write_tokenizer_record,
)

VOCAB_SIZE = 8000
MAX_BYTES = 6_000_000  # ~1.8M tokens: more than the default run reads, tokenized in seconds


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    out, total = [], 0
    for f in files:
        try:
            size = f.stat().st_size
        except OSError:
            continue
        out.append(f)
        total += size
        if total >= MAX_BYTES:
            break
    return out


def prepare_default_data(out_dir: str | Path, log=print) -> tuple[str, str]:
    """(data prefix, tokenizer path) under out_dir; reused when already there."""
    out = Path(out_dir)
    tok_path = out / "tokenizer.model"
    prefix = out / "stdlib_text_document"
    if tok_path.is_file() and Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file():
        return str(prefix), str(tok_path)
    files = stdlib_files()
    log(f"preparing the default corpus: {len(files)} standard-library files -> {out}")
    if not tok_path.is_file():
        trained = train_sentencepiece(files, out / "tokenizer", vocab_size=VOCAB_SIZE)
        assert trained == tok_path
    tok = load_tokenizer(tok_path)
    with IndexedDatasetWriter(prefix, token_dtype(tok.vocab_size)) as w:
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                w.add_document(document_ids(tok, text))
        w.finalize()
    write_tokenizer_record(prefix, tokenizer_record(tok_path, tok, bos=tok.add_bos))
    return str(prefix), str(tok_path)
