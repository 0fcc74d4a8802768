"""Memory-bank contrastive distillation (CIRKD's pixel-to-pixel and pixel-to-region memory terms;
docs/losses.md 4b) in plain PyTorch.

Each anchor row m (a pixel embedding) is compared with every entry q of a memory bank of teacher
embeddings: S_mq = s_m . B_q / tau for the student, T_mq = t_m . B_q / tau for the teacher, with s_m
and t_m scaled to unit length. The loss is the KL between the softmaxes over the bank at the KD
temperature kd_tau, averaged over the anchors and multiplied by kd_tau^2:
    kd_tau^2 / M * sum_m KL(softmax(T_m / kd_tau) || softmax(S_m / kd_tau)).
This readable form holds the M x Q logits (the tests' oracle and the CPU path); the Triton backend
streams the bank instead.
"""

import torch
import torch.nn.functional as F

from ..._validation import compute_dtype

NORM_EPS = 1e-12  # as F.normalize


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(M, C) -> each row divided by max(its norm, eps), in the computation dtype."""
    return F.normalize(x.to(compute_dtype(x)), dim=1, eps=NORM_EPS)


def memory_contrast_kd(student: torch.Tensor, teacher: torch.Tensor, memory: torch.Tensor, tau: float,
                       kd_tau: float) -> torch.Tensor:
    s = unit_rows(student)
    t = unit_rows(teacher.detach()).to(s.dtype)
    bank = memory.detach().to(s.dtype)
    # the two temperatures act on the same logits: one scale, one pass
    scale = 1.0 / (tau * kd_tau)
    log_ps = F.log_softmax((s @ bank.T) * scale, dim=1)
    log_pt = F.log_softmax((t @ bank.T) * scale, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum() / s.shape[0]
    return (kl * kd_tau**2).to(student.dtype)
