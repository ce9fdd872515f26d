"""Start-up reads the index, not the corpus: each document's last token comes from
PREFIX.doclast.npz (written with the dataset, or cached once for a dataset made before).

Reference: the token stream built by hand from the documents (each followed by EOS unless
it ends with one), independent of sat_dist.data.doc_ends."""

import os

import numpy as np
import pytest

from sat_dist.data import doc_ends
from sat_dist.data.indexed import IndexedDatasetReader, IndexedDatasetWriter
from sat_dist.data.packing import TokenStream
from sat_dist.errors import SatDistError

EOS = 2


def _docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        d = list(rng.integers(3, 500, size=int(rng.integers(0, 30))))
        if i % 3 == 0 and d:
            d[-1] = EOS  # already ends with EOS (preprocessed with --append-eod)
        docs.append(d)
    return docs


def _write(prefix, docs):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
        w.finalize()
    return str(prefix)


def _by_hand(docs):
    out = []
    for d in docs:
        out += d if d and d[-1] == EOS else d + [EOS]
    return np.array(out)


class _CountingTokens:
    """The .bin's memory map, counting the tokens read through it."""

    def __init__(self, tokens):
        self.tokens, self.read = tokens, 0

    def __getitem__(self, key):
        out = self.tokens[key]
        self.read += np.size(out)
        return out


def test_stream_comes_from_the_index_and_reads_at_most_the_spot_checks(tmp_path):
    docs = _docs(200)
    prefix = _write(tmp_path / "ds", docs)
    assert os.path.isfile(prefix + ".doclast.npz")  # written with the dataset
    reader = IndexedDatasetReader(prefix)
    counting = _CountingTokens(reader.tokens)
    reader.tokens = counting
    stream = TokenStream(reader, EOS)
    assert counting.read == 0  # the memory map is not touched (the spot checks pread 64 tokens)
    ref = _by_hand(docs)
    reader.tokens = counting.tokens
    assert stream.num_tokens == ref.size
    assert np.array_equal(stream.read(0, ref.size), ref)


def test_a_dataset_made_before_gets_its_index_once_beside_it(tmp_path):
    docs = _docs()
    prefix = _write(tmp_path / "old", docs)
    os.remove(prefix + ".doclast.npz")  # as Megatron's preprocess_data.py, or our older one, leaves it
    stream = TokenStream(IndexedDatasetReader(prefix), EOS)
    assert np.array_equal(stream.read(0, stream.num_tokens), _by_hand(docs))
    cached = prefix + ".doclast.npz"
    made = os.stat(cached).st_mtime_ns
    TokenStream(IndexedDatasetReader(prefix), EOS)
    assert os.stat(cached).st_mtime_ns == made  # read, not rebuilt


def test_data_cache_path_holds_the_index_of_a_dataset_made_before(tmp_path):
    docs = _docs()
    prefix = _write(tmp_path / "ds", docs)
    os.remove(prefix + ".doclast.npz")
    cache = tmp_path / "cache"
    stream = TokenStream(IndexedDatasetReader(prefix), EOS, cache_dir=cache)
    assert np.array_equal(stream.read(0, stream.num_tokens), _by_hand(docs))
    assert len(list(cache.glob("ds-*.doclast.npz"))) == 1
    assert not os.path.exists(prefix + ".doclast.npz")  # the dataset's directory is left alone


def test_unwritable_index_location_warns_and_computes(tmp_path, monkeypatch):
    docs = _docs()
    prefix = _write(tmp_path / "ds", docs)
    os.remove(prefix + ".doclast.npz")
    real_open = open

    def read_only_open(path, mode="r", *a, **kw):  # the suite runs as root: chmod would not stop it
        if str(path).startswith(prefix) and any(c in mode for c in "wa"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", read_only_open)
    with pytest.warns(UserWarning, match="--data-cache-path"):
        stream = TokenStream(IndexedDatasetReader(prefix), EOS)
    monkeypatch.undo()
    assert np.array_equal(stream.read(0, stream.num_tokens), _by_hand(docs))
    assert not os.path.exists(prefix + ".doclast.npz")


def test_cache_dir_entry_per_dataset(tmp_path):
    a = _write(tmp_path / "a" / "ds", _docs(seed=1))
    b = _write(tmp_path / "b" / "ds", _docs(seed=2))
    assert doc_ends.cache_file(a, tmp_path / "c") != doc_ends.cache_file(b, tmp_path / "c")


def test_index_of_another_dataset_version_is_refused_and_kept(tmp_path):
    prefix = _write(tmp_path / "ds", _docs(40))
    stale = (tmp_path / "ds.doclast.npz").read_bytes()
    _write(tmp_path / "ds", _docs(41))  # the dataset is remade ...
    (tmp_path / "ds.doclast.npz").write_bytes(stale)  # ... and an old index is copied back beside it
    with pytest.raises(SatDistError, match="another version") as e:
        TokenStream(IndexedDatasetReader(prefix), EOS)
    assert "delete" in str(e.value) and str(tmp_path / "ds.doclast.npz") in str(e.value)
    assert (tmp_path / "ds.doclast.npz").read_bytes() == stale  # nothing overwritten


def test_damaged_index_is_refused_and_kept(tmp_path):
    prefix = _write(tmp_path / "ds", _docs())
    path = tmp_path / "ds.doclast.npz"
    damaged = path.read_bytes()[:50]
    path.write_bytes(damaged)
    with pytest.raises(SatDistError, match="unreadable document index"):
        TokenStream(IndexedDatasetReader(prefix), EOS)
    assert path.read_bytes() == damaged


def test_bin_rewritten_with_the_same_lengths_is_caught(tmp_path):
    docs = _docs(30)
    prefix = _write(tmp_path / "ds", docs)
    index = (tmp_path / "ds.doclast.npz").read_bytes()
    other = [[t + 1 for t in d] for d in docs]  # same lengths, other tokens
    _write(tmp_path / "ds", other)
    (tmp_path / "ds.doclast.npz").write_bytes(index)
    with pytest.raises(SatDistError, match="disagree"):
        TokenStream(IndexedDatasetReader(prefix), EOS)


def test_data_cache_path_flag_through_the_launcher(corpus, tmp_path):
    import shutil

    from tests.launchers import _flags, torchrun

    src = corpus["data"]
    for suffix in (".bin", ".idx", ".tokenizer.json"):
        if os.path.exists(src + suffix):
            shutil.copy(src + suffix, tmp_path / ("ds" + suffix))
    cache = tmp_path / "cache"
    torchrun(1, _flags(corpus, **{"data-path": tmp_path / "ds", "data-cache-path": cache, "train-iters": 1}))
    assert len(list(cache.glob("ds-*.doclast.npz"))) == 1
    assert not (tmp_path / "ds.doclast.npz").exists()
