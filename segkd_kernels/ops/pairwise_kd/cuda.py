"""pairwise_kd (Gram path) on the hand-written CUDA kernels of csrc/pairwise_kd.cu.

Forward: per-pixel inverse norms (once, fp64), then ONE launch for the upper 64 x 64 tiles of the
Gram matrix of Z = [A | B] over pixel splits (fp64 partials, or precision="fast": fp32 sums over
64-pixel chunks added in fp64), summed over the splits by torch in a fixed order; the loss
    (||A^T A||^2 - 2 ||A^T B||^2 + ||B^T B||^2) / (N P^2)
is combined in fp64 (it cancels when student ~ teacher). Backward: d/dA = 4 (A (A^T A) - B (B^T A)):
on tensor cores (pairwise_grad_mma: native MMA with G split in 16-bit parts for half / bfloat16,
the 3xTF32 split for float), for fp64 features through torch matmul in fp64; then the normalisation
backward kernel.
Pooling (pool=2) is applied by the caller before this op.
"""

from __future__ import annotations

import torch

from .._cuda_common import cuda_lib, launch_args
from .reference import FAST_CHUNK, NORM_EPS, combine_upper_tiles, upper_tiles_to_blocks
TILE = 64  # kGramTile of csrc/pairwise_kd.cu
_SMS_DEFAULT = 132  # H100/H200: the split count is planned for it when no device says otherwise
_MIN_SPLIT = 8 * FAST_CHUNK  # pixels per split at least: a split is several 16-pixel steps

OP = "pairwise_kd"


def _check(student, teacher):
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"{OP}: expected (N, C_s, H, W) and (N, C_t, H, W), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")


def pixel_norms(lib, x: torch.Tensor) -> torch.Tensor:
    """(N, P) fp32 L2 norms over the channels of x (N, C, H, W) contiguous."""
    n, c, h, w = x.shape
    norm = torch.empty(n, h * w, dtype=torch.float32, device=x.device)
    lib.pixel_norm(x.data_ptr(), norm.data_ptr(), n, c, h * w, **launch_args(OP, x))
    return norm


def normalize_pixels(lib, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / max(||x_p||, eps) as fp32 (N, C, P), norms (N, P) fp32) for x (N, C, H, W) contiguous."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, h * w, dtype=torch.float32, device=x.device)
    norm = torch.empty(n, h * w, dtype=torch.float32, device=x.device)
    if x.numel() > 0:
        lib.normalize_pixels(x.data_ptr(), out.data_ptr(), norm.data_ptr(), n, c, h * w, NORM_EPS,
                             **launch_args(OP, x))
    return out, norm


def normalize_pixels_backward(lib, da: torch.Tensor, x: torch.Tensor, norm: torch.Tensor,
                              detach_norm: bool) -> torch.Tensor:
    """d loss / d x (x's dtype) from da = d loss / d normalised x (fp32, like x)."""
    n, c, h, w = x.shape
    dx = torch.empty_like(x)
    if x.numel() > 0:
        lib.normalize_pixels_backward(da.contiguous().data_ptr(), x.data_ptr(), norm.data_ptr(), dx.data_ptr(), n, c,
                                      h * w, NORM_EPS, detach_norm, **launch_args(OP, x))
    return dx


def inv_norms(lib, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norms, 1 / max(norms, eps)), both (N, P) fp64, for x (N, C, H, W) contiguous."""
    n, c, h, w = x.shape
    norm = torch.empty(n, h * w, dtype=torch.float64, device=x.device)
    inv = torch.empty_like(norm)
    lib.pixel_inv_norm(x.data_ptr(), norm.data_ptr(), inv.data_ptr(), n, c, h * w, NORM_EPS, **launch_args(OP, x))
    return norm, inv


def _splits(n: int, n_up: int, p: int, device: torch.device) -> int:
    """Pixel splits for two full waves of 256-thread blocks (2 per SM at 108-128 registers), each
    split a whole number of 64-pixel chunks; the launcher's contract: ceil(p / pix) == splits."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _SMS_DEFAULT
    want = -(-2 * 2 * sms // (n * n_up))
    splits = max(1, min(want, -(-p // _MIN_SPLIT)))
    pix = -(-(-(-p // splits)) // FAST_CHUNK) * FAST_CHUNK
    return -(-p // pix)


def _gram_tiles(lib, s, t, precision):
    """(upper tiles of Z^T Z (N, n_up, 64, 64) fp64, |s_p| (N, P) fp64)."""
    n, cs, h, w = s.shape
    ct, p = t.shape[1], h * w
    ta, tb = -(-cs // TILE), -(-ct // TILE)
    n_up = (ta + tb) * (ta + tb + 1) // 2
    norm_s, inv_s = inv_norms(lib, s)
    _, inv_t = inv_norms(lib, t)
    splits = _splits(n, n_up, p, s.device)
    part = torch.empty(n, splits, n_up, TILE, TILE, dtype=torch.float64, device=s.device)
    lib.pairwise_gram(s.data_ptr(), inv_s.data_ptr(), t.data_ptr(), inv_t.data_ptr(), part.data_ptr(), n, cs, ct, p,
                      splits, precision == "fast", **launch_args(OP, s))
    return part.sum(1), norm_s  # over the splits, in a fixed order: deterministic


@torch.library.custom_op("segkd::pairwise_kd_cuda", mutates_args=())
def pairwise_kd_cuda(student: torch.Tensor, teacher: torch.Tensor, detach_norm: bool, precision: str = "exact"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-dim in the student's dtype, A^T A (N, C_s, C_s) fp64, A^T B (N, C_s, C_t) fp64);
    precision "exact" or "fast" (docs/losses.md 3)."""
    lib = cuda_lib(OP)
    _check(student, teacher)
    launch_args(OP, student)
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    s = student.detach().to(dtype).contiguous()
    t = teacher.detach().to(dtype).contiguous()
    n, cs, h, w = s.shape
    ct, p = t.shape[1], h * w
    if s.numel() == 0 or t.numel() == 0:
        zeros = s.new_zeros(n, cs, cs, dtype=torch.float64), s.new_zeros(n, cs, ct, dtype=torch.float64)
        return student.new_zeros(()), *zeros
    g, _ = _gram_tiles(lib, s, t, precision)
    ta, tb = -(-cs // TILE), -(-ct // TILE)
    total = combine_upper_tiles(g, ta, tb)
    aa, ab = upper_tiles_to_blocks(g, ta, tb, cs, ct)
    return (total / (n * p * p)).to(student.dtype), aa, ab


@torch.library.custom_op("segkd::pairwise_kd_backward_cuda", mutates_args=())
def pairwise_kd_backward_cuda(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                              aa: torch.Tensor, ab: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """d loss / d student (kernel dtype) for the upstream gradient grad_loss (0-dim)."""
    lib = cuda_lib(OP)
    _check(student, teacher)
    launch_args(OP, student)
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    s = student.detach().to(dtype).contiguous()
    t = teacher.detach().to(dtype).contiguous()
    n, cs, h, w = s.shape
    p = h * w
    if s.numel() == 0 or t.numel() == 0:
        return torch.zeros_like(s)
    if s.dtype != torch.float64:
        # tensor cores, fp32 accumulators; the inverse norms factor out of the channel sums.
        # half / bfloat16: the raw features are exact MMA operands, G split into 16-bit hi + lo parts;
        # float: features and G each split into tf32 hi + lo parts, three products (3xTF32)
        ct = t.shape[1]
        _, inv_s = inv_norms(lib, s)
        _, inv_t = inv_norms(lib, t)
        da = torch.empty(n, cs, p, dtype=torch.float32, device=s.device)
        g = grad_loss.detach().to(torch.float32).reshape(1)
        lib.pairwise_grad_mma(aa.contiguous().data_ptr(), ab.contiguous().data_ptr(), s.data_ptr(), t.data_ptr(),
                              inv_s.data_ptr(), inv_t.data_ptr(), g.data_ptr(), da.data_ptr(), n, cs, ct, p,
                              4.0 / (n * p * p), **launch_args(OP, s))
        return normalize_pixels_backward(lib, da.reshape(n, cs, h, w), s, pixel_norms(lib, s), detach_norm)
    # fp64 features: d total / d a = 4 (AA a - AB b) per image, (C_s, P), by torch in fp64
    a, norm_s = normalize_pixels(lib, s)
    b, _ = normalize_pixels(lib, t)
    scale = grad_loss.to(torch.float64) * (4.0 / (n * p * p))
    da = (torch.bmm(aa, a.double()) - torch.bmm(ab, b.double())) * scale
    return normalize_pixels_backward(lib, da.float().reshape(n, cs, h, w), s, norm_s.reshape(n, p), detach_norm)


@pairwise_kd_cuda.register_fake
def _(student, teacher, detach_norm, precision="exact"):
    n, cs = student.shape[:2]
    ct = teacher.shape[1]
    return (student.new_empty(()), student.new_empty(n, cs, cs, dtype=torch.float64),
            student.new_empty(n, cs, ct, dtype=torch.float64))


@pairwise_kd_backward_cuda.register_fake
def _(grad_loss, student, teacher, aa, ab, detach_norm):
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    return student.new_empty(student.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    student, teacher, detach_norm, _precision = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(student, teacher, output[1], output[2])
    ctx.detach_norm = detach_norm
    ctx.student_dtype = student.dtype


def _backward(ctx, grad_loss, _grad_aa, _grad_ab):
    student, teacher, aa, ab = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None
    ds = pairwise_kd_backward_cuda(grad_loss, student, teacher, aa, ab, ctx.detach_norm)
    return ds.to(ctx.student_dtype), None, None, None


pairwise_kd_cuda.register_autograd(_backward, setup_context=_setup_context)
