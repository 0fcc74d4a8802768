"""Cross-image pixel-to-pixel distillation (CIRKD mini-batch; LOSSES.md 4) in plain PyTorch.

Readable form: one P x P similarity matrix per ordered image pair. Memory grows as P^2; the fused
kernels stream tiles instead.
"""

import torch
import torch.nn.functional as F

from ..._validation import compute_dtype

NORM_EPS = 1e-12  # as F.normalize


def cross_image_kd(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """1/N^2 sum_{i,j} 1/P sum_rows KL(softmax(b_i^T b_j / tau) || softmax(a_i^T a_j / tau))."""
    dtype = compute_dtype(student)
    n = student.shape[0]
    a = F.normalize(student.to(dtype).flatten(2), dim=1, eps=NORM_EPS)  # (N, C_s, P)
    b = F.normalize(teacher.detach().to(dtype).flatten(2), dim=1, eps=NORM_EPS)  # (N, C_t, P)
    total = a.new_zeros(())
    for i in range(n):
        for j in range(n):
            log_p_s = F.log_softmax(a[i].T @ a[j] / tau, dim=1)  # row r: pixel r of image i vs all of j
            log_p_t = F.log_softmax(b[i].T @ b[j] / tau, dim=1)
            total = total + (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return (total / (n * n)).to(student.dtype)
