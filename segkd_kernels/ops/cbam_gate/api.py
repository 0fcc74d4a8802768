"""sk.cbam_gate: CBAM's gated product M_s * (M_c * F) in one pass (docs/losses.md 6)."""

from __future__ import annotations

import torch

from ..._backends import select_backend
from ..._validation import check_same_device, check_tensor
from .._api import op_backends
from . import reference
from .cuda import cbam_gate_cuda_eager

IMPLEMENTED, _triton = op_backends(__package__)


def cbam_gate(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor, *,
              backend: str = "auto") -> torch.Tensor:
    """M_s * (M_c * x): (N, C, H, W) in x's dtype, differentiable in all three inputs.

    x (N, C, H, W); channel_gate M_c (N, C) or (N, C, 1, 1); spatial_gate M_s (N, 1, H, W) or
    (N, H, W). out[n, c, h, w] = M_s[n, h, w] * M_c[n, c] * x[n, c, h, w], computed in fp32 (fp64
    for fp64 x) and rounded once to x's dtype; each gate's gradient comes back in its own dtype and
    shape. The fused kernel never forms M_c * x.
    """
    check_tensor("x", x, rank=4)
    # the gates: floating-point tensors here, non-empty through their shapes below
    if not (isinstance(channel_gate, torch.Tensor) and channel_gate.is_floating_point()):
        check_tensor("channel_gate", channel_gate)
    if not (isinstance(spatial_gate, torch.Tensor) and spatial_gate.is_floating_point()):
        check_tensor("spatial_gate", spatial_gate)
    n, c, h, w = x.shape
    mc_shape, ms_shape = channel_gate.shape, spatial_gate.shape  # torch.Size: compares with tuples
    if mc_shape != (n, c) and mc_shape != (n, c, 1, 1):
        raise ValueError(f"channel_gate: expected shape (N, C) = {(n, c)} or (N, C, 1, 1), got {tuple(mc_shape)}")
    if ms_shape != (n, 1, h, w) and ms_shape != (n, h, w):
        raise ValueError(f"spatial_gate: expected shape (N, 1, H, W) = {(n, 1, h, w)} or (N, H, W), "
                         f"got {tuple(ms_shape)}")
    device = x.device
    if channel_gate.device != device or spatial_gate.device != device:
        check_same_device(x=x, channel_gate=channel_gate, spatial_gate=spatial_gate)
    name = select_backend("cbam_gate", backend, IMPLEMENTED, x)
    if name == "reference":
        return reference.cbam_gate(x, channel_gate, spatial_gate)
    # The gates go as they are, in either shape: the kernels address them by stride and return their
    # gradients in their shapes (no view nodes in the graph). Each backend's entry is its custom op's
    # eager path written out for these arguments (the op itself under tracing and compiling).
    return (_triton.cbam_gate_eager if name == "triton" else cbam_gate_cuda_eager)(x, channel_gate, spatial_gate)
