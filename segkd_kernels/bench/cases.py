"""What each op benchmark runs: shapes, inputs, the public call, the eager baseline, peers, floors.

Shapes come from real segmentation heads (docs/backends.md): Cityscapes 512x1024 crops at output
stride 8 give 64x128 features and 19-class logits; logits are also distilled at 128x256 and at
full resolution 512x1024; batch 8. Student and teacher channels differ for the pairwise losses
(128 vs 256).

Two byte floors per op and mode (docs/performance.md derives each one):
  bytes        the inherent floor: the fewest bytes any forward+backward must move given the math.
               Where a gradient element needs a global statistic of the inputs that is not known
               before they have all been read (the mean gap of PFS, the three dot products of
               AttnFD), or the backward needs the input again (the gate gradients of CBAM), the
               inputs are read twice; otherwise once.
  pass3_bytes  the single-pass floor: every input read once, the student gradient written once
               (3 tensor passes for a student/teacher loss), whatever the math allows.
Per mode:
  forward   read what the output needs (and write the output)
  backward  read what the gradient needs and write the gradient (a recompute backward; a forward
            that already produced the gradient needs less, so this floor is generous to us)
  full      forward and backward together, the fused ideal
Benchmarks report the fraction of both (roofline_frac: inherent, pass3_frac: single-pass); the
static report compares its bytes model with the inherent floor.
FLOP counts for the compute-bound ops are the multiply-adds of the algorithm (2 FLOPs each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

import segkd_kernels as sk

from . import eager


@dataclass
class Inputs:
    tensors: list           # positional arguments of the op
    grad_of: list           # indices of the tensors that require grad (the student side)
    kwargs: dict = field(default_factory=dict)


@dataclass
class Case:
    op: str
    shapes: list            # each entry: tuple of input shapes
    quick_shapes: list
    make: Callable          # (shapes, dtype, device) -> Inputs
    api: Callable           # (*tensors, backend=..., **kwargs) -> output
    eager: Callable         # (*tensors, **kwargs) -> output, as toolboxes write it
    bytes: Callable | None = None      # (shapes, dtype, mode) -> bytes that must move (inherent floor)
    pass3_bytes: Callable | None = None  # (shapes, dtype, mode) -> single-pass floor (None: the same)
    flops: Callable | None = None      # (shapes, mode) -> FLOPs that must be done
    flop_kind: str = "fp32"            # which peak the FLOPs are held against ("fp32" / "dtype")
    peers: dict = field(default_factory=dict)   # name -> () -> callable(*tensors) (may raise ImportError)


def shape_label(shapes) -> str:
    labels = ["x".join(map(str, s)) for s in shapes]
    # Same-shape operands (student / teacher logits) are written once.
    return labels[0] if all(label == labels[0] for label in labels) else "/".join(labels)


def _numel(shape) -> int:
    return math.prod(shape)


def _elsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _student_teacher(shapes, dtype, device):
    s = torch.randn(shapes[0], dtype=dtype, device=device).requires_grad_(True)
    t = torch.randn(shapes[1], dtype=dtype, device=device)
    return Inputs([s, t], [0])


def _logits(shapes, dtype, device):
    # Logits with a realistic spread (a few units), so softmaxes are neither flat nor one-hot.
    inputs = _student_teacher(shapes, dtype, device)
    with torch.no_grad():
        for x in inputs.tensors:
            x.mul_(3.0)
    return inputs


def _features(shapes, dtype, device):
    # Post-ReLU features, as the distilled points are.
    s = torch.randn(shapes[0], dtype=dtype, device=device).relu_().requires_grad_(True)
    t = torch.randn(shapes[1], dtype=dtype, device=device).relu_()
    return Inputs([s, t], [0])


def _read_st_write_ds(shapes, dtype, mode):
    reads = sum(_numel(s) for s in shapes)
    return (reads + (0 if mode == "forward" else _numel(shapes[0]))) * _elsize(dtype)


def _read_st_twice_write_ds(shapes, dtype, mode):
    # The loss needs one read of s and t; the gradient of every element needs a global statistic
    # of all of them (PFS: the mean gap; AttnFD: <s,s>, <t,t>, <s,t>), so any gradient is a second
    # read after the first one has finished.
    reads = sum(_numel(s) for s in shapes)
    out = {"forward": reads, "backward": reads + _numel(shapes[0]), "full": 2 * reads + _numel(shapes[0])}[mode]
    return out * _elsize(dtype)


def _pairwise_flops(shapes, mode):
    (n, cs, h, w), (_, ct, _, _) = shapes
    p = h * w
    forward = 2 * n * p * (cs * cs + cs * ct + ct * ct)      # A^T A, A^T B, B^T B
    backward = 2 * n * p * (cs * cs + cs * ct)                # A (A^T A), B (B^T A)
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def _cross_image_flops(shapes, mode):
    (n, cs, h, w), (_, ct, _, _) = shapes
    p = h * w
    # Forward: two similarity products per ordered pair. Full (issue 4's count): both recomputed
    # in the backward, plus two student-gradient products: N^2 P^2 (8 C_s + 4 C_t).
    forward = 2 * n * n * p * p * (cs + ct)
    full = n * n * p * p * (8 * cs + 4 * ct)
    return {"forward": forward, "backward": full - forward, "full": full}[mode]


SSIM_WINDOW = 11


def _ssim_flops(shapes, mode):
    numel = _numel(shapes[0])
    # Forward: x^2, y^2, xy, then 5 statistics through a separable window (2 passes of
    # SSIM_WINDOW multiply-adds each), then ~25 FLOPs for the map. Backward: the three partial-
    # derivative maps through the same separable filter, plus ~30 FLOPs per pixel of chain rule.
    forward = numel * (3 + 5 * 2 * 2 * SSIM_WINDOW + 25)
    backward = numel * (3 * 2 * 2 * SSIM_WINDOW + 30)
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def _eager_ssim_valid(s, t, window_size=SSIM_WINDOW, sigma=1.5, data_range=1.0):
    """pytorch-msssim's formulation as toolboxes write it: valid separable Gaussian, no rescaling."""
    import torch.nn.functional as F  # noqa: PLC0415

    y = t.detach()
    c = s.shape[1]
    g = eager._gaussian_window(window_size, sigma, s.device, s.dtype)

    def filt(z):
        z = F.conv2d(z, g.view(1, 1, 1, -1).expand(c, 1, 1, window_size), groups=c)
        return F.conv2d(z, g.view(1, 1, -1, 1).expand(c, 1, window_size, 1), groups=c)

    return eager.ssim_dissimilarity(filt, s, y, data_range)


def _peer_pytorch_msssim():
    from pytorch_msssim import ssim  # noqa: PLC0415  (optional peer)

    def run(s, t):
        # pytorch-msssim: valid padding, Gaussian 11 / 1.5, no rescaling, data_range 1: the work of
        # the ssim_kd_valid row (padding="valid", normalize=False).
        return 1 - ssim(s, t.detach(), data_range=1.0, size_average=True)

    return run


def _peer_kornia():
    from kornia.losses import ssim_loss  # noqa: PLC0415

    def run(s, t):
        # kornia: reflect padding, clamp((1 - SSIM) / 2, 0, 1) averaged, no rescaling: the work of
        # the ssim_kd row minus its min-max rescaling pass (a conservative comparison for us).
        return ssim_loss(s, t.detach(), window_size=SSIM_WINDOW, max_val=1.0)

    return run


def _peer_fussim():
    from fussim import fused_ssim  # noqa: PLC0415

    def run(s, t):
        # fused-ssim: fixed 11 / 1.5 window, data_range 1, fp32 only; valid padding to match the
        # ssim_kd_valid row (its default "same" is zero padding).
        if s.dtype != torch.float32:
            raise TypeError("fussim runs fp32 only")
        return 1 - fused_ssim(s, t.detach(), padding="valid")

    return run


def _channel_pool_inputs(shapes, dtype, device):
    x = torch.randn(shapes[0], dtype=dtype, device=device).requires_grad_(True)
    gate = torch.rand(shapes[0][:2], dtype=dtype, device=device).requires_grad_(True)
    return Inputs([x, gate], [0, 1])


def _channel_pool_bytes(shapes, dtype, mode):
    # Inherent: the forward reads x and the gate and writes the (max, mean) maps; the backward reads
    # their gradient and x again (d gate[n, c] = sum_p x * dy needs x, and dy exists only after
    # the forward) and writes dx and d gate.
    n, c, h, w = shapes[0]
    x, out, gate = n * c * h * w, n * 2 * h * w, n * c
    forward = x + gate + out
    backward = out + x + gate + x + gate
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode] * _elsize(dtype)


def _channel_pool_pass3_bytes(shapes, dtype, mode):
    n, c, h, w = shapes[0]
    x, out = n * c * h * w, n * 2 * h * w
    if mode == "forward":
        return (x + out) * _elsize(dtype)
    return (2 * x + out) * _elsize(dtype)    # read x once (+ grad of the output), write dx


def _spatial_pool_inputs(shapes, dtype, device):
    return Inputs([torch.randn(shapes[0], dtype=dtype, device=device).requires_grad_(True)], [0])


def _spatial_pool_bytes(shapes, dtype, mode):
    x = _numel(shapes[0])
    return (x if mode == "forward" else 2 * x) * _elsize(dtype)


def _cbam_gate_inputs(shapes, dtype, device):
    n, c, h, w = shapes[0]
    x = torch.randn(shapes[0], dtype=dtype, device=device).requires_grad_(True)
    channel_gate = torch.rand(n, c, dtype=dtype, device=device).requires_grad_(True)
    spatial_gate = torch.rand(n, 1, h, w, dtype=dtype, device=device).requires_grad_(True)
    return Inputs([x, channel_gate, spatial_gate], [0, 1, 2])


def _cbam_gate_bytes(shapes, dtype, mode):
    # Inherent: forward reads x and writes the product; backward reads the product's gradient and
    # x again (d M_c and d M_s are sums of g * x), writes dx (gates and their gradients are small).
    n, c, h, w = shapes[0]
    x, gates = n * c * h * w, n * c + n * h * w
    forward = x + x + gates
    backward = x + x + x + 2 * gates
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode] * _elsize(dtype)


def _cbam_gate_pass3_bytes(shapes, dtype, mode):
    x = _numel(shapes[0])
    # read x and the output's gradient once, write dx once (3 passes; 2 for the forward)
    return (2 * x if mode == "forward" else 3 * x) * _elsize(dtype)


LOGITS = [((8, 19, 128, 256),) * 2, ((8, 19, 512, 1024),) * 2]
LOGITS_QUICK = [((2, 5, 9, 13),) * 2]
FEATURES = [((8, 256, 64, 128),) * 2, ((8, 2048, 64, 128),) * 2]
FEATURES_QUICK = [((2, 6, 9, 13),) * 2]
PAIRS = [((8, 128, 64, 128), (8, 256, 64, 128))]
PAIRS_QUICK = [((2, 8, 9, 13), (2, 16, 9, 13))]
# cross_image_kd: the two ends of its target range, C_s = 128 and 256 against C_t = 256
CROSS_PAIRS = PAIRS + [((8, 256, 64, 128), (8, 256, 64, 128))]

CASES = {
    "channel_wise_kd": Case(
        "channel_wise_kd", LOGITS + [FEATURES[0]], LOGITS_QUICK, _logits,
        lambda s, t, backend: sk.channel_wise_kd(s, t, 4.0, backend=backend),
        lambda s, t: eager.channel_wise_kd(s, t, 4.0), bytes=_read_st_write_ds),
    "pixel_kd": Case(
        "pixel_kd", LOGITS, LOGITS_QUICK, _logits,
        lambda s, t, backend: sk.pixel_kd(s, t, 1.0, backend=backend),
        lambda s, t: eager.pixel_kd(s, t, 1.0), bytes=_read_st_write_ds),
    "pfs_pixel_kd": Case(
        "pfs_pixel_kd", LOGITS, LOGITS_QUICK, _logits,
        lambda s, t, backend: sk.pfs_pixel_kd(s, t, 1.0, backend=backend),
        lambda s, t: eager.pfs_pixel_kd(s, t, 1.0), bytes=_read_st_twice_write_ds,
        pass3_bytes=_read_st_write_ds),
    "pairwise_kd": Case(
        "pairwise_kd", PAIRS, PAIRS_QUICK, _features,
        lambda s, t, backend: sk.pairwise_kd(s, t, backend=backend),
        eager.pairwise_kd, bytes=_read_st_write_ds, flops=_pairwise_flops, flop_kind="dtype"),
    # precision="fast" (fp32 Gram chunks added in fp64): the speed option for bf16 users; the row
    # also keeps its kernels under the static report's compile and spill gates.
    "pairwise_kd_fast": Case(
        "pairwise_kd_fast", PAIRS, PAIRS_QUICK, _features,
        lambda s, t, backend: sk.pairwise_kd(s, t, precision="fast", backend=backend),
        eager.pairwise_kd, bytes=_read_st_write_ds, flops=_pairwise_flops, flop_kind="dtype"),
    "cross_image_kd": Case(
        "cross_image_kd", CROSS_PAIRS, PAIRS_QUICK, _features,
        lambda s, t, backend: sk.cross_image_kd(s, t, 0.1, backend=backend),
        lambda s, t: eager.cross_image_kd(s, t, 0.1), bytes=_read_st_write_ds, flops=_cross_image_flops,
        flop_kind="dtype"),
    # SSIM-KD as distillation uses it (reflect padding, per-map min-max rescaling), against kornia
    # (reflect); the valid, unrescaled row is the work pytorch-msssim and fused-ssim do.
    "ssim_kd": Case(
        "ssim_kd", [((8, 256, 64, 128),) * 2, ((8, 512, 128, 256),) * 2], FEATURES_QUICK, _features,
        lambda s, t, backend: sk.ssim_kd(s, t, window_size=SSIM_WINDOW, backend=backend),
        eager.ssim_kd, bytes=_read_st_write_ds, flops=_ssim_flops, flop_kind="fp32",
        peers={"peer:kornia": _peer_kornia}),
    "ssim_kd_valid": Case(
        # quick maps larger than the window: valid padding needs H, W >= 11
        "ssim_kd_valid", [((8, 256, 64, 128),) * 2, ((8, 512, 128, 256),) * 2], [((2, 6, 17, 19),) * 2], _features,
        lambda s, t, backend: sk.ssim_kd(s, t, window_size=SSIM_WINDOW, padding="valid", normalize=False,
                                         backend=backend),
        _eager_ssim_valid, bytes=_read_st_write_ds,
        flops=_ssim_flops, flop_kind="fp32",
        peers={"peer:pytorch-msssim": _peer_pytorch_msssim, "peer:fussim": _peer_fussim}),
    "attnfd_loss": Case(
        "attnfd_loss", FEATURES, FEATURES_QUICK, _features,
        lambda s, t, backend: sk.attnfd_loss(s, t, backend=backend),
        eager.attnfd_loss, bytes=_read_st_twice_write_ds, pass3_bytes=_read_st_write_ds),
    "spatial_pool": Case(
        "spatial_pool", [FEATURES[0][:1], FEATURES[1][:1]], [FEATURES_QUICK[0][:1]], _spatial_pool_inputs,
        lambda x, backend: sk.spatial_pool(x, backend=backend), eager.spatial_pool, bytes=_spatial_pool_bytes),
    "channel_pool": Case(
        "channel_pool", [FEATURES[0][:1], FEATURES[1][:1]], [FEATURES_QUICK[0][:1]], _channel_pool_inputs,
        lambda x, gate, backend: sk.channel_pool(x, gate, backend=backend), eager.channel_pool,
        bytes=_channel_pool_bytes, pass3_bytes=_channel_pool_pass3_bytes),
    "cbam_gate": Case(
        "cbam_gate", [FEATURES[0][:1], FEATURES[1][:1]], [FEATURES_QUICK[0][:1]], _cbam_gate_inputs,
        lambda x, mc, ms, backend: sk.cbam_gate(x, mc, ms, backend=backend), eager.cbam_gate,
        bytes=_cbam_gate_bytes, pass3_bytes=_cbam_gate_pass3_bytes),
}
