"""spatial_pool in plain PyTorch: mean and max over H, W per (n, c) (CBAM's channel-gate pooling)."""

import torch

from ..._validation import compute_dtype


def spatial_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.to(compute_dtype(x)).flatten(2)  # (N, C, H*W)
    avg = flat.mean(dim=2)
    # max(dim) routes the gradient to one maximal position, as max-pooling does.
    mx = flat.max(dim=2).values
    return avg.to(x.dtype), mx.to(x.dtype)
