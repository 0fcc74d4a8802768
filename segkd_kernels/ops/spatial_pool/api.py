"""sk.spatial_pool: mean and max over H, W per (n, c), differentiable in x (CBAM channel gate)."""

import torch

from ..._backends import FLOAT_DTYPES, KERNEL_DTYPES, select_backend
from ..._validation import check_tensor
from . import reference

IMPLEMENTED = {"reference": FLOAT_DTYPES, "cuda": KERNEL_DTYPES}
try:
    from .triton import spatial_pool_triton

    IMPLEMENTED["triton"] = FLOAT_DTYPES
except ImportError:  # triton missing: _backends reports why
    spatial_pool_triton = None
from .cuda import spatial_pool_cuda
from .._eager import install as _install_eager_path

_install_eager_path()  # eager calls of the custom ops skip the dispatcher (ops/_eager.py)


def spatial_pool(x: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(avg, max), each (N, C) in x's dtype: mean and max of x over H, W.

    The gradient of max goes to one maximal position per (n, c) (the first one in the kernels).
    NaN counts as the largest value, as in torch.max: a map holding one has a NaN max, whose
    gradient goes to its first NaN.
    """
    check_tensor("x", x, rank=4)
    name = select_backend("spatial_pool", backend, IMPLEMENTED, x)
    if name == "reference":
        return reference.spatial_pool(x)
    op = spatial_pool_triton if name == "triton" else spatial_pool_cuda
    avg, mx, _argmax = op(x)
    return avg, mx
