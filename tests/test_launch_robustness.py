"""Launch robustness on GPU clusters, checked on CPU: MFU's peak by device and dtype, the
CUDA device of a rank when each task sees one GPU."""


def test_peak_flops_by_device_and_dtype():
    from sat_dist.train.metrics import device_peak_flops

    assert device_peak_flops("NVIDIA H100 80GB HBM3", True) == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe", True) == 756e12
    assert device_peak_flops("NVIDIA H200", False) == 67e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB", True) == 312e12
    assert device_peak_flops("NVIDIA L40S", True) == 362e12
    assert device_peak_flops("Tesla T4", True) is None


def test_one_visible_gpu_per_task_uses_device_0():
    from sat_dist.parallel.state import local_device_index

    assert [local_device_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]  # a node's ranks see all 8 GPUs
    assert [local_device_index(r, 1) for r in (0, 3, 7)] == [0, 0, 0]  # srun --gpus-per-task=1
