"""SAT fidelity accounting, against hand computations: the start-up keep-count table and the
executed-FLOPs meter. (Keep counts and the dense end of the ladder are in test_sat_core.py;
the same checks inside a real run are in test_validation_sets.py.)"""

import pytest

from sat_dist.config import ModelConfig, SATConfig
from sat_dist.sat.schedule import OmissionSchedule
from sat_dist.train.arguments import MODEL_CONFIG_DIR
from sat_dist.train.loop import keep_counts_line
from sat_dist.train.metrics import ExecutedFlops

# The paper's rates (0.3, 0.3), whatever the project's defaults are.
PAPER = SATConfig(omission_attn=0.3, omission_mlp=0.3)
SMOLLM2 = ModelConfig(hidden_size=576, ffn_hidden_size=1536, num_layers=30, num_attention_heads=9,
                      num_query_groups=3, vocab_size=49152, name="smollm2-135m").validate()


def test_keep_counts_line_smollm2_by_hand():
    line = keep_counts_line(OmissionSchedule(PAPER.validate(), 100), SMOLLM2, 1)
    # attention: 3 * (0.7, 0.775, 0.85, 0.925) = 2.1, 2.325, 2.55, 2.775 -> 2, 2, 3, 3
    # MLP: 1536 * (...) / 128 = 8.4, 9.3, 10.2, 11.1 -> 1024, 1152, 1280, 1408
    assert line == (
        "SAT keep counts per TP partition: rung rates attn/mlp "
        "0.3/0.3 -> attn 2/3 groups, mlp 1024/1536 channels (omitted 0.333/0.333); "
        "0.225/0.225 -> attn 2/3 groups, mlp 1152/1536 channels (omitted 0.333/0.250); "
        "0.15/0.15 -> attn 3/3 groups, mlp 1280/1536 channels (omitted 0.000/0.167); "
        "0.075/0.075 -> attn 3/3 groups, mlp 1408/1536 channels (omitted 0.000/0.083); "
        "0/0 -> attn 3/3 groups, mlp 1536/1536 channels (omitted 0.000/0.000)")


def test_keep_counts_line_llama2_7b_tp8():
    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "llama2-7b.json")
    line = keep_counts_line(OmissionSchedule(PAPER.validate(), 1000), cfg, 8)
    rungs = line.split(": rung rates attn/mlp ")[1].split("; ")
    assert [r.split(" -> ")[1] for r in rungs] == [
        "attn 3/4 groups, mlp 896/1376 channels (omitted 0.250/0.349)",
        "attn 3/4 groups, mlp 1024/1376 channels (omitted 0.250/0.256)",
        "attn 3/4 groups, mlp 1152/1376 channels (omitted 0.250/0.163)",
        "attn 4/4 groups, mlp 1280/1376 channels (omitted 0.000/0.070)",
        "attn 4/4 groups, mlp 1376/1376 channels (omitted 0.000/0.000)"]


def _hand_flops(keep_attn, keep_mlp, batch=8, seq=64):
    """Megatron's formula for tiny-test (h 64, 2 layers, 4 heads / 2 KV groups of 16, ffn
    128, vocab 1024), with the kept fractions of attention and MLP work."""
    h, L, q, kv, f, V = 64, 2, 64, 32, 128, 1024
    per_token = L * (h * (q + 2 * kv) + q * h) * keep_attn + 3 * L * h * f * keep_mlp + h * V
    return 6 * batch * seq * per_token + 6 * batch * seq * seq * q * L * keep_attn


def test_executed_flops_sum_each_steps_keep_fractions():
    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    meter = ExecutedFlops(cfg, 8, 64)
    keeps = [(0.5, 0.75), (1.0, 0.875), (1.0, 1.0)]  # an interval across two rungs and the dense end
    for ka, km in keeps:
        meter.add_step(ka, km)
    steps, dense, executed = meter.take()
    assert steps == 3
    assert dense == pytest.approx(3 * _hand_flops(1, 1), rel=1e-12)
    assert executed == pytest.approx(sum(_hand_flops(ka, km) for ka, km in keeps), rel=1e-12)
    assert executed < 3 * _hand_flops(*keeps[-1])  # the last step's fractions for all: dense here
    assert meter.take() == (0, 0.0, 0.0)  # the next interval starts empty


# (--sat-sparse-pass, FLOPs of the MLP's 6 per weight and token run dense, omission in both
# passes with the same FLOPs at keep 0.25)
@pytest.mark.parametrize("sparse_pass,dense_share,same_as", [
    ("backward", 2, 0.5),      # the forward dense, the backward (4 of 6) over the kept channels
    ("weight-grad", 4, 0.25),  # the forward and input gradient dense, the weight gradients (2 of 6) kept only
])
def test_executed_flops_dense_forward_modes_by_hand(sparse_pass, dense_share, same_as):
    cfg = ModelConfig.from_file(MODEL_CONFIG_DIR / "tiny-test.json")
    meter = ExecutedFlops(cfg, 8, 64, sparse_pass=sparse_pass)
    meter.add_step(1.0, 0.25)
    h, L, f, batch, seq = 64, 2, 128, 8, 64
    mlp_dense = 6 * batch * seq * 3 * L * h * f
    mlp_executed = (dense_share * batch * seq * 3 * L * h * f
                    + (6 - dense_share) * batch * seq * 3 * L * h * f * 0.25)
    _, _, executed = meter.take()
    assert executed == pytest.approx(_hand_flops(1, 1) - mlp_dense + mlp_executed, rel=1e-12)
    assert executed == pytest.approx(_hand_flops(1, 1 - same_as), rel=1e-12)
