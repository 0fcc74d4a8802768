"""cbam_gate in plain PyTorch: CBAM's output M_s * (M_c * F)."""

import torch

from ..._validation import compute_dtype


def cbam_gate(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W), channel_gate (N, C), spatial_gate (N, H, W) -> (N, C, H, W) in x's dtype."""
    dtype = compute_dtype(x)
    n, c, h, w = x.shape
    m_c = channel_gate.to(dtype).reshape(n, c, 1, 1)
    m_s = spatial_gate.to(dtype).reshape(n, 1, h, w)
    # computed in fp32 (fp64) and rounded once, like the fused kernel
    return (m_s * (m_c * x.to(dtype))).to(x.dtype)
