"""sk.ssim_kd (docs/losses.md 5: kornia's ssim_loss semantics).

The oracle below is written independently of segkd_kernels.ops.ssim_kd.reference: a direct
(non-separable) 2-D Gaussian window, padding done by index reflection / skipping out-of-range
pixels, and an explicit Python loop over output pixels, in fp64. It is built from torch indexing
and elementwise ops only (no F.pad, no conv), so autograd through it gives an independent gradient.
It is slow: only run it on tiny maps.
"""

from __future__ import annotations

import math

import pytest
import torch

import segkd_kernels as sk
from segkd_kernels.testing import (assert_close, assert_within_error_budget, channels_last, make_tensor,
                                   non_contiguous, reference_error, within_error_budget)

PADDINGS = ("reflect", "zeros", "valid")


# ----------------------------------------------------------------------------------------------
# Independent fp64 oracle
# ----------------------------------------------------------------------------------------------

def _gaussian_1d(window: int, sigma: float) -> list[float]:
    """Textbook 1-d Gaussian exp(-(k - c)^2 / (2 sigma^2)), c the middle tap, normalised to sum 1."""
    c = (window - 1) / 2
    g = [math.exp(-((k - c) ** 2) / (2.0 * sigma * sigma)) for k in range(window)]
    total = sum(g)
    return [v / total for v in g]


def _gaussian_2d(window: int, sigma: float) -> torch.Tensor:
    g = _gaussian_1d(window, sigma)
    w2 = torch.tensor([[a * b for b in g] for a in g], dtype=torch.float64)
    return w2 / w2.sum()


def _reflect_index(i: int, n: int) -> int:
    """numpy / PyTorch 'reflect' (edge pixel not repeated): -1 -> 1, n -> n - 2."""
    if i < 0:
        i = -i
    if i > n - 1:
        i = 2 * (n - 1) - i
    assert 0 <= i < n, "pad wider than the map"
    return i


def _taps(centre: int, n: int, window: int, padding: str) -> tuple[list[int], list[int]]:
    """(pixel indices, window tap indices) contributing to output position `centre` along one axis."""
    r = window // 2
    pixels, taps = [], []
    for a in range(window):
        i = centre + a - r
        if 0 <= i < n:
            pixels.append(i)
            taps.append(a)
        elif padding == "reflect":
            pixels.append(_reflect_index(i, n))
            taps.append(a)
        elif padding == "zeros":
            continue  # a zero pixel contributes nothing
        else:
            raise AssertionError("valid positions never leave the map")
    return pixels, taps


def _minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    lo = flat.min(dim=-1).values.detach()[:, :, None, None]
    hi = flat.max(dim=-1).values.detach()[:, :, None, None]
    span = hi - lo
    scaled = (x - lo) / torch.clamp(span, min=1e-12)
    return torch.where(span <= 1e-12, torch.zeros_like(scaled), scaled)  # flat map -> 0, zero gradient; NaN stays


def oracle_ssim_kd(student, teacher, window_size=11, sigma=1.5, data_range=1.0, padding="reflect",
                   normalize=True, return_map=False):
    x = student.to(torch.float64)
    y = teacher.detach().to(torch.float64)
    if normalize:
        x, y = _minmax(x), _minmax(y)
    _, _, h, w = x.shape
    r = window_size // 2
    win = _gaussian_2d(window_size, sigma)
    if padding == "valid":
        rows, cols = range(r, h - r), range(r, w - r)
    else:
        rows, cols = range(h), range(w)

    def index(taps):
        pixels, weights = taps
        return torch.tensor(pixels), torch.tensor(weights)

    col_taps = {j: index(_taps(j, w, window_size, padding)) for j in cols}
    maps = torch.stack([x, y, x * x, y * y, x * y])  # (5, N, C, H, W)
    out_rows = []
    for i in rows:
        ri, ra = index(_taps(i, h, window_size, padding))
        out_row = []
        for j in cols:
            ci, ca = col_taps[j]
            weights = win.index_select(0, ra).index_select(1, ca)     # (kr, kc) taps of the 2-D window
            patch = maps.index_select(3, ri).index_select(4, ci)      # (5, N, C, kr, kc) pixels under it
            out_row.append((patch * weights).sum(dim=(-2, -1)))
        out_rows.append(torch.stack(out_row, dim=-1))
    mu_x, mu_y, e_xx, e_yy, e_xy = torch.stack(out_rows, dim=-2)  # each (N, C, H', W')
    var_x = e_xx - mu_x ** 2
    var_y = e_yy - mu_y ** 2
    cov = e_xy - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    ssim = num / (den + 1e-12)
    if return_map:
        return ssim
    return torch.clamp((1.0 - ssim) / 2.0, 0.0, 1.0).mean()


def _pair(shape, *, seed=0, dtype=torch.float64, scale=1.0, offset=0.0, requires_grad=False):
    """Correlated (student, teacher): SSIM well inside (-1, 1), so the loss is not trivial."""
    s = make_tensor(shape, dtype=torch.float64, seed=seed)
    noise = make_tensor(shape, dtype=torch.float64, seed=seed + 1000)
    t = 0.7 * s + 0.6 * noise
    s = (s * scale + offset).to(dtype).requires_grad_(requires_grad)
    t = (t * scale + offset).to(dtype)
    return s, t


def _grad(fn, s, t, grad_output=None):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t)
    (g,) = torch.autograd.grad(loss, s, grad_outputs=grad_output)
    return loss.detach(), g


# ----------------------------------------------------------------------------------------------
# 0. The oracle itself
# ----------------------------------------------------------------------------------------------

def test_oracle_helpers():
    assert [_reflect_index(i, 5) for i in range(-4, 9)] == [4, 3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1, 0]
    g = _gaussian_1d(3, 1.0)
    e = math.exp(-0.5)
    assert g == pytest.approx([e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)], rel=1e-15)
    assert _taps(0, 6, 5, "zeros") == ([0, 1, 2], [2, 3, 4])
    assert _taps(0, 6, 5, "reflect") == ([2, 1, 0, 1, 2], [0, 1, 2, 3, 4])
    assert _taps(5, 6, 5, "reflect") == ([3, 4, 5, 4, 3], [0, 1, 2, 3, 4])


def test_oracle_closed_form_constant_maps():
    """Constant maps a, b: var = cov = 0, so map = (2ab + C1) / (a^2 + b^2 + C1) * C2 / (C2 + 1e-12)
    for every padding where the window weights sum to 1 (reflect, valid)."""
    a, b, L = 0.3, 0.8, 1.0
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    expected_map = (2 * a * b + c1) * c2 / ((a * a + b * b + c1) * c2 + 1e-12)
    s = torch.full((1, 2, 7, 8), a, dtype=torch.float64)
    t = torch.full((1, 2, 7, 8), b, dtype=torch.float64)
    for padding in ("reflect", "valid"):
        m = oracle_ssim_kd(s, t, 5, 1.5, L, padding, normalize=False, return_map=True)
        torch.testing.assert_close(m, torch.full_like(m, expected_map), rtol=1e-12, atol=0)
        loss = sk.ssim_kd(s, t, window_size=5, padding=padding, normalize=False, backend="reference")
        torch.testing.assert_close(loss, torch.tensor((1 - expected_map) / 2, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# 1. Reference vs the loop oracle (fp64)
# ----------------------------------------------------------------------------------------------

def _shape_for(padding: str, window: int) -> tuple[int, ...]:
    if padding == "valid" and window > 13:
        return (1, 2, 16, 19)  # valid map 2 x 5
    return (2, 3, 13, 17)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("sigma,data_range", [(1.5, 1.0), (0.8, 1.0), (1.5, 255.0), (0.8, 255.0)])
@pytest.mark.parametrize("window", [3, 7, 11, 15])
@pytest.mark.parametrize("padding", PADDINGS)
def test_reference_matches_oracle(padding, window, sigma, data_range, normalize):
    shape = _shape_for(padding, window)
    # Unnormalised inputs live on the data range (mean L/2, spread L/5) so C1 and C2 matter.
    scale, offset = (0.2 * data_range, 0.5 * data_range) if not normalize else (1.0, 0.0)
    s, t = _pair(shape, seed=window, scale=scale, offset=offset)
    kw = dict(window_size=window, sigma=sigma, data_range=data_range, padding=padding, normalize=normalize)
    got = sk.ssim_kd(s, t, backend="reference", **kw)
    want = oracle_ssim_kd(s, t, **kw)
    assert got.dtype == torch.float64 and got.dim() == 0
    # (normalised maps in [0, 1] with L = 255: C1, C2 dominate and the loss is small, ~5e-4)
    assert 1e-4 < want.item() < 0.5, "test data should give a non-trivial loss"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape,padding,window,normalize", [
    ((1, 1, 11, 11), "valid", 11, True),   # 1 x 1 output
    ((1, 1, 11, 11), "valid", 11, False),
    ((1, 1, 15, 15), "valid", 15, True),   # 1 x 1 output, largest window
    ((1, 2, 6, 9), "reflect", 11, True),   # smallest map reflect accepts for window 11
    ((1, 2, 6, 9), "reflect", 11, False),
    ((2, 1, 8, 8), "reflect", 15, True),
    ((1, 1, 2, 5), "reflect", 3, False),
    ((1, 1, 2, 2), "zeros", 11, True),     # zeros accepts maps smaller than the window
    ((1, 1, 2, 2), "zeros", 11, False),
    ((1, 3, 1, 1), "zeros", 3, False),
    ((3, 2, 5, 4), "zeros", 7, True),
    ((1, 1, 7, 3), "valid", 3, False),
])
def test_reference_matches_oracle_odd_shapes(shape, padding, window, normalize):
    s, t = _pair(shape, seed=sum(shape))
    kw = dict(window_size=window, padding=padding, normalize=normalize)
    got = sk.ssim_kd(s, t, backend="reference", **kw)
    torch.testing.assert_close(got, oracle_ssim_kd(s, t, **kw), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("padding", PADDINGS)
def test_fp32_matches_fp64_oracle(padding):
    s, t = _pair((2, 3, 13, 17), seed=3, dtype=torch.float32)
    got = sk.ssim_kd(s, t, window_size=7, padding=padding)
    assert got.dtype == torch.float32
    want = oracle_ssim_kd(s, t, window_size=7, padding=padding)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_auto_and_module_match_reference():
    s, t = _pair((2, 3, 13, 17), seed=4, dtype=torch.float32)
    ref = sk.ssim_kd(s, t, window_size=5, sigma=0.8, padding="zeros", backend="reference")
    assert_close(sk.ssim_kd(s, t, window_size=5, sigma=0.8, padding="zeros"), ref)
    module = sk.nn.SSIMKD(window_size=5, sigma=0.8, padding="zeros")
    assert_close(module(s, t), ref)


def test_defaults_are_kornia_defaults():
    """window 11, sigma 1.5, data_range 1, reflect, normalize=True."""
    s, t = _pair((1, 2, 12, 13), seed=5)
    got = sk.ssim_kd(s, t)
    torch.testing.assert_close(got, oracle_ssim_kd(s, t, 11, 1.5, 1.0, "reflect", True), rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# 2. Peers, when installed (never installed by the tests)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["reflect", "valid"])
@pytest.mark.parametrize("window", [3, 11])
def test_matches_kornia(padding, window):
    kornia = pytest.importorskip("kornia")
    s, t = _pair((2, 3, 16, 19), seed=6)
    want = kornia.losses.ssim_loss(s, t, window, max_val=1.0, eps=1e-12, reduction="mean",
                                   padding="same" if padding == "reflect" else "valid")
    got = sk.ssim_kd(s, t, window_size=window, padding=padding, normalize=False)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("window", [3, 11])
def test_matches_pytorch_msssim(window):
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    s, t = _pair((2, 3, 16, 19), seed=7)
    s, t = s.sigmoid(), t.sigmoid()
    mean_map = pytorch_msssim.ssim(s, t, data_range=1.0, size_average=True, win_size=window, win_sigma=1.5)
    got = sk.ssim_kd(s, t, window_size=window, padding="valid", normalize=False)
    # map in [-1, 1], so the clamp is inactive and loss = (1 - mean map) / 2 (msssim has no 1e-12).
    torch.testing.assert_close(got, ((1 - mean_map) / 2).to(got.dtype), rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# 3. Gradients
# ----------------------------------------------------------------------------------------------

def _interior(x: torch.Tensor) -> torch.Tensor:
    """Mask of elements strictly between their (n, c) map's min and max."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    return ((flat > lo) & (flat < hi)).reshape(x.shape)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("padding,shape,window", [
    ("reflect", (1, 2, 5, 6), 5),
    ("zeros", (2, 1, 4, 5), 5),
    ("valid", (1, 2, 6, 7), 3),
])
def test_gradcheck(padding, shape, window, normalize):
    s, t = _pair(shape, seed=8)
    kw = dict(window_size=window, sigma=1.1, padding=padding, normalize=normalize, backend="reference")
    if not normalize:
        assert torch.autograd.gradcheck(lambda u: sk.ssim_kd(u, t, **kw), (s.requires_grad_(),))
        return
    # min and max are constants in the gradient: finite differences agree only where a small step
    # moves neither, so perturb the interior elements and hold each map's argmin/argmax fixed.
    mask = _interior(s)
    base = s.detach()

    def fn(u):
        return sk.ssim_kd(torch.where(mask, u, base), t, **kw)

    assert torch.autograd.gradcheck(fn, (base.clone().requires_grad_(),))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("padding,shape,window", [
    ("reflect", (2, 2, 9, 11), 7),
    ("reflect", (1, 2, 6, 9), 11),
    ("zeros", (2, 2, 7, 6), 11),
    ("valid", (1, 3, 12, 13), 11),
])
def test_gradient_matches_oracle(padding, shape, window, normalize):
    """Includes the argmin/argmax elements: both sides treat min and max as constants."""
    s, t = _pair(shape, seed=9)
    kw = dict(window_size=window, padding=padding, normalize=normalize)
    loss, g = _grad(lambda u, v: sk.ssim_kd(u, v, backend="reference", **kw), s, t)
    want_loss, want_g = _grad(lambda u, v: oracle_ssim_kd(u, v, **kw), s, t)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-14)
    assert want_g.abs().max() > 1e-4
    torch.testing.assert_close(g, want_g, rtol=1e-8, atol=1e-12)


def test_normalize_min_max_are_constants():
    """Detached min/max: d loss / d s = (d loss / d psi(s)) / (max - min) elementwise. (Through
    min/max, the gradient would instead sum to zero over the map: a shift of s changes nothing.)"""
    s, t = _pair((1, 1, 6, 7), seed=10)
    _, g = _grad(lambda u, v: sk.ssim_kd(u, v, window_size=3), s, t)
    x = ((s - s.min()) / (s.max() - s.min())).detach()
    y = (t - t.min()) / (t.max() - t.min())
    _, gx = _grad(lambda u, v: sk.ssim_kd(u, v, window_size=3, normalize=False), x, y)
    torch.testing.assert_close(g, gx / (s.max() - s.min()).detach(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("scale", [1e-9, 1e4])
def test_normalize_scale_invariant(scale):
    """psi(a s + b) = psi(s) for a > 0, down to ranges far above the 1e-12 guard (which must not
    be added to every range, nor be much larger than 1e-12); the gradient scales by 1 / a."""
    s, t = _pair((2, 2, 9, 10), seed=20)
    fn = lambda u, v: sk.ssim_kd(u, v, window_size=5)  # noqa: E731
    loss, g = _grad(fn, s, t)
    loss_a, g_a = _grad(fn, s * scale + 0.5 * scale, t * scale)
    torch.testing.assert_close(loss_a, loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_a * scale, g, rtol=1e-6, atol=1e-12 * g.abs().max().item())


# ----------------------------------------------------------------------------------------------
# 4. Degenerate inputs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
def test_constant_inputs_finite(padding, normalize, dtype):
    shape = (2, 2, 11, 12)
    rand_s, rand_t = _pair(shape, seed=11, dtype=dtype)
    const_s = torch.full(shape, 0.25, dtype=dtype)
    const_t = torch.full(shape, -1.5, dtype=dtype)
    for s, t in [(const_s, rand_t), (rand_s, const_t), (const_s, const_t), (const_s, const_s)]:
        loss, g = _grad(lambda u, v: sk.ssim_kd(u, v, padding=padding, normalize=normalize), s, t)
        assert torch.isfinite(loss), (loss, s[0, 0, 0, 0], t[0, 0, 0, 0])
        assert torch.isfinite(g).all()
        assert 0.0 <= loss.item() <= 1.0
        if dtype == torch.float64:
            want = oracle_ssim_kd(s, t, padding=padding, normalize=normalize)
            torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
def test_constant_inputs_half(normalize, dtype):
    """Finite loss and gradient; with normalize, a constant student map rescales to 0 and gets a
    zero gradient (not one scaled by 1 / 1e-12, which would overflow in fp16)."""
    shape = (1, 2, 12, 12)
    _, rand_t = _pair(shape, seed=21, dtype=dtype)
    const_s = torch.full(shape, 0.25, dtype=dtype)
    for s, t in [(const_s, rand_t), (const_s, const_s.clone())]:
        loss, g = _grad(lambda u, v: sk.ssim_kd(u, v, normalize=normalize), s, t)
        assert loss.dtype == dtype and torch.isfinite(loss)
        assert torch.isfinite(g).all()
        if normalize:
            assert (g == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
def test_identical_inputs_zero_loss_and_gradient(padding, normalize, dtype):
    """x = y: num = den, so map = den / (den + 1e-12) = 1 up to the 1e-12 guard, which leaves at most
    1e-12 / (2 C1 C2) ~ 5.6e-6 (and far less where den is not tiny); the gradient vanishes
    (a maximum of the map) up to the same guard."""
    s, _ = _pair((2, 3, 12, 13), seed=12, dtype=dtype)
    fn = lambda u, v: sk.ssim_kd(u, v, padding=padding, normalize=normalize)  # noqa: E731
    loss, g = _grad(fn, s, s.detach().clone())
    rounding = 1e-6 if dtype == torch.float32 else 1e-14
    assert -rounding <= loss.item() <= 1e-12 / (2 * 1e-4 * 9e-4) + rounding
    if dtype == torch.float64:
        want = oracle_ssim_kd(s, s, padding=padding, normalize=normalize)  # the guard's exact effect
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-15)
    # Compare with the gradient for a different teacher, the scale of a real gradient.
    _, g_real = _grad(fn, *_pair(s.shape, seed=12, dtype=dtype))
    assert g.abs().max() <= (1e-5 if dtype == torch.float32 else 1e-7) * g_real.abs().max()


# ----------------------------------------------------------------------------------------------
# 5. Autograd contract, layouts, dtypes
# ----------------------------------------------------------------------------------------------

def test_teacher_gets_no_gradient():
    s, t = _pair((2, 3, 9, 10), seed=13, dtype=torch.float32, requires_grad=True)
    t.requires_grad_(True)
    loss = sk.ssim_kd(s, t)
    loss.backward()
    assert s.grad is not None and s.grad.abs().max() > 0
    assert t.grad is None
    s2 = s.detach()
    assert not sk.ssim_kd(s2, t).requires_grad


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("layout", ["non_contiguous", "channels_last", "teacher_channels_last"])
def test_layouts(layout, padding):
    s, t = _pair((2, 3, 13, 12), seed=14, dtype=torch.float32)
    fn = lambda u, v: sk.ssim_kd(u, v, window_size=7, padding=padding)  # noqa: E731
    loss, g = _grad(fn, s, t)
    if layout == "non_contiguous":
        s2, t2 = non_contiguous(s), non_contiguous(t)
    elif layout == "channels_last":
        s2, t2 = channels_last(s), channels_last(t)
    else:
        s2, t2 = s, channels_last(t)
    assert not (s2.is_contiguous() and t2.is_contiguous())
    s2 = s2.detach().requires_grad_(True)
    loss2 = fn(s2, t2)
    loss2.backward()
    assert_close(loss2, loss)
    assert_close(s2.grad, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_output_scales(dtype):
    s, t = _pair((2, 2, 9, 8), seed=15, dtype=dtype)
    _, g1 = _grad(lambda u, v: sk.ssim_kd(u, v, window_size=5), s, t)
    _, g3 = _grad(lambda u, v: 3 * sk.ssim_kd(u, v, window_size=5), s, t)
    _, gt = _grad(lambda u, v: sk.ssim_kd(u, v, window_size=5), s, t, grad_output=torch.tensor(-0.5, dtype=dtype))
    assert_close(g3, 3 * g1)
    assert_close(gt, -0.5 * g1)
    # summed with another loss
    s2 = s.detach().clone().requires_grad_(True)
    (sk.ssim_kd(s2, t, window_size=5) * 2 + s2.sum()).backward()
    assert_close(s2.grad, 2 * g1 + 1)


def test_fp64_stays_fp64():
    s, t = _pair((1, 2, 8, 9), seed=16, requires_grad=True)
    loss = sk.ssim_kd(s, t, window_size=5)
    loss.backward()
    assert loss.dtype == torch.float64 and s.grad.dtype == torch.float64
    # fp64 precision, not an fp32 round trip
    torch.testing.assert_close(loss, oracle_ssim_kd(s, t, window_size=5), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, padding):
    s, t = _pair((2, 3, 13, 12), seed=17, dtype=dtype, scale=2.0)
    loss, g = _grad(lambda u, v: sk.ssim_kd(u, v, window_size=7, padding=padding), s, t)
    assert loss.dtype == dtype and g.dtype == dtype
    loss32, g32 = _grad(lambda u, v: sk.ssim_kd(u, v, window_size=7, padding=padding), s.float(), t.float())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.float(), loss32, rtol=eps, atol=0)
    torch.testing.assert_close(g.float(), g32, rtol=eps, atol=eps * g32.abs().max().item())
    # also unnormalised (fp32 statistics: E[x^2] - mu^2 would cancel in half precision)
    s_off, t_off = (s.float() + 30).to(dtype), (t.float() + 30).to(dtype)
    lo = sk.ssim_kd(s_off, t_off, window_size=7, padding=padding, normalize=False, data_range=60.0)
    hi = sk.ssim_kd(s_off.float(), t_off.float(), window_size=7, padding=padding, normalize=False, data_range=60.0)
    torch.testing.assert_close(lo.float(), hi, rtol=eps, atol=0)


# ----------------------------------------------------------------------------------------------
# 6. torch.compile
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["reflect", "valid"])
def test_torch_compile(padding):
    torch._dynamo.reset()
    s, t = _pair((2, 3, 13, 12), seed=18, dtype=torch.float32)

    def fn(u, v):
        return sk.ssim_kd(u, v, window_size=7, sigma=1.2, padding=padding)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss, g = _grad(fn, s, t)
    loss_c, g_c = _grad(compiled, s, t)
    assert_close(loss_c, loss)
    assert_close(g_c, g)


# ----------------------------------------------------------------------------------------------
# 7. Bad inputs
# ----------------------------------------------------------------------------------------------

def _ok(shape=(1, 2, 12, 12), dtype=torch.float32):
    return make_tensor(shape, dtype=dtype), make_tensor(shape, dtype=dtype, seed=1)


@pytest.mark.parametrize("window", [2, 4, 10, 12, 1, 17, 0, -3, 11.0, "11", True, None])
def test_bad_window(window):
    s, t = _ok()
    with pytest.raises(ValueError, match="window_size"):
        sk.ssim_kd(s, t, window_size=window)


@pytest.mark.parametrize("window", [3, 5, 13, 15])
def test_window_range_accepted(window):
    s, t = _ok((1, 1, 15, 15))
    assert torch.isfinite(sk.ssim_kd(s, t, window_size=window, padding="valid"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=-1.5), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(sigma=float("inf")), "sigma"),
    (dict(sigma="1.5"), "sigma"),
    (dict(data_range=0.0), "data_range"),
    (dict(data_range=-1.0), "data_range"),
    (dict(data_range=float("nan")), "data_range"),
    (dict(padding="same"), "padding"),
    (dict(padding="circular"), "padding"),
    (dict(padding="REFLECT"), "padding"),
    (dict(padding=None), "padding"),
    (dict(backend="bogus"), "backend"),
])
def test_bad_options(kwargs, match):
    s, t = _ok()
    with pytest.raises(ValueError, match=match):
        sk.ssim_kd(s, t, **kwargs)


def test_bad_tensors():
    s, t = _ok()
    with pytest.raises(ValueError, match="teacher_feat"):
        sk.ssim_kd(s, t[:, :1])
    with pytest.raises(ValueError, match="teacher_feat"):
        sk.ssim_kd(s, t[..., :-1])
    with pytest.raises(ValueError, match="student_feat"):
        sk.ssim_kd(s[0], t[0])
    with pytest.raises(ValueError, match="student_feat"):
        sk.ssim_kd(s[None], t[None])
    with pytest.raises(ValueError, match="teacher_feat"):
        sk.ssim_kd(s, t[0])
    with pytest.raises(ValueError, match="student_feat"):
        sk.ssim_kd(s.to(torch.int32), t)
    with pytest.raises(ValueError, match="teacher_feat"):
        sk.ssim_kd(s, t.to(torch.int64))
    with pytest.raises(ValueError, match="student_feat"):
        sk.ssim_kd(s.bool(), t)
    with pytest.raises(ValueError, match="student_feat"):
        sk.ssim_kd(s.numpy(), t)
    with pytest.raises(ValueError, match="teacher_feat"):
        sk.ssim_kd(s, t.to("meta"))
    with pytest.raises(ValueError, match="teacher_feat"):
        sk.ssim_kd(s.to("meta"), t)
    for shape in [(0, 2, 12, 12), (1, 0, 12, 12), (1, 2, 0, 12), (1, 2, 12, 0)]:
        e = torch.empty(shape)
        with pytest.raises(ValueError, match="student_feat"):
            sk.ssim_kd(e, e.clone(), padding="zeros")


@pytest.mark.parametrize("shape,padding,window", [
    ((1, 1, 10, 12), "valid", 11),
    ((1, 1, 12, 10), "valid", 11),
    ((1, 1, 2, 2), "valid", 3),
    ((1, 1, 14, 20), "valid", 15),
    ((1, 1, 5, 12), "reflect", 11),
    ((1, 1, 12, 5), "reflect", 11),
    ((1, 1, 1, 8), "reflect", 3),
    ((1, 1, 7, 7), "reflect", 15),
])
def test_map_too_small(shape, padding, window):
    s = make_tensor(shape)
    with pytest.raises(ValueError, match=r"student_feat.*window"):
        sk.ssim_kd(s, s.clone(), window_size=window, padding=padding)


@pytest.mark.parametrize("shape,padding,window", [
    ((1, 1, 11, 11), "valid", 11),
    ((1, 1, 6, 6), "reflect", 11),
    ((1, 1, 2, 2), "reflect", 3),
    ((1, 1, 8, 8), "reflect", 15),
    ((1, 1, 2, 2), "zeros", 11),
    ((1, 1, 1, 1), "zeros", 15),
])
def test_smallest_maps_accepted(shape, padding, window):
    s, t = _pair(shape, seed=19, dtype=torch.float32, requires_grad=True)
    loss = sk.ssim_kd(s, t, window_size=window, padding=padding)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------------------------
# 8. Backends
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-tensor path")
def test_cuda_backend_on_cpu_tensors_raises(monkeypatch):
    """Named explicitly or through SEGKD_BACKEND, the cuda backend never falls back on CPU tensors
    (whether it is not implemented, not built, or needs CUDA tensors)."""
    s, t = _ok()
    with pytest.raises(ValueError, match="ssim_kd: backend='cuda' cannot run"):
        sk.ssim_kd(s, t, backend="cuda")
    with pytest.raises(RuntimeError, match="ssim_kd: backend='cuda' cannot run"):
        sk.ssim_kd(s, t, backend="cuda")
    monkeypatch.setenv("SEGKD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ssim_kd: SEGKD_BACKEND='cuda' cannot run"):
        sk.ssim_kd(s, t)


def test_flat_student_channel_gets_zero_gradient_with_normalize():
    """A dead (constant) channel next to a live one: with normalize its gradient is exactly 0, the
    live channel's gradient is unaffected, and without normalize the flat channel does get one."""
    s, t = _pair((1, 2, 9, 10), seed=31, dtype=torch.float64)
    s = s.clone()
    s[:, 0] = 0.0
    _, g = _grad(lambda u, v: sk.ssim_kd(u, v, window_size=5, normalize=True), s, t)
    assert (g[:, 0] == 0).all() and (g[:, 1] != 0).any()
    _, g_raw = _grad(lambda u, v: sk.ssim_kd(u, v, window_size=5, normalize=False), s, t)
    assert (g_raw[:, 0] != 0).any()


# ----------------------------------------------------------------------------------------------
# 9. Triton backend (interpreter on CPU) against the reference
# ----------------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(not sk.available_backends()["triton"], reason="triton backend cannot run here")


def _triton_module():
    from segkd_kernels.ops.ssim_kd import triton as ssim_triton
    return ssim_triton


def _both(s, t, grad_output=-0.7, **kw):
    """(loss, student gradient) from triton and from the reference, same inputs, grad_output != 1."""
    out = []
    for backend in ("triton", "reference"):
        go = torch.tensor(grad_output, dtype=s.dtype)
        out.append(_grad(lambda u, v: sk.ssim_kd(u, v, backend=backend, **kw), s, t, grad_output=go))
    return out


def _check_triton_grad(g, s, t, fn, grad_output=-0.7):
    """The student gradient in fp32 against the fp64 reference, by the error budget: each gradient
    entry is a sum over the windows of terms of both signs that cancel, so its fp32 error is not a
    fixed fraction of the gradient, and the order of the sums (tiles, numpy's BLAS in the
    interpreter, torch's convolutions) moves it by as much as the reference's own fp32 error."""
    def grad_of(u, v):
        return _grad(fn, u, v, grad_output=torch.tensor(grad_output, dtype=u.dtype))[1]

    g64 = grad_of(s.double(), t.double())
    assert_within_error_budget(g, g64, reference_error(grad_of, s, t), what="ssim_kd triton gradient")


def _check_triton(s, t, grad_output=-0.7, **kw):
    (loss, g), (ref_loss, ref_g) = _both(s, t, grad_output, **kw)
    assert loss.dtype == s.dtype and g.dtype == s.dtype and g.shape == s.shape
    assert ref_g.abs().max() > 0, "test data should give a gradient"
    assert_close(loss, ref_loss)
    _check_triton_grad(g, s, t, lambda u, v: sk.ssim_kd(u, v, backend="reference", **kw), grad_output)


@needs_triton
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("window", [3, 7, 11])
@pytest.mark.parametrize("padding", PADDINGS)
def test_triton_matches_reference(padding, window, normalize):
    scale, offset = (1.0, 0.0) if normalize else (0.2, 0.5)
    s, t = _pair((1, 2, 13, 17), seed=40 + window, dtype=torch.float32, scale=scale, offset=offset)
    _check_triton(s, t, window_size=window, padding=padding, normalize=normalize)


@needs_triton
@pytest.mark.parametrize("padding,window,shape", [
    ("reflect", 7, (1, 2, 21, 35)),   # 5 strips of 5 rows x 3 column blocks of 16
    ("zeros", 7, (1, 2, 21, 35)),
    ("valid", 7, (1, 2, 27, 39)),     # 21 x 33 valid map: 5 x 3 blocks, 27 x 39 in the backward
    ("reflect", 3, (2, 1, 30, 17)),   # width one column past a block
    ("zeros", 11, (1, 1, 13, 20)),    # strips shorter than the window's halo
    ("reflect", 15, (1, 1, 9, 18)),   # the reflect folds of the top and bottom rows overlap
])
def test_triton_several_tiles(padding, window, shape, monkeypatch):
    """Short strips (5 rows) and narrow column blocks (16) so that tiny odd maps span several
    programs in each direction: strip and block edges inside the map, not only at its border."""
    monkeypatch.setattr(_triton_module(), "TILE_OVERRIDE", (5, 16))
    s, t = _pair(shape, seed=41, dtype=torch.float32)
    _check_triton(s, t, window_size=window, padding=padding, normalize=True, sigma=1.3)


@needs_triton
@pytest.mark.parametrize("padding,shape,window", [
    ("zeros", (1, 2, 3, 40), 11),      # H far below the window and the tile
    ("zeros", (1, 1, 1, 1), 5),
    ("reflect", (1, 2, 6, 6), 11),     # smallest map reflect accepts: the fold overlaps itself
    ("reflect", (2, 1, 2, 133), 3),    # W over one 128-wide column block
    ("valid", (1, 1, 11, 12), 11),     # 1 x 2 map
])
def test_triton_small_and_wide_maps(padding, shape, window):
    s, t = _pair(shape, seed=42, dtype=torch.float32)
    _check_triton(s, t, window_size=window, padding=padding, normalize=False, sigma=1.5, data_range=4.0)


@needs_triton
@pytest.mark.parametrize("sigma,data_range", [(0.7, 1.0), (2.5, 255.0)])
def test_triton_sigma_and_data_range(sigma, data_range):
    s, t = _pair((1, 2, 12, 15), seed=43, dtype=torch.float32, scale=0.2 * data_range, offset=0.5 * data_range)
    _check_triton(s, t, window_size=5, padding="reflect", normalize=False, sigma=sigma, data_range=data_range)


@needs_triton
@pytest.mark.parametrize("padding,normalize", [("reflect", True), ("reflect", False), ("zeros", True),
                                               ("valid", False)])
def test_triton_constant_and_identical_inputs(padding, normalize):
    shape = (1, 1, 12, 13)
    rand_s, rand_t = _pair(shape, seed=44, dtype=torch.float32)
    const = torch.full(shape, 0.25)
    kw = dict(window_size=7, padding=padding, normalize=normalize)
    for s, t in [(const, rand_t), (rand_s, const), (const, const.clone())]:
        (loss, g), (ref_loss, ref_g) = _both(s, t, **kw)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
        assert_close(loss, ref_loss)
        # Against fp64 truth: where the true gradient is ~0 (both maps flat), fp32 rounding noise
        # of the reference (~1e-7) is not a scale to compare with.
        _, g64 = _grad(lambda u, v: -0.7 * sk.ssim_kd(u, v, backend="reference", **kw), s.double(), t.double())
        assert within_error_budget(g, ref_g, g64, atol=1e-6 * g64.abs().max().item() + 1e-9)
        if normalize and s is const:
            assert (g == 0).all()  # a flat map rescales to 0 with exactly zero gradient
    # identical inputs: SSIM 1 (up to the 1e-12 guard), no gradient to speak of
    (loss, g), _ = _both(rand_s, rand_s.clone(), window_size=7, padding=padding, normalize=normalize)
    _, ref_g = _both(rand_s, rand_t, window_size=7, padding=padding, normalize=normalize)[1]
    assert -1e-6 <= loss.item() <= 1e-5
    assert g.abs().max() <= 1e-5 * ref_g.abs().max()


@needs_triton
def test_triton_flat_channel_next_to_live_one():
    s, t = _pair((2, 3, 9, 11), seed=45, dtype=torch.float32)
    s = s.clone()
    s[1, 2] = -3.0
    (loss, g), (ref_loss, ref_g) = _both(s, t, window_size=5)
    assert (g[1, 2] == 0).all() and (g[1, :2] != 0).any()
    assert_close(loss, ref_loss)
    _check_triton_grad(g, s, t, lambda u, v: sk.ssim_kd(u, v, window_size=5, backend="reference"))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs_on_cpu(dtype):
    """Same fp32 statistics as the reference: equal up to the final rounding to fp16 / bf16."""
    s, t = _pair((1, 2, 13, 17), seed=46, dtype=dtype, scale=2.0)
    (loss, g), (ref_loss, ref_g) = _both(s, t, grad_output=1.5, window_size=7, padding="reflect")
    assert loss.dtype == dtype and g.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=eps, atol=0)
    torch.testing.assert_close(g.float(), ref_g.float(), rtol=2 * eps, atol=2 * eps * ref_g.abs().max().item())


@needs_triton
def test_triton_layouts_and_teacher_dtype():
    s, t = _pair((2, 3, 13, 12), seed=47, dtype=torch.float32)
    fn = lambda u, v: sk.ssim_kd(u, v, window_size=5, padding="zeros", backend="triton")  # noqa: E731
    (loss, g), (ref_loss, ref_g) = _both(s, t, window_size=5, padding="zeros")
    assert_close(loss, ref_loss)
    for s2, t2 in [(non_contiguous(s), channels_last(t)), (channels_last(s), non_contiguous(t))]:
        s2 = s2.detach().requires_grad_(True)  # (no clone: it would make a strided view contiguous)
        assert not (s2.is_contiguous() or t2.is_contiguous())
        loss2 = fn(s2, t2)
        (g2,) = torch.autograd.grad(loss2, s2, grad_outputs=torch.tensor(-0.7))
        assert_close(loss2, loss)
        assert_close(g2, g)
    # a teacher in another dtype is read in its own dtype (an autocast bf16 teacher, an fp32
    # teacher with an fp16 student), not rounded to the student's
    (loss3, _), (ref3, _) = _both(s, t.bfloat16(), window_size=5, padding="zeros")
    assert_close(loss3, ref3)
    (loss4, _), (ref4, _) = _both(s.half(), t, window_size=5, padding="zeros")
    assert_close(loss4, ref4)


@needs_triton
def test_triton_teacher_gets_no_gradient_and_no_grad_forward():
    s, t = _pair((1, 2, 9, 10), seed=48, dtype=torch.float32, requires_grad=True)
    t.requires_grad_(True)
    sk.ssim_kd(s, t, window_size=5, backend="triton").backward()
    assert t.grad is None and s.grad.abs().max() > 0
    with torch.no_grad():
        loss = sk.ssim_kd(s, t, window_size=5, backend="triton")
    assert_close(loss, sk.ssim_kd(s.detach(), t.detach(), window_size=5, backend="reference"))


@needs_triton
def test_triton_backward_without_stored_partials():
    """The op called without the partial-derivative maps still differentiates (it recomputes them)."""
    ssim_triton = _triton_module()
    s, t = _pair((1, 2, 9, 10), seed=49, dtype=torch.float32)
    args = (5, 1.5, 1.0, "reflect", True)
    u = s.clone().requires_grad_(True)
    loss, partials, _ = ssim_triton.ssim_kd_triton(u, t, *args, False)
    assert partials.numel() == 0
    (g,) = torch.autograd.grad(loss * 2.0, u)
    ref_fn = lambda a, b: 2.0 * sk.ssim_kd(a, b, window_size=5, backend="reference")  # noqa: E731
    _, ref_g = _grad(ref_fn, s, t)
    _check_triton_grad(g, s, t, ref_fn, grad_output=1.0)


@needs_triton
@pytest.mark.parametrize("padding,need_partials", [("reflect", True), ("valid", False), ("zeros", True)])
def test_triton_opcheck(padding, need_partials):
    ssim_triton = _triton_module()
    s, t = _pair((1, 2, 9, 11), seed=50, dtype=torch.float32)
    s.requires_grad_(True)
    torch.library.opcheck(ssim_triton.ssim_kd_triton, (s, t, 5, 1.5, 1.0, padding, True, need_partials))
    _, partials, scales = ssim_triton.ssim_kd_triton(s.detach(), t, 5, 1.5, 1.0, padding, True, True)
    grad = torch.tensor(0.5)
    torch.library.opcheck(ssim_triton.ssim_kd_backward_triton,
                          (grad, s.detach(), t, partials, scales, 5, 1.5, padding, True))


@needs_triton
def test_triton_torch_compile():
    torch._dynamo.reset()
    s, t = _pair((2, 2, 11, 13), seed=51, dtype=torch.float32)

    def fn(u, v):
        return sk.ssim_kd(u, v, window_size=5, padding="reflect", backend="triton") * 3.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss, g = _grad(fn, s, t)
    loss_c, g_c = _grad(compiled, s, t)
    assert_close(loss_c, loss)
    assert_close(g_c, g)


@needs_triton
def test_triton_rejects_what_it_cannot_run():
    s, t = _ok()
    with pytest.raises(ValueError, match="dtype torch.float64 not supported by the triton backend"):
        sk.ssim_kd(s.double(), t.double(), backend="triton")
    small = make_tensor((1, 1, 5, 12))
    with pytest.raises(ValueError, match=r"student_feat.*window"):
        sk.ssim_kd(small, small.clone(), window_size=11, padding="reflect", backend="triton")
    with pytest.raises(ValueError, match=r"student_feat.*window"):
        sk.ssim_kd(small, small.clone(), window_size=7, padding="valid", backend="triton")
    # the op itself checks too (its kernels reflect an index once)
    with pytest.raises(ValueError, match=r"student_feat.*window"):
        _triton_module().ssim_kd_triton(small, small.clone(), 11, 1.5, 1.0, "reflect", True, False)


# ----------------------------------------------------------------------------------------------
# 10. GPU: fp16 / bf16 error budget, fp32 against fp64, the shapes the kernels are tuned for
# ----------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padding,window,shape", [
    ("reflect", 11, (2, 64, 33, 70)),
    ("zeros", 7, (1, 130, 17, 9)),
    ("valid", 15, (3, 5, 64, 128)),
])
def test_triton_half_error_budget_cuda(padding, window, shape, dtype, normalize):
    """err(triton in dtype) <= 2 err(reference in dtype) + atol, both against fp64, loss and gradient."""
    kw = dict(window_size=window, padding=padding, normalize=normalize)
    scale, offset = (1.0, 0.0) if normalize else (0.2, 0.5)
    s64, t64 = _pair(shape, seed=60, scale=scale, offset=offset)
    s64, t64 = s64.cuda(), t64.cuda()
    s, t = s64.to(dtype), t64.to(dtype)
    go = 1.7
    loss_k, g_k = _grad(lambda u, v: go * sk.ssim_kd(u, v, backend="triton", **kw), s, t)
    loss_r, g_r = _grad(lambda u, v: go * sk.ssim_kd(u, v, backend="reference", **kw), s, t)
    # fp64 truth on the same (rounded) inputs
    loss_64, g_64 = _grad(lambda u, v: go * sk.ssim_kd(u, v, backend="reference", **kw), s.double(), t.double())
    assert loss_k.dtype == dtype and g_k.dtype == dtype
    # both round an fp32 loss to dtype: allow the one-ulp flip where the two fp32 values straddle a boundary
    assert within_error_budget(loss_k, loss_r, loss_64, atol=torch.finfo(dtype).eps * abs(loss_64.item()))
    assert within_error_budget(g_k, g_r, g_64, atol=1e-3 * g_64.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("padding", PADDINGS)
def test_triton_fp32_cuda(padding):
    """fp32 on the GPU (tl.dot must not fall back to TF32) against the fp64 reference."""
    s, t = _pair((4, 96, 64, 128), seed=61)
    s, t = s.cuda(), t.cuda()
    kw = dict(window_size=11, padding=padding)
    loss, g = _grad(lambda u, v: sk.ssim_kd(u, v, backend="triton", **kw), s.float(), t.float())
    loss_64, g_64 = _grad(lambda u, v: sk.ssim_kd(u, v, backend="reference", **kw), s, t)
    torch.testing.assert_close(loss.double(), loss_64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.double(), g_64, rtol=1e-3, atol=1e-4 * g_64.abs().max().item())
