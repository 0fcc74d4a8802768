"""channel_pool in plain PyTorch: CBAM's spatial-gate input [max over C, mean over C] of x * gate."""

from __future__ import annotations

import torch

from ..._validation import compute_dtype


def channel_pool(x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    dtype = compute_dtype(x)
    gated = x.to(dtype)
    if gate is not None:
        gated = gated * gate.to(dtype).reshape(x.shape[0], x.shape[1], 1, 1)
    # max(dim) routes the gradient to one maximal channel per pixel, as the kernels do.
    mx = gated.max(dim=1, keepdim=True).values
    mean = gated.mean(dim=1, keepdim=True)
    return torch.cat([mx, mean], dim=1).to(x.dtype)
