"""ssim_kd on the hand-written CUDA kernels of csrc/ssim_kd.cu.

Forward: one kernel over column blocks x tall row strips (input rows staged in shared memory with
the padding resolved, horizontal pass from shared memory, vertical pass as a register sliding
window) that reduces the loss map to per-block fp32 partials (added here in fp64) and, when a
gradient is wanted, writes the three per-pixel partial-derivative maps. Backward: one kernel, the
adjoint of the padded Gaussian filter (padding folded into its weights) applied to those maps the
same way, combined with x and y and scaled by the min-max rescaling factor. The per-map min and max of
normalize=True come from torch.aminmax (constants in the gradient, as in the reference).
"""

from __future__ import annotations

import torch

from .._cuda_common import cuda_lib, launch_args
from .reference import RANGE_EPS

OP = "ssim_kd"
PADDING_CODES = {"reflect": 0, "zeros": 1, "valid": 2}  # csrc/ssim_kd.cu Padding


def _prepare(student, teacher, normalize):
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(f"{OP}: expected two (N, C, H, W) tensors of one shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    args = launch_args(OP, student)
    s = student.detach().to(dtype).contiguous()
    t = teacher.detach().to(dtype).contiguous()
    args["dtype"] = launch_args(OP, s)["dtype"]
    n, c, h, w = s.shape
    if normalize and s.numel() > 0:
        rows = []
        for x in (s, t):
            lo, hi = x.reshape(n * c, h * w).float().aminmax(dim=1)
            span = hi - lo
            # a flat map (span <= eps) becomes 0 with zero gradient: scale 0. The test is `span <= eps`,
            # not `span > eps`: a map holding a NaN has a NaN span (aminmax propagates NaN), whose
            # scale must be NaN as in the reference, not 0 (a finite map of zeros)
            scale = torch.where(span <= RANGE_EPS, torch.zeros_like(span), 1.0 / span.clamp_min(RANGE_EPS))
            rows += [lo, scale]
        stats = torch.stack(rows).contiguous()  # (4, N*C): lo_s, scale_s, lo_t, scale_t
    else:
        stats = s.new_empty(0, dtype=torch.float32)
    return s, t, stats, args


def _stat_ptrs(stats: torch.Tensor) -> list[int]:
    if stats.numel() == 0:
        return [0, 0, 0, 0]
    return [stats[k].data_ptr() for k in range(4)]


def _out_size(h: int, w: int, window_size: int, padding: str) -> tuple[int, int]:
    if padding == "valid":
        return h - window_size + 1, w - window_size + 1
    return h, w


@torch.library.custom_op("segkd::ssim_kd_cuda", mutates_args=())
def ssim_kd_cuda(student: torch.Tensor, teacher: torch.Tensor, window_size: int, sigma: float, data_range: float,
                 padding: str, normalize: bool, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-dim in the student's dtype, dmaps (3, N*C, H', W') fp32 or empty, stats (4, N*C) fp32 or empty)."""
    lib = cuda_lib(OP)
    if padding not in PADDING_CODES:
        raise ValueError(f"{OP}: padding must be one of {', '.join(PADDING_CODES)}, got {padding!r}")
    s, t, stats, args = _prepare(student, teacher, normalize)
    n, c, h, w = s.shape
    ho, wo = _out_size(h, w, window_size, padding)
    maps = n * c
    if maps * ho * wo <= 0 or s.numel() == 0:
        return student.new_zeros(()), s.new_empty(0, dtype=torch.float32), stats
    code = PADDING_CODES[padding]
    partials = torch.empty(lib.ssim_num_partials(maps, h, w, window_size, code), dtype=torch.float32, device=s.device)
    dmaps = torch.empty(3, maps, ho, wo, dtype=torch.float32, device=s.device) if need_grad else None
    lib.ssim_forward(s.data_ptr(), t.data_ptr(), *_stat_ptrs(stats), partials.data_ptr(),
                     0 if dmaps is None else dmaps.data_ptr(), maps, h, w, window_size, float(sigma),
                     float(data_range), code, **args)
    loss = (partials.double().sum() / (maps * ho * wo)).to(student.dtype)
    return loss, (dmaps if dmaps is not None else s.new_empty(0, dtype=torch.float32)), stats


@torch.library.custom_op("segkd::ssim_kd_backward_cuda", mutates_args=())
def ssim_kd_backward_cuda(grad_loss: torch.Tensor, dmaps: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                          stats: torch.Tensor, window_size: int, sigma: float, padding: str) -> torch.Tensor:
    """d loss / d student (kernel dtype, contiguous) for the upstream gradient grad_loss (0-dim)."""
    lib = cuda_lib(OP)
    s, t, _unused, args = _prepare(student, teacher, False)
    n, c, h, w = s.shape
    ds = torch.zeros_like(s)
    if dmaps.numel() == 0 or s.numel() == 0:
        return ds
    maps = n * c
    g = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
    # (the second pointer is a scratch buffer the fused adjoint no longer needs)
    lib.ssim_backward(dmaps.contiguous().data_ptr(), 0, s.data_ptr(), t.data_ptr(), *_stat_ptrs(stats),
                      g.data_ptr(), ds.data_ptr(), maps, h, w, window_size, float(sigma), PADDING_CODES[padding],
                      **args)
    return ds


@ssim_kd_cuda.register_fake
def _(student, teacher, window_size, sigma, data_range, padding, normalize, need_grad):
    n, c, h, w = student.shape
    ho, wo = _out_size(h, w, window_size, padding)
    maps = n * c
    dmaps_shape = (3, maps, ho, wo) if need_grad and maps * ho * wo > 0 else (0,)
    stats_shape = (4, maps) if normalize and student.numel() > 0 else (0,)
    return (student.new_empty(()), student.new_empty(dmaps_shape, dtype=torch.float32),
            student.new_empty(stats_shape, dtype=torch.float32))


@ssim_kd_backward_cuda.register_fake
def _(grad_loss, dmaps, student, teacher, stats, window_size, sigma, padding):
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    return student.new_empty(student.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    student, teacher, window_size, sigma, _data_range, padding, _normalize, need_grad = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(student, teacher, output[1], output[2])
    ctx.options = (window_size, sigma, padding)
    ctx.need_grad = need_grad
    ctx.student_dtype = student.dtype


def _backward(ctx, grad_loss, _grad_dmaps, _grad_stats):
    student, teacher, dmaps, stats = ctx.saved_tensors
    if not ctx.need_grad:
        raise RuntimeError(f"{OP}: the cuda op ran with need_grad=False, so it has no gradient to return")
    if grad_loss is None:
        return (None,) * 8
    ds = ssim_kd_backward_cuda(grad_loss, dmaps, student, teacher, stats, *ctx.options)
    return (ds.to(ctx.student_dtype),) + (None,) * 7


ssim_kd_cuda.register_autograd(_backward, setup_context=_setup_context)


def static_plan(shapes, dtype_name: str, window_size: int = 11) -> dict:
    """The launches of the benchmark call (reflect padding, `window_size`) on a (N, C, H, W) input,
    for the static report's instruction model: {phase: [(kernel name part, blocks, warps per block,
    {loop variable: trips per warp})]}. Mirrors the launchers of csrc/ssim_kd.cu: 128 columns per
    block (one per thread, 4 warps), strips of 64 rows (16 below 64 rows), the row loop advancing
    `window_size` rows per step over the strip plus its window_size - 1 halo rows, and the halo
    columns staged by `for (e = tid; e < K (K - 1); e += 128)`."""
    n, c, h, w = shapes[0]
    k, cols, warps = window_size, 128, 4
    strip = 64 if h >= 64 else 16
    tiles_x, tiles_y = -(-w // cols), -(-h // strip)
    rows = [min(strip, h - y * strip) for y in range(tiles_y)]
    row_trips = sum(-(-(r + k - 1) // k) for r in rows) / tiles_y
    halo = k * (k - 1)
    halo_trips = sum(-(-(halo - 32 * wp) // cols) if 32 * wp < halo else 0 for wp in range(warps)) / warps
    kernel_t = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half"}[dtype_name]
    trips = {"i0": row_trips, "e": halo_trips}
    blocks = n * c * tiles_x * tiles_y
    return {"forward": [(f"ssim_forward_kernel<{k}, {kernel_t}>", blocks, warps, trips)],
            "backward": [(f"ssim_backward_kernel<{k}, {kernel_t}>", blocks, warps, trips)]}
