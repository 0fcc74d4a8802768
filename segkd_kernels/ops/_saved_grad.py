"""Backward of ops whose forward already wrote the student gradient ds (Liger-style).

The backward must return ds * grad_output. When grad_output is exactly 1 (a plain
loss.backward()), returning ds itself saves a full read+write pass over it. Testing that needs a
host sync, which pays off from _SKIP_SCALE_MIN_NUMEL elements on (Liger-Kernel does the same), and
is only done in plain eager execution: under torch.compile, tracing or fake tensors there is no
data-dependent branch, the backward always multiplies.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_SKIP_SCALE_MIN_NUMEL = 1 << 22


def _eager(grad: torch.Tensor) -> bool:
    """Plain eager execution: no compile, no tracing or fake mode (grad holds real data)."""
    return (not torch.compiler.is_compiling() and type(grad) is torch.Tensor
            and _get_current_dispatch_mode() is None)


def scale_saved_grad(ds: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """ds * grad_output; ds itself when grad_output is 1 (autograd's reference counting keeps the
    saved ds safe from in-place accumulation, as for any returned gradient)."""
    if _eager(grad) and (ds.device.type == "cpu" or ds.numel() >= _SKIP_SCALE_MIN_NUMEL) and bool(grad == 1):
        return ds
    return ds * grad.to(ds.dtype)
