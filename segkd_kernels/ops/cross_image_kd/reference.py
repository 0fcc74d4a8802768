"""Cross-image pixel-to-pixel distillation (CIRKD mini-batch; docs/losses.md 4) in plain PyTorch.

The formula per ordered image pair (i, j) needs the P x P similarity matrices S_ij = a_i^T a_j / tau
and T_ij = b_i^T b_j / tau (268 MB each at P = 8192). This form never holds more than a block of
rows of them: for each image i and block of R rows it builds the (N, R, P) logits against every
partner image, adds up the row KLs, and drops them. The backward (a custom op, so autograd does not
keep every block alive) recomputes each block:
    dS = (softmax(S) - softmax(T)) * g / (P N^2),   dA_i[:, rows] += sum_j A_j dS^T / tau,
    dA_j += A_i[:, rows] dS / tau.
Memory O(N * P * (C + R)), with R chosen so a block holds about ROW_BLOCK_ELEMENTS logits.
The readable P x P form is the tests' oracle (python_tests/test_cross_image_kd.py).
"""

import torch
import torch.nn.functional as F

from ..._validation import compute_dtype

NORM_EPS = 1e-12  # as F.normalize
ROW_BLOCK_ELEMENTS = 1 << 21  # logits per block: 8 MiB per fp32 (N, R, P) tensor, a handful alive


def _row_block(n: int, p: int) -> int:
    return max(1, min(p, ROW_BLOCK_ELEMENTS // (n * p)))


def _block_logits(x_i: torch.Tensor, x: torch.Tensor, tau: float) -> torch.Tensor:
    """x_i^T x_j / tau for every partner image j: (N, R, P), contiguous (softmax over the last dim).
    x_i: (C, R) rows of image i, x: (N, C, P) all images."""
    return torch.matmul(x_i.T / tau, x)  # scaling the R x C factor saves a pass over the logits


@torch.library.custom_op("segkd::cross_image_kd_chunked", mutates_args=())
def cross_image_kl(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """sum over ordered pairs (i, j) and rows r of KL(softmax(T_ij[r]) || softmax(S_ij[r])),
    divided by P N^2. a: (N, C_s, P), b: (N, C_t, P) unit pixel features, same dtype."""
    n, _, p = a.shape
    rows = _row_block(n, p)
    total = a.new_zeros((), dtype=torch.float64)
    for i in range(n):
        for r0 in range(0, p, rows):
            log_ps = F.log_softmax(_block_logits(a[i, :, r0 : r0 + rows], a, tau), dim=2)
            log_pt = F.log_softmax(_block_logits(b[i, :, r0 : r0 + rows], b, tau), dim=2)
            # sum over the block of exp(log_pt) (log_pt - log_ps) as one dot product (fewer passes
            # than kl_div on CPU), accumulated in fp64 across blocks
            p_t = log_pt.exp()
            total += torch.dot(p_t.view(-1), log_pt.sub_(log_ps).view(-1)).double()
    return (total / (p * n * n)).to(a.dtype)


@torch.library.custom_op("segkd::cross_image_kd_chunked_backward", mutates_args=())
def cross_image_kl_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    n, _, p = a.shape
    rows = _row_block(n, p)
    coef = grad / (p * n * n * tau)  # a tensor: no host sync
    da = torch.zeros_like(a)
    for i in range(n):
        for r0 in range(0, p, rows):
            a_rows = a[i, :, r0 : r0 + rows]
            d_s = torch.softmax(_block_logits(a_rows, a, tau), dim=2)
            d_s -= torch.softmax(_block_logits(b[i, :, r0 : r0 + rows], b, tau), dim=2)
            d_s *= coef  # (N, R, P): dloss / dS for rows of i against every partner j
            da[i, :, r0 : r0 + rows] += torch.matmul(a, d_s.transpose(1, 2)).sum(dim=0)  # rows side
            da += torch.matmul(a_rows, d_s)  # partner (column) side
    return da


@cross_image_kl.register_fake
def _(a, b, tau):
    return a.new_empty(())


@cross_image_kl_backward.register_fake
def _(grad, a, b, tau):
    return torch.empty_like(a)


def _setup_context(ctx, inputs, output):
    a, b, tau = inputs
    ctx.save_for_backward(a, b)
    ctx.tau = tau


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    return cross_image_kl_backward(grad, a, b, ctx.tau), None, None


cross_image_kl.register_autograd(_backward, setup_context=_setup_context)


def unit_pixels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, P), each pixel's feature vector divided by max(its norm, eps)."""
    return F.normalize(x.to(compute_dtype(x)).flatten(2), dim=1, eps=NORM_EPS)


def cross_image_kd(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """1/N^2 sum_{i,j} 1/P sum_rows KL(softmax(b_i^T b_j / tau) || softmax(a_i^T a_j / tau))."""
    a = unit_pixels(student)
    b = unit_pixels(teacher.detach())
    return cross_image_kl(a, b, float(tau)).to(student.dtype)
