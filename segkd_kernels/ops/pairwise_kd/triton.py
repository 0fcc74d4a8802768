"""pairwise_kd in Triton: the exact Gram identity (docs/losses.md 3) with fused per-pixel normalisation.

Per image, with A = [a_p] (P x C_s) and B = [b_p] (P x C_t) the unit pixel features:
    loss = (||A^T A||_F^2 - 2 ||A^T B||_F^2 + ||B^T B||_F^2) / (N P^2)
    dA   = 4 g / (N P^2) * (A (A^T A) - B (B^T A)),  then through a_p = s_p / max(||s_p||, eps)

Kernels, all reading the features in their natural (N, C, P) layout (pixels contiguous):
  _norm_kernel      per-pixel L2 norm over the channels (fp64), one program per (image, pixel block)
  _gram_kernel      X^T Y for X, Y in {A, B}: one program per (image, C_x tile, C_y tile) streams
                    the pixels, normalising on load; fp64 operands and accumulator; A^T A and B^T B
                    compute the tiles on and above the diagonal only
  _grad_kernel      dA^T = scale * (G_aa A^T - G_ab B^T): one program per (image, C_s tile, pixel tile)
  _norm_bwd_kernel  ds = (dA - a (a . dA)) / ||s|| (or dA / ||s|| with detach_norm), per pixel block

Why fp64 Gram accumulation: the three terms are each ~P^2/C while the loss can be 1e-7 of that
(student = teacher + small noise). fp32 accumulation of the Gram entries, even combined in fp64,
is then off by 2-10% (python_tests/test_pairwise_kd.py::test_near_cancellation_fp32); chunked fp32
partials or Kahan sums only shave a factor of a few off an error that must shrink ~1000x. Products
of fp32-exact values are exact in fp64, so fp64 accumulation makes the Gram entries (and the
combination) accurate to ~1e-15. The cost is O(P C^2), against O(P^2 C) for the materialising
form, so even at fp64 rate it is far cheaper on a data-centre GPU (H100/H200 fp64 tensor cores).
The three Frobenius norms and their combination are C x C reductions done with torch in fp64
(negligible work, and torch's reductions are pairwise-summed).

The backward's two products do not cancel catastrophically (the gradient is O(noise) with fp32
error O(eps) relative to the terms), so they run with fp32 operands and accumulators (fp64 for fp64
inputs), TF32 off. fp16/bf16 inputs are upcast on load (the interpreter's bf16 tl.dot is wrong, and
this op is not tensor-core bound anyway).
"""

import torch
import triton
import triton.language as tl

from .._triton_common import FP_FUSION, acc_dtype, acc_torch_dtype

from ..._backends import TRITON_INTERPRET

NORM_EPS = 1e-12  # as F.normalize: a_p = s_p / max(||s_p||, eps)


@triton.jit
def _norm_kernel(x_ptr, norm_ptr, C, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    base = x_ptr + n * C * P
    acc = tl.zeros([BLOCK_P], dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (offs_c[:, None] < C) & mask_p[None, :]
        x = tl.load(base + offs_c[:, None] * P + offs_p[None, :], mask=mask, other=0.0).to(tl.float64)
        acc += tl.sum(x * x, axis=0)
    tl.store(norm_ptr + n * P + offs_p, tl.sqrt(acc), mask=mask_p)


@triton.jit
def _gram_kernel(x_ptr, xnorm_ptr, y_ptr, ynorm_ptr, g_ptr, CX, CY, P, eps,
                 BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, SYMMETRIC: tl.constexpr):
    """g[n, i, j] = sum_p x[n, i, p] y[n, j, p] / (max(|x_p|, eps) max(|y_p|, eps)), all in fp64.
    SYMMETRIC (x is y): only tiles on or above the diagonal are computed; the caller mirrors them."""
    n = tl.program_id(0).to(tl.int64)
    # Skipped tiles loop zero times and store zeros, replaced by the mirror image on the host side
    # (no early return: plain control flow).
    p_end = tl.program_id(0) * 0 + P
    if SYMMETRIC:
        p_end = tl.where(tl.program_id(2) < tl.program_id(1), 0, p_end)
    offs_i = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(2).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < CX
    mask_j = offs_j < CY
    x_base = x_ptr + n * CX * P
    y_base = y_ptr + n * CY * P
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float64)
    for p0 in range(0, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        mask_p = offs_p < P
        # other=1 keeps masked pixels finite; their features load as 0, so they add nothing
        x_inv = 1.0 / tl.maximum(tl.load(xnorm_ptr + n * P + offs_p, mask=mask_p, other=1.0), eps,
                                 propagate_nan=tl.PropagateNan.ALL)
        y_inv = 1.0 / tl.maximum(tl.load(ynorm_ptr + n * P + offs_p, mask=mask_p, other=1.0), eps,
                                 propagate_nan=tl.PropagateNan.ALL)
        x = tl.load(x_base + offs_i[:, None] * P + offs_p[None, :], mask=mask_i[:, None] & mask_p[None, :],
                    other=0.0).to(tl.float64) * x_inv[None, :]
        y = tl.load(y_base + offs_j[:, None] * P + offs_p[None, :], mask=mask_j[:, None] & mask_p[None, :],
                    other=0.0).to(tl.float64) * y_inv[None, :]
        acc += tl.dot(x, tl.trans(y), input_precision="ieee", out_dtype=tl.float64)
    tl.store(g_ptr + n * CX * CY + offs_i[:, None] * CY + offs_j[None, :], acc,
             mask=mask_i[:, None] & mask_j[None, :])


@triton.jit
def _grad_kernel(gaa_ptr, gab_ptr, s_ptr, snorm_ptr, t_ptr, tnorm_ptr, da_ptr, grad_ptr, CS, CT, P, eps, scale,
                 BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """da[n, c, p] = grad * scale * (sum_k G_aa[c, k] a[k, p] - sum_k G_ab[c, k] b[k, p]). The upstream
    gradient is read from memory: no host sync, and nothing data-dependent for torch.compile."""
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.program_id(2).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < CS
    mask_p = offs_p < P
    s_inv = (1.0 / tl.maximum(tl.load(snorm_ptr + n * P + offs_p, mask=mask_p, other=1.0), eps,
                              propagate_nan=tl.PropagateNan.ALL)).to(ACC_DTYPE)
    t_inv = (1.0 / tl.maximum(tl.load(tnorm_ptr + n * P + offs_p, mask=mask_p, other=1.0), eps,
                              propagate_nan=tl.PropagateNan.ALL)).to(ACC_DTYPE)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC_DTYPE)
    for k0 in range(0, CS, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < CS
        g = tl.load(gaa_ptr + n * CS * CS + offs_c[:, None] * CS + offs_k[None, :],
                    mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(ACC_DTYPE)
        a = tl.load(s_ptr + n * CS * P + offs_k[:, None] * P + offs_p[None, :],
                    mask=mask_k[:, None] & mask_p[None, :], other=0.0).to(ACC_DTYPE) * s_inv[None, :]
        acc += tl.dot(g, a, input_precision="ieee")
    for k0 in range(0, CT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < CT
        g = tl.load(gab_ptr + n * CS * CT + offs_c[:, None] * CT + offs_k[None, :],
                    mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(ACC_DTYPE)
        b = tl.load(t_ptr + n * CT * P + offs_k[:, None] * P + offs_p[None, :],
                    mask=mask_k[:, None] & mask_p[None, :], other=0.0).to(ACC_DTYPE) * t_inv[None, :]
        acc -= tl.dot(g, b, input_precision="ieee")
    g_out = tl.load(grad_ptr).to(ACC_DTYPE) * scale
    tl.store(da_ptr + n * CS * P + offs_c[:, None] * P + offs_p[None, :], acc * g_out,
             mask=mask_c[:, None] & mask_p[None, :])


@triton.jit
def _norm_bwd_kernel(s_ptr, snorm_ptr, da_ptr, ds_ptr, C, P, eps, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                     DETACH_NORM: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """ds = (da - a (a . da)) / max(|s|, eps); the projection drops out where the norm is clamped
    (there the divisor is the constant eps) or detached."""
    n = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    norm = tl.load(snorm_ptr + n * P + offs_p, mask=mask_p, other=1.0)
    inv = (1.0 / tl.maximum(norm, eps, propagate_nan=tl.PropagateNan.ALL)).to(ACC_DTYPE)
    base = n * C * P
    radial = tl.zeros([BLOCK_P], dtype=ACC_DTYPE)
    if not DETACH_NORM:
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = (offs_c[:, None] < C) & mask_p[None, :]
            idx = base + offs_c[:, None] * P + offs_p[None, :]
            a = tl.load(s_ptr + idx, mask=mask, other=0.0).to(ACC_DTYPE) * inv[None, :]
            da = tl.load(da_ptr + idx, mask=mask, other=0.0).to(ACC_DTYPE)
            radial += tl.sum(a * da, axis=0)
        radial = tl.where(norm >= eps, radial, 0.0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (offs_c[:, None] < C) & mask_p[None, :]
        idx = base + offs_c[:, None] * P + offs_p[None, :]
        a = tl.load(s_ptr + idx, mask=mask, other=0.0).to(ACC_DTYPE) * inv[None, :]
        da = tl.load(da_ptr + idx, mask=mask, other=0.0).to(ACC_DTYPE)
        ds = (da - a * radial[None, :]) * inv[None, :]
        tl.store(ds_ptr + idx, ds.to(ds_ptr.dtype.element_ty), mask=mask)




def _tile(c: int, cap: int) -> int:
    """Channel tile: tl.dot wants >= 16; no wider than the (power-of-two rounded) channel count."""
    return max(16, min(cap, triton.next_power_of_2(c)))


# Pixel tiles: wide under the interpreter (its cost is per block operation, not per element).
_BLOCK_P = 256 if TRITON_INTERPRET else 64
_GRAM_TILE = 128 if TRITON_INTERPRET else 64
_GRAD_TILE_C = 128 if TRITON_INTERPRET else 64
_GRAD_TILE_K = 128 if TRITON_INTERPRET else 32


def _norms(x: torch.Tensor) -> torch.Tensor:
    n, c, p = x.shape
    norm = torch.empty(n, p, dtype=torch.float64, device=x.device)
    block_c = min(triton.next_power_of_2(c), 32)
    _norm_kernel[(n, triton.cdiv(p, _BLOCK_P))](x, norm, c, p, BLOCK_C=block_c, BLOCK_P=_BLOCK_P, **FP_FUSION)
    return norm


_GRAM_UPCAST_16BIT = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9)


def _gram(x, xnorm, y=None, ynorm=None) -> torch.Tensor:
    """X^T Y per image (fp64); X^T X when y is None, computing the upper tiles only."""
    symmetric = y is None
    if _GRAM_UPCAST_16BIT:
        # Triton before 3.9 fails to lower an fp64 tl.dot whose operands were loaded as 16-bit
        # (ConvertTritonGPUToLLVM, sm_80 and sm_90; 3.6 seen): give it fp32 operands instead.
        x = x.float() if x.element_size() == 2 else x
        y = y.float() if y is not None and y.element_size() == 2 else y
    if symmetric:
        y, ynorm = x, xnorm
    n, cx, p = x.shape
    cy = y.shape[1]
    g = torch.empty(n, cx, cy, dtype=torch.float64, device=x.device)
    bi, bj = _tile(cx, _GRAM_TILE), _tile(cy, _GRAM_TILE)
    block_p = 128 if TRITON_INTERPRET else 32
    _gram_kernel[(n, triton.cdiv(cx, bi), triton.cdiv(cy, bj))](
        x, xnorm, y, ynorm, g, cx, cy, p, NORM_EPS, BLOCK_I=bi, BLOCK_J=bj, BLOCK_P=block_p, SYMMETRIC=symmetric,
        **FP_FUSION)
    if symmetric:  # fill the skipped tiles (tile row > tile column) from their mirror images
        tile = torch.arange(cx, device=x.device) // bi
        below = tile[:, None] > tile[None, :]
        g = torch.where(below, g.transpose(1, 2), g)
    return g


@torch.library.custom_op("segkd::pairwise_kd_triton", mutates_args=())
def pairwise_kd_triton(s: torch.Tensor, t: torch.Tensor, detach_norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor]:
    """(loss in s's dtype, G_aa, G_ab, |s_p|, |t_p|), the last four fp64 and kept for the backward.
    s: (N, C_s, P), t: (N, C_t, P); detach_norm only changes the backward."""
    s, t = s.contiguous(), t.contiguous()
    n, _, p = s.shape
    snorm, tnorm = _norms(s), _norms(t)
    gaa = _gram(s, snorm)
    gab = _gram(s, snorm, t, tnorm)
    gbb = _gram(t, tnorm)
    # torch's sum is pairwise, in fp64: the near-cancelling combination keeps its accuracy
    total = gaa.square().sum() - 2.0 * gab.square().sum() + gbb.square().sum()
    loss = (total / (n * p * p)).to(s.dtype)
    return loss, gaa, gab, snorm, tnorm


@torch.library.custom_op("segkd::pairwise_kd_backward_triton", mutates_args=())
def pairwise_kd_backward_triton(grad: torch.Tensor, s: torch.Tensor, t: torch.Tensor, gaa: torch.Tensor,
                                gab: torch.Tensor, snorm: torch.Tensor, tnorm: torch.Tensor,
                                detach_norm: bool) -> torch.Tensor:
    s, t = s.contiguous(), t.contiguous()
    n, cs, p = s.shape
    ct = t.shape[1]
    acc = acc_torch_dtype(s.dtype)
    scale = 4.0 / (n * p * p)
    da = torch.empty(n, cs, p, dtype=acc, device=s.device)
    block_c = _tile(cs, _GRAD_TILE_C)
    block_k = _GRAD_TILE_K
    _grad_kernel[(n, triton.cdiv(cs, block_c), triton.cdiv(p, _BLOCK_P))](
        gaa.to(acc).contiguous(), gab.to(acc).contiguous(), s, snorm, t, tnorm, da, grad.contiguous(), cs, ct, p, NORM_EPS, scale,
        BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_P=_BLOCK_P, ACC_DTYPE=acc_dtype(s.dtype), **FP_FUSION)
    ds = torch.empty_like(s)
    _norm_bwd_kernel[(n, triton.cdiv(p, _BLOCK_P))](
        s, snorm, da, ds, cs, p, NORM_EPS, BLOCK_C=min(triton.next_power_of_2(cs), 32), BLOCK_P=_BLOCK_P,
        DETACH_NORM=bool(detach_norm), ACC_DTYPE=acc_dtype(s.dtype), **FP_FUSION)
    return ds


@pairwise_kd_triton.register_fake
def _(s, t, detach_norm):
    n, cs, p = s.shape
    ct = t.shape[1]
    f64 = dict(dtype=torch.float64, device=s.device)
    return (s.new_empty(()), s.new_empty(n, cs, cs, **f64), s.new_empty(n, cs, ct, **f64),
            s.new_empty(n, p, **f64), s.new_empty(n, p, **f64))


@pairwise_kd_backward_triton.register_fake
def _(grad, s, t, gaa, gab, snorm, tnorm, detach_norm):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    s, t, detach_norm = inputs
    _loss, gaa, gab, snorm, tnorm = output
    ctx.save_for_backward(s, t, gaa, gab, snorm, tnorm)
    ctx.detach_norm = detach_norm


def _backward(ctx, grad_loss, *_unused):
    s, t, gaa, gab, snorm, tnorm = ctx.saved_tensors
    ds = pairwise_kd_backward_triton(grad_loss, s, t, gaa, gab, snorm, tnorm, ctx.detach_norm)
    return ds, None, None


pairwise_kd_triton.register_autograd(_backward, setup_context=_setup_context)
