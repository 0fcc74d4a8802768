"""sk.pairwise_kd: pairwise pixel-similarity distillation (docs/losses.md 3)."""

from __future__ import annotations

import torch

from ..._backends import select_backend
from ..._validation import check_bool, check_same_device, check_same_dims, check_teacher_dtype, check_tensor
from .._api import op_backends
from . import reference
from .cuda import pairwise_kd_cuda
from .reference import PRECISIONS

IMPLEMENTED, _triton = op_backends(__package__)


def check_pool(pool, shape=None) -> None:
    """None or a positive int; with the features' shape, also one that fits the map and leaves at
    least two pixels (one pixel's similarity with itself is 1 for student and teacher alike: the
    loss would be 0 whatever the inputs)."""
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 1):
        raise ValueError(f"pool: expected None or a positive int, got {pool!r}")
    if shape is None:
        return
    h, w = shape[2], shape[3]
    k = pool or 1
    if k > h or k > w:
        raise ValueError(f"pool: expected at most the feature map's size {h}x{w}, got {pool}")
    # (an unpooled 1x1 map is the caller's own choice, and its loss 0 the exact answer)
    if k > 1 and -(-h // k) * -(-w // k) < 2:  # ceil mode, as pool_features
        raise ValueError(f"pool: a {h}x{w} map pooled by {k} leaves 1 pixel; pairwise_kd needs at least 2")


def check_precision(precision) -> None:
    """One of PRECISIONS (a str: a non-str such as True is named in the error, not hashed)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")


def pairwise_kd(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, pool: int | None = None,
                detach_norm: bool = False, precision: str = "exact", backend: str = "auto") -> torch.Tensor:
    """Squared difference of the student's and teacher's pixel-to-pixel cosine similarities,
    averaged over N * P^2 pairs. Features (N, C_s, H, W) and (N, C_t, H, W): channel counts may
    differ. `pool=2` max-pools 2x2 first (CIRKD parity); `pool=None` keeps full resolution.
    `detach_norm=True` treats the per-pixel norms as constants in the gradient.
    `precision`: "exact" (fp64 Gram accumulation) or "fast" (fp32 sums over 64-pixel chunks, on
    tensor cores in the kernels; error bound in docs/losses.md 3); fp64 inputs compute in fp64.
    Teacher dtype: any floating dtype, converted to the computation dtype (fp32, fp64 for an fp64
    student); an fp64 teacher needs an fp64 student (ValueError: it would be rounded silently)."""
    check_tensor("student_feat", student_feat, rank=4)
    check_tensor("teacher_feat", teacher_feat, rank=4)
    check_same_dims("student_feat", student_feat, "teacher_feat", teacher_feat, dims=(0, 2, 3))
    check_same_device(student_feat=student_feat, teacher_feat=teacher_feat)
    check_teacher_dtype("student_feat", student_feat, "teacher_feat", teacher_feat)
    check_pool(pool, student_feat.shape)
    check_bool("detach_norm", detach_norm)
    check_precision(precision)
    name = select_backend("pairwise_kd", backend, IMPLEMENTED, student_feat)
    if name == "reference":
        return reference.pairwise_kd(student_feat, teacher_feat, pool, bool(detach_norm), precision)
    if name == "cuda":  # the cuda op takes the pooled (N, C, H', W') features
        s4 = reference.pool_features(student_feat, pool)
        t4 = reference.pool_features(teacher_feat.detach(), pool)
        return pairwise_kd_cuda(s4, t4.to(s4.dtype), bool(detach_norm), precision)[0]
    # Pooling stays in torch (autograd routes its gradient); the kernels see (N, C, P) features.
    s = reference.pool_features(student_feat, pool).flatten(2)
    t = reference.pool_features(teacher_feat.detach(), pool).flatten(2)
    return _triton.pairwise_kd_triton(s, t.to(s.dtype), bool(detach_norm), precision)[0]
