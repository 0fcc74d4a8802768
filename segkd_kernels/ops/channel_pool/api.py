"""sk.channel_pool: [max over C, mean over C] of x * gate, the input of CBAM's spatial gate."""

from __future__ import annotations

import torch

from ..._backends import select_backend
from ..._validation import check_same_device, check_tensor
from .._api import op_backends
from . import reference
from .cuda import channel_pool_cuda

IMPLEMENTED, _triton = op_backends(__package__)


def channel_pool(x: torch.Tensor, gate: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """(N, 2, H, W) in x's dtype: channel 0 the max over C, channel 1 the mean over C of
    x * gate[:, :, None, None]. `gate` (N, C) or (N, C, 1, 1), e.g. CBAM's channel gate M_c;
    differentiable in x and gate, without the caller materialising x * gate.

    The max's gradient goes to one maximal channel per pixel (the first one in the kernels). NaN
    counts as the largest value, as in torch.max: the max is NaN and its gradient goes to the first
    NaN channel."""
    check_tensor("x", x, rank=4)
    if gate is not None:
        check_tensor("gate", gate)
        n, c = x.shape[:2]
        if tuple(gate.shape) not in ((n, c), (n, c, 1, 1)):
            raise ValueError(f"gate: expected shape (N, C) = {(n, c)} or (N, C, 1, 1), got {tuple(gate.shape)}")
        check_same_device(x=x, gate=gate)
    name = select_backend("channel_pool", backend, IMPLEMENTED, x)
    if name == "reference":
        return reference.channel_pool(x, gate)
    # (N, C) view of a 4-d gate; its gradient flows back through the reshape. An (N, C) gate goes
    # as it is: a reshape to its own shape would add a view node to every forward and backward.
    op = _triton.channel_pool_triton if name == "triton" else channel_pool_cuda
    if gate is not None and gate.dim() != 2:
        gate = gate.reshape(x.shape[0], x.shape[1])
    out, _argmax = op(x, gate)
    return out
