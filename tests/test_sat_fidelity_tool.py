"""tools/sat_fidelity.py against transformers: leaving SAT's omitted MLP channels out must
give the loss of transformers' model whose down-projection columns of those channels are
zero (the same function), with the channels picked here by hand (weight magnitude, top-k)."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "sat_fidelity.py"


def _tool():
    spec = importlib.util.spec_from_file_location("sat_fidelity", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sparse_loss_equals_transformers_with_channels_zeroed(corpus, hf_init):
    from transformers import LlamaForCausalLM

    seq, mbs, n_batches, rate, align = 32, 2, 2, 0.5, 16
    r = subprocess.run([sys.executable, str(TOOL), "--hf-checkpoint", str(hf_init), "--data", f"code={corpus['data']}",
                        "--seq-length", str(seq), "--micro-batch-size", str(mbs), "--batches", str(n_batches),
                        "--setting", f"metric=magnitude,selection=topk,attn=0,mlp={rate},align={align}",
                        "--setting", "metric=activation,selection=topk,attn=0,mlp=0"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| metric=")]
    got, got_dense_setting = float(rows[0][1]), float(rows[1][1])

    model = LlamaForCausalLM.from_pretrained(hf_init).float().eval()
    data = _tool().batches(corpus["data"], n_batches, mbs, seq, 1)

    def loss():
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), lab.flatten()))
                       for ids, lab in data) / len(data)

    dense = loss()
    assert got_dense_setting == pytest.approx(dense, abs=2e-5)  # rate 0 runs dense
    for layer in model.model.layers:
        m = layer.mlp
        f = m.down_proj.weight.shape[1]
        keep = int(math.floor(f * (1 - rate) / align + 0.5)) * align  # nearest multiple of align
        mag = (m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1) + m.down_proj.weight.pow(2).sum(0))
        omitted = mag.argsort(descending=True)[keep:]
        with torch.no_grad():
            m.down_proj.weight[:, omitted] = 0.0
    want = loss()
    assert abs(want - dense) > 5e-4  # the omission really changes the function (random init: little)
    assert got == pytest.approx(want, abs=2e-5) and abs(got - dense) > 5e-4


def test_malformed_setting_is_one_clear_error(hf_init, corpus):
    r = subprocess.run([sys.executable, str(TOOL), "--hf-checkpoint", str(hf_init), "--data", f"code={corpus['data']}",
                        "--setting", "metric=maxip,rate=0.3"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "'rate=0.3' is not KEY=VALUE with KEY one of metric" in r.stderr
