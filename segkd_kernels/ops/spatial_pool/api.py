"""sk.spatial_pool: mean and max over H, W per (n, c), differentiable in x (CBAM channel gate)."""

import torch

from ..._backends import select_backend
from ..._validation import check_tensor
from .._api import op_backends
from . import reference
from .cuda import spatial_pool_cuda

IMPLEMENTED, _triton = op_backends(__package__)


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
    op = _triton.spatial_pool_triton if name == "triton" else spatial_pool_cuda
    avg, mx, _argmax = op(x)
    return avg, mx
