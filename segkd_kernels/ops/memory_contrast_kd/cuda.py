"""memory_contrast_kd on the hand-written CUDA kernels of csrc/memory_contrast_kd.cu.

Inputs are the unit anchor rows a (student), b (teacher), (M, C), and the bank (Q, C) in one dtype,
fp32 from the public function (the normalisation and its gradient stay in torch, as for the Triton
backend; the kernels also read fp16 / bf16 operands as they are). Forward: 32 anchors
per block stream the bank in 32-entry tiles (fp32 FMA dots from shared-memory staging) with running
max / sum-exp of S and T; it writes the row KL and both log-sum-exps (2, M). Backward: one block per
(32 anchors, 32 channels) recomputes the tiles and accumulates d loss / d a without atomics.
"""

from __future__ import annotations

import torch

from .._cuda_common import cuda_lib, launch_args

OP = "memory_contrast_kd"


def _prepare(a, b, bank):
    if a.dim() != 2 or b.shape != a.shape or bank.dim() != 2 or bank.shape[1] != a.shape[1] \
            or not (a.dtype == b.dtype == bank.dtype):
        raise ValueError(f"{OP}: expected (M, C), (M, C) and (Q, C) tensors of one dtype, got "
                         f"{tuple(a.shape)} {a.dtype}, {tuple(b.shape)} {b.dtype}, {tuple(bank.shape)} {bank.dtype}")
    return a.contiguous(), b.contiguous(), bank.contiguous()


@torch.library.custom_op("segkd::memory_contrast_kd_cuda", mutates_args=())
def memory_contrast_kd_cuda(a: torch.Tensor, b: torch.Tensor, bank: torch.Tensor, tau: float,
                            kd_tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss 0-dim in a's dtype, lse (2, M) fp32: row log-sum-exps of S and T)."""
    lib = cuda_lib(OP)
    a, b, bank = _prepare(a, b, bank)
    args = launch_args(OP, a)
    m, c = a.shape
    row_kl = torch.empty(m, dtype=torch.float32, device=a.device)
    lse = torch.empty(2, m, dtype=torch.float32, device=a.device)
    lib.memory_contrast_forward(a.data_ptr(), b.data_ptr(), bank.data_ptr(), row_kl.data_ptr(), lse.data_ptr(),
                                m, c, bank.shape[0], 1.0 / (tau * kd_tau), **args)
    loss = row_kl.double().sum() * (kd_tau * kd_tau / m)  # fp64 sum of the M row terms
    return loss.to(a.dtype), lse


@torch.library.custom_op("segkd::memory_contrast_kd_backward_cuda", mutates_args=())
def memory_contrast_kd_backward_cuda(grad_loss: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bank: torch.Tensor,
                                     lse: torch.Tensor, tau: float, kd_tau: float) -> torch.Tensor:
    lib = cuda_lib(OP)
    a, b, bank = _prepare(a, b, bank)
    args = launch_args(OP, a)
    m, c = a.shape
    da = torch.empty(m, c, dtype=torch.float32, device=a.device)
    g = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
    lib.memory_contrast_backward(a.data_ptr(), b.data_ptr(), bank.data_ptr(), lse.contiguous().data_ptr(),
                                 g.data_ptr(), da.data_ptr(), m, c, bank.shape[0], 1.0 / (tau * kd_tau),
                                 kd_tau / (m * tau), **args)
    return da.to(a.dtype)  # one rounding, after the scaling


@memory_contrast_kd_cuda.register_fake
def _(a, b, bank, tau, kd_tau):
    return a.new_empty(()), a.new_empty(2, a.shape[0], dtype=torch.float32)


@memory_contrast_kd_backward_cuda.register_fake
def _(grad_loss, a, b, bank, lse, tau, kd_tau):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    a, b, bank, tau, kd_tau = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(a, b, bank, output[1])
    ctx.tau, ctx.kd_tau = tau, kd_tau


def _backward(ctx, grad_loss, _grad_lse):
    a, b, bank, lse = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    return memory_contrast_kd_backward_cuda(grad_loss, a, b, bank, lse, ctx.tau, ctx.kd_tau), None, None, None, None


memory_contrast_kd_cuda.register_autograd(_backward, setup_context=_setup_context)
