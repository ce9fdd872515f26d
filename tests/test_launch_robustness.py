"""Launch robustness on GPU clusters, checked on CPU: no JIT-built optimizer, MFU's peak by
device and dtype, the CUDA device of a rank when each task sees one GPU."""

import pytest


def test_peak_flops_by_device_and_dtype():
    from sat_dist.train.metrics import device_peak_flops

    assert device_peak_flops("NVIDIA H100 80GB HBM3", True) == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe", True) == 756e12
    assert device_peak_flops("NVIDIA H200", False) == 67e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB", True) == 312e12
    assert device_peak_flops("NVIDIA L40S", True) == 362e12
    assert device_peak_flops("Tesla T4", True) is None
    # variants of one chip are told apart; a name not known exactly gets no MFU
    assert device_peak_flops("NVIDIA H100 NVL", True) == 835e12
    assert device_peak_flops("NVIDIA H800", True) == 989e12
    assert device_peak_flops("NVIDIA H800 PCIe", True) == 756e12
    assert device_peak_flops("NVIDIA A100-SXM4-40GB", False) == 19.5e12
    assert device_peak_flops("NVIDIA H100 Something New", True) is None


def test_one_visible_gpu_per_task_uses_device_0():
    from sat_dist.parallel.state import local_device_index

    assert [local_device_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]  # a node's ranks see all 8 GPUs
    assert [local_device_index(r, 1) for r in (0, 3, 7)] == [0, 0, 0]  # srun --gpus-per-task=1


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_optimizer_needs_no_jit_build(monkeypatch, cuda):
    """torch's fused AdamW on CPU and CUDA alike (DeepSpeed's FusedAdam would be nvcc-built at
    first use on every node); a JSON may still ask for DeepSpeed's op."""
    import torch

    from sat_dist.config import TrainConfig
    from sat_dist.train.engine import fill_ds_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    t = TrainConfig(micro_batch_size=1, seq_length=8, train_iters=2, lr=1e-4, min_lr=0.0, lr_warmup_iters=0,
                    lr_decay_style="constant").validate()
    params = fill_ds_config({"zero_optimization": {"stage": 3}}, t, 1, "x.json")["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True and params["adam_w_mode"] is True
    mine = {"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"torch_adam": False}}}
    params = fill_ds_config(mine, t, 1, "x.json")["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params


def test_restored_adam_step_lives_where_fused_adamw_wants_it():
    """ensure_adam_state makes `step` on the parameter's device for fused AdamW (CUDA refuses a
    CPU step there) and on the CPU otherwise; checked with a meta-device parameter."""
    import torch

    from sat_dist.parallel.zero import ensure_adam_state

    for fused, want in ((True, "meta"), (False, "cpu")):
        p = torch.nn.Parameter(torch.empty(4, device="meta"))
        opt = torch.optim.AdamW([p], lr=1e-3, fused=fused) if fused else torch.optim.AdamW([p], lr=1e-3)
        ensure_adam_state(opt, 7)
        st = opt.state[p]
        assert st["step"].device.type == want and st["step"].dtype == torch.float32
        if want == "cpu":
            assert float(st["step"]) == 7
        assert st["exp_avg"].device.type == "meta"
