"""Pixel-wise KD (docs/losses.md 2) and the knowledge-gap weighting of PFS (2b) in plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._validation import compute_dtype


def per_pixel_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """(N, H, W): KL(softmax_K(t/tau) || softmax_K(s/tau)) over the class axis (dim 1), in the
    compute dtype (fp32, or fp64 for fp64 students)."""
    dtype = compute_dtype(student)
    log_p_s = F.log_softmax(student.to(dtype) / tau, dim=1)
    log_p_t = F.log_softmax(teacher.detach().to(dtype) / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def _zero_ignored(logits: torch.Tensor, ignore_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits with every class of the ignored pixels set to 0. where(), not a multiply: the value
    and the gradient at ignored pixels are exactly 0 even if their logits are not finite (a NaN or
    Inf there would otherwise give a NaN gradient through the softmax, 0 * NaN = NaN)."""
    if ignore_mask is None:
        return logits
    return torch.where(ignore_mask[:, None], torch.zeros((), dtype=logits.dtype, device=logits.device), logits)


def _masked_mean(values: torch.Tensor, ignore_mask: torch.Tensor | None) -> torch.Tensor:
    """sum of values over valid pixels / max(1, number of valid pixels). where(), not a multiply:
    ignored pixels contribute 0 even where values are not finite."""
    if ignore_mask is None:
        return values.mean()
    valid = ~ignore_mask
    total = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / valid.sum().clamp_min(1).to(values.dtype)


def pixel_kd(student: torch.Tensor, teacher: torch.Tensor, tau: float, weight: torch.Tensor | None = None,
             ignore_mask: torch.Tensor | None = None) -> torch.Tensor:
    """tau^2 * sum_p w_p m_p KL_p / max(1, sum_p m_p), m_p = 0 where ignore_mask is True."""
    kl = per_pixel_kl(_zero_ignored(student, ignore_mask), _zero_ignored(teacher.detach(), ignore_mask), tau)
    if weight is not None:
        kl = kl * weight.detach().to(kl.dtype)
    return (_masked_mean(kl, ignore_mask) * (tau * tau)).to(student.dtype)


def knowledge_gap_weight(student: torch.Tensor, teacher: torch.Tensor, tau: float,
                         ignore_mask: torch.Tensor | None = None) -> torch.Tensor:
    """w_p = gap_p / mean of gap over valid pixels, gap = per-pixel KL (detached).

    Rounding can make a KL of identical rows a hair below 0; gaps are clamped at 0 so the weights
    are never negative. If every valid gap is 0 the weights are 0 (the loss is 0 anyway)."""
    gap = per_pixel_kl(_zero_ignored(student.detach(), ignore_mask), _zero_ignored(teacher.detach(), ignore_mask),
                       tau).clamp_min(0)
    return gap / _masked_mean(gap, ignore_mask).clamp_min(torch.finfo(gap.dtype).tiny)


def pfs_pixel_kd(student: torch.Tensor, teacher: torch.Tensor, tau: float,
                 ignore_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel KD weighted by the normalised knowledge gap (PFS's soft-prediction imitation)."""
    weight = knowledge_gap_weight(student, teacher, tau, ignore_mask)
    return pixel_kd(student, teacher, tau, weight=weight, ignore_mask=ignore_mask)
