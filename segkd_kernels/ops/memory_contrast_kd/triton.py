"""memory_contrast_kd in Triton: the memory bank streamed as the partner set (docs/losses.md 4b).

Inputs are unit anchor rows a (student) and b (teacher), (M, C), and the bank (Q, C), all row-major
in one dtype (the normalisation and its gradient stay in torch). The M x Q logits are never stored.

Forward, one program per block of BLOCK_M anchors: streams the bank in blocks of BLOCK_N entries;
each channel block of the bank is loaded once and feeds both tiles, S = a B^T * scale and
T = b B^T * scale with scale = 1 / (tau kd_tau). Per row it keeps the running max and sum-exp of S
and of T and the rescaled accumulator sum exp(T - m_T) (T - S) (online log-sum-exp), so
    KL = acc / l_T - (m_T + log l_T) + (m_S + log l_S).
It writes the row KL and the two log-sum-exps (M,): the only saved state.

Backward, one program per (block of anchors, tile of channels), no atomics: recomputes the tiles and
    dA[m, d] = kd_tau / (M tau) * g * sum_q (exp(S_mq - lse_S) - exp(T_mq - lse_T)) B[q, d]
(the derivative of kd_tau^2 KL with respect to logits scaled by 1/(tau kd_tau)). The bank and the
teacher get no gradient.

Precision: the public function passes fp32 unit rows (fp64 for fp64 inputs) whatever the input
dtype, and fp32 operands use input_precision="ieee" (no TF32). fp16/bf16 operands, if given to the
custom op directly, go to tl.dot as they are on a GPU (fp32 accumulation) and are upcast under the
interpreter, where bf16 tl.dot is wrong; exp/log and the running statistics are fp32 (fp64 for fp64).
"""

import torch
import triton
import triton.language as tl

from .._triton_common import FP_FUSION, cdiv, next_power_of_2
from ..cross_image_kd.triton import dot_types, online_lse_finish, online_lse_step


@triton.jit
def _tiles(a_ptr, b_ptr, m_ptr, offs_m, mask_m, offs_q, mask_q, C,
           BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """(a[offs_m] . bank[offs_q]^T, b[offs_m] . bank[offs_q]^T) over C channels; each bank block is
    loaded once for both products."""
    s = tl.zeros([offs_m.shape[0], offs_q.shape[0]], dtype=ACC_DTYPE)
    t = tl.zeros([offs_m.shape[0], offs_q.shape[0]], dtype=ACC_DTYPE)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < C
        rows = offs_m[:, None] * C + offs_k[None, :]
        mask_rows = mask_m[:, None] & mask_k[None, :]
        a = tl.load(a_ptr + rows, mask=mask_rows, other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptr + rows, mask=mask_rows, other=0.0).to(DOT_DTYPE)
        bank = tl.load(m_ptr + offs_q[:, None] * C + offs_k[None, :], mask=mask_q[:, None] & mask_k[None, :],
                       other=0.0).to(DOT_DTYPE)
        bank_t = tl.trans(bank)
        s += tl.dot(a, bank_t, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        t += tl.dot(b, bank_t, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return s, t


@triton.jit
def _fwd_kernel(a_ptr, b_ptr, m_ptr, kl_ptr, lse_s_ptr, lse_t_ptr, M, Q, C, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # Finite start values: the first bank block (never fully masked) replaces them, and no inf - inf.
    m_s = tl.full([BLOCK_M], -1e30, dtype=ACC_DTYPE)
    m_t = tl.full([BLOCK_M], -1e30, dtype=ACC_DTYPE)
    l_s = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    l_t = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for q0 in range(0, Q, BLOCK_N):
        offs_q = q0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_q = offs_q < Q
        s, t = _tiles(a_ptr, b_ptr, m_ptr, offs_m, mask_m, offs_q, mask_q, C, BLOCK_K, DOT_DTYPE, ACC_DTYPE,
                      PRECISION)
        # masked bank entries at -1e30: exp gives exactly 0 and t - s is 0 there
        valid = mask_q[None, :]
        s = tl.where(valid, s * scale, -1e30)
        t = tl.where(valid, t * scale, -1e30)
        m_s, m_t, l_s, l_t, acc = online_lse_step(s, t, m_s, m_t, l_s, l_t, acc)
    kl, lse_s, lse_t = online_lse_finish(m_s, m_t, l_s, l_t, acc)
    tl.store(kl_ptr + offs_m, kl, mask=mask_m)
    tl.store(lse_s_ptr + offs_m, lse_s, mask=mask_m)
    tl.store(lse_t_ptr + offs_m, lse_t, mask=mask_m)


@triton.jit
def _bwd_kernel(a_ptr, b_ptr, m_ptr, lse_s_ptr, lse_t_ptr, grad_ptr, da_ptr, M, Q, C, scale, grad_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < C
    lse_s = tl.load(lse_s_ptr + offs_m, mask=mask_m, other=0.0)
    lse_t = tl.load(lse_t_ptr + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for q0 in range(0, Q, BLOCK_N):
        offs_q = q0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_q = offs_q < Q
        s, t = _tiles(a_ptr, b_ptr, m_ptr, offs_m, mask_m, offs_q, mask_q, C, BLOCK_K, DOT_DTYPE, ACC_DTYPE,
                      PRECISION)
        d_s = tl.exp(s * scale - lse_s[:, None]) - tl.exp(t * scale - lse_t[:, None])
        d_s = tl.where(mask_m[:, None] & mask_q[None, :], d_s, 0.0)
        bank = tl.load(m_ptr + offs_q[:, None] * C + offs_d[None, :], mask=mask_q[:, None] & mask_d[None, :],
                       other=0.0).to(DOT_DTYPE)
        acc += tl.dot(d_s.to(DOT_DTYPE), bank, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    g = tl.load(grad_ptr).to(ACC_DTYPE) * grad_scale
    tl.store(da_ptr + offs_m[:, None] * C + offs_d[None, :], (acc * g).to(da_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


def _types(dtype: torch.dtype):
    return dot_types(dtype, "ieee")


def _k_block(c: int) -> int:
    return max(16, min(_MAX_BLOCK_K, next_power_of_2(c)))


# 64 x 64 logit tiles (two of them, S and T, live per program), 32-channel operand blocks, 64-channel
# gradient tiles, 8 warps. Compiled for sm_90 at CIRKD's VOC size (67600 anchors x 256 channels
# against a 4116-entry bank): forward 200 and backward 208 registers, no spills. The cross-image
# kernel's shape (64-channel blocks, 128-channel gradient tiles, 4 warps) hits the 255-register
# cap here with 2920 (forward) and 1508 (backward) bytes of spill stores.
_BLOCK_M = 64
_BLOCK_N = 64
_MAX_BLOCK_K = 32
_NUM_WARPS = 8
_MAX_BLOCK_D = 64


@torch.library.custom_op("segkd::memory_contrast_kd_triton", mutates_args=())
def memory_contrast_kd_triton(a: torch.Tensor, b: torch.Tensor, bank: torch.Tensor, tau: float,
                              kd_tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss in a's dtype, lse_S, lse_T (M,) in the accumulation dtype).
    a, b: (M, C) unit anchor rows, bank: (Q, C), one dtype."""
    a, b, bank = a.contiguous(), b.contiguous(), bank.contiguous()
    m, c = a.shape
    q = bank.shape[0]
    dot_dtype, acc_dtype, precision, acc_torch = _types(a.dtype)
    kl = torch.empty(m, dtype=acc_torch, device=a.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    _fwd_kernel[(cdiv(m, _BLOCK_M),)](
        a, b, bank, kl, lse_s, lse_t, m, q, c, 1.0 / (tau * kd_tau), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        BLOCK_K=_k_block(c), DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision, num_warps=_NUM_WARPS,
        **FP_FUSION)
    # fp64 sum of the M row terms, once
    loss = (kl.sum(dtype=torch.float64) * (kd_tau * kd_tau / m)).to(a.dtype)
    return loss, lse_s, lse_t


@torch.library.custom_op("segkd::memory_contrast_kd_backward_triton", mutates_args=())
def memory_contrast_kd_backward_triton(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bank: torch.Tensor,
                                       lse_s: torch.Tensor, lse_t: torch.Tensor, tau: float,
                                       kd_tau: float) -> torch.Tensor:
    a, b, bank = a.contiguous(), b.contiguous(), bank.contiguous()
    m, c = a.shape
    q = bank.shape[0]
    dot_dtype, acc_dtype, precision, _ = _types(a.dtype)
    da = torch.empty_like(a)
    block_d = max(16, min(_MAX_BLOCK_D, next_power_of_2(c)))
    _bwd_kernel[(cdiv(m, _BLOCK_M), cdiv(c, block_d))](
        a, b, bank, lse_s.contiguous(), lse_t.contiguous(), grad.contiguous(), da, m, q, c,
        1.0 / (tau * kd_tau), kd_tau / (m * tau), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_k_block(c),
        BLOCK_D=block_d, DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision, num_warps=_NUM_WARPS,
        **FP_FUSION)
    return da


@memory_contrast_kd_triton.register_fake
def _(a, b, bank, tau, kd_tau):
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    m = a.shape[0]
    return a.new_empty(()), a.new_empty(m, dtype=acc), a.new_empty(m, dtype=acc)


@memory_contrast_kd_backward_triton.register_fake
def _(grad, a, b, bank, lse_s, lse_t, tau, kd_tau):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    a, b, bank, tau, kd_tau = inputs
    _loss, lse_s, lse_t = output
    ctx.save_for_backward(a, b, bank, lse_s, lse_t)
    ctx.tau, ctx.kd_tau = tau, kd_tau


def _backward(ctx, grad_loss, *_unused):
    a, b, bank, lse_s, lse_t = ctx.saved_tensors
    da = memory_contrast_kd_backward_triton(grad_loss, a, b, bank, lse_s, lse_t, ctx.tau, ctx.kd_tau)
    return da, None, None, None, None


memory_contrast_kd_triton.register_autograd(_backward, setup_context=_setup_context)
