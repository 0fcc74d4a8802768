"""pixel_kd, knowledge_gap and pfs_pixel_kd in Triton (docs/losses.md 2, 2b), on NCHW directly.

One program of one warp per (block of pixels, image): pixels on the fast axis (coalesced loads for
NCHW) spread over the warp's lanes, the K classes looped over in tiles of BLOCK_K held in registers
of the same warp, so every reduction over classes is registers and shuffles (no shared memory, no
barrier; with several warps per program Triton would spread the classes over the warps). Per pixel it keeps the online
log-sum-exps of s/tau and t/tau and a rescaled accumulator of exp(t/tau - m_t) (t - s)/tau, so
    KL_p = acc / l_t - lse_t + lse_s.
When K fits in one tile the logits are loaded once and reused for the gradient; otherwise a second
loop over K reloads them (from L2: one program's tiles are small) to write
    ds = coef_p * (softmax(s/tau) - softmax(t/tau)),   coef_p = tau * w_p * m_p / max(1, #valid).

Ignored pixels are masked out of the loads (never multiplied by 0), so whatever they hold, their
KL, weight and gradient are exactly 0. Per-program partial sums (deterministic, no atomics) give
    sum_p m_p w_p KL_p,   sum_p m_p gap_p,   sum_p m_p gap_p KL_p      (gap = max(KL, 0)).

pixel_kd: one pass (the valid count comes from the mask, a small torch reduction, read by pointer
so nothing synchronises), then one single-program launch turns the partial sums into the loss.
pfs_pixel_kd: the weights need the global mean gap, so pass 1 only reduces, the finalize launch
computes the loss and the mean gap, and pass 2 (only when the student needs a gradient) recomputes
KL_p and writes ds with w_p = gap_p / mean gap: two reads of the logits, no per-pixel copy of them.
The backward only scales ds by grad_output. Accumulation is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .._saved_grad import scale_saved_grad
from .._triton_common import (FP_FUSION, acc_dtype, acc_torch_dtype, cdiv, flat_pixel_strides, fp32_split,
                              next_power_of_2)

# Classes held in registers at once, and the tile size (classes x pixels) a program works on.
_MAX_BLOCK_K = 32
_LOOP_BLOCK_K = 16
_WARP_TILE = 512
# Lowest finite fp32: start of the running maxima of the class loop (every finite logit is >= it,
# so a pixel with any logit above -inf has a sum >= 1, and a tile of -inf never makes the rescale
# exp(-inf - -inf) = NaN), and the exponent of masked class lanes in the gradient loop (exp = 0).
# fp64 logits below it, far outside any logit range, would count as -inf.
_NEG = -3.4028234663852886e38
_TINY = 1.1754943508222875e-38  # smallest normal fp32 (exact in fp64 too): the mean-gap clamp


@triton.jit
def _pixel_kd_kernel(s_ptr, t_ptr, ign_ptr, w_ptr, n_ign_ptr, mean_gap_ptr, ds_ptr, kl_ptr, part_ptr, K, P,
                     total, s_sn, s_sk, s_sp, t_sn, t_sk, t_sp, inv_tau_hi, inv_tau_lo, tau_hi, tau_lo,
                     BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, ONE_TILE: tl.constexpr,
                     HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr, GAP_WEIGHT: tl.constexpr,
                     WRITE_GRAD: tl.constexpr, WRITE_KL: tl.constexpr, ACC: tl.constexpr, NEG: tl.constexpr):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    pix = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    inside = pix < P
    valid = inside
    if HAS_MASK:
        ignored = tl.load(ign_ptr + n * P + pix, mask=inside, other=1)
        valid = inside & (ignored == 0)
    # fp32 kernel arguments carry inv_tau as hi + lo so that fp64 inputs keep ~48 bits of it
    inv_tau = tl.cast(inv_tau_hi, ACC) + tl.cast(inv_tau_lo, ACC)
    s_base = s_ptr + n * s_sn + pix[None, :] * s_sp
    t_base = t_ptr + n * t_sn + pix[None, :] * t_sp
    ks = tl.arange(0, BLOCK_K)

    if ONE_TILE:
        kin = ks < K
        lm = kin[:, None] & valid[None, :]
        xs = tl.load(s_base + ks[:, None].to(tl.int64) * s_sk, mask=lm, other=0.0).to(ACC) * inv_tau
        xt = tl.load(t_base + ks[:, None].to(tl.int64) * t_sk, mask=lm, other=0.0).to(ACC) * inv_tau
        # masked class lanes hold -inf, as torch's softmax sees only the K classes: the max is -inf
        # only when all K logits are, and then exp(x - max) = exp(-inf - -inf) is NaN in every
        # lane, the reference's NaN softmax; otherwise masked lanes give exp(-inf) = 0
        xs = tl.where(kin[:, None], xs, float("-inf"))
        xt = tl.where(kin[:, None], xt, float("-inf"))
        m_s = tl.max(xs, axis=0)
        m_t = tl.max(xt, axis=0)
        e_s = tl.exp(xs - m_s[None, :])
        e_t = tl.exp(xt - m_t[None, :])
        l_s = tl.sum(e_s, axis=0)
        l_t = tl.sum(e_t, axis=0)
        acc = tl.sum(tl.where(kin[:, None], e_t * (xt - xs), 0.0), axis=0)
    else:
        m_s = tl.full([BLOCK_P], NEG, ACC)
        m_t = tl.full([BLOCK_P], NEG, ACC)
        l_s = tl.zeros([BLOCK_P], ACC)
        l_t = tl.zeros([BLOCK_P], ACC)
        acc = tl.zeros([BLOCK_P], ACC)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            kin = kk < K
            lm = kin[:, None] & valid[None, :]
            xs = tl.load(s_base + kk[:, None].to(tl.int64) * s_sk, mask=lm, other=0.0).to(ACC) * inv_tau
            xt = tl.load(t_base + kk[:, None].to(tl.int64) * t_sk, mask=lm, other=0.0).to(ACC) * inv_tau
            xs = tl.where(kin[:, None], xs, float("-inf"))
            xt = tl.where(kin[:, None], xt, float("-inf"))
            new_m_s = tl.maximum(m_s, tl.max(xs, axis=0))
            new_m_t = tl.maximum(m_t, tl.max(xt, axis=0))
            alpha_t = tl.exp(m_t - new_m_t)
            e_t = tl.exp(xt - new_m_t[None, :])
            l_s = l_s * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(xs - new_m_s[None, :]), axis=0)
            l_t = l_t * alpha_t + tl.sum(e_t, axis=0)
            acc = acc * alpha_t + tl.sum(tl.where(kin[:, None], e_t * (xt - xs), 0.0), axis=0)
            m_s = new_m_s
            m_t = new_m_t
        # a sum of 0 means all K logits are -inf: the reference's softmax is exp(-inf - -inf) = NaN,
        # so make the sum NaN (one select per pixel), which carries into the KL and the gradient
        l_s = tl.where(l_s == 0.0, float("nan"), l_s)
        l_t = tl.where(l_t == 0.0, float("nan"), l_t)

    # lse_s - lse_t by parts (max, then log-sum), and probabilities as exp(x - max) / sum: with
    # logits of 1e4, m + log(l) in fp32 would round log(l), and every probability with it, to 1e-3
    inv_l_s = 1.0 / l_s
    inv_l_t = 1.0 / l_t
    kl = acc * inv_l_t + (m_s - m_t) + (tl.log(l_s) - tl.log(l_t))
    kl = tl.where(valid, kl, 0.0)
    gap = tl.maximum(kl, 0.0, propagate_nan=tl.PropagateNan.ALL)  # a NaN gap stays NaN (torch.clamp_min)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + n * P + pix, mask=valid, other=0.0).to(ACC)
        wkl = tl.where(valid, w * kl, 0.0)
    else:
        wkl = kl
    if WRITE_KL:
        tl.store(kl_ptr + n * P + pix, kl.to(kl_ptr.dtype.element_ty), mask=inside)
    slot = (n * tl.num_programs(0) + pid_p) * 3
    tl.store(part_ptr + slot, tl.sum(wkl, axis=0))
    tl.store(part_ptr + slot + 1, tl.sum(gap, axis=0))
    tl.store(part_ptr + slot + 2, tl.sum(gap * kl, axis=0))

    if WRITE_GRAD:
        # coef_p = tau * w_p / max(1, #valid), 0 at ignored pixels; w_p = gap_p / mean gap for pfs
        count = tl.cast(total, ACC)
        if HAS_MASK:
            count = count - tl.load(n_ign_ptr).to(ACC)
        coef = (tl.cast(tau_hi, ACC) + tl.cast(tau_lo, ACC)) / tl.maximum(count, 1.0)
        if GAP_WEIGHT:
            coef = coef * (gap / tl.load(mean_gap_ptr))
        elif HAS_WEIGHT:
            coef = coef * w
        coef = tl.where(valid, coef, 0.0)
        ds_base = ds_ptr + n * K * P + pix[None, :]
        if ONE_TILE:
            ds = coef[None, :] * (e_s * inv_l_s[None, :] - e_t * inv_l_t[None, :])
            sm = kin[:, None] & inside[None, :]
            tl.store(ds_base + ks[:, None].to(tl.int64) * P, ds.to(ds_ptr.dtype.element_ty), mask=sm)
        else:
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + ks
                kin = kk < K
                lm = kin[:, None] & valid[None, :]
                xs = tl.load(s_base + kk[:, None].to(tl.int64) * s_sk, mask=lm, other=0.0).to(ACC) * inv_tau
                xt = tl.load(t_base + kk[:, None].to(tl.int64) * t_sk, mask=lm, other=0.0).to(ACC) * inv_tau
                # masked class lanes hold 0 here (not stored); x - max <= 0 for the others
                p_s = tl.exp(tl.where(kin[:, None], xs - m_s[None, :], NEG)) * inv_l_s[None, :]
                p_t = tl.exp(tl.where(kin[:, None], xt - m_t[None, :], NEG)) * inv_l_t[None, :]
                ds = coef[None, :] * (p_s - p_t)
                sm = kin[:, None] & inside[None, :]
                tl.store(ds_base + kk[:, None].to(tl.int64) * P, ds.to(ds_ptr.dtype.element_ty), mask=sm)


@triton.jit
def _pixel_kd_finalize_kernel(part_ptr, programs, n_ign_ptr, total, tau_sq_hi, tau_sq_lo, loss_ptr, mean_gap_ptr,
                              HAS_MASK: tl.constexpr, GAP_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
                              ACC: tl.constexpr, TINY: tl.constexpr):
    """One program: the partial sums to the loss (and the mean gap of pfs_pixel_kd), so the scalar
    epilogue is one launch instead of a chain of small torch ops."""
    lanes = tl.arange(0, BLOCK)
    sum_wkl = tl.zeros([BLOCK], ACC)
    sum_gap = tl.zeros([BLOCK], ACC)
    sum_gap_kl = tl.zeros([BLOCK], ACC)
    for start in range(0, programs, BLOCK):
        rows = (start + lanes).to(tl.int64)
        inside = rows < programs
        sum_wkl += tl.load(part_ptr + rows * 3, mask=inside, other=0.0)
        sum_gap += tl.load(part_ptr + rows * 3 + 1, mask=inside, other=0.0)
        sum_gap_kl += tl.load(part_ptr + rows * 3 + 2, mask=inside, other=0.0)
    count = tl.cast(total, ACC)
    if HAS_MASK:
        count = count - tl.load(n_ign_ptr).to(ACC)
    count = tl.maximum(count, 1.0)
    tau_sq = tl.cast(tau_sq_hi, ACC) + tl.cast(tau_sq_lo, ACC)
    if GAP_WEIGHT:
        # the reference clamps the mean gap at the smallest normal number: all gaps 0 -> weights 0
        mean_gap = tl.maximum(tl.sum(sum_gap, axis=0) / count, TINY, propagate_nan=tl.PropagateNan.ALL)
        tl.store(mean_gap_ptr, mean_gap)
        loss = tl.sum(sum_gap_kl, axis=0) / mean_gap / count * tau_sq
    else:
        loss = tl.sum(sum_wkl, axis=0) / count * tau_sq
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))










def _blocks(k: int, p: int) -> tuple[int, int, bool, int]:
    """(BLOCK_K, BLOCK_P, one_tile, num_warps): one warp per program and _WARP_TILE logits per
    tensor (16 per thread). With one warp the class axis of a tile lies inside the warp: every
    reduction over classes is registers and shuffles, never shared memory and barriers (with
    several warps, Triton puts the pixels of a 128-pixel tile in one warp and the classes across
    warps). The pixels of the tile are spread over the warp's lanes, and the many small programs
    (N * H*W / BLOCK_P) fill the GPU."""
    one_tile = k <= _MAX_BLOCK_K
    block_k = max(2, next_power_of_2(k)) if one_tile else _LOOP_BLOCK_K
    block_p = max(16, min(next_power_of_2(p), _WARP_TILE // block_k))
    return block_k, block_p, one_tile, 1


def _launch(s, t, ignore_mask, weight, n_ignored, mean_gap, tau, *, gap_weight=False, write_grad=False,
            write_kl=False):
    """Runs the main kernel; returns (partials (programs, 3) in the compute dtype, ds or None, kl or None)."""
    n, k, h, w = s.shape
    p = h * w
    acc_torch = acc_torch_dtype(s.dtype)
    s, s_strides = flat_pixel_strides(s)
    t, t_strides = flat_pixel_strides(t)
    block_k, block_p, one_tile, warps = _blocks(k, p)
    grid = (cdiv(p, block_p), n)
    partials = torch.empty(n * grid[0], 3, dtype=acc_torch, device=s.device)
    ds = torch.empty((n, k, h, w), dtype=s.dtype, device=s.device) if write_grad else None
    kl = torch.empty((n, h, w), dtype=s.dtype, device=s.device) if write_kl else None
    # unused pointers get any non-empty tensor, here a one-element view of the partials (no
    # allocation, no launch, and the bytes model does not count the whole buffer for it): their
    # loads and stores are compiled out
    unused = partials.view(-1)[:1]
    ign = ignore_mask.contiguous().view(torch.uint8) if ignore_mask is not None else unused
    wt = weight.contiguous() if weight is not None else unused

    def _or(x):
        return x if x is not None else unused

    _pixel_kd_kernel[grid](
        s, t, ign, wt, _or(n_ignored), _or(mean_gap), _or(ds), _or(kl), partials, k, p, n * p, *s_strides,
        *t_strides, *fp32_split(1.0 / tau), *fp32_split(tau), BLOCK_K=block_k, BLOCK_P=block_p, ONE_TILE=one_tile,
        HAS_MASK=ignore_mask is not None, HAS_WEIGHT=weight is not None, GAP_WEIGHT=gap_weight,
        WRITE_GRAD=write_grad, WRITE_KL=write_kl, ACC=acc_dtype(acc_torch), NEG=_NEG, num_warps=warps, **FP_FUSION)
    return partials, ds, kl


def _finalize(student, partials, n_ignored, tau, *, gap_weight=False):
    """(loss in the student's dtype, mean gap (1,) in the compute dtype or None)."""
    n, _, h, w = student.shape
    loss = torch.empty((), dtype=student.dtype, device=student.device)
    mean_gap = torch.empty(1, dtype=partials.dtype, device=student.device) if gap_weight else None
    programs = partials.shape[0]
    _pixel_kd_finalize_kernel[(1,)](
        partials, programs, n_ignored if n_ignored is not None else partials, n * h * w, *fp32_split(tau * tau),
        loss, mean_gap if mean_gap is not None else partials, HAS_MASK=n_ignored is not None,
        GAP_WEIGHT=gap_weight, BLOCK=min(1024, max(16, next_power_of_2(programs))),
        ACC=acc_dtype(partials.dtype), TINY=_TINY, num_warps=4, **FP_FUSION)
    return loss, mean_gap


def _n_ignored(ignore_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Number of ignored pixels, on the device (int64, 0-dim): the kernels read it, nothing syncs."""
    return None if ignore_mask is None else ignore_mask.sum()


def _empty_grad(s: torch.Tensor) -> torch.Tensor:
    return torch.empty((0,), dtype=s.dtype, device=s.device)


@torch.library.custom_op("segkd::pixel_kd_triton", mutates_args=())
def pixel_kd_triton(student: torch.Tensor, teacher: torch.Tensor, tau: float, weight: torch.Tensor | None,
                    ignore_mask: torch.Tensor | None, needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ds): loss 0-dim in the student's dtype; ds = d loss / d student (grad_output 1) when
    needs_grad, else an empty tensor."""
    n_ignored = _n_ignored(ignore_mask)
    partials, ds, _ = _launch(student, teacher, ignore_mask, weight, n_ignored, None, tau, write_grad=needs_grad)
    loss, _ = _finalize(student, partials, n_ignored, tau)
    return loss, ds if ds is not None else _empty_grad(student)


@torch.library.custom_op("segkd::pfs_pixel_kd_triton", mutates_args=())
def pfs_pixel_kd_triton(student: torch.Tensor, teacher: torch.Tensor, tau: float, ignore_mask: torch.Tensor | None,
                        needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ds) of the gap-weighted pixel KD: pass 1 reduces, pass 2 (needs_grad) writes ds."""
    n_ignored = _n_ignored(ignore_mask)
    partials, _, _ = _launch(student, teacher, ignore_mask, None, n_ignored, None, tau)
    loss, mean_gap = _finalize(student, partials, n_ignored, tau, gap_weight=True)
    if not needs_grad:
        return loss, _empty_grad(student)
    _, ds, _ = _launch(student, teacher, ignore_mask, None, n_ignored, mean_gap, tau, gap_weight=True,
                       write_grad=True)
    return loss, ds


@torch.library.custom_op("segkd::knowledge_gap_triton", mutates_args=())
def knowledge_gap_triton(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """(N, H, W) per-pixel KL(teacher || student) in the student's dtype."""
    _, _, kl = _launch(student, teacher, None, None, None, None, tau, write_kl=True)
    return kl


@pixel_kd_triton.register_fake
def _(student, teacher, tau, weight, ignore_mask, needs_grad):
    return student.new_empty(()), student.new_empty(student.shape if needs_grad else (0,))


@pfs_pixel_kd_triton.register_fake
def _(student, teacher, tau, ignore_mask, needs_grad):
    return student.new_empty(()), student.new_empty(student.shape if needs_grad else (0,))


@knowledge_gap_triton.register_fake
def _(student, teacher, tau):
    n, _, h, w = student.shape
    return student.new_empty((n, h, w))


def _setup_context(ctx, inputs, output):
    _loss, ds = output
    ctx.mark_non_differentiable(ds)
    ctx.num_inputs = len(inputs)
    ctx.fused = ds.numel() > 0
    if ctx.fused:
        ctx.save_for_backward(ds)
        return
    # called with needs_grad=False: keep the inputs (tensors, or None, saved as such) to recompute ds
    ctx.tensor_slots = [i for i, x in enumerate(inputs) if x is None or isinstance(x, torch.Tensor)]
    ctx.other_inputs = {i: x for i, x in enumerate(inputs) if i not in ctx.tensor_slots}
    ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots))


def _make_backward(op):
    def backward(ctx, grad_loss, _grad_ds):
        nones = (None,) * ctx.num_inputs
        if grad_loss is None:
            return nones
        if ctx.fused:
            (ds,) = ctx.saved_tensors
        else:
            args = dict(ctx.other_inputs)
            args.update(zip(ctx.tensor_slots, ctx.saved_tensors))
            args[ctx.num_inputs - 1] = True  # needs_grad, the last argument
            _, ds = op(*(args[i] for i in range(ctx.num_inputs)))
        return (scale_saved_grad(ds, grad_loss) if ctx.fused else ds * grad_loss.to(ds.dtype),) + nones[1:]

    return backward


pixel_kd_triton.register_autograd(_make_backward(pixel_kd_triton), setup_context=_setup_context)
pfs_pixel_kd_triton.register_autograd(_make_backward(pfs_pixel_kd_triton), setup_context=_setup_context)


def _needs_grad(student: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and student.requires_grad


def pixel_kd(student, teacher, tau, weight=None, ignore_mask=None) -> torch.Tensor:
    weight = weight.detach() if weight is not None else None
    loss, _ = pixel_kd_triton(student, teacher.detach(), float(tau), weight, ignore_mask, _needs_grad(student))
    return loss


def pfs_pixel_kd(student, teacher, tau, ignore_mask=None) -> torch.Tensor:
    loss, _ = pfs_pixel_kd_triton(student, teacher.detach(), float(tau), ignore_mask, _needs_grad(student))
    return loss


def knowledge_gap(student, teacher, tau) -> torch.Tensor:
    return knowledge_gap_triton(student.detach(), teacher.detach(), float(tau))
