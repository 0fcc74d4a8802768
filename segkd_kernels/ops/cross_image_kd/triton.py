"""cross_image_kd in Triton: FlashAttention-2-style streaming kernels (docs/losses.md 4).

Inputs are the unit pixel features in pixel-major layout, a: (N, P, C_s), b: (N, P, C_t) (the
normalisation and its gradient stay in torch, O(N P C)). No P x P matrix is ever stored. The channel
counts are compile-time constants (one compile per (C_s, C_t), as FlashAttention per head size).

Forward, one program per (block of BLOCK_M rows of image i, partner image j). The row tiles of image
i, a_i (BLOCK_M, C_s) and b_i (BLOCK_M, C_t), are loaded once and stay resident for the whole loop
over the partner's pixels; that partner loop is the software-pipelined loop (num_stages), each step
loading one (BLOCK_N, C) tile of a_j and b_j and building the S and T tiles with one tl.dot each.
Per row it keeps the running max and sum-exp of S and of T plus the rescaled accumulator
sum exp(T - m_T) (T - S); per row
    KL = acc / l_T - (m_T + log l_T) + (m_S + log l_S).
It writes the row KL and the two log-sum-exps (N, N, P): the only saved state.

Backward, one program per (block of BLOCK_M rows of image i [x channel tile], partner j), with the
row tiles resident in the same way: each S/T tile is computed once and gives
    dS = (exp(S - lse_S) - exp(T - lse_T)) * g / (P N^2 tau),
    rows side:    dA_i[rows] += dS a_j[cols]   (accumulated in registers over the partner loop)
    columns side: dA_j[cols] += dS^T a_i[rows] (added to dA_j per tile with fp32 atomics),
so the backward executes exactly the algorithm's FLOPs (2 recomputed products + 2 gradient
products per tile). The atomics make the fp32 gradient's last bits depend on the order in which
programs finish (not bitwise reproducible run to run on a GPU); a deterministic column pass would
recompute every tile a second time (1.375x the FLOPs at C_s = 128, C_t = 256).

Channel counts past RESIDENT_CHANNELS (C_s + C_t padded to powers of two), and fp32 / fp64 on a GPU
(their resident tiles would spill, see _plan): the S/T products loop over BLOCK_K channel blocks per
tile (reloading the row chunks from L1/L2); past 256 student channels the backward splits C_s into
BLOCK_D tiles (a grid axis), recomputing S/T per channel tile.

Masking: a padded partner column gets a -1e30 bias on S and T, so its exp is exactly 0 and T - S is
0 (no select per element); padded rows read zero features and zero log-sum-exps, whose dS is
exp(0) - exp(0) = 0.

Precision: fp32 operands go through input_precision="tf32x3" (three TF32 tensor-core products with
the operands split hi + lo, fp32-level accuracy); fp16/bf16 operands go to tl.dot as they are on a
GPU (tensor cores, fp32 accumulation; dS is rounded to the operand dtype for the two gradient
products, as FlashAttention does) and are upcast under the interpreter, where bf16 tl.dot is
wrong; exp/log and all running statistics are fp32 (fp64 for fp64 inputs).
"""

import torch
import triton
import triton.language as tl

from ..._backends import TRITON_INTERPRET
from .._triton_common import FP_FUSION, cdiv, next_power_of_2

# Largest padded C_s + C_t whose row tiles stay resident (a (128, 384) bf16 pair is 96 KB).
RESIDENT_CHANNELS = 512
MASK_BIAS = tl.constexpr(-1e30)  # added to padded partner columns: exp underflows to exactly 0, finite T - S


@triton.jit
def _tile(x_ptr, base, offs_p, mask_p, k0, C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """x[offs_p, k0:k0 + BLOCK_K] of a pixel-major (P, C) image at x_ptr + base, zero-padded."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(x_ptr + base + offs_p[:, None] * C + offs_k[None, :],
                   mask=mask_p[:, None] & (offs_k[None, :] < C), other=0.0).to(DOT_DTYPE)


@triton.jit
def _logits(x_ptr, x_base, offs_x, mask_x, y_ptr, y_base, offs_y, mask_y, C: tl.constexpr,
            BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """x[offs_x, :] . y[offs_y, :]^T over C channels in BLOCK_K blocks (wide channels only)."""
    acc = tl.zeros([offs_x.shape[0], offs_y.shape[0]], dtype=ACC_DTYPE)
    for k0 in range(0, C, BLOCK_K):
        x = _tile(x_ptr, x_base, offs_x, mask_x, k0, C, BLOCK_K, DOT_DTYPE)
        y = _tile(y_ptr, y_base, offs_y, mask_y, k0, C, BLOCK_K, DOT_DTYPE)
        acc += tl.dot(x, tl.trans(y), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _partner_logits(a_ptr, b_ptr, a_i, b_i, base_is, base_it, base_js, base_jt, offs_m, mask_m, offs_n, mask_n,
                    CS: tl.constexpr, CT: tl.constexpr, KS: tl.constexpr, KT: tl.constexpr, RESIDENT: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """(S, T, a_j): the raw logit blocks of rows offs_m of image i against pixels offs_n of image j.
    RESIDENT: from the resident row tiles a_i, b_i and the partner's whole tiles (a_j, all C_s
    channels, is returned for the backward); otherwise streamed over channel blocks (a_j is 0)."""
    if RESIDENT:
        a_j = _tile(a_ptr, base_js, offs_n, mask_n, 0, CS, KS, DOT_DTYPE)
        b_j = _tile(b_ptr, base_jt, offs_n, mask_n, 0, CT, KT, DOT_DTYPE)
        s = tl.dot(a_i, tl.trans(a_j), input_precision=PRECISION, out_dtype=ACC_DTYPE)
        t = tl.dot(b_i, tl.trans(b_j), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    else:
        a_j = 0
        s = _logits(a_ptr, base_is, offs_m, mask_m, a_ptr, base_js, offs_n, mask_n, CS, KS,
                    DOT_DTYPE, ACC_DTYPE, PRECISION)
        t = _logits(b_ptr, base_it, offs_m, mask_m, b_ptr, base_jt, offs_n, mask_n, CT, KT,
                    DOT_DTYPE, ACC_DTYPE, PRECISION)
    return s, t, a_j


@triton.jit
def online_lse_step(s, t, m_s, m_t, l_s, l_t, acc):
    """One partner block of the streaming row statistics (shared with memory_contrast_kd): s, t are
    the (rows, block) logits with masked columns at a large negative finite value (exp gives 0 and
    t - s stays finite); m_* the running maxima, l_* the rescaled sums of exp, acc the rescaled sum
    of exp(t - m_t) (t - s). Returns the updated (m_s, m_t, l_s, l_t, acc)."""
    m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
    m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
    e_s = tl.exp(s - m_s_new[:, None])
    e_t = tl.exp(t - m_t_new[:, None])
    alpha_t = tl.exp(m_t - m_t_new)
    l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(e_s, axis=1)
    l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
    acc = acc * alpha_t + tl.sum(e_t * (t - s), axis=1)
    return m_s_new, m_t_new, l_s, l_t, acc


@triton.jit
def online_lse_finish(m_s, m_t, l_s, l_t, acc):
    """(KL of each row, log-sum-exp of s, log-sum-exp of t) from the final statistics."""
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    return acc / l_t - lse_t + lse_s, lse_s, lse_t


@triton.jit
def _fwd_kernel(a_ptr, b_ptr, kl_ptr, lse_s_ptr, lse_t_ptr, N, P, inv_tau,
                CS: tl.constexpr, CT: tl.constexpr, KS: tl.constexpr, KT: tl.constexpr, RESIDENT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    i = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < P
    base_is, base_it = i * P * CS, i * P * CT
    base_js, base_jt = j * P * CS, j * P * CT
    if RESIDENT:  # KS, KT: C_s, C_t padded to powers of two; loaded once for the whole partner loop
        a_i = _tile(a_ptr, base_is, offs_m, mask_m, 0, CS, KS, DOT_DTYPE)
        b_i = _tile(b_ptr, base_it, offs_m, mask_m, 0, CT, KT, DOT_DTYPE)
    else:  # _partner_logits streams the rows' channels itself
        a_i = 0
        b_i = 0
    # Finite start values: the first block (never fully masked) replaces them, and no inf - inf.
    m_s = tl.full([BLOCK_M], -1e30, dtype=ACC_DTYPE)
    m_t = tl.full([BLOCK_M], -1e30, dtype=ACC_DTYPE)
    l_s = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    l_t = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for n0 in range(0, P, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < P
        s, t, _a_j = _partner_logits(a_ptr, b_ptr, a_i, b_i, base_is, base_it, base_js, base_jt, offs_m, mask_m,
                                     offs_n, mask_n, CS, CT, KS, KT, RESIDENT, DOT_DTYPE, ACC_DTYPE, PRECISION)
        bias = tl.where(mask_n, 0.0, MASK_BIAS).to(ACC_DTYPE)[None, :]
        m_s, m_t, l_s, l_t, acc = online_lse_step(s * inv_tau + bias, t * inv_tau + bias, m_s, m_t, l_s, l_t, acc)
    kl, lse_s, lse_t = online_lse_finish(m_s, m_t, l_s, l_t, acc)
    out = (i * N + j) * P + offs_m
    tl.store(kl_ptr + out, kl, mask=mask_m)
    tl.store(lse_s_ptr + out, lse_s, mask=mask_m)
    tl.store(lse_t_ptr + out, lse_t, mask=mask_m)


@triton.jit
def _bwd_kernel(a_ptr, b_ptr, lse_s_ptr, lse_t_ptr, grad_ptr, da_ptr, N, P, inv_tau, scale,
                CS: tl.constexpr, CT: tl.constexpr, KS: tl.constexpr, KT: tl.constexpr, RESIDENT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    i = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2).to(tl.int64)
    D_TILES: tl.constexpr = (CS + BLOCK_D - 1) // BLOCK_D
    offs_m = (tl.program_id(0) // D_TILES).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < P
    d0 = (tl.program_id(0) % D_TILES) * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < CS
    base_is, base_it = i * P * CS, i * P * CT
    base_js, base_jt = j * P * CS, j * P * CT
    if RESIDENT:  # BLOCK_D == KS: the row tile is also the columns side's operand
        a_i = _tile(a_ptr, base_is, offs_m, mask_m, 0, CS, KS, DOT_DTYPE)
        b_i = _tile(b_ptr, base_it, offs_m, mask_m, 0, CT, KT, DOT_DTYPE)
        a_id = a_i
    else:
        a_i = 0  # _partner_logits streams the rows' channels itself
        b_i = 0
        a_id = _tile(a_ptr, base_is, offs_m, mask_m, d0, CS, BLOCK_D, DOT_DTYPE)
    rows = (i * N + j) * P + offs_m
    lse_s = tl.load(lse_s_ptr + rows, mask=mask_m, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=mask_m, other=0.0)
    # d loss / d S_ij = (p_S - p_T) * g / (P N^2); the 1 / tau of S = a_i^T a_j / tau is in scale
    coef = tl.load(grad_ptr).to(ACC_DTYPE) * scale
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for n0 in range(0, P, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < P
        s, t, a_j = _partner_logits(a_ptr, b_ptr, a_i, b_i, base_is, base_it, base_js, base_jt, offs_m, mask_m,
                                    offs_n, mask_n, CS, CT, KS, KT, RESIDENT, DOT_DTYPE, ACC_DTYPE, PRECISION)
        if RESIDENT:
            a_jd = a_j
        else:
            a_jd = _tile(a_ptr, base_js, offs_n, mask_n, d0, CS, BLOCK_D, DOT_DTYPE)
        bias = tl.where(mask_n, 0.0, MASK_BIAS).to(ACC_DTYPE)[None, :]
        # p_S - p_T in [-1, 1] goes to the products unscaled: coef (about 1e-5 / P) would push fp16
        # operands into underflow; it scales the products' results instead
        d_s = (tl.exp(s * inv_tau + bias - lse_s[:, None]) - tl.exp(t * inv_tau + bias - lse_t[:, None]))
        d_s = d_s.to(DOT_DTYPE)
        acc += tl.dot(d_s, a_jd, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        d_col = tl.dot(tl.trans(d_s), a_id, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        tl.atomic_add(da_ptr + base_js + offs_n[:, None] * CS + offs_d[None, :], d_col * coef,
                      mask=mask_n[:, None] & mask_d[None, :], sem="relaxed")
    tl.atomic_add(da_ptr + base_is + offs_m[:, None] * CS + offs_d[None, :], acc * coef,
                  mask=mask_m[:, None] & mask_d[None, :], sem="relaxed")


def dot_types(dtype: torch.dtype, fp32_precision: str):
    """(DOT_DTYPE, ACC_DTYPE, PRECISION, torch accumulation dtype) of the streaming-softmax kernels
    (shared with memory_contrast_kd): fp64 in fp64, fp32 (and everything under the interpreter) in
    fp32 with fp32_precision for tl.dot, fp16/bf16 operands with fp32 accumulation."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee", torch.float64
    if dtype == torch.float32 or TRITON_INTERPRET:
        return tl.float32, tl.float32, fp32_precision, torch.float32
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), tl.float32, "ieee", torch.float32


def _types(dtype: torch.dtype):
    # tf32x3 on a GPU; the interpreter multiplies in fp32 whatever the precision says
    return dot_types(dtype, "tf32x3")


def _pad(c: int) -> int:
    return max(16, next_power_of_2(c))


def _plan(a: torch.Tensor, cs: int, ct: int, backward: bool = False) -> dict:
    """Tile sizes and launch options of the forward (or backward) kernel."""
    ks, kt = _pad(cs), _pad(ct)
    # fp32 / fp64 tiles are twice / four times as wide in bytes and tf32x3 splits every operand
    # into hi + lo in registers: resident (64, 384) fp32 row tiles spill (static report), so wide
    # dtypes stream channel blocks on a GPU; the interpreter runs both paths by channel count.
    resident = ks + kt <= RESIDENT_CHANNELS and (TRITON_INTERPRET or a.element_size() <= 2)
    if not resident:  # channel blocks of the S/T products, channel tiles of the backward
        ks, kt = min(ks, 64), min(kt, 64)
    if TRITON_INTERPRET:
        # the interpreter's cost is per block operation: wide tiles, no launch options
        return dict(KS=ks, KT=kt, RESIDENT=resident, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    if a.element_size() >= 4:
        # the backward's (64, 128) row and column gradient tiles need 8 warps to stay in registers
        # (a 256-channel gradient tile: 32 rows per program, or it spills)
        # (fp64: 32-row gradient tiles and 8 warps in the forward too, or they spill)
        fp64 = a.element_size() == 8
        rows = 32 if backward and (fp64 or _pad(cs) > 128) else 64
        return dict(KS=min(ks, 32), KT=min(kt, 32), RESIDENT=False, BLOCK_M=rows, BLOCK_N=16 if backward else 32,
                    num_warps=8 if backward or fp64 else 4, num_stages=1 if backward else 2)
    if ks + kt <= 384:
        # 128-row tiles on 8 warps (two warpgroups on sm_90), a 2-stage partner pipeline: 144 / 192 KB
        # of shared memory (sm_80 / sm_90 forward at C_s = 128, C_t = 256), no spills (static report)
        return dict(KS=ks, KT=kt, RESIDENT=resident, BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    # C_s + C_t up to 512: the 128-row pair (128 KB) and two partner stages would not fit in shared memory
    # (the backward's (64, C_s) gradient tile needs 8 warps to stay in registers)
    return dict(KS=ks, KT=kt, RESIDENT=resident, BLOCK_M=64, BLOCK_N=32, num_warps=8 if backward else 4,
                num_stages=2)


def _bwd_block_d(plan: dict, cs: int) -> int:
    """Student channels per backward program: all of them up to 256 (each S/T tile computed once),
    else 128-channel tiles (a grid axis; the S/T tiles are recomputed per tile)."""
    return plan["KS"] if plan["RESIDENT"] else (_pad(cs) if _pad(cs) <= 256 else 128)


@torch.library.custom_op("segkd::cross_image_kd_triton", mutates_args=())
def cross_image_kd_triton(a: torch.Tensor, b: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(loss in a's dtype, lse_S, lse_T (N, N, P) in the accumulation dtype).
    a: (N, P, C_s), b: (N, P, C_t) unit pixel features, same dtype."""
    a, b = a.contiguous(), b.contiguous()
    n, p, cs = a.shape
    ct = b.shape[2]
    dot_dtype, acc_dtype, precision, acc_torch = _types(a.dtype)
    kl = torch.empty(n, n, p, dtype=acc_torch, device=a.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    plan = _plan(a, cs, ct)
    _fwd_kernel[(cdiv(p, plan["BLOCK_M"]), n, n)](
        a, b, kl, lse_s, lse_t, n, p, 1.0 / tau, CS=cs, CT=ct, DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype,
        PRECISION=precision, **plan, **FP_FUSION)
    # fp64 sum: N^2 P row terms, summed once
    loss = (kl.sum(dtype=torch.float64) / (p * n * n)).to(a.dtype)
    return loss, lse_s, lse_t


@torch.library.custom_op("segkd::cross_image_kd_backward_triton", mutates_args=())
def cross_image_kd_backward_triton(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lse_s: torch.Tensor,
                                   lse_t: torch.Tensor, tau: float) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    n, p, cs = a.shape
    ct = b.shape[2]
    dot_dtype, acc_dtype, precision, acc_torch = _types(a.dtype)
    plan = _plan(a, cs, ct, backward=True)
    block_d = _bwd_block_d(plan, cs)
    # every program adds its rows' and its partner columns' contributions: zero start, acc dtype
    da = torch.zeros(a.shape, dtype=acc_torch, device=a.device)
    _bwd_kernel[(cdiv(p, plan["BLOCK_M"]) * cdiv(cs, block_d), n, n)](
        a, b, lse_s.contiguous(), lse_t.contiguous(), grad.contiguous(), da, n, p, 1.0 / tau,
        1.0 / (p * n * n * tau), CS=cs, CT=ct, BLOCK_D=block_d, DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype,
        PRECISION=precision, **plan, **FP_FUSION)
    return da.to(a.dtype)


@cross_image_kd_triton.register_fake
def _(a, b, tau):
    n, p, _ = a.shape
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.new_empty(()), a.new_empty(n, n, p, dtype=acc), a.new_empty(n, n, p, dtype=acc)


@cross_image_kd_backward_triton.register_fake
def _(grad, a, b, lse_s, lse_t, tau):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    a, b, tau = inputs
    _loss, lse_s, lse_t = output
    ctx.save_for_backward(a, b, lse_s, lse_t)
    ctx.tau = tau


def _backward(ctx, grad_loss, *_unused):
    a, b, lse_s, lse_t = ctx.saved_tensors
    return cross_image_kd_backward_triton(grad_loss, a, b, lse_s, lse_t, ctx.tau), None, None


cross_image_kd_triton.register_autograd(_backward, setup_context=_setup_context)
