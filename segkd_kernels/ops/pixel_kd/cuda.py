"""pixel_kd and pfs_pixel_kd on the hand-written CUDA kernel of csrc/pixel_kd.cu.

The kernel reads the logits in NCHW (classes P apart) and writes per-block sums of w * KL (pixel_kd:
the loss needs no per-pixel map) or, per pixel, w * KL (fp32; the PFS gap and knowledge_gap need the
map), and optionally the student gradient for a unit upstream gradient. The normaliser 1 / max(1, #valid)
and the PFS gap mean stay on the device (coef tensor), so nothing synchronises with the host.
pfs_pixel_kd takes two light passes: the per-pixel KL (= the gap) first, then, with the gap mean
known, the gradient pass weighted by max(KL, 0).
"""

from __future__ import annotations

import torch

from .._cuda_common import cuda_lib, launch_args
from .._saved_grad import register_saved_grad_autograd, scale_in_place

OP = "pixel_kd"


def _prepare(student, teacher, ignore_mask):
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(f"{OP}: expected two (N, K, H, W) tensors of one shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    n, _, h, w = student.shape
    if ignore_mask is not None and (ignore_mask.dtype != torch.bool or tuple(ignore_mask.shape) != (n, h, w)):
        raise ValueError(f"{OP}: ignore_mask must be a bool (N, H, W) tensor, got {ignore_mask.dtype} "
                         f"{tuple(ignore_mask.shape)}")
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    args = launch_args(OP, student)
    s = student.detach().to(dtype).contiguous()
    t = teacher.detach().to(dtype).contiguous()
    args["dtype"] = launch_args(OP, s)["dtype"]
    if ignore_mask is None:
        mask = None
        denom = torch.full((), float(max(n * h * w, 1)), dtype=torch.float32, device=s.device)
    else:
        mask = ignore_mask.contiguous()
        denom = (~mask).sum().clamp_min(1).to(torch.float32)
    return s, t, mask, denom, args


def _launch(lib, s, t, mask, weight, clamp_weight, coef, out, grad, tau, args, partials=None, grad_mult=None):
    n, k, h, w = s.shape
    if n * h * w == 0:
        return
    if k == 0:
        raise ValueError(f"{OP}: the class axis is empty")
    ptr = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
    lib.pixel_kd_forward(ptr(s), ptr(t), ptr(mask), ptr(weight), clamp_weight, ptr(coef), ptr(out), ptr(partials),
                         ptr(grad), ptr(grad_mult), n, k, h * w, float(tau), **args)


@torch.library.custom_op("segkd::pixel_kd_cuda", mutates_args=())
def pixel_kd_cuda(student: torch.Tensor, teacher: torch.Tensor, tau: float, weight: torch.Tensor | None,
                  ignore_mask: torch.Tensor | None, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad): loss 0-dim in the student's dtype, grad = d loss / d student for grad_output == 1 in
    the dtype the kernel reads (the student's, or fp32 when the teacher's differs; empty unless
    need_grad; the backward scales it in place, see ops/_saved_grad.py)."""
    lib = cuda_lib(OP)
    s, t, mask, denom, args = _prepare(student, teacher, ignore_mask)
    n, _, h, w = s.shape
    wt = None if weight is None else weight.detach().to(torch.float32).contiguous()
    # one sum of w * KL per block (every block writes its own, so no fill is needed)
    partials = torch.empty(lib.pixel_kd_num_partials(n, h * w), dtype=torch.float32, device=s.device)
    grad = torch.empty_like(s) if need_grad else s.new_empty(0)
    coef = (tau / denom).reshape(1)  # d loss / d KL_p = tau^2 w_p / denom; d KL_p / d s = (p_s - p_t) / tau
    _launch(lib, s, t, mask, wt, False, coef, None, grad if need_grad else None, tau, args, partials=partials)
    loss = (partials.sum() * (tau * tau) / denom).to(student.dtype)
    return loss, grad


def _pfs_gap(lib, s, t, mask, denom, tau, args, grad_mult=None):
    """Pass 1 of PFS: the per-pixel KL map (0 where ignored) and the clamped mean gap. With grad_mult
    (the backward's recomputation) nothing runs when grad_output is 1 and the map is left unset."""
    n, _, h, w = s.shape
    kl = torch.empty(n * h * w, dtype=torch.float32, device=s.device)  # every pixel is written
    _launch(lib, s, t, mask, None, False, None, kl, None, tau, args, grad_mult=grad_mult)
    gap = kl.clamp_min(0)
    mean_gap = (gap.sum() / denom).clamp_min(torch.finfo(torch.float32).tiny)
    return kl, gap, mean_gap


@torch.library.custom_op("segkd::pfs_pixel_kd_cuda", mutates_args=())
def pfs_pixel_kd_cuda(student: torch.Tensor, teacher: torch.Tensor, tau: float, ignore_mask: torch.Tensor | None,
                      need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad) of pixel KD weighted by w_p = max(KL_p, 0) / mean over valid pixels of max(KL, 0)."""
    lib = cuda_lib(OP)
    s, t, mask, denom, args = _prepare(student, teacher, ignore_mask)
    kl, gap, mean_gap = _pfs_gap(lib, s, t, mask, denom, tau, args)
    # w = gap / mean_gap as in the reference: all-zero gaps give w = 0 (and a zero gradient)
    loss = ((kl * (gap / mean_gap)).sum() * (tau * tau) / denom).to(student.dtype)
    grad = s.new_empty(0)
    if need_grad:  # pass 2: gradient with the (detached) gap weights read back from kl
        grad = torch.empty_like(s)
        coef = torch.stack([tau / denom, mean_gap])  # kernel: coef[0] * max(kl, 0) / coef[1]
        _launch(lib, s, t, mask, kl, True, coef, None, grad, tau, args)
    return loss, grad


def _pixel_kd_rescale(inputs, grad, grad_output):
    """grad (the saved gradient, in place) for grad_output (on the device), untouched when it is
    exactly 1: fp32 scaled, fp16/bf16 recomputed from the inputs and rounded once."""
    if inputs is None:
        scale_in_place(cuda_lib(OP), grad, grad_output, launch_args(OP, grad))
        return
    student, teacher, tau, weight, ignore_mask, _need_grad = inputs
    s, t, mask, denom, args = _prepare(student, teacher, ignore_mask)
    wt = None if weight is None else weight.detach().to(torch.float32).contiguous()
    coef = (tau / denom).reshape(1)
    _launch(cuda_lib(OP), s, t, mask, wt, False, coef, None, grad, tau, args, grad_mult=grad_output)


def _pfs_rescale(inputs, grad, grad_output):
    """As _pixel_kd_rescale, for PFS: fp16/bf16 run both passes again (the gap map is not kept), each
    a no-op when grad_output is exactly 1."""
    if inputs is None:
        scale_in_place(cuda_lib(OP), grad, grad_output, launch_args(OP, grad))
        return
    student, teacher, tau, ignore_mask, _need_grad = inputs
    lib = cuda_lib(OP)
    s, t, mask, denom, args = _prepare(student, teacher, ignore_mask)
    kl, _gap, mean_gap = _pfs_gap(lib, s, t, mask, denom, tau, args, grad_mult=grad_output)
    coef = torch.stack([tau / denom, mean_gap])
    _launch(lib, s, t, mask, kl, True, coef, None, grad, tau, args, grad_mult=grad_output)


def _fake(student, teacher, *rest):
    need_grad = rest[-1]
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    grad = student.new_empty(student.shape if need_grad else (0,), dtype=dtype)
    return student.new_empty(()), grad


pixel_kd_cuda.register_fake(_fake)
pfs_pixel_kd_cuda.register_fake(_fake)


register_saved_grad_autograd(pixel_kd_cuda, OP, _pixel_kd_rescale)
register_saved_grad_autograd(pfs_pixel_kd_cuda, OP, _pfs_rescale)


@torch.library.custom_op("segkd::knowledge_gap_cuda", mutates_args=())
def knowledge_gap_cuda(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """(N, H, W) per-pixel KL(teacher || student) at temperature tau in the student's dtype (no gradient)."""
    lib = cuda_lib(OP)
    s, t, _mask, _denom, args = _prepare(student, teacher, None)
    n, _, h, w = s.shape
    kl = torch.empty(n * h * w, dtype=torch.float32, device=s.device)  # every pixel is written
    _launch(lib, s, t, None, None, False, None, kl, None, tau, args)
    return kl.reshape(n, h, w).to(student.dtype)


@knowledge_gap_cuda.register_fake
def _(student, teacher, tau):
    n, _, h, w = student.shape
    return student.new_empty(n, h, w)
