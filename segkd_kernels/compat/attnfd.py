"""AttnFD's distiller loss (AmirMansurian/AttnFD, distiller.py) on attnfd_loss."""

from __future__ import annotations

import math

from torch import nn

from ..ops.attnfd_loss import attnfd_loss


def build_feature_connector(t_channel, s_channel):
    """AttnFD's connector: 1x1 conv (no bias) from the student's to the teacher's channels, He-normal
    initialised with fan-out, then BatchNorm (weight 1, bias 0). Note the argument order: teacher
    first, as AttnFD's."""
    conv = nn.Conv2d(s_channel, t_channel, kernel_size=1, stride=1, padding=0, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channel))  # fan-out of a 1x1 conv: out channels
    bn = nn.BatchNorm2d(t_channel)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


class AttnFDLoss(nn.Module):
    """`attn_lambda * sum_points sum((A_s / ||A_s|| - A_t / ||A_t||)^2) / N`, one Frobenius norm over
    each whole (N, C, H, W) tensor, as AttnFD's Distiller.forward; attn_lambda = 2 is AttnFD's
    default. forward takes the refined attention maps of the points (the student's after their
    connectors), as lists or single tensors."""

    def __init__(self, attn_lambda=2.0, *, backend="auto"):
        super().__init__()
        self.attn_lambda, self.backend = attn_lambda, backend

    def forward(self, s_attens, t_attens):
        if not isinstance(s_attens, (list, tuple)):
            s_attens, t_attens = [s_attens], [t_attens]
        if len(s_attens) != len(t_attens):
            raise ValueError(f"t_attens: expected {len(s_attens)} maps like s_attens, got {len(t_attens)}")
        total = 0.0
        for s, t in zip(s_attens, t_attens):
            total = total + attnfd_loss(s, t, backend=self.backend)
        return total * self.attn_lambda
