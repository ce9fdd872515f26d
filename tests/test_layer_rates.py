"""Uneven MLP omission rates per layer (--sat-omission-mlp-layers) against independent
references: keep counts computed by hand at every rung of the ladder, and transformers'
LlamaForCausalLM with each layer's MLP leaving out the channels that layer omits (a layer at
rate 0 left dense), on one process and on TP=2 x DP=2 gloo ranks."""

import pytest
import torch

from sat_dist.config import SATConfig
from sat_dist.errors import SatDistError
from sat_dist.sat.selection import layer_keep_count
from tests.test_sat_levers import STRIDE, _kept_mlp, _partition_topk, _reference, _sat_run
from tests.test_tensor_parallel import MHA, _batch, _hf_model, _single


def test_each_layer_keeps_its_own_rate_scaled_by_the_rung():
    """64 channels, align 8, rates 0 / 0.5 / 0.75 (mean 5/12): at the ladder's fractions 1,
    3/4, 1/2, 1/4 the layers omit r*f of their channels, rounded to the nearest multiple of 8."""
    sat = SATConfig(omission_mlp=5 / 12, omission_mlp_layers="0,0.5,0.75", align_mlp=8).validate()
    want = {
        1.0: (64, 32, 16),  # 64 * (1 - 0.5) = 32; 64 * (1 - 0.75) = 16
        0.75: (64, 40, 32),  # 64 * 0.625 = 40; 64 * 0.4375 = 28 -> 32 (nearest 8, halves up)
        0.5: (64, 48, 40),  # 64 * 0.75 = 48; 64 * 0.625 = 40
        0.25: (64, 56, 56),  # 64 * 0.875 = 56; 64 * 0.8125 = 52 -> 56
    }
    for frac, counts in want.items():
        got = tuple(layer_keep_count(64, sat.omission_mlp * frac, 8, sat, "mlp", layer) for layer in range(3))
        assert got == counts, frac
    # attention units never read the MLP's per-layer rates; rate 0 is dense everywhere
    assert layer_keep_count(4, 0.5, 1, sat, "attn", 2) == 2
    assert all(layer_keep_count(64, 0.0, 8, sat, "mlp", layer) == 64 for layer in range(3))


@pytest.mark.parametrize("tp,world", [(1, 1), (2, 4)], ids=["single", "tp2xdp2"])
@pytest.mark.parametrize("frac", [1.0, 0.5], ids=["sparse-stage", "rung"])
def test_per_layer_rates_equal_transformers_with_each_layers_channels_left_out(tp, world, frac):
    """Layer 0 at rate 0 runs dense; layer 1 at 0.75 (at the rung: 0.375) keeps the top-k of
    the activation metric per TP partition. Loss and gradients equal the reference's; DP
    replicas pick the same channels (checked in _sat_run)."""
    cfg = MHA
    hf_sd = _hf_model(cfg).state_dict()
    ids, labels = _batch(cfg)
    sat = SATConfig(metric="activation", selection="topk", omission_mlp=0.375, omission_mlp_layers="0,0.75",
                    align_mlp=8, token_stride=STRIDE).validate()
    loss, grads, selected = _sat_run(cfg, hf_sd, ids, labels, sat, (0.0, 0.375 * frac), tp, world)
    kept = _kept_mlp(selected, cfg)
    k = {1.0: 32, 0.5: 80}[frac]  # 128 * (1 - 0.75 * frac)
    assert set(kept) == {1} and len(kept[1]) == k
    ref_loss, ref_grads, acts = _reference(cfg, hf_sd, ids, labels, kept, "omit")
    at = acts[1].reshape(-1, acts[1].shape[-1])[::STRIDE].double()
    w_down = hf_sd["model.layers.1.mlp.down_proj.weight"].double()
    assert kept[1] == _partition_topk(at.pow(2).sum(0).sqrt() * w_down.norm(dim=0), tp, k // tp)
    assert loss == pytest.approx(ref_loss, abs=2e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=2e-5, msg=name)
    # layer 0 really ran dense, and what layer 1 left out mattered (the test can fail)
    uniform = SATConfig(metric="activation", selection="topk", omission_mlp=0.375, align_mlp=8,
                        token_stride=STRIDE).validate()
    u_loss, _, u_sel = _sat_run(cfg, hf_sd, ids, labels, uniform, (0.0, 0.375 * frac), 1, 1)
    assert set(_kept_mlp(u_sel, cfg)) == {0, 1}
    dense_loss, _, _ = _single(cfg, hf_sd, ids, labels)
    assert abs(loss - dense_loss) > 1e-4 and abs(loss - u_loss) > 1e-5


@pytest.mark.parametrize("overrides,msg", [
    ({"omission_mlp": 0.1, "omission_mlp_layers": "0,0.5"}, "set --sat-omission-mlp 0.2500"),
    ({"omission_mlp": 0.5, "omission_mlp_layers": "0,1.0"}, "allowed: rates in [0, 1) (not 1)"),
    ({"omission_mlp": 0.5, "omission_mlp_layers": "0.5,half"}, "comma-separated numbers in [0, 1)"),
])
def test_bad_layer_rates_refused_with_one_clear_error(overrides, msg):
    with pytest.raises(SatDistError) as e:
        SATConfig(**overrides).validate()
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_layer_rates_must_name_every_layer():
    from sat_dist.model.llama import LlamaModel
    from sat_dist.model.sat_state import SATState

    sat = SATConfig(omission_mlp=0.3, omission_mlp_layers="0.3,0.3,0.3").validate()
    with pytest.raises(SatDistError, match="3 rates for a model of 2 layers; give one rate per layer"):
        LlamaModel(MHA, SATState(sat))


def test_run_definition_holds_the_layer_rates_and_old_checkpoints_resume_as_before():
    from sat_dist.checkpoint.state import definition_changes
    from sat_dist.config import ModelConfig
    from sat_dist.train.arguments import parse_args, run_definition

    model = ModelConfig().validate()
    plain = run_definition(parse_args([]), model)
    uneven = run_definition(parse_args(["--sat-omission-mlp-layers", "0,0.2", "--sat-omission-mlp", "0.1"]), model)
    assert plain["sat-omission-mlp-layers"] == ""
    old = {"run_definition": {k: v for k, v in plain.items() if k != "sat-omission-mlp-layers"}}
    assert definition_changes(old, plain) == []
    assert definition_changes(old, uneven) == ["sat-omission-mlp-layers"]


def test_allocation_is_the_cheapest_choice_found_by_enumerating_every_one():
    """allocate_layer_rates against exhaustive search over every per-layer choice."""
    import itertools
    import random

    from sat_dist.sat.layer_rates import allocate_layer_rates

    rng = random.Random(0)
    rates = [1 / 3, 0.5, 2 / 3, 5 / 6]
    options = [0.0] + rates
    for _ in range(60):
        n_layers = rng.randint(1, 4)
        costs = [[rng.uniform(-0.01, 1.0) for _ in rates] for _ in range(n_layers)]
        mean = rng.choice([0.0, 0.2, 1 / 3, 0.45, 0.5, 2 / 3, 5 / 6])
        got = allocate_layer_rates(costs, rates, mean)

        def cost(choice):
            return sum(costs[i][rates.index(r)] for i, r in enumerate(choice) if r)

        feasible = [c for c in itertools.product(options, repeat=n_layers) if sum(c) / n_layers >= mean - 1e-9]
        assert sum(got) / n_layers >= mean - 1e-9
        assert cost(got) == pytest.approx(min(cost(c) for c in feasible), abs=1e-12)
    # the measured pattern: one expensive layer stays dense, the cheap ones take its share
    assert allocate_layer_rates([[1.0, 2.0], [0.1, 0.2], [0.1, 0.3]], [0.5, 0.75], 0.5) == (0.0, 0.75, 0.75)
    with pytest.raises(ValueError, match="above the highest rate"):
        allocate_layer_rates([[0.1]], [0.5], 0.6)


def test_fidelity_per_layer_rows_equal_transformers_with_one_layers_channels_zeroed(corpus, hf_init):
    """sat_fidelity --per-layer: the row of layer l at rate r is the loss of transformers' model
    with only layer l's r omitted channels (weight magnitude, picked here by hand) zeroed."""
    import math
    import subprocess
    import sys

    from transformers import LlamaForCausalLM

    from tests.test_sat_fidelity_tool import REPO, TOOL, _tool

    seq, mbs, rate, align = 32, 2, 0.5, 16
    r = subprocess.run([sys.executable, str(TOOL), "--hf-checkpoint", str(hf_init), "--data", f"code={corpus['data']}",
                        "--seq-length", str(seq), "--micro-batch-size", str(mbs), "--batches", "1",
                        "--setting", f"metric=magnitude,selection=topk,align={align}", "--per-layer", f"{rate},0.75",
                        "--propose", "0.5"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {int(line.split("|")[1]): float(line.split("|")[2]) for line in r.stdout.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert "--sat-omission-mlp-layers" in r.stdout and "| per layer 0.5 |" in r.stdout

    data = _tool().batches(corpus["data"], 1, mbs, seq, 1)

    def loss(model):
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), lab.flatten()))
                       for ids, lab in data) / len(data)

    dense = loss(LlamaForCausalLM.from_pretrained(hf_init).float().eval())
    assert set(rows) == set(range(len(LlamaForCausalLM.from_pretrained(hf_init).model.layers)))
    for layer in rows:
        model = LlamaForCausalLM.from_pretrained(hf_init).float().eval()
        m = model.model.layers[layer].mlp
        f = m.down_proj.weight.shape[1]
        keep = int(math.floor(f * (1 - rate) / align + 0.5)) * align
        mag = m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1) + m.down_proj.weight.pow(2).sum(0)
        with torch.no_grad():
            m.down_proj.weight[:, mag.argsort(descending=True)[keep:]] = 0.0
        want = loss(model) - dense
        assert abs(want) > 1e-5  # the layer's omission changes the function
        assert rows[layer] == pytest.approx(want, abs=2e-5), layer
