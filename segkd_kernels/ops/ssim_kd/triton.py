"""ssim_kd in Triton (docs/losses.md 5): fused forward and backward.

Layout of the work: the grid is (N*C planes) x (row strips) x (column blocks). A program owns BC output columns (one per thread) and a strip of up to TH output rows, and
walks down the strip one row at a time, so the K - 1 halo rows of the vertical filter are filtered
once per strip, not once per row block.

Forward (_ssim_fwd_kernel), per input row of the strip and its halo:
  1. horizontal pass: thread c reads the K input columns of its window (fp32 after the load, each
     rescaled when normalize) and accumulates the five products x, y, x^2, y^2, xy with one
     weight per window slot. Padding is resolved here, once per program: the slot addresses are
     clamped into the row and each slot carries its own weight (0 outside the map for zeros and
     valid, the Gaussian taps of every reflected position that lands on the slot for reflect), so
     the row loop has no masks and no reflect arithmetic. A clamped slot reads the edge pixel,
     which is in the window anyway, so a non-finite value reaches exactly the outputs whose window
     holds it, as in the reference. Rows are padded as whole rows: the strip reads the reflected
     row (reflect) or zeroes the filtered row (zeros).
  2. vertical pass: a register sliding window over rows. The last K horizontally filtered rows of
     four statistics are kept in registers (loop-carried tuples): x, y, xy and the rescaled
     x^2 scale_x^2 + y^2 scale_y^2 (the map uses E[x^2] and E[y^2] only through var_x + var_y,
     so one ring serves both); an output row is K FMAs per statistic, then the window moves by
     one row.
  3. the SSIM map, clamp and the program's partial sum of the loss; the map is never written. When
     the student needs a gradient, the three per-pixel partial derivatives of the clamped loss
     term with respect to mu_x, E[x^2] and E[xy] are written, interleaved as one 16-byte vector
     per output pixel (fp32, the fourth lane 0): kept from the forward to the backward instead of
     a second forward, and read back with one vector load per window slot.
The per-program partial sums are then added by torch (deterministic, no atomics).

Backward (_ssim_bwd_kernel): the filter G (padding included) is linear, so
d loss / d x = G^T P_mu + 2 x G^T P_xx + y G^T P_xy. G^T is separable like G, and each axis of it
is again a K-slot gather over the partial maps with per-slot weights: the adjoint of the padding is
folded into those weights (reflect: a pixel also collects the taps of the padded positions that
reflect onto it), so there is no padded buffer and no fold pass. Columns carry their weights per
thread as in the forward; rows use the plain taps (zeros, valid) or, for reflect, the row's
folded weights from a small host table (_row_table: one uniform load per window slot, no branch
on edge rows). The same row walk with a register
window as the forward, three maps instead of five, then the combination with x and y and the
rescaling factor, written in the student's dtype. Under normalize, d x / d s is 1 / (max - min)
per (n, c), and exactly 0 for a flat map (reference: RANGE_EPS).

Per-(n, c) min and max for normalize come from _minmax_kernel (one pass over student and teacher).
fp16 / bf16 / fp32 inputs, fp32 statistics always; fp64 inputs use the reference.

Non-finite inputs give the reference's NaN and Inf pattern, in the loss and in the gradient: a NaN
makes its map's min, max and so the whole rescaled map NaN (normalize); a window holding a
non-finite value gives a NaN SSIM term (Inf - Inf in the variance, or NaN); the clamp keeps NaN.
Every product in the filters is a weight times a value of the window, so nothing else turns NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_common import FP_FUSION
from .reference import MAP_EPS, RANGE_EPS, gaussian_taps

PAD_CODES = {"reflect": 0, "zeros": 1, "valid": 2}

# (strip rows TH, block columns BC) forced for every kernel; None picks them from the shape.
# Tests set small ones so that tiny maps span several strips and column blocks.
TILE_OVERRIDE: tuple[int, int] | None = None

_TAPS: dict = {}


def _taps(window: int, sigma: float, device) -> torch.Tensor:
    """fp32 taps, made once per (window, sigma, device): no tiny kernels on every call."""
    key = (window, sigma, str(device))
    if key not in _TAPS:
        _TAPS[key] = gaussian_taps(window, sigma, torch.float32, "cpu").to(device)
    return _TAPS[key]


def _row_table(h: int, window: int, sigma: float, device) -> torch.Tensor:
    """(h, window) fp32: entry [p, k] weights map row p - R + k in the backward's vertical adjoint
    of input row p under reflect padding (the taps, plus the taps of the padded rows -p and
    2 (h - 1) - p that reflect onto p; fp32 sums in the order of _weight). Made once per
    (h, window, sigma, device), like the taps."""
    key = ("rows", h, window, sigma, str(device))
    if key not in _TAPS:
        g = gaussian_taps(window, sigma, torch.float32, "cpu")
        r = window // 2
        p = torch.arange(h)[:, None]
        q = p - r + torch.arange(window)[None, :]

        def tap(d):
            inside = (d >= -r) & (d <= r)
            return torch.where(inside, g[(d + r).clamp(0, window - 1)], torch.zeros(()))

        w = tap(q - p)
        w = w + tap(-q - p) * (p >= 1).to(torch.float32)
        w = w + tap(2 * (h - 1) - q - p) * (p <= h - 2).to(torch.float32)
        _TAPS[key] = w.contiguous().to(device)
    return _TAPS[key]


def _tiles(rows: int, cols: int) -> tuple[int, int]:
    """Strip rows TH and block columns BC (one column per thread).

    BC = 128 (4 warps) keeps a row of a block at 512 contiguous bytes of fp32; narrower maps take
    the next power of two, at least one warp. TH = 64 rows: the K - 1 halo rows filtered once more
    per strip cost (K - 1) / 64 of the horizontal work, and a 64-row map is one strip."""
    if TILE_OVERRIDE is not None:
        return TILE_OVERRIDE
    bc = max(32, min(128, triton.next_power_of_2(cols)))
    return min(64, max(rows, 1)), bc


@triton.jit
def _reflect(i, n):
    """numpy / F.pad 'reflect' for |overhang| < n (checked by the API): -1 -> 1, n -> n - 2."""
    i = tl.abs(i)
    return tl.where(i > n - 1, 2 * (n - 1) - i, i)


@triton.jit
def _tap(taps_ptr, m, R: tl.constexpr):
    """Gaussian weight at offset m from the window centre, 0 outside the window."""
    inside = (m >= -R) & (m <= R)
    return tl.load(taps_ptr + R + tl.where(inside, m, 0), mask=inside, other=0.0)


@triton.jit
def _weight(taps_ptr, p, q, n, K: tl.constexpr, PAD: tl.constexpr, FORWARD: tl.constexpr):
    """Weight of source position q in output position p along one axis of length n (the source
    axis for the forward, the output axis for the backward), padding folded in.

    Forward, output p = sum_d taps(d) * padded[p + d]: reflect adds the taps of every padded
    position p + d whose reflection is q (q itself, -q and 2 (n - 1) - q). Backward: the transpose,
    output p (an input pixel) collects from source q (a map pixel) the taps between q and every
    padded position that reflects onto p. Valid reads source q = p + k (forward) / writes from
    q = p - k (backward), k = 0 .. K - 1."""
    R: tl.constexpr = K // 2
    if PAD == 2:
        if FORWARD:
            w = _tap(taps_ptr, q - p - R, R)
        else:
            w = _tap(taps_ptr, p - q - R, R)
    else:
        w = _tap(taps_ptr, q - p, R)
        if PAD == 0:
            if FORWARD:
                w += _tap(taps_ptr, -q - p, R) * (q >= 1).to(tl.float32)
                w += _tap(taps_ptr, 2 * (n - 1) - q - p, R) * (q <= n - 2).to(tl.float32)
            else:
                w += _tap(taps_ptr, -p - q, R) * (p >= 1).to(tl.float32)
                w += _tap(taps_ptr, 2 * (n - 1) - p - q, R) * (p <= n - 2).to(tl.float32)
    return w


@triton.jit
def _slots(taps_ptr, cols, n_src, n_axis, K: tl.constexpr, PAD: tl.constexpr, FORWARD: tl.constexpr,
           OFF: tl.constexpr):
    """Per-thread window slots of a row: clamped source columns and their weights (tuples of K).

    Slot k of output column c is source column c - OFF + k; a slot outside the source row reads
    the nearest edge pixel (always inside the window of c) with weight 0."""
    idx = ()
    wts = ()
    for k in tl.static_range(K):
        q = cols - OFF + k
        w = _weight(taps_ptr, cols, q, n_axis, K, PAD, FORWARD)
        w = tl.where((q >= 0) & (q < n_src), w, 0.0)
        idx = idx + (tl.minimum(tl.maximum(q, 0), n_src - 1),)
        wts = wts + (w,)
    return idx, wts


@triton.jit
def _load_taps(taps_ptr, K: tl.constexpr):
    """The K taps as a tuple of scalars (operands of the vertical pass's FMAs)."""
    taps = ()
    for k in tl.static_range(K):
        taps = taps + (tl.load(taps_ptr + k),)
    return taps


@triton.jit
def _plane_scales(scales_ptr, n_planes, plane):
    """min and 1 / range of the student's and the teacher's map `plane` (see _minmax_kernel)."""
    return (tl.load(scales_ptr + plane), tl.load(scales_ptr + n_planes + plane),
            tl.load(scales_ptr + 2 * n_planes + plane), tl.load(scales_ptr + 3 * n_planes + plane))


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
def _fwd_row(s_plane, t_plane, row_off, idx, wts, lo_x, lo_y, K: tl.constexpr, NORMALIZE: tl.constexpr):
    """Horizontal pass of one input row: the five filtered products at the block's columns, of
    x - min and y - min under normalize (the rescaling factors are applied once per output pixel,
    after the vertical pass: the filter is linear). Offsets are 32-bit inside the map (row_off +
    slot column), one wide add per pointer (a 64-bit row pointer plus the slot costs more)."""
    h_x = tl.zeros_like(wts[0])
    h_y = tl.zeros_like(wts[0])
    h_xx = tl.zeros_like(wts[0])
    h_yy = tl.zeros_like(wts[0])
    h_xy = tl.zeros_like(wts[0])
    for k in tl.static_range(K):
        off = row_off + idx[k]
        x = tl.load(s_plane + off).to(tl.float32)
        y = tl.load(t_plane + off).to(tl.float32)
        if NORMALIZE:
            x = x - lo_x
            y = y - lo_y
        gx = wts[k] * x
        gy = wts[k] * y
        h_x += gx
        h_y += gy
        h_xx += gx * x
        h_yy += gy * y
        h_xy += gx * y
    return h_x, h_y, h_xx, h_yy, h_xy


@triton.jit
def _put(win, j: tl.constexpr, v, K: tl.constexpr):
    """The window ring with slot j replaced by v (j static: a renaming, no register moves)."""
    out = ()
    for q in tl.static_range(K):
        if q == j:
            out = out + (v,)
        else:
            out = out + (win[q],)
    return out


@triton.jit
def _dot_ring(taps, win, j: tl.constexpr, K: tl.constexpr):
    """sum_q taps[q] * (q-th oldest row of the ring whose newest row is in slot j)."""
    acc = taps[0] * win[(j + 1) % K]
    for q in tl.static_range(1, K):
        acc += taps[q] * win[(j + 1 + q) % K]
    return acc


@triton.jit
def _fwd_out(mu_x, mu_y, e_ss, e_xy, acc, col_ok, c1, c2, map_eps, partials_ptr, offs,
             STORE: tl.constexpr):
    """SSIM term of one output row (e_ss = E[x^2] + E[y^2]: the map needs the two only through
    var_x + var_y): adds its clamped loss to acc and, with STORE, writes the three partial
    derivatives of the loss term (the backward's input)."""
    cov = e_xy - mu_x * mu_y
    m2 = mu_x * mu_x + mu_y * mu_y
    a1 = 2.0 * mu_x * mu_y + c1
    a2 = 2.0 * cov + c2
    b1 = m2 + c1
    b2 = (e_ss - m2) + c2
    num = a1 * a2
    den = b1 * b2 + map_eps
    # the hardware reciprocal (div.approx, within 2 ulp for |den| in [2^-126, 2^126]) instead of the
    # IEEE division; den is scaled by 2^-32 first so that it stays in that range up to the fp32
    # maximum, and the exact multiply by 2^-32 gives 1 / den back
    inv_den = tl.math.fdiv(1.0, den * 2.3283064365386963e-10, approx=True) * 2.3283064365386963e-10
    ssim = num * inv_den
    term = (1.0 - ssim) * 0.5
    # NaN-propagating clamp, as torch.clamp (the default tl.minimum / maximum drop a NaN)
    clamped = tl.minimum(tl.maximum(term, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                         propagate_nan=tl.PropagateNan.ALL)
    acc += tl.where(col_ok, clamped, 0.0)
    if STORE:
        # d term / d map = -1/2 where the clamp passes the gradient (torch.clamp: bounds inclusive);
        # a1, a2, b1, b2 as functions of (mu_x, E[x^2], E[xy]) with the teacher's statistics fixed,
        # with g = (d term / d map) / den: d/d mu_x = 2 g (mu_y (a2 - a1) - ssim mu_x (b2 - b1)),
        # d/d E[x^2] = -ssim b1 g, d/d E[xy] = 2 a1 g
        g = tl.where((term >= 0.0) & (term <= 1.0), -0.5, 0.0) * inv_den
        g2 = 2.0 * g
        p_mu = g2 * (mu_y * (a2 - a1) - ssim * mu_x * (b2 - b1))
        p_xx = -ssim * b1 * g
        p_xy = g2 * a1
        # one 16-byte vector per pixel: (p_mu, p_xx, p_xy, 0), so the backward reads the three
        # maps of a window slot with one load
        v = tl.join(tl.join(p_mu, p_xy), tl.join(p_xx, tl.zeros_like(p_xx)))
        v = tl.reshape(v, [p_mu.shape[0], 4])
        tl.store(partials_ptr + offs[:, None] * 4 + tl.arange(0, 4)[None, :], v, mask=col_ok[:, None])
    return acc


@triton.jit
def _ssim_fwd_kernel(s_ptr, t_ptr, taps_ptr, scales_ptr, loss_part_ptr, partials_ptr,
                     H, W, HO, WO, n_planes, n_strips, n_ctiles, TH, c1, c2, map_eps,
                     K: tl.constexpr, PAD: tl.constexpr, NORMALIZE: tl.constexpr, STORE: tl.constexpr,
                     BC: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    strip = tl.program_id(1)
    ctile = tl.program_id(2)
    OFF: tl.constexpr = 0 if PAD == 2 else K // 2
    o0 = strip * TH
    n_rows = tl.minimum(TH, HO - o0)
    cols = ctile * BC + tl.arange(0, BC)
    col_ok = cols < WO
    idx, wts = _slots(taps_ptr, cols, W, W, K, PAD, True, OFF)
    taps = _load_taps(taps_ptr, K)

    if NORMALIZE:
        # x' = (x - min) * scale: the difference first, exact near the minimum (x * scale - min *
        # scale would round min * scale, a large error when the map's offset dwarfs its range)
        lo_x, sc_x, lo_y, sc_y = _plane_scales(scales_ptr, n_planes, plane)
        sc_xx = sc_x * sc_x
        sc_yy = sc_y * sc_y
        sc_xy = sc_x * sc_y
    else:
        sc_xx = 1.0
        sc_yy = 1.0
    if not NORMALIZE:
        lo_x = 0.0
        lo_y = 0.0
    s_plane = s_ptr + plane * H * W
    t_plane = t_ptr + plane * H * W

    zero = tl.zeros([BC], tl.float32)
    w_x = (zero,) * K
    w_y = (zero,) * K
    w_ss = (zero,) * K
    w_xy = (zero,) * K
    acc = zero
    map_size = HO * WO
    # Padded row o0 - OFF + i; output row o0 + i - (K - 1) once the window holds K rows. The loop
    # advances K rows per step and the step is unrolled, so the ring slot of row i is the static
    # j = i mod K: the window never moves between registers.
    n_total = n_rows + K - 1
    for i0 in range(0, n_total, K):
        for j in tl.static_range(K):
            i = i0 + j
            if i < n_total:
                row = o0 - OFF + i
                if PAD == 0:
                    row = _reflect(row, H)
                row_c = tl.minimum(tl.maximum(row, 0), H - 1)
                h_x, h_y, h_xx, h_yy, h_xy = _fwd_row(s_plane, t_plane, row_c * W, idx, wts, lo_x, lo_y,
                                                      K, NORMALIZE)
                # the map uses E[x^2] and E[y^2] only through their sum: one ring for both, of the
                # rescaled squares (x - min)^2 scale^2 (the scales differ between x and y)
                if NORMALIZE:
                    h_ss = h_xx * sc_xx + h_yy * sc_yy
                else:
                    h_ss = h_xx + h_yy
                if PAD == 1:
                    # zero padding pads the rescaled map: rows outside are 0
                    row_ok = (row >= 0) & (row < H)
                    h_x = tl.where(row_ok, h_x, 0.0)
                    h_y = tl.where(row_ok, h_y, 0.0)
                    h_ss = tl.where(row_ok, h_ss, 0.0)
                    h_xy = tl.where(row_ok, h_xy, 0.0)
                w_x = _put(w_x, j, h_x, K)
                w_y = _put(w_y, j, h_y, K)
                w_ss = _put(w_ss, j, h_ss, K)
                w_xy = _put(w_xy, j, h_xy, K)
                if i >= K - 1:
                    mu_x = _dot_ring(taps, w_x, j, K)
                    mu_y = _dot_ring(taps, w_y, j, K)
                    e_ss = _dot_ring(taps, w_ss, j, K)
                    e_xy = _dot_ring(taps, w_xy, j, K)
                    if NORMALIZE:  # statistics of (x - min) * scale: linear and quadratic in the scale
                        mu_x *= sc_x
                        mu_y *= sc_y
                        e_xy *= sc_xy
                    acc = _fwd_out(mu_x, mu_y, e_ss, e_xy, acc, col_ok, c1, c2, map_eps, partials_ptr,
                                   plane * map_size + (o0 + i - (K - 1)) * WO + cols, STORE)
    tl.store(loss_part_ptr + (plane * n_strips + strip) * n_ctiles + ctile, tl.sum(acc, axis=0))


@triton.jit
def _bwd_row(p_row, idx, wts, K: tl.constexpr):
    """Horizontal adjoint of one row of the three partial maps (one 16-byte load per slot)."""
    h_mu = tl.zeros_like(wts[0])
    h_xx = tl.zeros_like(wts[0])
    h_xy = tl.zeros_like(wts[0])
    lanes = tl.arange(0, 4)[None, :]
    for k in tl.static_range(K):
        v = tl.load(p_row + idx[k][:, None] * 4 + lanes)
        even, odd = tl.split(tl.reshape(v, [v.shape[0], 2, 2]))  # (mu, xy), (xx, 0)
        mu, xy = tl.split(even)
        xx, _pad = tl.split(odd)
        h_mu += wts[k] * mu
        h_xx += wts[k] * xx
        h_xy += wts[k] * xy
    return h_mu, h_xx, h_xy


@triton.jit
def _row_weights(rows_ptr, p, K: tl.constexpr):
    """Folded reflect weights of the K window rows p - R .. p + R for output row p: row p of the
    host's table (_row_table), one uniform load per slot, no branch on the row."""
    w = ()
    for k in tl.static_range(K):
        w = w + (tl.load(rows_ptr + p * K + k),)
    return w


@triton.jit
def _ssim_bwd_kernel(partials_ptr, s_ptr, t_ptr, taps_ptr, rows_ptr, scales_ptr, gscale_ptr, out_ptr,
                     H, W, HO, WO, n_planes, n_strips, n_ctiles, TH,
                     K: tl.constexpr, PAD: tl.constexpr, NORMALIZE: tl.constexpr, BC: tl.constexpr):
    """d loss / d s over a strip of input rows: adjoint filter of the three partial maps, combined
    with x and y. Output pixel p collects from the map pixels within R of it (reflect, zeros; with
    the folded reflect weights) or from p - K + 1 .. p (valid)."""
    plane = tl.program_id(0).to(tl.int64)
    strip = tl.program_id(1)
    ctile = tl.program_id(2)
    OFF: tl.constexpr = K - 1 if PAD == 2 else K // 2
    p0 = strip * TH
    n_rows = tl.minimum(TH, H - p0)
    cols = ctile * BC + tl.arange(0, BC)
    col_ok = cols < W
    idx, wts = _slots(taps_ptr, cols, WO, W, K, PAD, False, OFF)
    if PAD != 0:  # reflect reads its row weights from the table
        taps = _load_taps(taps_ptr, K)
    map_size = HO * WO
    p_plane = partials_ptr + plane * map_size * 4

    if NORMALIZE:
        lo_x, sc_x, lo_y, sc_y = _plane_scales(scales_ptr, n_planes, plane)
        g = tl.load(gscale_ptr) * sc_x
    else:
        g = tl.load(gscale_ptr)
    x_plane = s_ptr + plane * H * W
    y_plane = t_ptr + plane * H * W
    cols_c = tl.minimum(cols, W - 1)

    zero = tl.zeros([BC], tl.float32)
    w_mu = (zero,) * K
    w_xx = (zero,) * K
    w_xy = (zero,) * K
    # map row p0 - OFF + i; output row p0 + i - (K - 1) once the window holds K rows (K rows per
    # step, unrolled: static ring slots, as in the forward)
    n_total = n_rows + K - 1
    for i0 in range(0, n_total, K):
        for j in tl.static_range(K):
            i = i0 + j
            if i < n_total:
                jr = p0 - OFF + i
                jr_c = tl.minimum(tl.maximum(jr, 0), HO - 1)
                h_mu, h_xx, h_xy = _bwd_row(p_plane + jr_c * WO * 4, idx, wts, K)
                # the partial maps are zero outside the output map
                jr_ok = (jr >= 0) & (jr < HO)
                w_mu = _put(w_mu, j, tl.where(jr_ok, h_mu, 0.0), K)
                w_xx = _put(w_xx, j, tl.where(jr_ok, h_xx, 0.0), K)
                w_xy = _put(w_xy, j, tl.where(jr_ok, h_xy, 0.0), K)
                if i >= K - 1:
                    p = p0 + i - (K - 1)
                    if PAD == 0:
                        rw = _row_weights(rows_ptr, p, K)
                        z_mu = _dot_ring(rw, w_mu, j, K)
                        z_xx = _dot_ring(rw, w_xx, j, K)
                        z_xy = _dot_ring(rw, w_xy, j, K)
                    else:
                        z_mu = _dot_ring(taps, w_mu, j, K)
                        z_xx = _dot_ring(taps, w_xx, j, K)
                        z_xy = _dot_ring(taps, w_xy, j, K)
                    offs = p * W + cols_c
                    x = tl.load(x_plane + offs).to(tl.float32)
                    y = tl.load(y_plane + offs).to(tl.float32)
                    if NORMALIZE:
                        x = (x - lo_x) * sc_x
                        y = (y - lo_y) * sc_y
                    grad = (z_mu + 2.0 * x * z_xx + y * z_xy) * g
                    tl.store(out_ptr + plane * H * W + p * W + cols, grad.to(out_ptr.dtype.element_ty),
                             mask=col_ok)


def _out_size(h: int, w: int, window: int, padding: str) -> tuple[int, int]:
    if padding == "valid":
        return h - window + 1, w - window + 1
    return h, w


def _check_grid(n_strips: int, n_ctiles: int) -> None:
    # grid axes 1 and 2 (row strips, column blocks) hold at most 65535 programs each
    if max(n_strips, n_ctiles) > 65535:
        raise ValueError(f"ssim_kd: map too large for one launch ({n_strips} row strips x {n_ctiles} column blocks)")


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
    """(loss in the student's dtype, partial-derivative maps (N*C, H', W', 4) fp32 (d/d mu_x,
    d/d E[x^2], d/d E[xy], 0 per pixel) or an empty tensor, per-plane rescaling (4, N*C) fp32: min and 1 / range of student, then teacher)."""
    from .api import _check_fits  # (api imports this module)

    # the kernels read reflected indices once: a map smaller than the window would read garbage
    _check_fits(window_size, padding, student.shape)
    s = student.contiguous()
    t = teacher.contiguous()
    n, c, h, w = s.shape
    ho, wo = _out_size(h, w, window_size, padding)
    scales = _scales(s, t, normalize)
    taps = _taps(window_size, sigma, s.device)
    th, bc = _tiles(ho, wo)
    n_strips = triton.cdiv(ho, th)
    _check_grid(n_strips, triton.cdiv(wo, bc))
    n_ctiles = triton.cdiv(wo, bc)
    loss_parts = torch.empty(n * c * n_strips * n_ctiles, dtype=torch.float32, device=s.device)
    if need_partials:
        partials = torch.empty(n * c, ho, wo, 4, dtype=torch.float32, device=s.device)
    else:
        partials = torch.empty(0, dtype=torch.float32, device=s.device)
    _ssim_fwd_kernel[(n * c, n_strips, n_ctiles)](
        # without partials the kernel never writes them; it still gets a valid (non-null) pointer
        s, t, taps, scales, loss_parts, partials if need_partials else loss_parts,
        h, w, ho, wo, n * c, n_strips, n_ctiles, th,
        (0.01 * data_range) ** 2, (0.03 * data_range) ** 2, MAP_EPS,
        K=window_size, PAD=PAD_CODES[padding], NORMALIZE=normalize, STORE=need_partials, BC=bc,
        num_warps=max(1, bc // 32), **FP_FUSION)
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
    taps = _taps(window_size, sigma, s.device)
    # d loss / d map carries 1 / (N C H' W') and the incoming gradient; a device scalar, no sync
    gscale = (grad_loss.to(torch.float32) / (n * c * ho * wo)).reshape(1)
    grad = torch.empty(n, c, h, w, dtype=student.dtype, device=s.device)
    th, bc = _tiles(h, w)
    n_strips = triton.cdiv(h, th)
    _check_grid(n_strips, triton.cdiv(w, bc))
    n_ctiles = triton.cdiv(w, bc)
    rows = _row_table(h, window_size, sigma, s.device) if padding == "reflect" else taps
    _ssim_bwd_kernel[(n * c, n_strips, n_ctiles)](
        partials, s, t, taps, rows, scales, gscale, grad, h, w, ho, wo, n * c, n_strips, n_ctiles, th,
        K=window_size, PAD=PAD_CODES[padding], NORMALIZE=normalize, BC=bc, num_warps=max(1, bc // 32), **FP_FUSION)
    return grad


@ssim_kd_triton.register_fake
def _(student, teacher, window_size, sigma, data_range, padding, normalize, need_partials):
    n, c, h, w = student.shape
    ho, wo = _out_size(h, w, window_size, padding)
    partials_shape = (n * c, ho, wo, 4) if need_partials else (0,)
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
