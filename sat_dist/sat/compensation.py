"""Mean compensation of omitted MLP channels (--sat-compensation mean).

Omitting channel j drops a_j(t) W_down[:, j] from every token's output. Adding back the
channel's mean activation mu_j over the scored tokens, as a bias sum_{j omitted} mu_j
W_down[:, j], leaves only each token's deviation from that mean missing (FLAP, An et al.
2024, for structured pruning). The cost is one [n] x [n, h] matrix-vector product per layer.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def omitted_mean_bias(mean: torch.Tensor, kept: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """sum over omitted channels j of mean[j] * W_down[:, j], [h] in fc2's dtype.

    mean [n]: the channels' mean activations; kept [k]: the kept channels' indices;
    fc2 [n, h] = W_down^T. Computed without grad: the bias is a constant of the step, so the
    omitted channels' weights get exactly zero gradient, as without compensation.
    """
    omitted_mean = mean.float().index_fill(0, kept, 0.0)  # [n], zero on kept channels
    # in fc2's dtype: an fp32 copy of a bf16 W_down would cost 180 MB a layer at 7B
    return omitted_mean.to(fc2.dtype) @ fc2
