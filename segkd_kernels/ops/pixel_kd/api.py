"""sk.pixel_kd, sk.knowledge_gap, sk.pfs_pixel_kd (docs/losses.md 2, 2b)."""

from __future__ import annotations

import torch

from ..._backends import select_backend
from ..._validation import (check_positive, check_same_device, check_same_shape, check_teacher_dtype,
                             check_tensor)
from .._api import op_backends
from . import reference
from .cuda import knowledge_gap_cuda, pfs_pixel_kd_cuda, pixel_kd_cuda

IMPLEMENTED, _triton = op_backends(__package__)


def _needs_grad(student_logits: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and student_logits.requires_grad


def _check_logits(student_logits, teacher_logits, tau) -> None:
    check_tensor("student_logits", student_logits, rank=4)
    check_tensor("teacher_logits", teacher_logits, rank=4)
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    check_teacher_dtype("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_positive("tau", tau)


def _check_pixel_map(name: str, value, student_logits: torch.Tensor, *, boolean: bool) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor or None, got {type(value).__name__}")
    n, _, h, w = student_logits.shape
    if tuple(value.shape) != (n, h, w):
        raise ValueError(f"{name}: expected shape (N, H, W) = {(n, h, w)}, got {tuple(value.shape)}")
    if boolean and value.dtype != torch.bool:
        raise ValueError(f"{name}: expected a bool tensor (True = ignored pixel), got dtype {value.dtype}")
    if not boolean and not value.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    check_same_device(student_logits=student_logits, **{name: value})


def _nonnegative_weight(weight: torch.Tensor | None, ignore_mask: torch.Tensor | None = None, *,
                        host_check: bool) -> torch.Tensor | None:
    """Weights of the pixels that count must be >= 0 (a negative one would make the loss, a sum of
    KLs, negative); ignored pixels may hold anything, as their logits may.

    Reading the values on the host is free for a CPU tensor, and there a negative weight raises.
    For a CUDA tensor it would wait for the device on every call (and a compiled graph cannot
    branch on it), so there a negative weight makes the loss NaN instead, on the device: one
    elementwise pass over an (N, H, W) map, never a silent wrong value."""
    if weight is None:
        return None
    negative = weight < 0
    if ignore_mask is not None:
        negative = negative & ~ignore_mask
    if host_check:
        if bool(negative.any()):
            raise ValueError(f"weight: expected values >= 0, got {weight[negative].min().item():g}")
        return weight
    return torch.where(negative, torch.full((), float("nan"), dtype=weight.dtype, device=weight.device), weight)


def pixel_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0, *,
             weight: torch.Tensor | None = None, ignore_mask: torch.Tensor | None = None,
             backend: str = "auto") -> torch.Tensor:
    """Hinton KD per pixel over the class axis: tau^2 * sum_p w_p m_p KL_p / max(1, #valid pixels).

    Logits (N, K, H, W); `weight` (N, H, W) float >= 0 (a negative weight raises a ValueError for CPU
    tensors; on a GPU, where checking would wait for the device, it makes the loss NaN);
    `ignore_mask` (N, H, W) bool, True = ignored.
    Returns a 0-dim tensor in the student's dtype, differentiable in the student only.
    Teacher dtype: any floating dtype, converted to the computation dtype (fp32, fp64 for an fp64
    student); an fp64 teacher needs an fp64 student (ValueError: it would be rounded silently)."""
    _check_logits(student_logits, teacher_logits, tau)
    _check_pixel_map("weight", weight, student_logits, boolean=False)
    _check_pixel_map("ignore_mask", ignore_mask, student_logits, boolean=True)
    weight = _nonnegative_weight(weight, ignore_mask, host_check=weight is not None and weight.device.type == "cpu"
                                 and not torch.compiler.is_compiling())
    name = select_backend("pixel_kd", backend, IMPLEMENTED, student_logits)
    if name == "triton":
        return _triton.pixel_kd(student_logits, teacher_logits, tau, weight, ignore_mask)
    if name == "cuda":
        weight = weight.detach() if weight is not None else None
        return pixel_kd_cuda(student_logits, teacher_logits.detach(), float(tau), weight, ignore_mask,
                             _needs_grad(student_logits))[0]
    return reference.pixel_kd(student_logits, teacher_logits, tau, weight, ignore_mask)


def knowledge_gap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """(N, H, W) per-pixel KL(teacher || student) at temperature tau, detached, in the student's dtype.
    The backend is chosen as for backend="auto" (SEGKD_BACKEND applies).
    Teacher dtype: any floating dtype, converted to the computation dtype (fp32, fp64 for an fp64
    student); an fp64 teacher needs an fp64 student (ValueError: it would be rounded silently)."""
    _check_logits(student_logits, teacher_logits, tau)
    name = select_backend("knowledge_gap", "auto", IMPLEMENTED, student_logits)
    if name == "triton":
        return _triton.knowledge_gap(student_logits, teacher_logits, tau)
    if name == "cuda":
        return knowledge_gap_cuda(student_logits.detach(), teacher_logits.detach(), float(tau))
    with torch.no_grad():
        return reference.per_pixel_kl(student_logits, teacher_logits, tau).to(student_logits.dtype)


def pfs_pixel_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0, *,
                 ignore_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Pixel KD weighted by the knowledge gap, w_p = gap_p / mean valid gap (docs/losses.md 2b).
    Teacher dtype: any floating dtype, converted to the computation dtype (fp32, fp64 for an fp64
    student); an fp64 teacher needs an fp64 student (ValueError: it would be rounded silently)."""
    _check_logits(student_logits, teacher_logits, tau)
    _check_pixel_map("ignore_mask", ignore_mask, student_logits, boolean=True)
    name = select_backend("pfs_pixel_kd", backend, IMPLEMENTED, student_logits)
    if name == "triton":
        return _triton.pfs_pixel_kd(student_logits, teacher_logits, tau, ignore_mask)
    if name == "cuda":
        return pfs_pixel_kd_cuda(student_logits, teacher_logits.detach(), float(tau), ignore_mask,
                                 _needs_grad(student_logits))[0]
    return reference.pfs_pixel_kd(student_logits, teacher_logits, tau, ignore_mask)
