"""Tokenizers behind one small interface: SentencePiece `tokenizer.model` or HF `tokenizer.json`.

Deliberately free of torch and transformers, so `tools/preprocess_data.py` and its worker
processes start in a fraction of a second. Everything here works offline.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterable, Optional

from sat_dist.errors import SatDistError

# Names tried, in order, for a tokenizer.json that comes without a tokenizer_config.json.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


class Tokenizer:
    """What the data pipeline needs from a tokenizer.

    `encode` adds no BOS/EOS; document separators are the data pipeline's business
    (`document_ids` builds a document's ids). `decode` drops special/control tokens (EOS,
    BOS), so decode(encode(t)) == t.
    """

    path: str
    """File the tokenizer was loaded from (for messages)."""

    vocab_size: int
    """Number of token ids, special tokens included; every id is < vocab_size."""

    eos_id: int
    """End-of-document id, put between packed documents."""

    bos_id: Optional[int]
    """Beginning-of-sequence id, or None where the tokenizer has none."""

    add_bos: bool
    """Whether documents start with BOS (what transformers' `tokenizer(text)` and Megatron-LM's
    Llama tokenizers do for Llama-2/3): the tokenizer has a BOS that is not its EOS (a BOS
    equal to EOS, as in GPT-2 and SmolLM2, is their document separator, already between
    documents), and nothing it ships says otherwise: a tokenizer.json's post-processor decides
    where it has one (BOS only if it puts BOS first, as transformers applies it); else a
    tokenizer_config.json beside the file with "add_bos_token": false means none; else BOS."""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def piece(self, token_id: int) -> Optional[str]:
        """The vocabulary entry of an id (None where the id has none)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, bos_id={self.bos_id})")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (Llama-2's tokenizer.model, or one from train_sentencepiece)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = str(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise SatDistError(f"tokenizer {self.path}: not a readable SentencePiece model "
                               f"({_first_line(e)}); pass a valid tokenizer.model") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        bos = int(self._sp.bos_id())
        self.bos_id = bos if bos >= 0 else None
        if self.eos_id < 0:
            raise SatDistError(f"tokenizer {self.path}: the model defines no EOS id; "
                               "retrain it with eos_id set (train_sentencepiece does)")
        config = _read_config(Path(self.path).with_name("tokenizer_config.json"))
        self.add_bos = _has_distinct_bos(self) and config.get("add_bos_token") is not False

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> Optional[str]:
        return self._sp.id_to_piece(int(token_id))


class HFTokenizer(Tokenizer):
    """A Hugging Face fast-tokenizer file (tokenizer.json), read with the `tokenizers` library.

    EOS/BOS come from a tokenizer_config.json beside the file when there is one (that is
    where transformers keeps them), else from the usual token names.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HFTok

        self.path = str(path)
        try:
            self._tok = _HFTok.from_file(self.path)
        except Exception as e:  # the Rust side raises a bare Exception
            raise SatDistError(f"tokenizer {self.path}: not a readable tokenizer.json "
                               f"({_first_line(e)}); pass a valid tokenizer.json") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        config = _read_config(Path(self.path).with_name("tokenizer_config.json"))
        named = _special_tokens(config)
        eos = self._find_id(named.get("eos_token"), _EOS_CANDIDATES)
        if eos is None:
            raise SatDistError(f"tokenizer {self.path}: cannot tell the EOS token; put a "
                               "tokenizer_config.json with \"eos_token\" next to it")
        self.eos_id = eos
        self.bos_id = self._find_id(named.get("bos_token"), _BOS_CANDIDATES)
        self.add_bos = _has_distinct_bos(self) and self._config_or_post_processor_adds_bos(config)

    def _config_or_post_processor_adds_bos(self, config: dict) -> bool:
        # transformers (5.x) applies the tokenizer.json's post-processor where there is one,
        # whatever tokenizer_config.json's add_bos_token says.
        if self._tok.post_processor is not None:
            return self._tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        return config.get("add_bos_token") is not False

    def _find_id(self, configured: Optional[str], candidates: tuple[str, ...]) -> Optional[int]:
        for name in ((configured,) if configured else candidates):
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return int(tid)
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(int(token_id))


def document_ids(tok: Tokenizer, text: str, bos: bool = True, eod: bool = True) -> list[int]:
    """One document's token ids, as the data pipeline stores it: BOS (when `bos` and the
    tokenizer's `add_bos` say so), the text's ids, EOS (when `eod`). Exactly one BOS starts
    the document: a text whose ids already start with BOS (a literal "<s>" matched by an HF
    tokenizer) gets no second one. The one place that lays out a document's ids
    (tools/preprocess_data.py, the default corpus)."""
    ids = tok.encode(text)
    if bos and tok.add_bos and ids[:1] != [tok.bos_id]:
        ids = [tok.bos_id] + ids
    if eod:
        ids.append(tok.eos_id)
    return ids


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer file; a directory is searched for tokenizer.model, then tokenizer.json.

    The backend is chosen by extension: .json is HF `tokenizers`, anything else SentencePiece.
    """
    p = tokenizer_file(path)
    if p.suffix == ".json":
        return HFTokenizer(p)
    return SentencePieceTokenizer(p)


RECORD_SUFFIX = ".tokenizer.json"
"""PREFIX.tokenizer.json, written by tools/preprocess_data.py next to PREFIX.bin/.idx: which
tokenizer made the dataset and whether its documents start with BOS (Megatron's format
itself says neither)."""


def tokenizer_record(path: str | Path, tok: Optional[Tokenizer] = None, *, bos: Optional[bool] = None) -> dict:
    """What identifies a tokenizer: the SHA-256 of its vocabulary (every id's entry, in id
    order, and the EOS id), so that a model's tokenizer.model and its tokenizer.json, which
    map text to the same ids, have the same record; plus its file's name and SHA-256. `tok`:
    the tokenizer `path` holds, when the caller has loaded it already.

    A dataset's record also says how its documents are laid out: `bos` given, the record
    gets "bos" (true: every document starts with the tokenizer's BOS, "bos_id"; false: none
    does). Records written before that key existed have none: their datasets have no BOS
    (tools/preprocess_data.py wrote encode(text) + [EOS]); `record_bos` reads them so."""
    p = tokenizer_file(path)
    tok = tok or load_tokenizer(p)
    vocab = "\n".join(str(tok.piece(i)) for i in range(tok.vocab_size)) + f"\neos={tok.eos_id}"
    record = {"tokenizer": p.name, "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
              "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "vocab_size": tok.vocab_size,
              "eos_id": tok.eos_id}
    if bos is not None:
        record["bos"] = bool(bos)
        if bos:
            record["bos_id"] = tok.bos_id
    return record


def record_bos(record: dict) -> bool:
    """Whether the documents of the dataset a record describes start with BOS; a record
    without "bos" (made before the key existed) means no BOS."""
    return bool(record.get("bos", False))


def write_tokenizer_record(prefix: str | Path, record: dict) -> None:
    Path(f"{prefix}{RECORD_SUFFIX}").write_text(json.dumps(record, indent=2) + "\n")


def read_tokenizer_record(prefix: str | Path) -> Optional[dict]:
    """The record of the tokenizer that made PREFIX, or None (made by another tool)."""
    f = Path(f"{prefix}{RECORD_SUFFIX}")
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SatDistError(f"{f}: unreadable ({type(e).__name__}); delete it or re-run tools/preprocess_data.py")
    if not isinstance(record, dict) or "vocab_sha256" not in record:
        raise SatDistError(f"{f}: not a tokenizer record (no vocab_sha256); delete it or re-run "
                           f"tools/preprocess_data.py")
    if not isinstance(record.get("bos", False), bool):
        raise SatDistError(f"{f}: \"bos\" is {record['bos']!r}, not true or false; delete it or re-run "
                           f"tools/preprocess_data.py")
    return record


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file `path` names (a directory: its tokenizer.model or tokenizer.json)."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("tokenizer.model", "tokenizer.json") if (p / n).is_file()]
        if not found:
            raise SatDistError(f"tokenizer {p}: directory has no tokenizer.model or tokenizer.json")
        p = found[0]
    if not p.is_file():
        raise SatDistError(f"tokenizer {p}: file not found; pass a tokenizer.model or "
                           "tokenizer.json")
    return p


def train_sentencepiece(
    text_files: Iterable[str | Path],
    out_prefix: str | Path,
    vocab_size: int = 8000,
    max_bytes: int = 5_000_000,
    num_threads: int = 2,
) -> Path:
    """Train a Llama-style BPE SentencePiece model on the first `max_bytes` of `text_files`.

    Byte fallback (no <unk> in practice), identity normalisation and kept whitespace make
    decode(encode(t)) == t for any text, code included. Ids: unk=0, bos=1, eos=2, no pad
    (Llama-2's layout). Writes `<out_prefix>.model` and returns its path. ~1 s for 5 MB.
    """
    import sentencepiece as spm

    lines = _sample_lines(text_files, max_bytes)
    if not lines:
        raise SatDistError("train_sentencepiece: the text files hold no text; pass non-empty files")
    out = Path(f"{out_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=num_threads, minloglevel=2,
        )
    except RuntimeError as e:
        raise SatDistError(f"train_sentencepiece: {_first_line(e)}; use a smaller vocab_size "
                           "or more text") from None
    out.write_bytes(proto.getvalue())
    return out


def _sample_lines(text_files: Iterable[str | Path], max_bytes: int) -> list[str]:
    # SentencePiece trains on lines; empty ones carry nothing, newlines map to byte pieces.
    lines, total = [], 0
    for f in text_files:
        if total >= max_bytes:
            break
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                text = fh.read(max_bytes - total)  # characters, close enough to bytes here
        except OSError as e:
            raise SatDistError(f"train_sentencepiece: cannot read {f} ({e.strerror})") from None
        total += len(text)
        lines.extend(line for line in text.splitlines() if line)
    return lines


def _read_config(path: Path) -> dict:
    """A tokenizer_config.json's content; {} where there is none (or it is unreadable)."""
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _has_distinct_bos(tok: Tokenizer) -> bool:
    return tok.bos_id is not None and tok.bos_id != tok.eos_id


def _special_tokens(cfg: dict) -> dict[str, str]:
    out = {}
    for key in ("eos_token", "bos_token"):
        v = cfg.get(key)
        # transformers writes either "</s>" or {"content": "</s>", ...}
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "load_tokenizer", "tokenizer_file",
           "document_ids", "tokenizer_record", "record_bos", "write_tokenizer_record", "read_tokenizer_record",
           "RECORD_SUFFIX", "train_sentencepiece"]
