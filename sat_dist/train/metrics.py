"""Throughput accounting (Megatron-LM's model FLOPs) and the TensorBoard writer."""

from __future__ import annotations

from typing import Optional

from sat_dist.config import ModelConfig


def model_flops(cfg: ModelConfig, batch: int, seq: int, attn_keep: float = 1.0,
                mlp_keep: float = 1.0, sparse_pass: str = "both", wgrad_keep: float = 1.0,
                head_wgrad_keep: float = 1.0) -> float:
    """FLOPs of one forward+backward of `batch` sequences of `seq` tokens.

    With keeps of 1 this is Megatron-LM's formula (causal attention counted half):
      B*s*6*[L*(h*(q+2kv) + q*h) + 3*L*h*ffn + h*V] + B*s^2*6*q*L.
    attn_keep / mlp_keep (kept fraction of attention units / MLP channels, averaged over
    layers) give the FLOPs SAT actually executes: the projections and the attention scores
    of omitted units are not computed; the LM head always is. sparse_pass
    (--sat-sparse-pass): both, the MLP's three products per pass over the kept channels;
    backward, its forward (a third of its FLOPs) dense and its backward (two thirds) over
    the kept channels; weight-grad, the forward and the input gradient (two thirds) dense
    and only the weight gradients (one third) over the kept channels. wgrad_keep
    (--sat-wgrad-tokens; FLOP-weighted mean over the decoder's products) scales the weight-
    gradient third of every decoder product, head_wgrad_keep that of the LM head.
    """
    h, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_query_groups * cfg.head_dim
    attn_proj = L * (h * (q + 2 * kv) + q * h) * attn_keep
    mlp_share = {"both": mlp_keep, "backward": (1 + 2 * mlp_keep) / 3,
                 "weight-grad": (2 + mlp_keep) / 3}[sparse_pass]
    mlp = 3 * L * h * cfg.ffn_hidden_size * mlp_share
    wg, wg_head = (2 + wgrad_keep) / 3, (2 + head_wgrad_keep) / 3
    dense_tokens = batch * seq * 6 * ((attn_proj + mlp) * wg + h * V * wg_head)
    return dense_tokens + batch * seq * seq * 6 * q * L * attn_keep


# Dense peak FLOP/s per GPU from the vendors' data sheets (no structured sparsity):
# (bf16 tensor cores, fp32 without TF32), by the exact name torch.cuda.get_device_name
# reports. Variants of one chip differ (H100 SXM 989, NVL 835, PCIe 756 TFLOP/s bf16), so a
# name is matched whole: an unknown device gets no MFU rather than a wrong one.
_H100_SXM, _H100_NVL, _H100_PCIE = (989e12, 67e12), (835e12, 60e12), (756e12, 51e12)
_A100 = (312e12, 19.5e12)
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 SXM5 80GB": _H100_SXM,
    "NVIDIA H100 NVL": _H100_NVL,
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H200": _H100_SXM,
    "NVIDIA H200 NVL": _H100_NVL,
    "NVIDIA H800": _H100_SXM,
    "NVIDIA H800 PCIe": _H100_PCIE,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA L40S": (362e12, 91.6e12),
}


def device_peak_flops(device_name: str, bf16: bool) -> Optional[float]:
    """The peak FLOP/s MFU divides by, for a CUDA device name (torch.cuda.get_device_name)
    and the run's dtype; None for a name not in PEAK_FLOPS (then pass --peak-tflops)."""
    wanted = " ".join(device_name.split()).lower()
    for name, (peak_bf16, peak_fp32) in PEAK_FLOPS.items():
        if name.lower() == wanted:
            return peak_bf16 if bf16 else peak_fp32
    return None


def product_flops(cfg: ModelConfig) -> dict[str, int]:
    """Each decoder layer product's weight elements (its FLOPs per token, up to a factor)."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    return {"qkv": h * (q + 2 * kv), "proj": q * h, "fc1": 2 * h * cfg.ffn_hidden_size, "fc2": h * cfg.ffn_hidden_size}


class ExecutedFlops:
    """Dense and executed FLOPs of the steps since the last log line.

    The keep fractions change along the ladder, and within one log interval too, so each
    step's executed FLOPs are added as the step ends: the interval's executed throughput is
    what its steps really ran, not the last step's keep fractions applied to all of them.
    """

    def __init__(self, cfg: ModelConfig, batch: int, seq: int, sparse_pass: str = "both"):
        self.cfg, self.batch, self.seq, self.sparse_pass = cfg, batch, seq, sparse_pass
        self.steps, self.executed = 0, 0.0

    def add_step(self, attn_keep: float, mlp_keep: float, wgrad_keep: float = 1.0,
                 head_wgrad_keep: float = 1.0) -> None:
        self.steps += 1
        self.executed += model_flops(self.cfg, self.batch, self.seq, attn_keep, mlp_keep, self.sparse_pass,
                                     wgrad_keep, head_wgrad_keep)

    def take(self) -> tuple[int, float, float]:
        """(steps, dense FLOPs, executed FLOPs) of the interval; starts the next one."""
        out = (self.steps, self.steps * model_flops(self.cfg, self.batch, self.seq), self.executed)
        self.steps, self.executed = 0, 0.0
        return out


class TensorBoardLog:
    """Scalars written by exactly one rank (the others hold a disabled instance)."""

    def __init__(self, log_dir: Optional[str], enabled: bool):
        self.writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
