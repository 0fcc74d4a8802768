"""Shared by test_channel_wise_kd.py and test_pixel_kd.py (losses over logits): the textbook softmax
of their explicit-loop fp64 oracles (Python floats, math.exp / math.log, no torch) and the bad
inputs both ops must refuse with a one-line error naming the argument, and the check of a compiled
call against eager values."""

import math

import torch

from segkd_kernels.testing import assert_close, make_tensor


def softmax_and_log(values, tau):
    """(p, log p) of softmax(values / tau), shifted by the max so exp never overflows."""
    scaled = [v / tau for v in values]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    z = sum(exps)
    return [e / z for e in exps], [v - top - math.log(z) for v in scaled]


def bad_logit_cases(device, student: str, teacher: str, axis: str) -> list:
    """(name, args, kwargs, error match) for an op(student, teacher, tau) over (N, axis, H, W) logits."""
    ok = make_tensor((2, 3, 4, 5), device=device)
    other = make_tensor((2, 3, 4, 5), device=device, seed=1)
    return [
        ("shape mismatch", (ok, make_tensor((2, 3, 4, 6), device=device)), {}, teacher),
        (f"{axis} mismatch", (ok, make_tensor((2, 4, 4, 5), device=device)), {}, teacher),
        ("student rank 3", (ok[0], other[0]), {}, student),
        ("teacher rank 5", (ok, other[None]), {}, teacher),
        ("student int", (ok.long(), other), {}, student),
        ("teacher int", (ok, other.to(torch.int32)), {}, teacher),
        ("student bool", (ok > 0, other), {}, student),
        ("student not a tensor", (ok.tolist(), other), {}, student),
        ("teacher on meta", (ok, other.to("meta")), {}, teacher),
        ("student on meta", (ok.to("meta"), other), {}, f"{teacher}.*meta|meta.*{teacher}"),
        ("empty batch", (ok[:0], other[:0]), {}, student),
        ("empty spatial", (ok[:, :, :0], other[:, :, :0]), {}, student),
        (f"empty {axis}", (ok[:, :0], other[:, :0]), {}, student),
        ("tau zero", (ok, other), {"tau": 0.0}, "tau"),
        ("tau int zero", (ok, other), {"tau": 0}, "tau"),
        ("tau negative", (ok, other), {"tau": -1.0}, "tau"),
        ("tau nan", (ok, other), {"tau": float("nan")}, "tau"),
        ("tau inf", (ok, other), {"tau": float("inf")}, "tau"),
        ("tau string", (ok, other), {"tau": "4"}, "tau"),
        ("tau bool", (ok, other), {"tau": True}, "tau"),
        ("tau None", (ok, other), {"tau": None}, "tau"),
    ]


def check_compiled_call(fn, s, t, want_loss, want_grad, upstream: float, backend: str, **kwargs) -> None:
    """fn(s, t, tau=2) on a fresh leaf copy of s: the loss and, for upstream * loss, the gradient."""
    s2 = s.detach().clone().requires_grad_(True)
    loss = fn(s2, t, 2.0, backend=backend, **kwargs)
    (upstream * loss).backward()
    assert_close(loss.detach(), want_loss)
    assert_close(s2.grad, upstream * want_grad)
