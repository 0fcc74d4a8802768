"""ssim_kd in Triton (docs/losses.md 5): fused forward and backward.

Layout of the work: the grid is (N*C planes) x (spatial tiles of the output map), flattened into
one axis, so a KD feature tensor with hundreds of channels and a small H x W gives thousands of
programs (the fused-ssim kernels loop over channels inside a block instead).

Forward (_ssim_fwd_kernel), per program:
  1. horizontal pass: K shifted loads of a (BR x BC) block of student and teacher rows, the block
     covering the tile's TH = BR - (K - 1) output rows plus their halo; each load is rescaled
     (normalize) and the five products x, y, x^2, y^2, xy are accumulated with one tap each, in fp32.
     Padding is folded into the load indices (reflect) or masks (zeros); valid needs neither.
  2. vertical pass: a register block cannot be shifted by rows, so the vertical filter is a
     product with the banded (BR x BR) tap matrix, G[i, j] = taps[j - i] (tl.dot, fp32 "ieee":
     TF32 would leave E[x^2] - mu^2 with a 1e-3 relative error).
  3. the SSIM map, clamp and the tile's partial sum of the loss; the map is never written. When
     the student needs a gradient, the three per-pixel partial derivatives of the clamped loss
     term with respect to mu_x, E[x^2] and E[xy] are written (fp32, output-map sized: 12 bytes
     per output pixel kept from the forward to the backward, instead of a second forward).
The per-program partial sums are then added by torch (deterministic, no atomics).

Backward: the filter G is linear, so d loss / d x = G^T P_mu + 2 x G^T P_xx + y G^T P_xy, with
G^T the adjoint of "pad, then filter". The taps are symmetric, so the adjoint of the valid filter
part is the same separable filter over the zero-extended partial maps (_ssim_bwd_kernel, the same
two passes as the forward, three maps instead of five). Zero padding and valid need nothing else.
Reflect padding's adjoint also folds the halo back onto the pixels it reflects: the backward
kernel writes the combination on the padded grid ((H + 2r) x (W + 2r)) and _ssim_fold_kernel adds
the (up to 3 x 3) padded positions that reflect onto each pixel. Under normalize, d x / d s is
1 / (max - min) per (n, c), and exactly 0 for a flat map (reference: RANGE_EPS).

Per-(n, c) min and max for normalize come from _minmax_kernel (one pass over student and teacher).
fp16 / bf16 / fp32 inputs, fp32 statistics always; fp64 inputs use the reference.

Non-finite inputs give the reference's NaN and Inf pattern, in the loss and in the gradient: a NaN
makes its map's min, max and so the whole rescaled map NaN (normalize); a window holding a
non-finite value gives a NaN SSIM term; the clamp keeps NaN. The banded tl.dot would spread one
non-finite value over its block's whole column (0 * NaN), so it multiplies blocks with those
values zeroed and one more product, of the 0/1 band with the non-finite marks, restores NaN
exactly where the window holds one (one extra tl.dot in each of the forward and the backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_common import FP_FUSION
from .reference import MAP_EPS, RANGE_EPS, gaussian_taps

PAD_CODES = {"reflect": 0, "zeros": 1, "valid": 2}

# (block rows BR, block columns BC) forced for every kernel; None picks them from the shape.
# Tests set small blocks so that tiny maps span several tiles in each direction.
TILE_OVERRIDE: tuple[int, int] | None = None

# Precision of the banded vertical product. "ieee" is plain fp32 FMA (the safe default, ~4x the
# taps' work); "tf32x3" (three TF32 tensor-core products, ~2^-22 relative error) is the candidate to
# measure on a GPU: the forward is FP32-compute-bound at KD shapes. Plain "tf32" is too coarse.
DOT_PRECISION = "ieee"

_TAPS: dict = {}


def _taps(window: int, sigma: float, device) -> torch.Tensor:
    """fp32 taps, made once per (window, sigma, device): no tiny kernels on every call."""
    key = (window, sigma, str(device))
    if key not in _TAPS:
        _TAPS[key] = gaussian_taps(window, sigma, torch.float32, "cpu").to(device)
    return _TAPS[key]


def _num_warps(br: int, bc: int) -> int:
    # five (BR x BC) fp32 accumulators and five product results live at once
    return 8 if br * bc >= 2048 else 4


def _tiles(window: int, rows: int, cols: int) -> tuple[int, int]:
    """Block rows BR (the tile computes BR - window + 1 output rows) and block columns BC.

    BR = 32 keeps the banded vertical product at 32 taps per output row while the halo costs
    (BR / TH - 1) = 10 / 22 extra loads for window 11; small windows use 16. BC follows the width
    up to 64 (one row of a 64-wide block is 256 contiguous bytes per load)."""
    if TILE_OVERRIDE is not None:
        return TILE_OVERRIDE
    br = 16 if window <= 5 else 32
    bc = max(16, min(64, triton.next_power_of_2(cols)))
    return br, bc


@triton.jit
def _reflect(i, n):
    """numpy / F.pad 'reflect' for |overhang| < n (checked by the API): -1 -> 1, n -> n - 2."""
    i = tl.abs(i)
    return tl.where(i > n - 1, 2 * (n - 1) - i, i)


@triton.jit
def _tap_matrix(taps_ptr, K: tl.constexpr, BR: tl.constexpr):
    """G[i, j] = taps[j - i] on the band 0 <= j - i < K: output row i of a block is the taps
    applied to block rows i .. i + K - 1."""
    d = tl.arange(0, BR)[None, :] - tl.arange(0, BR)[:, None]
    band = (d >= 0) & (d < K)
    return tl.load(taps_ptr + tl.where(band, d, 0), mask=band, other=0.0)


@triton.jit
def _finite(h):
    return tl.abs(h) < float("inf")  # False for +-Inf and NaN


@triton.jit
def _nonfinite_windows(finite, K: tl.constexpr, BR: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Which rows of the banded product band @ h have a non-finite h in their window.

    In a matrix product every output row sees every input row, the off-band ones times a zero tap,
    and 0 * NaN = NaN: one non-finite value would spread over the block's whole column. So the
    products take the blocks with their non-finite entries zeroed, and this product of the 0/1
    band with the non-finite marks (exact small integers) says which outputs must be NaN."""
    d = tl.arange(0, BR)[None, :] - tl.arange(0, BR)[:, None]
    window = tl.where((d >= 0) & (d < K), 1.0, 0.0)
    return tl.dot(window, tl.where(finite, 0.0, 1.0), input_precision=DOT_PRECISION) > 0.0


@triton.jit
def _minmax_kernel(s_ptr, t_ptr, scales_ptr, n_planes, plane_size, range_eps, BLOCK: tl.constexpr):
    """scales[0/1/2/3, plane] = min(s), 1 / (max(s) - min(s)) or 0 if flat, same for t.

    A NaN anywhere in a map makes its min and NaN its scale, as torch.amin / amax do (the
    reference): then every rescaled pixel is NaN. tl.minimum / tl.min skip NaN (IEEE minNum), so
    NaN is counted on the side and substituted at the end."""
    plane = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    s_lo = tl.full([BLOCK], float("inf"), tl.float32)
    s_hi = tl.full([BLOCK], float("-inf"), tl.float32)
    t_lo = tl.full([BLOCK], float("inf"), tl.float32)
    t_hi = tl.full([BLOCK], float("-inf"), tl.float32)
    s_nan = tl.zeros([BLOCK], tl.int32)
    t_nan = tl.zeros([BLOCK], tl.int32)
    for start in range(0, plane_size, BLOCK):
        offs = start + lanes
        ok = offs < plane_size
        s = tl.load(s_ptr + plane * plane_size + offs, mask=ok, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + plane * plane_size + offs, mask=ok, other=0.0).to(tl.float32)
        s_nan = s_nan | (s != s).to(tl.int32)
        t_nan = t_nan | (t != t).to(tl.int32)
        s_lo = tl.minimum(s_lo, tl.where(ok, s, float("inf")))
        s_hi = tl.maximum(s_hi, tl.where(ok, s, float("-inf")))
        t_lo = tl.minimum(t_lo, tl.where(ok, t, float("inf")))
        t_hi = tl.maximum(t_hi, tl.where(ok, t, float("-inf")))
    s_min = tl.where(tl.max(s_nan, axis=0) > 0, float("nan"), tl.min(s_lo, axis=0))
    s_span = tl.max(s_hi, axis=0) - s_min
    t_min = tl.where(tl.max(t_nan, axis=0) > 0, float("nan"), tl.min(t_lo, axis=0))
    t_span = tl.max(t_hi, axis=0) - t_min
    # A flat map (span <= RANGE_EPS) rescales to 0 with zero gradient: scale 0, not 1 / eps. The
    # test is `span <= eps`, so a NaN span gives a NaN scale (and an infinite one 0) as in the reference.
    s_scale = tl.where(s_span <= range_eps, 0.0, 1.0 / tl.where(s_span <= range_eps, 1.0, s_span))
    t_scale = tl.where(t_span <= range_eps, 0.0, 1.0 / tl.where(t_span <= range_eps, 1.0, t_span))
    tl.store(scales_ptr + plane, s_min)
    tl.store(scales_ptr + n_planes + plane, s_scale)
    tl.store(scales_ptr + 2 * n_planes + plane, t_min)
    tl.store(scales_ptr + 3 * n_planes + plane, t_scale)


@triton.jit
def _ssim_fwd_kernel(s_ptr, t_ptr, taps_ptr, scales_ptr, loss_part_ptr, partials_ptr,
                     H, W, HO, WO, n_planes, n_tile_cols, tiles_per_plane, c1, c2, map_eps,
                     K: tl.constexpr, PAD: tl.constexpr, NORMALIZE: tl.constexpr, STORE: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    plane = (pid // tiles_per_plane).to(tl.int64)
    tile = pid % tiles_per_plane
    TH: tl.constexpr = BR - K + 1
    R: tl.constexpr = K // 2
    o0 = (tile // n_tile_cols) * TH
    c0 = (tile % n_tile_cols) * BC

    # input rows read by the block: output row o uses padded rows o .. o + K - 1, i.e. input rows
    # o - R .. o + R (reflect, zeros) or o .. o + K - 1 (valid)
    if PAD == 2:
        rows = o0 + tl.arange(0, BR)
        col_base = c0 + tl.arange(0, BC)
    else:
        rows = o0 - R + tl.arange(0, BR)
        col_base = c0 - R + tl.arange(0, BC)
    if PAD == 0:
        rows = _reflect(rows, H)
    row_ok = (rows >= 0) & (rows < H)
    base = plane * H * W

    if NORMALIZE:
        lo_x = tl.load(scales_ptr + plane)
        sc_x = tl.load(scales_ptr + n_planes + plane)
        lo_y = tl.load(scales_ptr + 2 * n_planes + plane)
        sc_y = tl.load(scales_ptr + 3 * n_planes + plane)

    h_x = tl.zeros([BR, BC], tl.float32)
    h_y = tl.zeros([BR, BC], tl.float32)
    h_xx = tl.zeros([BR, BC], tl.float32)
    h_yy = tl.zeros([BR, BC], tl.float32)
    h_xy = tl.zeros([BR, BC], tl.float32)
    for k in tl.static_range(K):
        g = tl.load(taps_ptr + k)
        cols = col_base + k
        if PAD == 0:
            cols = _reflect(cols, W)
        ok = row_ok[:, None] & ((cols >= 0) & (cols < W))[None, :]
        offs = base + rows[:, None] * W + cols[None, :]
        x = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if NORMALIZE:
            # zero padding pads the rescaled map, so padded pixels stay 0
            x = tl.where(ok, (x - lo_x) * sc_x, 0.0)
            y = tl.where(ok, (y - lo_y) * sc_y, 0.0)
        gx = g * x
        gy = g * y
        h_x += gx
        h_y += gy
        h_xx += gx * x
        h_yy += gy * y
        h_xy += gx * y

    band = _tap_matrix(taps_ptr, K, BR)
    # A non-finite input (student or teacher) in a pixel's window makes the reference's statistics
    # non-finite and its SSIM term NaN (Inf - Inf in the variance, or NaN): mu_x is set to NaN
    # there, and every term and partial derivative of the pixel follows. (Finite inputs whose
    # squares overflow fp32, |x| > 1.8e19, are outside what this reproduces.)
    finite = _finite(h_x) & _finite(h_y) & _finite(h_xx) & _finite(h_yy) & _finite(h_xy)
    hit = _nonfinite_windows(finite, K, BR, DOT_PRECISION)
    mu_x = tl.dot(band, tl.where(finite, h_x, 0.0), input_precision=DOT_PRECISION)
    mu_x = tl.where(hit, float("nan"), mu_x)
    mu_y = tl.dot(band, tl.where(finite, h_y, 0.0), input_precision=DOT_PRECISION)
    e_xx = tl.dot(band, tl.where(finite, h_xx, 0.0), input_precision=DOT_PRECISION)
    e_yy = tl.dot(band, tl.where(finite, h_yy, 0.0), input_precision=DOT_PRECISION)
    e_xy = tl.dot(band, tl.where(finite, h_xy, 0.0), input_precision=DOT_PRECISION)

    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    a1 = 2.0 * mu_x * mu_y + c1
    a2 = 2.0 * cov + c2
    b1 = mu_x * mu_x + mu_y * mu_y + c1
    b2 = var_x + var_y + c2
    num = a1 * a2
    den = b1 * b2 + map_eps
    ssim = num / den
    term = (1.0 - ssim) / 2.0

    r_idx = tl.arange(0, BR)
    out_rows = o0 + r_idx
    out_cols = c0 + tl.arange(0, BC)
    valid = ((r_idx < TH) & (out_rows < HO))[:, None] & (out_cols < WO)[None, :]
    # NaN-propagating clamp, as torch.clamp (the default tl.minimum / maximum drop a NaN operand)
    clamped = tl.minimum(tl.maximum(term, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                         propagate_nan=tl.PropagateNan.ALL)
    part = tl.sum(tl.sum(tl.where(valid, clamped, 0.0), axis=1), axis=0)
    tl.store(loss_part_ptr + pid, part)

    if STORE:
        # d term / d map = -1/2 where the clamp passes the gradient (torch.clamp: bounds inclusive)
        gate = tl.where(valid & (term >= 0.0) & (term <= 1.0), -0.5, 0.0)
        inv_den = 1.0 / den
        d_a1 = a2 * inv_den
        d_a2 = a1 * inv_den
        q = num * inv_den * inv_den
        d_b1 = -q * b2
        d_b2 = -q * b1
        # a1, a2, b1, b2 as functions of (mu_x, E[x^2], E[xy]) with the teacher's statistics fixed
        p_mu = gate * (2.0 * mu_y * (d_a1 - d_a2) + 2.0 * mu_x * (d_b1 - d_b2))
        p_xx = gate * d_b2
        p_xy = gate * 2.0 * d_a2
        map_size = HO * WO
        offs = plane * map_size + out_rows[:, None] * WO + out_cols[None, :]
        stride = n_planes * map_size
        tl.store(partials_ptr + offs, p_mu, mask=valid)
        tl.store(partials_ptr + stride + offs, p_xx, mask=valid)
        tl.store(partials_ptr + 2 * stride + offs, p_xy, mask=valid)


@triton.jit
def _ssim_bwd_kernel(partials_ptr, s_ptr, t_ptr, taps_ptr, scales_ptr, gscale_ptr, out_ptr,
                     H, W, HO, WO, HB, WB, n_planes, n_tile_cols, tiles_per_plane,
                     K: tl.constexpr, PAD: tl.constexpr, NORMALIZE: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Adjoint filter of the three partial maps, combined with x and y.

    Output grid: the input map (zeros, valid; writes d loss / d s) or the padded map (reflect;
    writes d loss / d x on the padded grid for _ssim_fold_kernel). Position e of that grid gets
    sum_k taps[k] P[e + k - S] (taps symmetric), S = R for zeros, 2R for valid and reflect."""
    pid = tl.program_id(0)
    plane = (pid // tiles_per_plane).to(tl.int64)
    tile = pid % tiles_per_plane
    TH: tl.constexpr = BR - K + 1
    R: tl.constexpr = K // 2
    e0 = (tile // n_tile_cols) * TH
    c0 = (tile % n_tile_cols) * BC
    if PAD == 1:
        rows = e0 - R + tl.arange(0, BR)
        col_base = c0 - R + tl.arange(0, BC)
    else:
        rows = e0 - 2 * R + tl.arange(0, BR)
        col_base = c0 - 2 * R + tl.arange(0, BC)
    row_ok = (rows >= 0) & (rows < HO)
    map_size = HO * WO
    base = plane * map_size
    stride = n_planes * map_size

    h_mu = tl.zeros([BR, BC], tl.float32)
    h_xx = tl.zeros([BR, BC], tl.float32)
    h_xy = tl.zeros([BR, BC], tl.float32)
    for k in tl.static_range(K):
        g = tl.load(taps_ptr + k)
        cols = col_base + k
        ok = row_ok[:, None] & ((cols >= 0) & (cols < WO))[None, :]
        offs = base + rows[:, None] * WO + cols[None, :]
        h_mu += g * tl.load(partials_ptr + offs, mask=ok, other=0.0)
        h_xx += g * tl.load(partials_ptr + stride + offs, mask=ok, other=0.0)
        h_xy += g * tl.load(partials_ptr + 2 * stride + offs, mask=ok, other=0.0)

    band = _tap_matrix(taps_ptr, K, BR)
    # NaN partial derivatives (pixels with a non-finite SSIM term) reach exactly the positions
    # whose window holds them, as in the reference's adjoint; see _nonfinite_windows
    finite = _finite(h_mu) & _finite(h_xx) & _finite(h_xy)
    hit = _nonfinite_windows(finite, K, BR, DOT_PRECISION)
    z_mu = tl.dot(band, tl.where(finite, h_mu, 0.0), input_precision=DOT_PRECISION)
    z_mu = tl.where(hit, float("nan"), z_mu)
    z_xx = tl.dot(band, tl.where(finite, h_xx, 0.0), input_precision=DOT_PRECISION)
    z_xy = tl.dot(band, tl.where(finite, h_xy, 0.0), input_precision=DOT_PRECISION)

    r_idx = tl.arange(0, BR)
    e_rows = e0 + r_idx
    e_cols = c0 + tl.arange(0, BC)
    valid = ((r_idx < TH) & (e_rows < HB))[:, None] & (e_cols < WB)[None, :]
    # the pixel whose value the padded position e holds
    if PAD == 0:
        p_rows = _reflect(e_rows - R, H)
        p_cols = _reflect(e_cols - R, W)
    else:
        p_rows = e_rows
        p_cols = e_cols
    in_map = valid & ((p_rows >= 0) & (p_rows < H))[:, None] & ((p_cols >= 0) & (p_cols < W))[None, :]
    p_offs = plane * H * W + p_rows[:, None] * W + p_cols[None, :]
    x = tl.load(s_ptr + p_offs, mask=in_map, other=0.0).to(tl.float32)
    y = tl.load(t_ptr + p_offs, mask=in_map, other=0.0).to(tl.float32)
    if NORMALIZE:
        sc_x = tl.load(scales_ptr + n_planes + plane)
        x = (x - tl.load(scales_ptr + plane)) * sc_x
        y = (y - tl.load(scales_ptr + 2 * n_planes + plane)) * tl.load(scales_ptr + 3 * n_planes + plane)
    grad = (z_mu + 2.0 * x * z_xx + y * z_xy) * tl.load(gscale_ptr)
    if PAD == 0:
        out_offs = plane * HB * WB + e_rows[:, None] * WB + e_cols[None, :]
        tl.store(out_ptr + out_offs, grad, mask=in_map)
    else:
        if NORMALIZE:
            grad = grad * sc_x
        tl.store(out_ptr + p_offs, grad.to(out_ptr.dtype.element_ty), mask=in_map)


@triton.jit
def _ssim_fold_kernel(v_ptr, scales_ptr, out_ptr, H, W, n_planes, blocks_per_plane,
                      R: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Adjoint of reflect padding: pixel p gets the padded positions q with reflect(q) = p,
    i.e. q = p, q = -p (1 <= p <= R) and q = 2 (H - 1) - p (H - 1 - R <= p <= H - 2), per axis."""
    pid = tl.program_id(0)
    plane = (pid // blocks_per_plane).to(tl.int64)
    offs = (pid % blocks_per_plane) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < H * W
    i = offs // W
    j = offs % W
    HB = H + 2 * R
    WB = W + 2 * R
    base = plane * HB * WB
    # candidate padded rows / columns (padded coordinate + R) and whether each exists
    r0 = i + R
    r1 = R - i
    r1_ok = (i >= 1) & (i <= R)
    r2 = 2 * (H - 1) - i + R
    r2_ok = (i >= H - 1 - R) & (i <= H - 2)
    q0 = j + R
    q1 = R - j
    q1_ok = (j >= 1) & (j <= R)
    q2 = 2 * (W - 1) - j + R
    q2_ok = (j >= W - 1 - R) & (j <= W - 2)
    acc = tl.load(v_ptr + base + r0 * WB + q0, mask=ok, other=0.0)
    acc += tl.load(v_ptr + base + r0 * WB + q1, mask=ok & q1_ok, other=0.0)
    acc += tl.load(v_ptr + base + r0 * WB + q2, mask=ok & q2_ok, other=0.0)
    acc += tl.load(v_ptr + base + r1 * WB + q0, mask=ok & r1_ok, other=0.0)
    acc += tl.load(v_ptr + base + r1 * WB + q1, mask=ok & r1_ok & q1_ok, other=0.0)
    acc += tl.load(v_ptr + base + r1 * WB + q2, mask=ok & r1_ok & q2_ok, other=0.0)
    acc += tl.load(v_ptr + base + r2 * WB + q0, mask=ok & r2_ok, other=0.0)
    acc += tl.load(v_ptr + base + r2 * WB + q1, mask=ok & r2_ok & q1_ok, other=0.0)
    acc += tl.load(v_ptr + base + r2 * WB + q2, mask=ok & r2_ok & q2_ok, other=0.0)
    if NORMALIZE:
        acc = acc * tl.load(scales_ptr + n_planes + plane)
    tl.store(out_ptr + plane * H * W + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _out_size(h: int, w: int, window: int, padding: str) -> tuple[int, int]:
    if padding == "valid":
        return h - window + 1, w - window + 1
    return h, w


def _scales(s: torch.Tensor, t: torch.Tensor, normalize: bool) -> torch.Tensor:
    n, c, h, w = s.shape
    scales = torch.empty(4, n * c, dtype=torch.float32, device=s.device)
    if not normalize:  # identity: min 0, scale 1 (the kernels skip them; the saved tensor stays defined)
        scales[0::2] = 0.0
        scales[1::2] = 1.0
    else:
        block = min(triton.next_power_of_2(h * w), 1024)
        _minmax_kernel[(n * c,)](s, t, scales, n * c, h * w, RANGE_EPS, BLOCK=block, **FP_FUSION)
    return scales


@torch.library.custom_op("segkd::ssim_kd_triton", mutates_args=())
def ssim_kd_triton(student: torch.Tensor, teacher: torch.Tensor, window_size: int, sigma: float,
                   data_range: float, padding: str, normalize: bool, need_partials: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss in the student's dtype, partial-derivative maps (3, N*C, H', W') fp32 or an empty
    tensor, per-plane rescaling (4, N*C) fp32: min and 1 / range of student, then teacher)."""
    from .api import _check_fits  # (api imports this module)

    # the kernels read reflected indices once: a map smaller than the window would read garbage
    _check_fits(window_size, padding, student.shape)
    s = student.contiguous()
    t = teacher.contiguous()
    n, c, h, w = s.shape
    ho, wo = _out_size(h, w, window_size, padding)
    scales = _scales(s, t, normalize)
    taps = _taps(window_size, sigma, s.device)
    br, bc = _tiles(window_size, ho, wo)
    th = br - window_size + 1
    n_tile_cols = triton.cdiv(wo, bc)
    tiles = triton.cdiv(ho, th) * n_tile_cols
    loss_parts = torch.empty(n * c * tiles, dtype=torch.float32, device=s.device)
    if need_partials:
        partials = torch.empty(3, n * c, ho, wo, dtype=torch.float32, device=s.device)
    else:
        partials = torch.empty(0, dtype=torch.float32, device=s.device)
    _ssim_fwd_kernel[(n * c * tiles,)](
        # without partials the kernel never writes them; it still gets a valid (non-null) pointer
        s, t, taps, scales, loss_parts, partials if need_partials else loss_parts,
        h, w, ho, wo, n * c, n_tile_cols, tiles,
        (0.01 * data_range) ** 2, (0.03 * data_range) ** 2, MAP_EPS,
        K=window_size, PAD=PAD_CODES[padding], NORMALIZE=normalize, STORE=need_partials, BR=br, BC=bc,
        DOT_PRECISION=DOT_PRECISION, num_warps=_num_warps(br, bc), **FP_FUSION)
    loss = (loss_parts.sum() / (n * c * ho * wo)).to(student.dtype)
    return loss, partials, scales


@torch.library.custom_op("segkd::ssim_kd_backward_triton", mutates_args=())
def ssim_kd_backward_triton(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                            partials: torch.Tensor, scales: torch.Tensor, window_size: int, sigma: float,
                            padding: str, normalize: bool) -> torch.Tensor:
    s = student.contiguous()
    t = teacher.contiguous()
    partials = partials.contiguous()
    n, c, h, w = s.shape
    ho, wo = _out_size(h, w, window_size, padding)
    r = window_size // 2
    taps = _taps(window_size, sigma, s.device)
    # d loss / d map carries 1 / (N C H' W') and the incoming gradient; a device scalar, no sync
    gscale = (grad_loss.to(torch.float32) / (n * c * ho * wo)).reshape(1)
    grad = torch.empty(n, c, h, w, dtype=student.dtype, device=s.device)
    hb, wb = (h + 2 * r, w + 2 * r) if padding == "reflect" else (h, w)
    out = torch.empty(n * c, hb, wb, dtype=torch.float32, device=s.device) if padding == "reflect" else grad
    br, bc = _tiles(window_size, hb, wb)
    th = br - window_size + 1
    n_tile_cols = triton.cdiv(wb, bc)
    tiles = triton.cdiv(hb, th) * n_tile_cols
    _ssim_bwd_kernel[(n * c * tiles,)](
        partials, s, t, taps, scales, gscale, out, h, w, ho, wo, hb, wb, n * c, n_tile_cols, tiles,
        K=window_size, PAD=PAD_CODES[padding], NORMALIZE=normalize, BR=br, BC=bc,
        DOT_PRECISION=DOT_PRECISION, num_warps=_num_warps(br, bc), **FP_FUSION)
    if padding == "reflect":
        block = min(triton.next_power_of_2(h * w), 1024)
        blocks = triton.cdiv(h * w, block)
        _ssim_fold_kernel[(n * c * blocks,)](out, scales, grad, h, w, n * c, blocks,
                                             R=r, NORMALIZE=normalize, BLOCK=block, **FP_FUSION)
    return grad


@ssim_kd_triton.register_fake
def _(student, teacher, window_size, sigma, data_range, padding, normalize, need_partials):
    n, c, h, w = student.shape
    ho, wo = _out_size(h, w, window_size, padding)
    partials_shape = (3, n * c, ho, wo) if need_partials else (0,)
    return (student.new_empty(()), student.new_empty(partials_shape, dtype=torch.float32),
            student.new_empty((4, n * c), dtype=torch.float32))


@ssim_kd_backward_triton.register_fake
def _(grad_loss, student, teacher, partials, scales, window_size, sigma, padding, normalize):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, teacher, window_size, sigma, data_range, padding, normalize, _need = inputs
    _loss, partials, scales = output
    ctx.save_for_backward(student, teacher, partials, scales)
    ctx.options = (window_size, sigma, data_range, padding, normalize)


def _backward(ctx, grad_loss, _grad_partials, _grad_scales):
    student, teacher, partials, scales = ctx.saved_tensors
    window_size, sigma, data_range, padding, normalize = ctx.options
    grad_student = None
    if ctx.needs_input_grad[0]:
        if partials.numel() == 0:  # forward ran without them (no gradient was expected): recompute
            _, partials, scales = ssim_kd_triton(student, teacher, window_size, sigma, data_range, padding,
                                                 normalize, True)
        grad_student = ssim_kd_backward_triton(grad_loss, student, teacher, partials, scales, window_size,
                                               sigma, padding, normalize)
    # the teacher is a target: no gradient (docs/losses.md)
    return grad_student, None, None, None, None, None, None, None


ssim_kd_triton.register_autograd(_backward, setup_context=_setup_context)
