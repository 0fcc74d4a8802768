"""mmrazor's (and mmsegmentation's distillation configs') ChannelWiseDivergence on channel_wise_kd."""

from __future__ import annotations

from torch import nn

from .._validation import check_positive
from ..ops.channel_wise_kd import channel_wise_kd


class ChannelWiseDivergence(nn.Module):
    """`loss_weight * tau^2 / (N*C) * sum KL(softmax_HW(t / tau) || softmax_HW(s / tau))`, mmrazor's
    defaults tau = 1.0, loss_weight = 1.0. Student and teacher need the same shape (mmrazor checks
    only H, W; map channels first)."""

    def __init__(self, tau=1.0, loss_weight=1.0, *, backend="auto"):
        super().__init__()
        check_positive("tau", tau)
        self.tau, self.loss_weight, self.backend = tau, loss_weight, backend

    def forward(self, preds_S, preds_T):
        return self.loss_weight * channel_wise_kd(preds_S, preds_T, self.tau, backend=self.backend)
