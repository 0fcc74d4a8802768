"""pairwise_kd in Triton: the exact Gram identity (docs/losses.md 3) with fused per-pixel normalisation.

Per image, with A = [a_p] (P x C_s) and B = [b_p] (P x C_t) the unit pixel features and
Z = [A | B] (P x (C_s + C_t)), G = Z^T Z holds the three Gram blocks G_aa, G_ab, G_bb:
    loss = (||G_aa||_F^2 - 2 ||G_ab||_F^2 + ||G_bb||_F^2) / (N P^2)
    dA   = 4 g / (N P^2) * (A G_aa - B G_ab^T),  then through a_p = s_p / max(||s_p||, eps)

Kernels, all reading the features in their natural (N, C, P) layout (pixels contiguous):
  _norm_kernel      per-pixel L2 norm over the channels and its clamped inverse 1 / max(norm, eps),
                    fp64, once per tensor: every later kernel multiplies by the stored inverse
  _zgram_kernel     ONE launch for all of G: the channel axis of Z is cut into TILE-wide tiles, the
                    student's channels padded to a whole number of tiles so that every tile comes
                    from one tensor; a program computes one tile on or above the diagonal over one
                    split of the pixels and writes it to its own slot of a partials buffer. The
                    partials are summed over the splits by torch in a fixed order (deterministic,
                    no atomics). The split count is chosen so that the grid fills the GPU twice over.
  _grad_kernel      dA^T tile = (G_aa S^T) * inv_s - (G_ab T^T) * inv_t: the per-pixel inverse
                    norms factor out of the channel sums, so the tensor-core operands are the raw
                    features (bf16 exact in bf16 MMA; fp32 through the 3xTF32 split)
  _norm_bwd_kernel  ds = (dA - a (a . dA)) / ||s|| (or dA / ||s|| with detach_norm), per pixel block

Why fp64 Gram accumulation (precision="exact"): the three terms are each ~P^2/C while the loss can
be 1e-7 of that (student = teacher + small noise). fp32 accumulation of the Gram entries, even
combined in fp64, is then off by percents (python_tests/test_pairwise_kd.py::test_near_cancellation_fp32).
Products of fp32-exact values are exact in fp64, so fp64 accumulation (DMMA on sm_80/sm_90) makes
the Gram entries and their combination accurate to ~1e-15. precision="fast" trades that for fp32
tensor cores: unit features rounded to fp32, products through the 3xTF32 split (fp32-accurate),
fp32 accumulation over FAST_CHUNK pixels at a time and the chunk sums added in fp64; its error
bound and measured error are in docs/losses.md 3. The three Frobenius norms and their combination
are C x C reductions done with torch in fp64 (negligible work, pairwise-summed).

The backward's two products do not cancel catastrophically (the gradient is O(noise) with fp32
error O(eps) relative to the terms), so they run on tensor cores with fp32 accumulators: 3xTF32 for
fp32 (and fp16, whose Gram entries would overflow fp16) inputs, bf16 MMA for bf16 inputs with G
split into bf16 hi + lo parts (2^-17 relative), fp64 for fp64 inputs.
"""

import torch
import triton
import triton.language as tl

from .._triton_common import FP_FUSION, acc_dtype, acc_torch_dtype, cdiv, next_power_of_2

from ..._backends import TRITON_INTERPRET
from .reference import FAST_CHUNK, NORM_EPS, combine_upper_tiles

# backward products (the _grad_kernel MODE constexpr)
_MODE_FP64, _MODE_TF32X3, _MODE_BF16X2 = 0, 1, 2


@triton.jit
def _norm_kernel(x_ptr, norm_ptr, inv_ptr, C, P, eps, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    base = x_ptr + n * C * P
    acc = tl.zeros([BLOCK_P], dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (offs_c[:, None] < C) & mask_p[None, :]
        x = tl.load(base + offs_c[:, None] * P + offs_p[None, :], mask=mask, other=0.0).to(tl.float64)
        acc += tl.sum(x * x, axis=0)
    norm = tl.sqrt(acc)
    tl.store(norm_ptr + n * P + offs_p, norm, mask=mask_p)
    tl.store(inv_ptr + n * P + offs_p, 1.0 / tl.maximum(norm, eps, propagate_nan=tl.PropagateNan.ALL), mask=mask_p)


@triton.jit
def _tile_start(r, T):
    """Linear index of tile (r, r) in the row-major upper triangle of a T x T tile grid."""
    return r * T - (r * (r - 1)) // 2


@triton.jit
def _zgram_operands(x_base, mask_x, y_base, mask_y, offs_p, p_end, P, offs_r):
    """Raw feature blocks of the two tiles at pixels offs_p; pixels at or past p_end load as 0 (and
    the callers load their inverse norms as 0), so they add nothing."""
    mask_p = offs_p < p_end
    x = tl.load(x_base + offs_r[:, None] * P + offs_p[None, :], mask=mask_x[:, None] & mask_p[None, :], other=0.0)
    y = tl.load(y_base + offs_r[:, None] * P + offs_p[None, :], mask=mask_y[:, None] & mask_p[None, :], other=0.0)
    return x, y


@triton.jit
def _z_tile_rows(ti, TA, s_ptr, sinv_ptr, t_ptr, tinv_ptr, CS, CT, P, n, offs_r, TILE: tl.constexpr):
    """Channel tile ti of Z = [A; B] for image n: (its first row, the inverse norms of its map, the
    mask of its rows). Tiles ti < TA are student channels ti*TILE.., the rest teacher channels."""
    if ti < TA:
        base = s_ptr + n * CS * P + ti.to(tl.int64) * TILE * P
        inv = sinv_ptr + n * P
        mask = ti * TILE + offs_r < CS
    else:
        base = t_ptr + n * CT * P + (ti - TA).to(tl.int64) * TILE * P
        inv = tinv_ptr + n * P
        mask = (ti - TA) * TILE + offs_r < CT
    return base, inv, mask


@triton.jit
def _zgram_kernel(s_ptr, sinv_ptr, t_ptr, tinv_ptr, part_ptr, CS, CT, P, TA, T, pix_per_split,
                  TILE: tl.constexpr, BLOCK_P: tl.constexpr, FAST: tl.constexpr):
    """part[n, split, k] = tile k = (ti, tj), ti <= tj, of Z^T Z over the split's pixels, fp64.
    Tiles ti < TA are student channels ti*TILE.., the rest teacher channels (ti-TA)*TILE.."""
    k = tl.program_id(0)
    split = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    n_up = tl.num_programs(0)
    n_splits = tl.num_programs(1)
    # (ti, tj) from k: ti = number of rows r >= 1 whose first tile index is <= k
    ti = k * 0
    for r in range(1, T):
        ti += (_tile_start(r, T) <= k).to(tl.int32)
    tj = ti + k - _tile_start(ti, T)
    offs_r = tl.arange(0, TILE)
    x_base, x_inv, mask_x = _z_tile_rows(ti, TA, s_ptr, sinv_ptr, t_ptr, tinv_ptr, CS, CT, P, n, offs_r, TILE)
    y_base, y_inv, mask_y = _z_tile_rows(tj, TA, s_ptr, sinv_ptr, t_ptr, tinv_ptr, CS, CT, P, n, offs_r, TILE)
    p_begin = split * pix_per_split
    p_end = tl.minimum(p_begin + pix_per_split, P)
    acc = tl.zeros([TILE, TILE], dtype=tl.float64)
    for p0 in range(p_begin, p_end, BLOCK_P):
        if FAST:
            # fp32 unit features, fp32-accurate products (3xTF32), one fp32 sum over the BLOCK_P
            # pixels (four dots of a quarter of the pixels: the 3xTF32 operand halves of a whole
            # block, or of half of one with fp32 inputs, spill on sm_80), that chunk sum added in fp64
            chunk = tl.zeros([TILE, TILE], dtype=tl.float32)
            for h in range(0, BLOCK_P, BLOCK_P // 4):
                offs_p = p0 + h + tl.arange(0, BLOCK_P // 4)
                x, y = _zgram_operands(x_base, mask_x, y_base, mask_y, offs_p, p_end, P, offs_r)
                xf = x.to(tl.float32) * tl.load(x_inv + offs_p, mask=offs_p < p_end, other=0.0).to(tl.float32)[None, :]
                yf = y.to(tl.float32) * tl.load(y_inv + offs_p, mask=offs_p < p_end, other=0.0).to(tl.float32)[None, :]
                chunk = tl.dot(xf, tl.trans(yf), chunk, input_precision="tf32x3")
            acc += chunk.to(tl.float64)
        else:
            offs_p = p0 + tl.arange(0, BLOCK_P)
            x, y = _zgram_operands(x_base, mask_x, y_base, mask_y, offs_p, p_end, P, offs_r)
            xd = x.to(tl.float64) * tl.load(x_inv + offs_p, mask=offs_p < p_end, other=0.0)[None, :]
            yd = y.to(tl.float64) * tl.load(y_inv + offs_p, mask=offs_p < p_end, other=0.0)[None, :]
            acc += tl.dot(xd, tl.trans(yd), input_precision="ieee", out_dtype=tl.float64)
    slot = part_ptr + ((n * n_splits + split) * n_up + k) * TILE * TILE
    tl.store(slot + offs_r[:, None] * TILE + offs_r[None, :], acc)


@triton.jit
def _mma(g, x, acc, MODE: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """acc + g @ x, g an fp64 G block, x a block of raw features. NATIVE_BF16=False (the
    interpreter, whose bf16 tl.dot is wrong in Triton 3.9) takes the same bf16 parts through an fp32
    dot: their products are exact in fp32 either way."""
    if MODE == 0:
        acc = tl.dot(g, x.to(tl.float64), acc, input_precision="ieee", out_dtype=tl.float64)
    elif MODE == 1:
        acc = tl.dot(g.to(tl.float32), x.to(tl.float32), acc, input_precision="tf32x3")
    else:
        # bf16 features are exact bf16 MMA operands; G as hi + lo bf16 parts (2^-17 relative)
        # through fp32 (native cvt to bf16; Triton 3.9's interpreter botches fp64 -> bf16): the
        # double rounding moves hi by at most one bf16 ulp, and lo takes up whatever hi missed
        g_hi = g.to(tl.float32).to(tl.bfloat16)
        g_lo = (g - g_hi.to(tl.float64)).to(tl.float32).to(tl.bfloat16)
        xb = x.to(tl.bfloat16)
        if NATIVE_BF16:
            acc = tl.dot(g_hi, xb, acc, out_dtype=tl.float32)
            acc = tl.dot(g_lo, xb, acc, out_dtype=tl.float32)
        else:
            xf = xb.to(tl.float32)
            acc = tl.dot(g_hi.to(tl.float32), xf, acc, input_precision="ieee")
            acc = tl.dot(g_lo.to(tl.float32), xf, acc, input_precision="ieee")
    return acc


@triton.jit
def _grad_kernel(g_ptr, s_ptr, sinv_ptr, t_ptr, tinv_ptr, da_ptr, grad_ptr, CS, CT, P, TA, T, scale,
                 TILE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, MODE: tl.constexpr,
                 NATIVE_BF16: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """da[n, c, p] = grad * scale * ((G_aa S)[c, p] inv_s[p] - (G_ab T)[c, p] inv_t[p]) for the
    student channels c of tile row ci; G read from the upper tiles of the forward (transposed
    where the tile lies below the diagonal). The upstream gradient is read from memory: no host
    sync, and nothing data-dependent for torch.compile."""
    ci = tl.program_id(0)
    n = tl.program_id(2).to(tl.int64)
    offs_c = tl.arange(0, TILE)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    n_up = T * (T + 1) // 2
    g_base = g_ptr + n * n_up * TILE * TILE
    acc_a = tl.zeros([TILE, BLOCK_P], dtype=ACC_DTYPE)
    for k0 in range(0, TA * TILE, BLOCK_K):
        kt = k0 // TILE
        lo = tl.minimum(ci, kt)
        hi = tl.maximum(ci, kt)
        tile = g_base + (_tile_start(lo, T) + hi - lo).to(tl.int64) * TILE * TILE
        stride_r = tl.where(ci <= kt, TILE, 1)
        stride_k = tl.where(ci <= kt, 1, TILE)
        g = tl.load(tile + offs_c[:, None] * stride_r + (k0 % TILE + offs_k)[None, :] * stride_k)
        x = tl.load(s_ptr + n * CS * P + (k0 + offs_k)[:, None] * P + offs_p[None, :],
                    mask=(k0 + offs_k < CS)[:, None] & mask_p[None, :], other=0.0)
        acc_a = _mma(g, x, acc_a, MODE, NATIVE_BF16)
    acc_b = tl.zeros([TILE, BLOCK_P], dtype=ACC_DTYPE)
    row = _tile_start(ci, T) - ci
    for k0 in range(0, (T - TA) * TILE, BLOCK_K):
        tile = g_base + (row + TA + k0 // TILE).to(tl.int64) * TILE * TILE  # tile (ci, TA + k0 // TILE)
        g = tl.load(tile + offs_c[:, None] * TILE + (k0 % TILE + offs_k)[None, :])
        y = tl.load(t_ptr + n * CT * P + (k0 + offs_k)[:, None] * P + offs_p[None, :],
                    mask=(k0 + offs_k < CT)[:, None] & mask_p[None, :], other=0.0)
        acc_b = _mma(g, y, acc_b, MODE, NATIVE_BF16)
    s_inv = tl.load(sinv_ptr + n * P + offs_p, mask=mask_p, other=0.0).to(ACC_DTYPE)
    t_inv = tl.load(tinv_ptr + n * P + offs_p, mask=mask_p, other=0.0).to(ACC_DTYPE)
    g_out = tl.load(grad_ptr).to(ACC_DTYPE) * scale
    da = (acc_a * s_inv[None, :] - acc_b * t_inv[None, :]) * g_out
    rows = ci * TILE + offs_c
    tl.store(da_ptr + n * CS * P + rows[:, None].to(tl.int64) * P + offs_p[None, :], da,
             mask=(rows < CS)[:, None] & mask_p[None, :])


@triton.jit
def _norm_bwd_kernel(s_ptr, snorm_ptr, sinv_ptr, da_ptr, ds_ptr, C, P, eps, BLOCK_C: tl.constexpr,
                     BLOCK_P: tl.constexpr, DETACH_NORM: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """ds = (da - a (a . da)) / max(|s|, eps); the projection drops out where the norm is clamped
    (there the divisor is the constant eps) or detached."""
    n = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    inv = tl.load(sinv_ptr + n * P + offs_p, mask=mask_p, other=1.0).to(ACC_DTYPE)
    base = n * C * P
    radial = tl.zeros([BLOCK_P], dtype=ACC_DTYPE)
    if not DETACH_NORM:
        norm = tl.load(snorm_ptr + n * P + offs_p, mask=mask_p, other=1.0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = (offs_c[:, None] < C) & mask_p[None, :]
            idx = base + offs_c[:, None] * P + offs_p[None, :]
            a = tl.load(s_ptr + idx, mask=mask, other=0.0).to(ACC_DTYPE) * inv[None, :]
            da = tl.load(da_ptr + idx, mask=mask, other=0.0).to(ACC_DTYPE)
            radial += tl.sum(a * da, axis=0)
        radial = tl.where(norm >= eps, radial, 0.0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (offs_c[:, None] < C) & mask_p[None, :]
        idx = base + offs_c[:, None] * P + offs_p[None, :]
        a = tl.load(s_ptr + idx, mask=mask, other=0.0).to(ACC_DTYPE) * inv[None, :]
        da = tl.load(da_ptr + idx, mask=mask, other=0.0).to(ACC_DTYPE)
        ds = (da - a * radial[None, :]) * inv[None, :]
        tl.store(ds_ptr + idx, ds.to(ds_ptr.dtype.element_ty), mask=mask)


def _tile(c: int) -> int:
    """Channel tile of Z: tl.dot wants >= 16; 64 fills a warpgroup's MMA and keeps the fp64
    accumulator (32 registers per thread) and the staged fp64 operands within one SM's budget."""
    return max(16, min(64, next_power_of_2(c)))


# Pixel tiles: wide under the interpreter (its cost is per block operation, not per element).
_BLOCK_P = 256 if TRITON_INTERPRET else 64
_GRAM_BLOCK_P = 128 if TRITON_INTERPRET else 32  # fp64 operands: 2 x 64 x 32 x 8 B per stage
_GRAD_BLOCK_P = 128 if TRITON_INTERPRET else 64
_GRAD_BLOCK_K = 64 if TRITON_INTERPRET else 32
_SMS_DEFAULT = 132  # H100/H200: the split count is planned for it when no device says otherwise
_WAVES = 2
_CTAS_PER_SM = 3  # the most the static report shows for the 64 x 64 tiles (bf16 exact, sm_80 and sm_90)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS_DEFAULT


def _plan(n: int, cs: int, ct: int, p: int, fast: bool, device: torch.device) -> dict:
    """Tile and split sizes, a pure function of the shapes (and the device's SM count)."""
    tile = _tile(max(cs, ct))
    ta, tb = cdiv(cs, tile), cdiv(ct, tile)
    t = ta + tb
    n_up = t * (t + 1) // 2
    block_p = FAST_CHUNK if fast else _GRAM_BLOCK_P
    # enough (tile, split, image) programs for _WAVES full waves, each split at least a few chunks
    min_split = block_p * (2 if TRITON_INTERPRET else 8)
    want = cdiv(_WAVES * _CTAS_PER_SM * _sm_count(device), n * n_up)
    splits = max(1, min(want, cdiv(p, min_split)))
    pix = cdiv(cdiv(p, splits), block_p) * block_p
    return dict(tile=tile, ta=ta, tb=tb, t=t, n_up=n_up, block_p=block_p, pix=pix, splits=cdiv(p, pix))


def _norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, p = x.shape
    norm = torch.empty(n, p, dtype=torch.float64, device=x.device)
    inv = torch.empty_like(norm)
    block_c = min(next_power_of_2(c), 32)
    _norm_kernel[(n, cdiv(p, _BLOCK_P))](x, norm, inv, c, p, NORM_EPS, BLOCK_C=block_c, BLOCK_P=_BLOCK_P,
                                                **FP_FUSION)
    return norm, inv


def _upcast_for_gram(x: torch.Tensor, fast: bool) -> torch.Tensor:
    # Triton before 3.9 fails to lower an fp64 tl.dot whose operands were loaded as 16-bit
    # (ConvertTritonGPUToLLVM, sm_80 and sm_90; 3.6 seen): give it fp32 operands instead.
    if _GRAM_UPCAST_16BIT and not fast and x.element_size() == 2:
        return x.float()
    return x


_GRAM_UPCAST_16BIT = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9)


@torch.library.custom_op("segkd::pairwise_kd_triton", mutates_args=())
def pairwise_kd_triton(s: torch.Tensor, t: torch.Tensor, detach_norm: bool, precision: str = "exact"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss in s's dtype, G's upper tiles (N, n_up, TILE, TILE), |s_p|, 1 / max(|s_p|, eps),
    1 / max(|t_p|, eps)), the last four fp64 and kept for the backward. s: (N, C_s, P),
    t: (N, C_t, P); detach_norm only changes the backward; precision "exact" or "fast" (fp64
    inputs compute in fp64 either way)."""
    s, t = s.contiguous(), t.contiguous()
    n, cs, p = s.shape
    ct = t.shape[1]
    fast = precision == "fast" and s.dtype != torch.float64
    plan = _plan(n, cs, ct, p, fast, s.device)
    snorm, sinv = _norms(s)
    _tnorm, tinv = _norms(t)
    tile, n_up, splits = plan["tile"], plan["n_up"], plan["splits"]
    part = torch.empty(n, splits, n_up, tile, tile, dtype=torch.float64, device=s.device)
    _zgram_kernel[(n_up, splits, n)](
        _upcast_for_gram(s, fast), sinv, _upcast_for_gram(t, fast), tinv, part, cs, ct, p, plan["ta"], plan["t"],
        plan["pix"], TILE=tile, BLOCK_P=plan["block_p"], FAST=fast,
        # fast: the fp32 chunk and fp64 running sums plus the 3xTF32 operand halves spill on 4 warps
        num_warps=8 if fast else 4, **FP_FUSION)
    g = part.sum(1)  # over the splits, in a fixed order: deterministic
    total = combine_upper_tiles(g, plan["ta"], plan["tb"])
    loss = (total / (n * p * p)).to(s.dtype)
    return loss, g, snorm, sinv, tinv


@torch.library.custom_op("segkd::pairwise_kd_backward_triton", mutates_args=())
def pairwise_kd_backward_triton(grad: torch.Tensor, s: torch.Tensor, t: torch.Tensor, g: torch.Tensor,
                                snorm: torch.Tensor, sinv: torch.Tensor, tinv: torch.Tensor,
                                detach_norm: bool) -> torch.Tensor:
    s, t = s.contiguous(), t.contiguous()
    n, cs, p = s.shape
    ct = t.shape[1]
    tile = g.shape[-1]
    ta, tb = cdiv(cs, tile), cdiv(ct, tile)
    acc = acc_torch_dtype(s.dtype)
    mode = {torch.float64: _MODE_FP64, torch.bfloat16: _MODE_BF16X2}.get(s.dtype, _MODE_TF32X3)
    scale = 4.0 / (n * p * p)
    da = torch.empty(n, cs, p, dtype=acc, device=s.device)
    block_k = min(_GRAD_BLOCK_K, tile)
    _grad_kernel[(ta, cdiv(p, _GRAD_BLOCK_P), n)](
        g, s, sinv, t, tinv, da, grad.contiguous(), cs, ct, p, ta, ta + tb, scale, TILE=tile, BLOCK_K=block_k,
        BLOCK_P=_GRAD_BLOCK_P, MODE=mode, NATIVE_BF16=not TRITON_INTERPRET, ACC_DTYPE=acc_dtype(s.dtype), num_warps=8 if mode == _MODE_FP64 else 4,
        **FP_FUSION)
    ds = torch.empty_like(s)
    _norm_bwd_kernel[(n, cdiv(p, _BLOCK_P))](
        s, snorm, sinv, da, ds, cs, p, NORM_EPS, BLOCK_C=min(next_power_of_2(cs), 32), BLOCK_P=_BLOCK_P,
        DETACH_NORM=bool(detach_norm), ACC_DTYPE=acc_dtype(s.dtype), **FP_FUSION)
    return ds


@pairwise_kd_triton.register_fake
def _(s, t, detach_norm, precision="exact"):
    n, cs, p = s.shape
    ct = t.shape[1]
    fast = precision == "fast" and s.dtype != torch.float64
    plan = _plan(n, cs, ct, p, fast, s.device)
    f64 = dict(dtype=torch.float64, device=s.device)
    return (s.new_empty(()), s.new_empty(n, plan["n_up"], plan["tile"], plan["tile"], **f64),
            s.new_empty(n, p, **f64), s.new_empty(n, p, **f64), s.new_empty(n, p, **f64))


@pairwise_kd_backward_triton.register_fake
def _(grad, s, t, g, snorm, sinv, tinv, detach_norm):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    s, t, detach_norm, _precision = inputs
    _loss, g, snorm, sinv, tinv = output
    ctx.save_for_backward(s, t, g, snorm, sinv, tinv)
    ctx.detach_norm = detach_norm


def _backward(ctx, grad_loss, *_unused):
    s, t, g, snorm, sinv, tinv = ctx.saved_tensors
    ds = pairwise_kd_backward_triton(grad_loss, s, t, g, snorm, sinv, tinv, ctx.detach_norm)
    return ds, None, None, None


pairwise_kd_triton.register_autograd(_backward, setup_context=_setup_context)

