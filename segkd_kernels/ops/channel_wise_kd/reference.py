"""Channel-wise distillation (CWD, docs/losses.md 1) in plain PyTorch."""

import torch
import torch.nn.functional as F

from ..._validation import compute_dtype


def channel_wise_kd(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 / (N*C) * sum over (n, c) of KL(softmax_P(t/tau) || softmax_P(s/tau))."""
    n, c = student.shape[:2]
    dtype = compute_dtype(student)
    log_p_s = F.log_softmax(student.to(dtype).flatten(2) / tau, dim=2)  # softmax over the H*W positions
    log_p_t = F.log_softmax(teacher.detach().to(dtype).flatten(2) / tau, dim=2)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return (kl * (tau * tau / (n * c))).to(student.dtype)
