"""Shared fixtures: a tiny tokenized corpus and HF initial weights for pipeline tests.

The CPU suite hides CUDA from itself and from every rank and launcher it starts: its
multi-rank tests compare gloo ranks bit for bit with one process, which on a GPU node would
pick NCCL, one device per rank and non-deterministic kernels. The GPU tests (tests/gpu/) run
on their own, with SAT_DIST_GPU_TESTS=1 (tools/gpu_check.sh does): then only they are
collected and CUDA stays visible.
"""

import os

GPU_RUN = os.environ.get("SAT_DIST_GPU_TESTS") == "1"
if not GPU_RUN:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA (lazily, later)
collect_ignore_glob = ["test_*.py"] if GPU_RUN else []

import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sat_dist.data.indexed import IndexedDatasetWriter, token_dtype  # noqa: E402
from sat_dist.data.tokenizer import load_tokenizer, train_sentencepiece  # noqa: E402
from tests.launchers import REPO, _flags, scalars, torchrun  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]
    tok_path = train_sentencepiece(files, d / "tok", vocab_size=1000)
    tok = load_tokenizer(tok_path)
    with IndexedDatasetWriter(d / "stdlib", token_dtype(tok.vocab_size)) as w:
        for f in files:
            w.add_document(tok.encode(f.read_text()) + [tok.eos_id])
        w.finalize()
    return {"data": str(d / "stdlib"), "tok": str(tok_path), "dir": d}


@pytest.fixture(scope="session")
def hf_init(corpus):
    from transformers import LlamaForCausalLM

    from sat_dist.config import ModelConfig
    from tests.reference import hf_config

    cfg = ModelConfig.from_file(REPO / "configs" / "model" / "tiny-test.json")
    torch.manual_seed(0)
    d = corpus["dir"] / "hf_init"
    LlamaForCausalLM(hf_config(cfg)).save_pretrained(d)
    return d




@pytest.fixture(scope="session")
def reference_run(corpus, tmp_path_factory):
    """An uninterrupted 2-rank run (TP=1 x DP=2, ZeRO-3, SAT ladder) of 6 steps, saving every
    2, validating every 3: the reference for resume and fault tests. Returns (dir, stdout,
    {step: lm loss})."""
    d = tmp_path_factory.mktemp("reference")
    r = torchrun(2, _flags(corpus, save=d / "ckpt", **{"save-interval": 2, "eval-interval": 3,
                                                      "tensorboard-dir": d / "tb"}))
    return d, r.stdout, scalars(d / "tb", "lm loss")
