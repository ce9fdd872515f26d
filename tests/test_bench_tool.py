"""tools/bench_sat.py runs (tiny shapes, CPU) and its FLOP accounting is right. No timing is
asserted: speed is reported in docs/PERFORMANCE.md from GPU runs, not tested here."""

import json

import pytest

from sat_dist.config import ModelConfig
from tools.bench_sat import layer_flops, main


def test_layer_flops_by_hand():
    cfg = ModelConfig(hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=1)
    # per token: q/k/v/o projections 8*(8+2*4) + 8*8 = 192; MLP 3*8*16 = 384; scores s*q = 4*8
    assert layer_flops(cfg, tokens=4, seq=4, keep_attn=1, keep_mlp=1) == 6 * 4 * (192 + 384) + 6 * 4 * 4 * 8
    assert layer_flops(cfg, 4, 4, 0.5, 0.25) == 6 * 4 * (96 + 96) + 6 * 4 * 4 * 4


def test_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--dtype", "fp32", "--shapes", "tiny", "--warmup", "0", "--iters", "1",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"device", "date", "commit", "command", "layer"} <= set(report)
    rows = {(r["omission_attn"], r["omission_mlp"]): r for r in report["layer"]}
    assert len(rows) == 5
    half = rows[(0.5, 0.5)]
    assert (half["kept_attn"], half["kept_mlp"]) == (2, 384)  # 4 heads, 768 channels (align 32)
    assert half["flop_ideal_speedup"] == pytest.approx(2.0)
    assert rows[(0.0, 0.5)]["flop_ideal_speedup"] == pytest.approx(
        layer_flops_tiny(1, 1) / layer_flops_tiny(1, 384 / 768))


def layer_flops_tiny(keep_attn, keep_mlp):
    from tools.bench_sat import SEQS, SHAPES

    cfg = ModelConfig(**SHAPES["tiny"])
    seq, micro = SEQS["tiny"][0]
    return layer_flops(cfg, seq * micro, seq, keep_attn, keep_mlp)



def test_step_benchmark_runs_and_reports(tmp_path):
    """tools/bench_step.py end to end on one CPU rank (tiny width): both arms run through
    torchrun and DeepSpeed ZeRO-3, and the FLOP-ideal speedup is the hand-computed one."""
    from tools.bench_step import main as bench_step

    out = tmp_path / "step.json"
    assert bench_step(["--width", "tiny", "--layers", "2", "--vocab", "512", "--seq", "64", "--ranks", "1",
                       "--rounds", "1", "--warmup", "0", "--omissions", "0.5,0.5", "--align-mlp", "32",
                       "--peer", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"device", "date", "commit", "command", "sat_dist", "peer", "dense_vs_peer_tokens_per_s"} <= set(report)
    dense, half = report["sat_dist"]["settings"]
    assert dense["omission"] == [0.0, 0.0] and half["omission"] == [0.5, 0.5]
    assert (half["keep_fraction_attn"], half["keep_fraction_mlp"]) == (0.5, 0.5)  # 2 of 4 heads, 384 of 768
    # Per token, by hand (h 256, ffn 768, vocab 512, 2 layers, seq 64): projections 4*256*256,
    # MLP 3*256*768, LM head 256*512, attention scores 64*256 (all x6 for fwd+bwd).
    def flops(keep):
        return 64 * 6 * (2 * (4 * 256 * 256 + 3 * 256 * 768) * keep + 256 * 512) + 64 * 64 * 6 * 256 * 2 * keep
    assert half["flop_ideal_speedup"] == pytest.approx(flops(1.0) / flops(0.5))
    assert half["speedup"] == pytest.approx(dense["median_step_s"] / half["median_step_s"])
    for row in (dense, half, report["peer"]["settings"][0]):
        assert row["tokens_per_s"] > 0 and row["peak_memory_gb"] > 0
        assert row["forward_s"] > 0 and row["backward_s"] > 0 and row["optimizer_s"] > 0


def test_checkpoint_io_benchmark_counts_what_the_save_moves(tmp_path):
    """tools/bench_checkpoint_io.py at DP 2: the bytes it counts for the ZeRO-3 save are the
    arithmetic of a gather to the owner (each parameter's owner receives the other rank's
    half of its fp32 weight and two Adam moments, ZeRO-3 padding each to an even split),
    the files hold them, and every byte of the checkpoint is really read back at resume
    (the page cache was dropped)."""
    import math

    from sat_dist.model.llama import LlamaModel
    from tools.bench_checkpoint_io import main as io_main
    from tools.bench_step import WIDTHS

    out = tmp_path / "io.json"
    assert io_main(["--width", "tiny", "--layers", "1", "--vocab", "4096", "--ranks", "2", "--save-tp", "1",
                    "--load-tp", "1", "--dir", str(tmp_path), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    cfg = ModelConfig(**WIDTHS["tiny"], num_layers=1, vocab_size=4096).validate()
    numels = [math.prod(p.shape) for _, p in LlamaModel(cfg).named_parameters()]
    assert sum(x["moved"] for x in r["runs"]["save"]) == sum(12 * math.ceil(n / 2) for n in numels)
    assert sum(n for f, n in r["files"].items() if f.startswith("state_")) >= 12 * sum(numels)
    assert sum(x["read"] for x in r["runs"]["load_tp1"]) >= 0.9 * r["checkpoint_bytes"]


def test_step_benchmark_runs_per_layer_rates_with_the_training_keep_counts(tmp_path):
    """--sat-omission-mlp-layers: an MLP rate m runs each layer at its own rate times m / the
    rates' mean, with a ladder run's keep counts. Layers 0 / 0.5 / 0.75 of 768 channels (align
    64): at the mean 5/12 they keep 768, 384, 192; at 3/4 of it (0.3125) 768, 512, 320 (the
    layers' own ladder rates 0.375 and 0.5625: 480 and 336 to the nearest multiple of 64)."""
    from tools.bench_step import main as bench_step

    out = tmp_path / "step.json"
    assert bench_step(["--width", "tiny", "--layers", "3", "--vocab", "512", "--seq", "32", "--ranks", "1",
                       "--rounds", "1", "--warmup", "0", "--align-mlp", "64", "--sat-omission-mlp-layers", "0,0.5,0.75",
                       "--omissions", "0,0.416667", "0,0.3125", "--out", str(out)]) == 0
    _, full, rung = json.loads(out.read_text())["sat_dist"]["settings"]
    assert full["keep_fraction_mlp"] == pytest.approx((768 + 384 + 192) / (3 * 768))
    assert rung["keep_fraction_mlp"] == pytest.approx((768 + 512 + 320) / (3 * 768))
    assert full["keep_fraction_attn"] == rung["keep_fraction_attn"] == 1.0
