"""sk.cbam_gate: CBAM's gated product M_s * (M_c * F) in one pass (docs/losses.md 6)."""

from __future__ import annotations

import torch

from ..._backends import FLOAT_DTYPES, KERNEL_DTYPES, select_backend
from ..._validation import check_same_device, check_tensor
from . import reference

IMPLEMENTED = {"reference": FLOAT_DTYPES, "cuda": KERNEL_DTYPES}
try:
    from .triton import cbam_gate_triton

    IMPLEMENTED["triton"] = FLOAT_DTYPES
except ImportError:  # triton missing: _backends reports why
    cbam_gate_triton = None
from .cuda import cbam_gate_cuda
from .._eager import install as _install_eager_path

_install_eager_path()  # eager calls of the custom ops skip the dispatcher (ops/_eager.py)


def cbam_gate(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor, *,
              backend: str = "auto") -> torch.Tensor:
    """M_s * (M_c * x): (N, C, H, W) in x's dtype, differentiable in all three inputs.

    x (N, C, H, W); channel_gate M_c (N, C) or (N, C, 1, 1); spatial_gate M_s (N, 1, H, W) or
    (N, H, W). out[n, c, h, w] = M_s[n, h, w] * M_c[n, c] * x[n, c, h, w], computed in fp32 (fp64
    for fp64 x) and rounded once to x's dtype; each gate's gradient comes back in its own dtype and
    shape. The fused kernel never forms M_c * x.
    """
    check_tensor("x", x, rank=4)
    check_tensor("channel_gate", channel_gate)
    check_tensor("spatial_gate", spatial_gate)
    n, c, h, w = x.shape
    if tuple(channel_gate.shape) not in ((n, c), (n, c, 1, 1)):
        raise ValueError(f"channel_gate: expected shape (N, C) = {(n, c)} or (N, C, 1, 1), "
                         f"got {tuple(channel_gate.shape)}")
    if tuple(spatial_gate.shape) not in ((n, 1, h, w), (n, h, w)):
        raise ValueError(f"spatial_gate: expected shape (N, 1, H, W) = {(n, 1, h, w)} or (N, H, W), "
                         f"got {tuple(spatial_gate.shape)}")
    check_same_device(x=x, channel_gate=channel_gate, spatial_gate=spatial_gate)
    name = select_backend("cbam_gate", backend, IMPLEMENTED, x)
    if name == "reference":
        return reference.cbam_gate(x, channel_gate, spatial_gate)
    # views (copies only if a gate's strides do not allow one); gradients flow back through them.
    # A gate already in the kernels' shape goes as it is (no view node in forward and backward).
    op = cbam_gate_triton if name == "triton" else cbam_gate_cuda
    if channel_gate.dim() != 2:
        channel_gate = channel_gate.reshape(n, c)
    if spatial_gate.dim() != 3:
        spatial_gate = spatial_gate.reshape(n, h, w)
    return op(x, channel_gate, spatial_gate)
