"""Pairwise similarity distillation (SKD pair-wise, PFS; docs/losses.md 3) in plain PyTorch.

Uses the exact Gram identity, so no P x P matrix is ever built (A: P x C_s, B: P x C_t per image):
    sum_{i,j} (a_i.a_j - b_i.b_j)^2 = ||A^T A||_F^2 - 2 ||A^T B||_F^2 + ||B^T B||_F^2
Cost O(P * C^2) and memory O(P * C). The three terms nearly cancel when student ~ teacher, so the
Gram matrices and their combination are computed in fp64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._validation import compute_dtype

NORM_EPS = 1e-12  # as F.normalize: a_i = s_i / max(||s_i||, eps)


def normalize_pixels(x: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """Per-pixel L2 normalisation over the channel axis; the norm is a constant if detach_norm."""
    norm = x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    if detach_norm:
        norm = norm.detach()
    return x / norm


def pool_features(x: torch.Tensor, pool: int | None) -> torch.Tensor:
    """pool x pool max-pooling with ceil mode (CIRKD's CriterionStructuralKD uses pool=2)."""
    if pool is None or pool == 1:
        return x
    return F.max_pool2d(x, kernel_size=pool, stride=pool, ceil_mode=True)


def pairwise_kd(student: torch.Tensor, teacher: torch.Tensor, pool: int | None = None,
                detach_norm: bool = False) -> torch.Tensor:
    """1 / (N * P^2) * sum_n sum_{i,j} (a_i.a_j - b_i.b_j)^2 over normalised pixel features."""
    dtype = compute_dtype(student)
    s = pool_features(student.to(dtype), pool)
    t = pool_features(teacher.detach().to(dtype), pool)
    n, p = s.shape[0], s.shape[2] * s.shape[3]
    a = normalize_pixels(s, detach_norm).flatten(2).double()  # (N, C_s, P) = A^T per image
    b = normalize_pixels(t, detach_norm).flatten(2).double()  # (N, C_t, P)
    aa = a @ a.transpose(1, 2)  # A^T A: (N, C_s, C_s)
    ab = a @ b.transpose(1, 2)  # A^T B: (N, C_s, C_t)
    bb = b @ b.transpose(1, 2)  # B^T B: (N, C_t, C_t)
    total = aa.square().sum() - 2.0 * ab.square().sum() + bb.square().sum()
    return (total / (n * p * p)).to(student.dtype)
