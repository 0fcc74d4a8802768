"""attnfd_loss in Triton: the three dot products <s,s>, <t,t>, <s,t> in one pass, and the gradient.

Forward: a persistent grid (one program per resident slot) strides over the flat tensors (both read
once, in a memory order they share, so channels_last pairs need no copy); each lane accumulates the
three products in fp64 and each program writes one row of partial sums. One more program sums them
in a fixed order (fp64, deterministic, no atomics) and computes the loss and the gradient's two
coefficients (attnfd_loss_triton); attnfd_dots_triton returns the dots alone (torch sums the
partials), for second derivatives.

Why fp64 and not fp32 partials: the loss is 2 - 2 cos, which cancels to ~1e-6 when the student is
close to the teacher, so the dot products need ~1e-10 relative accuracy. fp32 products and fp32
per-block partials carry ~1e-9 (for 4k elements the loss came out 4% off even with an fp64
combine); products of fp32 (or fp16/bf16) values are exact in fp64 and fp64 sums keep ~1e-16. The
pass stays bandwidth-bound: 3 fp64 FMAs per element pair.

Backward: the dots' gradient is elementwise, ds = 2 g_ss s + g_st t (dt likewise), with the fp64
coefficients read from device memory (no host synchronisation); computed in fp32 (fp64 for fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import PlanCache
from .._triton_common import FP_FUSION, cdiv, device_sms_l2, fp32_split, next_power_of_2

BLOCK = 1024
# The dots pass is a persistent grid: one program per resident slot, 8 four-warp programs per SM
# (<= 64 registers: the fp64 accumulators of _DOTS_BLOCK elements per program), each striding over
# the tensors, so the launch is one wave with no tail (a second, partial wave of equal-work
# programs would double the pass's time). MAX_PROGRAMS (None: that count) caps it (tests).
_DOTS_BLOCK = 512
_DOTS_CTAS_PER_SM = 8
MAX_PROGRAMS = None


@triton.jit
def _dots_kernel(s_ptr, t_ptr, part_ptr, numel, num_programs, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    acc_ss = tl.zeros([BLOCK], dtype=tl.float64)
    acc_tt = tl.zeros([BLOCK], dtype=tl.float64)
    acc_st = tl.zeros([BLOCK], dtype=tl.float64)
    # grid-stride loop: consecutive programs read consecutive blocks (coalesced)
    for start in range(pid * BLOCK, numel, num_programs * BLOCK):
        offs = start + lanes
        ok = offs < numel
        s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float64)
        t = tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float64)
        acc_ss += s * s
        acc_tt += t * t
        acc_st += s * t
    tl.store(part_ptr + pid * 3, tl.sum(acc_ss, axis=0))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(acc_tt, axis=0))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(acc_st, axis=0))


@triton.jit
def _axpby_kernel(a_ptr, b_ptr, coef_ptr, out_ptr, numel, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """out = coef[0] * a + coef[1] * b over flat tensors."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < numel
    ca = tl.load(coef_ptr).to(ACC_DTYPE)
    cb = tl.load(coef_ptr + 1).to(ACC_DTYPE)
    a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(ACC_DTYPE)
    b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + offs, (ca * a + cb * b).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _finish_kernel(part_ptr, loss_ptr, coef_ptr, programs, batch, eps_hi, eps_lo, BLOCK_P: tl.constexpr,
                   OUT_FP64: tl.constexpr):
    """One program: the fixed-order fp64 sum of the partial rows, the loss, and the student's
    gradient coefficients for grad_output 1, [2 dL/d<s,s>, dL/d<s,t>]: the whole scalar epilogue
    (about 25 fp64 torch ops forward and backward) in one launch. The formulas follow api.py's
    loss_from_dots step by step, and its gradient as autograd takes it (clamp_min passes the
    gradient where <s,s> >= eps^2)."""
    lanes = tl.arange(0, BLOCK_P)
    acc_ss = tl.zeros([BLOCK_P], dtype=tl.float64)
    acc_tt = tl.zeros([BLOCK_P], dtype=tl.float64)
    acc_st = tl.zeros([BLOCK_P], dtype=tl.float64)
    for start in range(0, programs, BLOCK_P):
        rows = start + lanes
        ok = rows < programs
        acc_ss += tl.load(part_ptr + rows * 3, mask=ok, other=0.0)
        acc_tt += tl.load(part_ptr + rows * 3 + 1, mask=ok, other=0.0)
        acc_st += tl.load(part_ptr + rows * 3 + 2, mask=ok, other=0.0)
    ss = tl.sum(acc_ss, axis=0)
    tt = tl.sum(acc_tt, axis=0)
    st = tl.sum(acc_st, axis=0)
    # fp32 kernel arguments carry eps as hi + lo; squared in fp64 (fp64 sqrt is correctly rounded)
    eps = tl.cast(eps_hi, tl.float64) + tl.cast(eps_lo, tl.float64)
    eps_sq = eps * eps
    # clamp_min keeps a NaN (tl.maximum would drop it)
    ns = tl.sqrt(tl.where(ss != ss, ss, tl.maximum(ss, eps_sq)))
    nt = tl.sqrt(tl.where(tt != tt, tt, tl.maximum(tt, eps_sq)))
    ns2 = ns * ns
    nt2 = nt * nt
    nst = ns * nt
    n = tl.cast(batch, tl.float64)
    loss = (ss / ns2 + tt / nt2 - 2.0 * st / nst) / n
    # through fp32, as torch converts fp64 to fp16/bf16 (and the interpreter has no direct fp64 -> bf16)
    if OUT_FP64:
        tl.store(loss_ptr, loss)
    else:
        tl.store(loss_ptr, loss.to(tl.float32).to(loss_ptr.dtype.element_ty))
    # d/d ns of ss / ns^2 - 2 st / (ns nt), then through ns = sqrt(max(ss, eps^2))
    g_ns = -ss / (ns2 * ns2) * (2.0 * ns) + 2.0 * st / (nst * nst) * nt
    g_ss = 1.0 / ns2 + tl.where(ss >= eps_sq, g_ns / (2.0 * ns), 0.0)
    g_st = -2.0 / nst
    tl.store(coef_ptr, 2.0 * g_ss / n)
    tl.store(coef_ptr + 1, g_st / n)


def _dense_order(s: torch.Tensor, t: torch.Tensor) -> tuple[int, ...] | None:
    """A dim order in which both s and t are contiguous, or None (then both are copied)."""
    if s.is_contiguous() and t.is_contiguous():
        return tuple(range(s.dim()))
    if s.dim() == 4 and s.is_contiguous(memory_format=torch.channels_last) and \
            t.is_contiguous(memory_format=torch.channels_last):
        return (0, 2, 3, 1)
    return None


# Launch plans (ops/_launch.PlanCache) keyed on what they depend on (shapes, strides, dtypes, device,
# the module's knobs).
_PLANS = PlanCache()
_cached = _PLANS.get_or_make


def _dots_plan(s: torch.Tensor, t: torch.Tensor) -> tuple[bool, int, int]:
    """(both dense in one memory order, numel, programs) of the dots' pass."""
    numel = s.numel()
    slots = device_sms_l2(s.device)[0] * _DOTS_CTAS_PER_SM if MAX_PROGRAMS is None else MAX_PROGRAMS
    return _dense_order(s, t) is not None, numel, max(1, min(cdiv(numel, _DOTS_BLOCK), slots))


def _dot_partials(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """fp64 (programs, 3): per-program partial sums of <s,s>, <t,t>, <s,t> (the one pass over s, t).
    The kernel reads numel elements from each base pointer in memory order: tensors dense in one
    memory order (_dense_order) are passed as they are, others as contiguous copies."""
    key = ("dots", s.shape, s.stride(), t.shape, t.stride(), s.device, MAX_PROGRAMS)
    dense, numel, programs = _cached(key, lambda: _dots_plan(s, t))
    if not dense:
        s, t = s.contiguous(), t.contiguous()
    part = torch.empty(programs, 3, dtype=torch.float64, device=s.device)
    if numel > 0:
        _dots_kernel[(programs,)](s, t, part, numel, programs, BLOCK=_DOTS_BLOCK, num_warps=4, **FP_FUSION)
    else:
        part.zero_()
    return part


@torch.library.custom_op("segkd::attnfd_dots_triton", mutates_args=())
def attnfd_dots_triton(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """fp64 (3,): [<s,s>, <t,t>, <s,t>] over all elements (s and t of one shape, any dtypes)."""
    return _dot_partials(s, t).sum(dim=0)


def _axpby_plan(a: torch.Tensor, b: torch.Tensor):
    """(dense order or None, its inverse (None for the identity), numel, grid, constexprs)."""
    order = _dense_order(a, b)
    dims = tuple(range(a.dim()))
    numel = a.numel()
    block = min(next_power_of_2(numel), BLOCK)
    acc = tl.float64 if a.dtype == torch.float64 else tl.float32
    inverse = None if order in (None, dims) else tuple(order.index(d) for d in dims)
    return order, inverse, numel, (cdiv(numel, block),), dict(BLOCK=block, ACC_DTYPE=acc, **FP_FUSION)


@torch.library.custom_op("segkd::attnfd_dots_backward_triton", mutates_args=())
def attnfd_dots_backward_triton(a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """coef[0] * a + coef[1] * b in a's dtype, laid out like a (and b, when both share a dense order)."""
    key = ("axpby", a.shape, a.stride(), b.shape, b.stride(), a.dtype)
    order, inverse, numel, grid, consts = _cached(key, lambda: _axpby_plan(a, b))
    if order is None:
        a, b = a.contiguous(), b.contiguous()
    # the output is dense in the inputs' memory order; the kernel sees base pointers only
    out = a.new_empty(a.shape) if inverse is None else a.new_empty([a.shape[d] for d in order]).permute(inverse)
    if numel > 0:
        _axpby_kernel[grid](a, b, coef.contiguous(), out, numel, **consts)
    return out


@attnfd_dots_triton.register_fake
def _(s, t):
    return s.new_empty(3, dtype=torch.float64)


@attnfd_dots_backward_triton.register_fake
def _(a, b, coef):
    order = _dense_order(a, b) or tuple(range(a.dim()))
    inverse = [order.index(d) for d in range(a.dim())]
    return a.new_empty([a.shape[d] for d in order]).permute(inverse)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grad_of(x, other, g_sq, g_cross):
    """d/dx of g_sq <x,x> + g_cross <x,other> = 2 g_sq x + g_cross other."""
    if torch.is_grad_enabled():
        # a second derivative was asked for (create_graph=True): the same formula in torch ops,
        # which autograd can differentiate again
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return ((2 * g_sq).to(dtype) * x.to(dtype) + g_cross.to(dtype) * other.to(dtype)).to(x.dtype)
    coef = torch.stack([2 * g_sq, g_cross]).to(torch.float64)
    return attnfd_dots_backward_triton(x, other, coef)


def _backward(ctx, grad):
    s, t = ctx.saved_tensors
    ds = _grad_of(s, t, grad[0], grad[2]) if ctx.needs_input_grad[0] else None
    dt = _grad_of(t, s, grad[1], grad[2]) if ctx.needs_input_grad[1] else None
    return ds, dt


attnfd_dots_triton.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("segkd::attnfd_loss_triton", mutates_args=())
def attnfd_loss_triton(s: torch.Tensor, t: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss in s's dtype, fp64 (2,) [2 dL/d<s,s>, dL/d<s,t>] for grad_output 1): the dots' pass and
    one epilogue launch."""
    part = _dot_partials(s, t)
    key = ("finish", part.shape[0], s.shape[0], eps, s.dtype)
    args, consts = _cached(key, lambda: ((part.shape[0], s.shape[0], *fp32_split(eps)),
                                         dict(BLOCK_P=min(1024, next_power_of_2(part.shape[0])),
                                              OUT_FP64=s.dtype == torch.float64, num_warps=4, **FP_FUSION)))
    loss = torch.empty((), dtype=s.dtype, device=s.device)
    coef = torch.empty(2, dtype=torch.float64, device=s.device)
    _finish_kernel[(1,)](part, loss, coef, *args, **consts)
    return loss, coef


@attnfd_loss_triton.register_fake
def _(s, t, eps):
    return s.new_empty(()), s.new_empty(2, dtype=torch.float64)


def _loss_setup_context(ctx, inputs, output):
    s, t, eps = inputs
    ctx.eps = eps
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(s, t, output[1])


def _loss_backward(ctx, grad_loss, _grad_coef):
    s, t, coef = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return None, None, None
    if torch.is_grad_enabled():
        # a second derivative was asked for (create_graph=True): the dots' op and the loss in
        # torch ops, which autograd can differentiate again
        from .api import loss_from_dots  # noqa: PLC0415

        with torch.enable_grad():
            s_ = s if s.requires_grad else s.detach().requires_grad_(True)
            loss = loss_from_dots(attnfd_dots_triton(s_, t.detach()), s.shape[0]).to(s.dtype)
            (ds,) = torch.autograd.grad(loss, s_, grad_loss, create_graph=True)
        return ds, None, None
    # coef is fp64: the product promotes grad_loss exactly, as an explicit cast would
    return attnfd_dots_backward_triton(s, t, coef * grad_loss), None, None


attnfd_loss_triton.register_autograd(_loss_backward, setup_context=_loss_setup_context)
