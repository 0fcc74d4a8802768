"""cross_image_kd in Triton: a FlashAttention-style streaming kernel (docs/losses.md 4).

Inputs are the unit pixel features in pixel-major layout, a: (N, P, C_s), b: (N, P, C_t) (the
normalisation and its gradient stay in torch, O(N P C)). No P x P matrix is ever stored.

Forward, one program per (block of BLOCK_M rows of image i, partner image j): streams the partner's
pixels in blocks of BLOCK_N, builds the S and T tiles with tl.dot (looping over channel blocks, so
C from 1 to 2048 works with fixed registers), and keeps per row the running max and sum-exp of S and
of T plus the rescaled accumulator sum exp(T - m_T) (T - S). Per row:
    KL = acc / l_T - (m_T + log l_T) + (m_S + log l_S)
It writes the row KL and the two log-sum-exps (N, N, P): the only saved state.

Backward, one program per (block of pixels o of image k, tile of student channels), deterministic
(no atomics): with dS_qr = (exp(S - lse_S) - exp(T - lse_T)) * g / (P N^2 tau),
    rows side:    dA_k[o] += sum_q sum_partner dS_kq[o, partner] a_q[partner]
    columns side: dA_k[o] += sum_q sum_partner dS_qk[partner, o] a_q[partner]
so each program recomputes the tiles of both orientations (the row and column sides of the
FlashAttention-2 backward fused in one program; the columns side replaces the atomics of dQ).
With C_s wider than one channel tile the tiles are recomputed per channel tile.

Precision: fp32 operands use input_precision="ieee" (no TF32); fp16/bf16 operands go to tl.dot as
they are on a GPU (tensor cores, fp32 accumulation) and are upcast under the interpreter, where
bf16 tl.dot is wrong; exp/log and all running statistics are fp32 (fp64 for fp64 inputs).
"""

import torch
import triton
import triton.language as tl

from ..._backends import TRITON_INTERPRET
from .._triton_common import FP_FUSION


@triton.jit
def _logits(x_ptr, x_base, offs_x, mask_x, y_ptr, y_base, offs_y, mask_y, C,
            BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """x[offs_x, :] . y[offs_y, :]^T over C channels (pixel-major rows of length C)."""
    acc = tl.zeros([offs_x.shape[0], offs_y.shape[0]], dtype=ACC_DTYPE)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < C
        x = tl.load(x_ptr + x_base + offs_x[:, None] * C + offs_k[None, :], mask=mask_x[:, None] & mask_k[None, :],
                    other=0.0).to(DOT_DTYPE)
        y = tl.load(y_ptr + y_base + offs_y[:, None] * C + offs_k[None, :], mask=mask_y[:, None] & mask_k[None, :],
                    other=0.0).to(DOT_DTYPE)
        acc += tl.dot(x, tl.trans(y), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _fwd_kernel(a_ptr, b_ptr, kl_ptr, lse_s_ptr, lse_t_ptr, N, P, CS, CT, inv_tau,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    i = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < P
    # Finite start values: the first block (never fully masked) replaces them, and no inf - inf.
    m_s = tl.full([BLOCK_M], -1e30, dtype=ACC_DTYPE)
    m_t = tl.full([BLOCK_M], -1e30, dtype=ACC_DTYPE)
    l_s = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    l_t = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for n0 in range(0, P, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < P
        s = _logits(a_ptr, i * P * CS, offs_m, mask_m, a_ptr, j * P * CS, offs_n, mask_n, CS,
                    BLOCK_K, DOT_DTYPE, ACC_DTYPE, PRECISION) * inv_tau
        t = _logits(b_ptr, i * P * CT, offs_m, mask_m, b_ptr, j * P * CT, offs_n, mask_n, CT,
                    BLOCK_K, DOT_DTYPE, ACC_DTYPE, PRECISION) * inv_tau
        valid = mask_n[None, :]
        m_s_new = tl.maximum(m_s, tl.max(tl.where(valid, s, -1e30), axis=1))
        m_t_new = tl.maximum(m_t, tl.max(tl.where(valid, t, -1e30), axis=1))
        e_s = tl.where(valid, tl.exp(s - m_s_new[:, None]), 0.0)
        e_t = tl.where(valid, tl.exp(t - m_t_new[:, None]), 0.0)
        alpha_t = tl.exp(m_t - m_t_new)
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(e_s, axis=1)
        l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
        acc = acc * alpha_t + tl.sum(e_t * (t - s), axis=1)
        m_s = m_s_new
        m_t = m_t_new
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    kl = acc / l_t - lse_t + lse_s
    out = (i * N + j) * P + offs_m
    tl.store(kl_ptr + out, kl, mask=mask_m)
    tl.store(lse_s_ptr + out, lse_s, mask=mask_m)
    tl.store(lse_t_ptr + out, lse_t, mask=mask_m)


@triton.jit
def _bwd_kernel(a_ptr, b_ptr, lse_s_ptr, lse_t_ptr, grad_ptr, da_ptr, N, P, CS, CT, inv_tau, scale,
                BLOCK_O: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    k = tl.program_id(1).to(tl.int64)
    offs_o = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < P
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < CS
    acc = tl.zeros([BLOCK_O, BLOCK_D], dtype=ACC_DTYPE)
    for q_idx in range(0, N):
        q = k * 0 + q_idx  # int64 (a plain int under the interpreter has no .to)
        # rows side: pixels o of image k are rows of the pair (k, q)
        lse_s_o = tl.load(lse_s_ptr + (k * N + q) * P + offs_o, mask=mask_o, other=0.0)
        lse_t_o = tl.load(lse_t_ptr + (k * N + q) * P + offs_o, mask=mask_o, other=0.0)
        for p0 in range(0, P, BLOCK_Q):
            offs_q = p0 + tl.arange(0, BLOCK_Q).to(tl.int64)
            mask_q = offs_q < P
            # (BLOCK_O, BLOCK_Q): rows o of image k against partner pixels of image q
            s = _logits(a_ptr, k * P * CS, offs_o, mask_o, a_ptr, q * P * CS, offs_q, mask_q, CS,
                        BLOCK_K, DOT_DTYPE, ACC_DTYPE, PRECISION) * inv_tau
            t = _logits(b_ptr, k * P * CT, offs_o, mask_o, b_ptr, q * P * CT, offs_q, mask_q, CT,
                        BLOCK_K, DOT_DTYPE, ACC_DTYPE, PRECISION) * inv_tau
            d_s = tl.exp(s - lse_s_o[:, None]) - tl.exp(t - lse_t_o[:, None])
            d_s = tl.where(mask_o[:, None] & mask_q[None, :], d_s, 0.0)
            a_q = tl.load(a_ptr + q * P * CS + offs_q[:, None] * CS + offs_d[None, :],
                          mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
            acc += tl.dot(d_s.to(DOT_DTYPE), a_q, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        # columns side: pixels o of image k are columns of the pair (q, k); its rows are q's pixels
        for p0 in range(0, P, BLOCK_Q):
            offs_q = p0 + tl.arange(0, BLOCK_Q).to(tl.int64)
            mask_q = offs_q < P
            lse_s_q = tl.load(lse_s_ptr + (q * N + k) * P + offs_q, mask=mask_q, other=0.0)
            lse_t_q = tl.load(lse_t_ptr + (q * N + k) * P + offs_q, mask=mask_q, other=0.0)
            s = _logits(a_ptr, q * P * CS, offs_q, mask_q, a_ptr, k * P * CS, offs_o, mask_o, CS,
                        BLOCK_K, DOT_DTYPE, ACC_DTYPE, PRECISION) * inv_tau
            t = _logits(b_ptr, q * P * CT, offs_q, mask_q, b_ptr, k * P * CT, offs_o, mask_o, CT,
                        BLOCK_K, DOT_DTYPE, ACC_DTYPE, PRECISION) * inv_tau
            d_s = tl.exp(s - lse_s_q[:, None]) - tl.exp(t - lse_t_q[:, None])  # (BLOCK_Q, BLOCK_O)
            d_s = tl.where(mask_q[:, None] & mask_o[None, :], d_s, 0.0)
            a_q = tl.load(a_ptr + q * P * CS + offs_q[:, None] * CS + offs_d[None, :],
                          mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
            acc += tl.dot(tl.trans(d_s.to(DOT_DTYPE)), a_q, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    g = tl.load(grad_ptr).to(ACC_DTYPE) * scale
    tl.store(da_ptr + k * P * CS + offs_o[:, None] * CS + offs_d[None, :], (acc * g).to(da_ptr.dtype.element_ty),
             mask=mask_o[:, None] & mask_d[None, :])


def _types(dtype: torch.dtype):
    """(DOT_DTYPE, ACC_DTYPE, PRECISION, torch accumulation dtype)."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee", torch.float64
    if dtype == torch.float32 or TRITON_INTERPRET:
        return tl.float32, tl.float32, "ieee", torch.float32
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), tl.float32, "ieee", torch.float32


def _k_block(c_s: int, c_t: int) -> int:
    return max(16, min(64, triton.next_power_of_2(max(c_s, c_t))))


# 64 x 64 logit tiles (the interpreter's cost is per block operation, so it likes them wide too).
_BLOCK_M = 64
_BLOCK_N = 64


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
    _fwd_kernel[(triton.cdiv(p, _BLOCK_M), n, n)](
        a, b, kl, lse_s, lse_t, n, p, cs, ct, 1.0 / tau, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        BLOCK_K=_k_block(cs, ct), DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision, **FP_FUSION)
    # fp64 sum: N^2 P row terms, summed once
    loss = (kl.sum(dtype=torch.float64) / (p * n * n)).to(a.dtype)
    return loss, lse_s, lse_t


@torch.library.custom_op("segkd::cross_image_kd_backward_triton", mutates_args=())
def cross_image_kd_backward_triton(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lse_s: torch.Tensor,
                                   lse_t: torch.Tensor, tau: float) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    n, p, cs = a.shape
    ct = b.shape[2]
    dot_dtype, acc_dtype, precision, _ = _types(a.dtype)
    da = torch.empty_like(a)
    block_d = max(16, min(128, triton.next_power_of_2(cs)))
    _bwd_kernel[(triton.cdiv(p, _BLOCK_M), n, triton.cdiv(cs, block_d))](
        a, b, lse_s.contiguous(), lse_t.contiguous(), grad.contiguous(), da, n, p, cs, ct, 1.0 / tau,
        1.0 / (p * n * n * tau), BLOCK_O=_BLOCK_M, BLOCK_Q=_BLOCK_N, BLOCK_K=_k_block(cs, ct), BLOCK_D=block_d,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision, **FP_FUSION)
    return da


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
