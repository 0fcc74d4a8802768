"""sk.channel_pool: [max over C, mean over C] of x * gate, the input of CBAM's spatial gate."""

from __future__ import annotations

import torch

from ..._backends import FLOAT_DTYPES, select_backend
from ..._validation import check_same_device, check_tensor
from . import reference

IMPLEMENTED = {"reference": FLOAT_DTYPES}


def channel_pool(x: torch.Tensor, gate: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """(N, 2, H, W) in x's dtype: channel 0 the max over C, channel 1 the mean over C of
    x * gate[:, :, None, None]. `gate` (N, C) or (N, C, 1, 1), e.g. CBAM's channel gate M_c;
    differentiable in x and gate, without the caller materialising x * gate."""
    check_tensor("x", x, rank=4)
    if gate is not None:
        check_tensor("gate", gate)
        n, c = x.shape[:2]
        if tuple(gate.shape) not in ((n, c), (n, c, 1, 1)):
            raise ValueError(f"gate: expected shape (N, C) = {(n, c)} or (N, C, 1, 1), got {tuple(gate.shape)}")
        check_same_device(x=x, gate=gate)
    select_backend("channel_pool", backend, IMPLEMENTED, x)
    return reference.channel_pool(x, gate)
