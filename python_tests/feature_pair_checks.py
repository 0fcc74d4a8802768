"""Checks shared by the tests of the losses on a student and a teacher feature map with their own
channel counts, (N, C_s, H, W) and (N, C_t, H, W): pairwise_kd and cross_image_kd. Each test file
passes its op; the checks hold whatever the op computes."""

from __future__ import annotations

import pytest
import torch

from segkd_kernels.testing import make_tensor

# DEVICE: where the tests run their features (a GPU when there is one)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (student shape, teacher shape, the argument the error must name)
BAD_SHAPES = [
    ((2, 3, 5, 7), (3, 4, 5, 7), "teacher_feat"),  # N
    ((2, 3, 5, 7), (2, 4, 6, 7), "teacher_feat"),  # H
    ((2, 3, 5, 7), (2, 4, 5, 8), "teacher_feat"),  # W
    ((3, 5, 7), (2, 4, 5, 7), "student_feat"),  # rank
    ((2, 3, 5, 7), (2, 4, 5, 7, 1), "teacher_feat"),
    ((2, 3, 5, 7), (4, 5, 7), "teacher_feat"),
    ((0, 3, 5, 7), (0, 4, 5, 7), "student_feat"),  # empty
    ((2, 3, 0, 7), (2, 4, 0, 7), "student_feat"),
    ((2, 3, 5, 0), (2, 4, 5, 0), "student_feat"),
    ((2, 3, 5, 7), (2, 0, 5, 7), "teacher_feat"),
]


def features(n, c_s, c_t, h, w, *, dtype=torch.float64, seed=0):
    """A student map that requires grad and a teacher map, seeded."""
    s = make_tensor((n, c_s, h, w), dtype=dtype, device=DEVICE, seed=seed, requires_grad=True)
    t = make_tensor((n, c_t, h, w), dtype=dtype, device=DEVICE, seed=seed + 1)
    return s, t


def value_and_grad(fn, s, t, *args, **kwargs):
    """(fn(s, t, ...), d fn / d s) on a fresh leaf copy of s."""
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, s)
    return loss, grad


def good_pair(seed):
    return make_tensor((2, 3, 5, 7), seed=seed), make_tensor((2, 4, 5, 7), seed=seed + 1)


def check_bad_shape(op, student_shape, teacher_shape, name):
    with pytest.raises(ValueError, match=name):
        op(torch.randn(student_shape), torch.randn(teacher_shape))


def check_bad_dtypes_and_types(op, s, t):
    with pytest.raises(ValueError, match="student_feat"):
        op(s.long(), t)
    with pytest.raises(ValueError, match="teacher_feat"):
        op(s, t.to(torch.int32))
    with pytest.raises(ValueError, match="teacher_feat"):
        op(s, t.bool())
    with pytest.raises(ValueError, match="student_feat"):
        op(s.numpy(), t)
    with pytest.raises(ValueError, match="student_feat"):
        op(s.tolist(), t)


def check_different_devices(op, s, t):
    with pytest.raises(ValueError, match="teacher_feat"):
        op(s, t.to("meta"))
    with pytest.raises(ValueError, match="teacher_feat"):  # names the odd one out vs student_feat
        op(s.to("meta"), t)


def check_missing_backend(op, name, implemented, backend, s, t):
    if backend in implemented:
        pytest.skip(f"{name} has a {backend} backend now")
    with pytest.raises((ValueError, RuntimeError), match=f"no {backend} backend"):
        op(s, t, backend=backend)
