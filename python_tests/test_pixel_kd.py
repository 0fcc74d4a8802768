"""pixel_kd, knowledge_gap, pfs_pixel_kd (docs/losses.md 2, 2b): values and gradients against an
explicit-loop fp64 oracle, weight and ignore_mask semantics, autograd rules (teacher and weight
detached, grad_output, gradcheck), layouts, dtypes, torch.compile, input checks, numerical safety."""

import math

import pytest
import torch
import torch.nn.functional as F

import segkd_kernels as sk
from segkd_kernels._backends import select_backend
from segkd_kernels.ops.pixel_kd import api as pixel_api
from segkd_kernels.ops.pixel_kd import triton as pixel_triton
from segkd_kernels.testing import (TOLERANCES, assert_close, channels_last, make_tensor, non_contiguous,
                                   within_error_budget)
from logit_kd_shared import bad_logit_cases, check_compiled_call, softmax_and_log

# (N, K, H, W): one pixel, one class (loss 0), odd sizes, a long thin map.
SHAPES = [(1, 1, 1, 1), (1, 3, 5, 7), (2, 7, 1, 1), (3, 1, 3, 13), (2, 7, 3, 13)]
TAUS = [0.5, 1.0, 4.0]


# ---------------------------------------------------------------------------------------------
# Oracle: Python floats, one pixel at a time, textbook softmax with math.exp / math.log.
# ---------------------------------------------------------------------------------------------

_softmax = softmax_and_log


def _pixels(x):
    """x[n][h][w] = list of the K class logits at that pixel (Python floats)."""
    return x.detach().cpu().double().permute(0, 2, 3, 1).tolist()


def naive_gap(student, teacher, tau):
    """(N, H, W) fp64: KL(p_t || p_s) at each pixel, no tau^2."""
    n, _, h, w = student.shape
    s, t = _pixels(student), _pixels(teacher)
    out = torch.zeros(n, h, w, dtype=torch.float64)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                p_t, log_p_t = _softmax(t[i][y][x], tau)
                _, log_p_s = _softmax(s[i][y][x], tau)
                out[i, y, x] = sum(pt * (lt - ls) for pt, lt, ls in zip(p_t, log_p_t, log_p_s) if pt > 0)
    return out


def naive_pixel_kd(student, teacher, tau, weight=None, ignore_mask=None):
    """(loss, d loss / d student) straight from docs/losses.md 2; ignored pixels are never looked at, so
    whatever their logits hold cannot reach the result."""
    n, k, h, w = student.shape
    s, t = _pixels(student), _pixels(teacher)
    wt = None if weight is None else weight.detach().cpu().double().tolist()
    ign = None if ignore_mask is None else ignore_mask.cpu().tolist()
    valid = [(i, y, x) for i in range(n) for y in range(h) for x in range(w) if ign is None or not ign[i][y][x]]
    denom = max(1, len(valid))
    total = 0.0
    grad = torch.zeros(n, k, h, w, dtype=torch.float64)
    for i, y, x in valid:
        p_s, log_p_s = _softmax(s[i][y][x], tau)
        p_t, log_p_t = _softmax(t[i][y][x], tau)
        kl = sum(pt * (lt - ls) for pt, lt, ls in zip(p_t, log_p_t, log_p_s) if pt > 0)
        wp = 1.0 if wt is None else wt[i][y][x]
        total += wp * kl
        for c in range(k):
            grad[i, c, y, x] = tau * wp * (p_s[c] - p_t[c]) / denom
    return tau * tau * total / denom, grad


def naive_pfs_weight(student, teacher, tau, ignore_mask=None):
    """w_p = gap_p / (mean of gap over valid pixels), from the loop KL."""
    gap = naive_gap(student, teacher, tau).clamp_min(0)
    flat = gap.flatten().tolist()
    ign = [False] * len(flat) if ignore_mask is None else ignore_mask.flatten().tolist()
    kept = [g for g, m in zip(flat, ign) if not m]
    mean = sum(kept) / len(kept) if kept else 0.0
    return gap / mean if mean > 0 else torch.zeros_like(gap)


def naive_pfs(student, teacher, tau, ignore_mask=None):
    weight = naive_pfs_weight(student, teacher, tau, ignore_mask)
    return naive_pixel_kd(student, teacher, tau, weight=weight, ignore_mask=ignore_mask)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def _logits(shape, dtype=torch.float64, device="cpu", seed=0, scale=2.0):
    s = make_tensor(shape, dtype=dtype, device=device, seed=seed, scale=scale, requires_grad=True)
    t = make_tensor(shape, dtype=dtype, device=device, seed=seed + 100, scale=scale)
    return s, t


def _weight(shape, dtype=torch.float64, device="cpu", seed=50):
    n, _, h, w = shape
    return make_tensor((n, h, w), dtype=dtype, device=device, seed=seed).abs() + 0.1


def _mask(shape, device="cpu", seed=60, frac=0.3):
    """Some pixels ignored: never none and never all (when there are at least two pixels)."""
    n, _, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(n, h, w, generator=gen) < frac
    if m.numel() >= 2:
        m.view(-1)[0], m.view(-1)[-1] = True, False
    return m.to(device)


def _grad(fn, s, *args, **kwargs):
    """(loss, d loss / d s) of fn(s, ...) with a fresh leaf."""
    s = s.detach().requires_grad_(True)
    loss = fn(s, *args, **kwargs)
    (g,) = torch.autograd.grad(loss, s)
    return loss.detach(), g


def _approx(dtype):
    rtol, atol = TOLERANCES[dtype]
    return dict(rel=rtol, abs=atol)


# ---------------------------------------------------------------------------------------------
# 1, 2. pixel_kd values and gradients against the oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("shape", SHAPES)
def test_pixel_kd_matches_loop_oracle(shape, tau, dtype, device):
    s, t = _logits(shape, dtype, device, seed=sum(shape))
    loss = sk.pixel_kd(s, t, tau, backend="reference")
    assert loss.dim() == 0 and loss.dtype == dtype
    want_loss, want_grad = naive_pixel_kd(s, t, tau)
    assert loss.item() == pytest.approx(want_loss, **_approx(dtype))
    (g,) = torch.autograd.grad(loss, s)
    assert g.dtype == dtype and g.shape == s.shape
    assert_close(g.cpu(), want_grad.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 7, 3, 13), (3, 2, 1, 4)])
@pytest.mark.parametrize("use_weight,use_mask", [(True, False), (False, True), (True, True)],
                         ids=["weight", "mask", "weight+mask"])
def test_pixel_kd_weight_and_mask_match_loop_oracle(use_weight, use_mask, shape, tau, dtype, device):
    s, t = _logits(shape, dtype, device, seed=3)
    weight = _weight(shape, dtype, device) if use_weight else None
    mask = _mask(shape, device) if use_mask else None
    loss = sk.pixel_kd(s, t, tau, weight=weight, ignore_mask=mask, backend="reference")
    want_loss, want_grad = naive_pixel_kd(s, t, tau, weight, mask)
    assert loss.dim() == 0 and loss.dtype == dtype
    assert loss.item() == pytest.approx(want_loss, **_approx(dtype))
    (g,) = torch.autograd.grad(loss, s)
    assert_close(g.cpu(), want_grad.to(dtype))
    if use_mask:
        assert bool((g.permute(0, 2, 3, 1)[mask] == 0).all())


def test_pixel_kd_defaults_and_auto_backend(device):
    s, t = _logits((2, 3, 5, 7), device=device)
    want = naive_pixel_kd(s, t, 1.0)[0]  # default tau is 1.0 (docs/losses.md 2)
    assert sk.pixel_kd(s, t).item() == pytest.approx(want, rel=1e-9)
    # auto is triton: for CUDA tensors, and for CPU tensors under the interpreter (conftest)
    name = select_backend("pixel_kd", "auto", pixel_api.IMPLEMENTED, s)
    assert name == "triton" if device == "cpu" else name in ("triton", "cuda")  # cuda: per AUTO_ORDER_CUDA
    assert torch.equal(sk.pixel_kd(s, t, backend="auto"), sk.pixel_kd(s, t, backend=name))
    assert_close(sk.pixel_kd(s, t, backend="auto"), sk.pixel_kd(s, t, backend="reference"))
    assert sk.pixel_kd(s, t, 2).item() == pytest.approx(naive_pixel_kd(s, t, 2.0)[0], rel=1e-9)  # int tau


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_pixel_kd_is_cirkd_criterion_kd(tau, device):
    """No weight, no mask: CIRKD's CriterionKD (batchmean KL over N*H*W rows, times tau^2), written
    the way the toolbox writes it."""
    s, t = _logits((2, 5, 3, 4), device=device, seed=4)
    k = s.shape[1]
    rows_s = s.detach().permute(0, 2, 3, 1).reshape(-1, k)
    rows_t = t.permute(0, 2, 3, 1).reshape(-1, k)
    cirkd = F.kl_div(F.log_softmax(rows_s / tau, dim=1), F.softmax(rows_t / tau, dim=1),
                     reduction="batchmean") * tau ** 2
    torch.testing.assert_close(sk.pixel_kd(s, t, tau), cirkd, rtol=1e-12, atol=1e-14)


def test_pixel_kd_softmax_is_over_classes(device):
    """Adding a per-pixel constant to every class leaves the loss unchanged; adding a per-class
    constant to every pixel does not."""
    s, t = _logits((2, 3, 5, 7), device=device)
    base = sk.pixel_kd(s, t)
    per_pixel = make_tensor((2, 1, 5, 7), dtype=torch.float64, device=device, seed=8, scale=5.0)
    torch.testing.assert_close(sk.pixel_kd(s + per_pixel, t - per_pixel), base, rtol=1e-12, atol=1e-12)
    per_class = make_tensor((1, 3, 1, 1), dtype=torch.float64, device=device, seed=9, scale=5.0)
    assert abs(sk.pixel_kd(s + per_class, t).item() - base.item()) > 1e-3


@pytest.mark.parametrize("tau", TAUS)
def test_identical_logits_give_zero(tau, device):
    s, t = _logits((2, 3, 5, 7), device=device)
    for fn in (sk.pixel_kd, sk.pfs_pixel_kd):
        loss, g = _grad(fn, t, t, tau)
        assert loss.item() == pytest.approx(0.0, abs=1e-12) and g.abs().max().item() < 1e-14
        assert fn(s, t, tau).item() > 0
    assert sk.knowledge_gap(t, t, tau).abs().max().item() < 1e-14


@pytest.mark.parametrize("tau", [0.5, 4.0])
@pytest.mark.parametrize("variant", ["plain", "weight", "mask", "weight+mask", "all_ignored"])
def test_pixel_kd_gradcheck_fp64(variant, tau, device):
    shape = (2, 3, 1, 3)
    s, t = _logits(shape, device=device, seed=12)
    weight = _weight(shape, device=device) if "weight" in variant else None
    mask = _mask(shape, device) if "mask" in variant else None
    if variant == "all_ignored":
        mask = torch.ones(2, 1, 3, dtype=torch.bool, device=device)

    def fn(x):
        return sk.pixel_kd(x, t, tau, weight=weight, ignore_mask=mask, backend="reference")

    assert torch.autograd.gradcheck(fn, (s,))
    if variant == "weight+mask":
        assert torch.autograd.gradgradcheck(fn, (s,))


# ---------------------------------------------------------------------------------------------
# 3. ignore_mask and weight semantics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd"])
def test_all_pixels_ignored_gives_zero_loss_and_gradient(fn, device):
    s, t = _logits((2, 3, 5, 7), device=device)
    mask = torch.ones(2, 5, 7, dtype=torch.bool, device=device)
    loss, g = _grad(getattr(sk, fn), s, t, 2.0, ignore_mask=mask)
    assert loss.item() == 0.0 and bool((g == 0).all())


def test_no_pixel_ignored_equals_no_mask(device):
    s, t = _logits((2, 3, 5, 7), device=device)
    mask = torch.zeros(2, 5, 7, dtype=torch.bool, device=device)
    for fn in (sk.pixel_kd, sk.pfs_pixel_kd):
        loss_m, g_m = _grad(fn, s, t, 2.0, ignore_mask=mask)
        loss, g = _grad(fn, s, t, 2.0)
        assert_close(loss_m, loss)
        assert_close(g_m, g)


def test_mask_divides_by_valid_count_not_all_pixels(device):
    """Ignoring pixels whose KL is 0 (student == teacher there) raises the loss by #all / #valid."""
    s, t = _logits((1, 3, 4, 5), device=device, seed=2)
    s = s.detach().clone()
    mask = _mask(s.shape, device, frac=0.4)
    s.permute(0, 2, 3, 1)[mask] = t.permute(0, 2, 3, 1)[mask]
    valid = int((~mask).sum())
    assert 0 < valid < mask.numel()
    torch.testing.assert_close(sk.pixel_kd(s, t, ignore_mask=mask),
                               sk.pixel_kd(s, t) * mask.numel() / valid, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fn,where", [("pixel_kd", "student"), ("pixel_kd", "teacher"), ("pixel_kd", "both"),
                                      ("pixel_kd", "weight"), ("pfs_pixel_kd", "student"),
                                      ("pfs_pixel_kd", "teacher"), ("pfs_pixel_kd", "both")])
def test_non_finite_values_at_ignored_pixels_are_harmless(fn, where, bad, device):
    """Ignored pixels may hold anything (padding, void labels): loss and gradient are finite, the
    gradient there is exactly 0, and both equal the result with finite values there."""
    shape = (2, 3, 4, 5)
    s, t = _logits(shape, device=device, seed=13)
    mask = _mask(shape, device, seed=14)
    weight = _weight(shape, device=device) if fn == "pixel_kd" else None
    kwargs = {"ignore_mask": mask}
    if weight is not None:
        kwargs["weight"] = weight
    clean_loss, clean_g = _grad(getattr(sk, fn), s, t, 1.0, **kwargs)

    s_bad, t_bad = s.detach().clone(), t.clone()
    if where in ("student", "both"):
        s_bad.permute(0, 2, 3, 1)[mask] = bad
    if where in ("teacher", "both"):
        t_bad.permute(0, 2, 3, 1)[mask] = bad
    if where == "weight":
        w_bad = weight.clone()
        w_bad[mask] = bad
        kwargs["weight"] = w_bad
    loss, g = _grad(getattr(sk, fn), s_bad, t_bad, 1.0, **kwargs)
    assert loss.isfinite() and bool(g.isfinite().all())
    assert bool((g.permute(0, 2, 3, 1)[mask] == 0).all())
    assert_close(loss, clean_loss)
    assert_close(g, clean_g)


def test_weight_scales_each_pixel(device):
    """weight = 2 everywhere doubles the loss; weight 0 at a pixel removes it from the sum but not
    from the count (unlike ignore_mask)."""
    shape = (1, 3, 4, 5)
    s, t = _logits(shape, device=device, seed=15)
    base = sk.pixel_kd(s, t)
    two = torch.full((1, 4, 5), 2.0, dtype=torch.float64, device=device)
    torch.testing.assert_close(sk.pixel_kd(s, t, weight=two), 2 * base, rtol=1e-12, atol=0)
    one_hot = torch.zeros(1, 4, 5, dtype=torch.float64, device=device)
    one_hot[0, 2, 3] = 1.0
    gap = naive_gap(s, t, 1.0)[0, 2, 3].item()
    assert sk.pixel_kd(s, t, weight=one_hot).item() == pytest.approx(gap / 20, rel=1e-12)


def test_weight_gets_no_gradient(device):
    shape = (2, 3, 4, 5)
    s, t = _logits(shape, device=device)
    w = _weight(shape, device=device).requires_grad_(True)
    loss = sk.pixel_kd(s, t, weight=w)
    (g_w,) = torch.autograd.grad(loss, w, allow_unused=True, retain_graph=True)
    assert g_w is None or torch.count_nonzero(g_w) == 0
    loss.backward()
    assert_close(s.grad, _grad(sk.pixel_kd, s, t, weight=w.detach())[1])


def test_weight_and_mask_dtype_and_device_mix(device):
    """A weight in another float dtype than the logits is fine (used in the compute dtype)."""
    shape = (2, 3, 4, 5)
    s, t = _logits(shape, device=device)
    w64 = _weight(shape, device=device)
    want = sk.pixel_kd(s, t, weight=w64)
    got = sk.pixel_kd(s, t, weight=w64.float())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# 3. knowledge_gap and pfs_pixel_kd
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 5, 7), (3, 7, 3, 1)])
def test_knowledge_gap_is_per_pixel_kl(shape, tau, dtype, device):
    s, t = _logits(shape, dtype, device, seed=16)
    t_req = t.clone().requires_grad_(True)
    gap = sk.knowledge_gap(s, t_req, tau)
    n, _, h, w = shape
    assert gap.shape == (n, h, w) and gap.dtype == dtype
    assert not gap.requires_grad and gap.grad_fn is None
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(gap.cpu().double(), naive_gap(s, t, tau), rtol=rtol, atol=atol)
    assert sk.knowledge_gap(s, t).cpu().double().allclose(naive_gap(s, t, 1.0), rtol=rtol, atol=atol)  # default tau 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 7, 3, 13), (3, 2, 1, 1)])
@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
def test_pfs_pixel_kd_matches_loop_oracle(use_mask, shape, tau, dtype, device):
    """Value = pixel KD with w = gap / mean valid gap; gradient = the pixel-KD gradient with those
    weights held constant (the gap is detached, docs/losses.md 2b)."""
    s, t = _logits(shape, dtype, device, seed=17)
    mask = _mask(shape, device, seed=18) if use_mask else None
    loss = sk.pfs_pixel_kd(s, t, tau, ignore_mask=mask, backend="reference")
    assert loss.dim() == 0 and loss.dtype == dtype
    want_loss, want_grad = naive_pfs(s, t, tau, mask)
    assert loss.item() == pytest.approx(want_loss, **_approx(dtype))
    (g,) = torch.autograd.grad(loss, s)
    assert_close(g.cpu(), want_grad.to(dtype))
    # same as pixel_kd with the public knowledge_gap turned into weights by hand
    gap = sk.knowledge_gap(s, t, tau)
    valid = torch.ones_like(gap, dtype=torch.bool) if mask is None else ~mask
    weight = gap / gap[valid].mean()
    via_pixel_kd = sk.pixel_kd(s, t, tau, weight=weight, ignore_mask=mask)
    assert_close(loss.detach(), via_pixel_kd.detach())


def test_pfs_weights_average_to_one_over_valid_pixels(device):
    """With a weight of 1 the pfs loss would be pixel_kd; the normalised gap weights have mean 1
    over the valid pixels, so pfs = tau^2 * sum gap^2 / sum gap (independent of the pixel count)."""
    shape = (2, 4, 3, 5)
    s, t = _logits(shape, device=device, seed=19)
    mask = _mask(shape, device, seed=20)
    gap = naive_gap(s, t, 2.0)[~mask.cpu()]
    want = 4.0 * (gap * gap).sum() / gap.sum()
    assert sk.pfs_pixel_kd(s, t, 2.0, ignore_mask=mask).item() == pytest.approx(want.item(), rel=1e-10)


def test_pfs_gradient_treats_the_gap_as_a_constant(device):
    """The gradient is not the full derivative of the value (the weights depend on the student but
    are detached): check it differs from finite differences, so the oracle test above means something."""
    s, t = _logits((1, 3, 2, 2), device=device, seed=21)
    _, g = _grad(sk.pfs_pixel_kd, s, t, 1.0)
    x = s.detach().clone()
    fd = torch.zeros_like(x)
    h = 1e-6
    for idx in range(x.numel()):
        xp, xm = x.clone(), x.clone()
        xp.view(-1)[idx] += h
        xm.view(-1)[idx] -= h
        fd.view(-1)[idx] = (sk.pfs_pixel_kd(xp, t) - sk.pfs_pixel_kd(xm, t)) / (2 * h)
    assert (fd - g).abs().max().item() > 1e-3
    gap = sk.knowledge_gap(s, t)
    fixed = gap / gap.mean()  # computed once: gradcheck perturbs s in place
    assert torch.autograd.gradcheck(lambda y: sk.pixel_kd(y, t, weight=fixed), (s,))


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
def test_pfs_student_equals_teacher_is_zero_not_nan(use_mask, device):
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        t = make_tensor((2, 5, 3, 4), dtype=dtype, device=device, seed=22, scale=3.0)
        mask = _mask(t.shape, device) if use_mask else None
        loss, g = _grad(sk.pfs_pixel_kd, t, t, 1.0, ignore_mask=mask)
        assert loss.item() == 0.0, dtype
        assert bool(g.isfinite().all()) and g.abs().max().item() == 0.0, dtype


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
def test_pfs_rounding_level_gaps_give_a_bounded_nonnegative_loss(use_mask, device):
    """Student a few ulps from the teacher in fp32: per-pixel KLs are rounding noise, some of them
    below 0. The weights must stay >= 0, so the loss, tau^2 * sum gap^2 / sum gap, stays within
    [0, tau^2 * max gap] and finite (negative gaps could make the mean ~0 or < 0)."""
    shape = (2, 4, 6, 7)
    t = make_tensor(shape, device=device, seed=26, scale=3.0)
    s = t + t.abs() * make_tensor(shape, device=device, seed=27) * 2e-7
    mask = _mask(shape, device) if use_mask else None
    gap = sk.knowledge_gap(s, t, 1.0)
    assert bool((gap < 0).any()), "the case needs some negative rounding-level gaps"
    loss, g = _grad(sk.pfs_pixel_kd, s, t, 1.0, ignore_mask=mask)
    assert loss.isfinite() and bool(g.isfinite().all())
    assert 0.0 <= loss.item() <= gap.abs().max().item() + 1e-12


# ---------------------------------------------------------------------------------------------
# 4. Teacher is a target only
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd"])
def test_teacher_gets_no_gradient(fn, device):
    s, t = _logits((2, 3, 4, 5), device=device)
    t_req = t.clone().requires_grad_(True)
    mask = _mask(s.shape, device)
    loss = getattr(sk, fn)(s, t_req, 2.0, ignore_mask=mask)
    (g_t,) = torch.autograd.grad(loss, t_req, allow_unused=True, retain_graph=True)
    assert g_t is None or torch.count_nonzero(g_t) == 0
    loss.backward()
    assert t_req.grad is None or torch.count_nonzero(t_req.grad) == 0
    assert_close(s.grad, _grad(getattr(sk, fn), s, t, 2.0, ignore_mask=mask)[1])
    # only the teacher requires grad: nothing to differentiate
    assert not getattr(sk, fn)(s.detach(), t_req, 2.0).requires_grad


# ---------------------------------------------------------------------------------------------
# 5. Layouts
# ---------------------------------------------------------------------------------------------

LAYOUTS = {"contiguous": lambda x: x, "non_contiguous": non_contiguous, "channels_last": channels_last}


@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd", "knowledge_gap"])
@pytest.mark.parametrize("layout_t", list(LAYOUTS))
@pytest.mark.parametrize("layout_s", list(LAYOUTS))
def test_layouts_match_contiguous(layout_s, layout_t, fn, device):
    shape = (2, 3, 5, 7)
    s, t = _logits(shape, torch.float32, device, seed=23)
    kwargs = {}
    if fn != "knowledge_gap":
        mask = _mask(shape, device)
        kwargs["ignore_mask"] = non_contiguous(mask) if layout_s != "contiguous" else mask
    if fn == "pixel_kd":
        w = _weight(shape, torch.float32, device)
        kwargs["weight"] = non_contiguous(w) if layout_t != "contiguous" else w
    op = getattr(sk, fn)
    s2 = LAYOUTS[layout_s](s.detach()).requires_grad_(True)
    t2 = LAYOUTS[layout_t](t)
    if fn == "knowledge_gap":
        assert_close(op(s2, t2, 2.0), op(s.detach().contiguous(), t, 2.0))
        return
    clean = {k: v.contiguous() for k, v in kwargs.items()}
    want_loss, want_grad = _grad(op, s, t, 2.0, **clean)
    loss, g = _grad(op, s2, t2, 2.0, **kwargs)
    assert_close(loss, want_loss)
    assert_close(g, want_grad)


# ---------------------------------------------------------------------------------------------
# 6. grad_output != 1
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd"])
def test_grad_output_is_honoured(fn, dtype, device):
    op = getattr(sk, fn)
    shape = (2, 3, 4, 5)
    s, t = _logits(shape, dtype, device, seed=24)
    mask = _mask(shape, device)
    _, g1 = _grad(op, s, t, 1.5, ignore_mask=mask)

    s.grad = None
    (3.5 * op(s, t, 1.5, ignore_mask=mask)).backward()
    assert_close(s.grad, 3.5 * g1)

    s.grad = None
    (-0.25 * op(s, t, 1.5, ignore_mask=mask) + (s * s).sum()).backward()
    assert_close(s.grad, -0.25 * g1 + 2 * s.detach())

    s.grad = None
    loss = op(s, t, 1.5, ignore_mask=mask)
    (loss * loss).backward()
    assert_close(s.grad, 2 * loss.detach() * g1)


# ---------------------------------------------------------------------------------------------
# 7. dtypes
# ---------------------------------------------------------------------------------------------

def test_fp64_stays_fp64(device):
    s, t = _logits((1, 3, 5, 7), torch.float64, device)
    for fn in (sk.pixel_kd, sk.pfs_pixel_kd):
        loss, g = _grad(fn, s, t, 3.0)
        assert loss.dtype == torch.float64 and g.dtype == torch.float64
    loss = sk.pixel_kd(s, t, 3.0)
    assert abs(loss.item() - naive_pixel_kd(s, t, 3.0)[0]) <= 1e-12 * abs(loss.item())
    assert sk.knowledge_gap(s, t).dtype == torch.float64


@pytest.mark.parametrize("near", [False, True], ids=["random", "student_near_teacher"])
@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd", "knowledge_gap"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_fp32(dtype, fn, tau, near, device):
    """fp16/bf16 logits: the result is in that dtype and equals the fp32 computation on the upcast
    inputs up to one rounding of the result. With the student close to the teacher, log-probabilities
    rounded to 16 bits would change the small KL by orders of magnitude more."""
    shape = (2, 5, 6, 7)
    t = make_tensor(shape, dtype=dtype, device=device, seed=1, scale=3.0)
    if near:
        s = (t.double() + make_tensor(shape, dtype=torch.float64, device=device, seed=2, scale=0.02)).to(dtype)
    else:
        s = make_tensor(shape, dtype=dtype, device=device, seed=2, scale=3.0)
    op = getattr(sk, fn)
    kwargs = {}
    if fn != "knowledge_gap":
        kwargs["ignore_mask"] = _mask(shape, device)
    if fn == "pixel_kd":
        kwargs["weight"] = _weight(shape, dtype, device)  # weight in the same low precision
    eps = torch.finfo(dtype).eps
    tiny = 2.0 ** -24 if dtype == torch.float16 else 1e-38  # fp16 subnormal spacing
    if fn == "knowledge_gap":
        gap = op(s, t, tau)
        assert gap.dtype == dtype and gap.shape == (2, 6, 7)
        want = op(s.float(), t.float(), tau)
        assert bool(((gap.float() - want).abs() <= eps * want.abs() + tiny).all())
        return
    s.requires_grad_(True)
    loss = op(s, t, tau, **kwargs)
    assert loss.dim() == 0 and loss.dtype == dtype
    loss.backward()
    assert s.grad.dtype == dtype
    up = {k: (v.float() if v.is_floating_point() else v) for k, v in kwargs.items()}
    want_loss, want_grad = _grad(op, s.detach().float(), t.float(), tau, **up)
    assert abs(loss.float().item() - want_loss.item()) <= eps * abs(want_loss.item()) + 1e-30
    assert bool(((s.grad.float() - want_grad).abs() <= eps * want_grad.abs() + tiny).all())
    if fn == "pixel_kd":  # the fp32 computation itself is right (abs: fp32 cancellation in the KL)
        want_naive = naive_pixel_kd(s, t, tau, kwargs["weight"], kwargs["ignore_mask"])[0]
        assert want_loss.item() == pytest.approx(want_naive, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# 8. torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["pixel_kd", "pixel_kd_weight_mask", "pfs_pixel_kd_mask", "knowledge_gap"])
def test_torch_compile_fullgraph_matches_eager(variant, device):
    shape = (2, 3, 5, 7)
    s, t = _logits(shape, torch.float32, device, seed=25)
    mask = _mask(shape, device)
    weight = _weight(shape, torch.float32, device)
    torch._dynamo.reset()
    if variant == "knowledge_gap":
        fn = torch.compile(sk.knowledge_gap, fullgraph=True, backend="aot_eager")
        got = fn(s, t, 2.0)
        assert not got.requires_grad
        assert_close(got, sk.knowledge_gap(s, t, 2.0))
        return
    op = sk.pfs_pixel_kd if variant.startswith("pfs") else sk.pixel_kd
    kwargs = {}
    if "mask" in variant:
        kwargs["ignore_mask"] = mask
    if "weight" in variant:
        kwargs["weight"] = weight
    want_loss, want_grad = _grad(op, s, t, 2.0, **kwargs)
    fn = torch.compile(op, fullgraph=True, backend="aot_eager")
    check_compiled_call(fn, s, t, want_loss, want_grad, 2.5, "reference", **kwargs)


# ---------------------------------------------------------------------------------------------
# 9. Bad inputs
# ---------------------------------------------------------------------------------------------

def _bad_logit_cases(device):
    return bad_logit_cases(device, "student_logits", "teacher_logits", "class")


def _bad_map_cases(device):
    """(name, fn names that take the argument, kwargs, match) for weight and ignore_mask."""
    m = torch.zeros(2, 4, 5, dtype=torch.bool, device=device)
    w = torch.ones(2, 4, 5, device=device)
    both = ("pixel_kd", "pfs_pixel_kd")
    return [
        ("weight with class axis", ("pixel_kd",), {"weight": w[:, None]}, "weight"),
        ("weight transposed", ("pixel_kd",), {"weight": w.transpose(1, 2)}, "weight"),
        ("weight of one image", ("pixel_kd",), {"weight": w[0]}, "weight"),
        ("weight int", ("pixel_kd",), {"weight": w.long()}, "weight"),
        ("weight bool", ("pixel_kd",), {"weight": w > 0}, "weight"),
        ("weight list", ("pixel_kd",), {"weight": w.tolist()}, "weight"),
        ("weight on meta", ("pixel_kd",), {"weight": w.to("meta")}, "weight"),
        ("mask wrong shape", both, {"ignore_mask": m[:, :3]}, "ignore_mask"),
        ("mask with class axis", both, {"ignore_mask": m[:, None]}, "ignore_mask"),
        ("mask float", both, {"ignore_mask": m.float()}, "ignore_mask"),
        ("mask uint8", both, {"ignore_mask": m.to(torch.uint8)}, "ignore_mask"),
        ("mask int64 labels", both, {"ignore_mask": m.long()}, "ignore_mask"),
        ("mask list", both, {"ignore_mask": m.tolist()}, "ignore_mask"),
        ("mask on meta", both, {"ignore_mask": m.to("meta")}, "ignore_mask"),
        ("unknown backend", both, {"backend": "numpy"}, "backend"),
    ]


@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd", "knowledge_gap"])
@pytest.mark.parametrize("case", range(len(_bad_logit_cases("cpu"))), ids=[c[0] for c in _bad_logit_cases("cpu")])
def test_bad_logits_raise_value_error_naming_the_argument(case, fn, device):
    _, args, kwargs, match = _bad_logit_cases(device)[case]
    with pytest.raises(ValueError, match=match):
        getattr(sk, fn)(*args, **kwargs)


@pytest.mark.parametrize("case", range(len(_bad_map_cases("cpu"))), ids=[c[0] for c in _bad_map_cases("cpu")])
def test_bad_weight_or_mask_raises_value_error_naming_the_argument(case, device):
    _, fns, kwargs, match = _bad_map_cases(device)[case]
    s, t = _logits((2, 3, 4, 5), torch.float32, device)
    for fn in fns:
        with pytest.raises(ValueError, match=match):
            getattr(sk, fn)(s, t, **kwargs)


# ---------------------------------------------------------------------------------------------
# 10. Backends: a named one that is not implemented raises, never falls back
# ---------------------------------------------------------------------------------------------

# The op table is cut to the reference so that these checks hold whichever fused backends exist.
# ids not equal to "cuda": conftest skips every item with a "cuda" keyword, and a bare parametrize
# id counts as one.
@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd"])
def test_named_unimplemented_backend_raises(fn, backend, device, monkeypatch):
    monkeypatch.setattr(pixel_api, "IMPLEMENTED", {"reference": pixel_api.IMPLEMENTED["reference"]})
    s, t = _logits((1, 2, 3, 4), torch.float32, device)
    with pytest.raises((RuntimeError, ValueError), match=f"no {backend} backend"):
        getattr(sk, fn)(s, t, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=lambda b: f"backend={b}")
def test_env_override_to_unimplemented_backend_raises(backend, device, monkeypatch):
    monkeypatch.setattr(pixel_api, "IMPLEMENTED", {"reference": pixel_api.IMPLEMENTED["reference"]})
    monkeypatch.setenv("SEGKD_BACKEND", backend)
    s, t = _logits((1, 2, 3, 4), torch.float32, device)
    for fn in (sk.pixel_kd, sk.pfs_pixel_kd, sk.knowledge_gap):
        with pytest.raises((RuntimeError, ValueError), match=f"no {backend} backend"):
            fn(s, t)
    for fn in (sk.pixel_kd, sk.pfs_pixel_kd):
        assert fn(s, t, backend="reference").isfinite()


# ---------------------------------------------------------------------------------------------
# 11. Numerical safety
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gaussian", "signs"])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd"])
def test_huge_logits_fp32_finite(fn, tau, kind, device):
    shape = (2, 5, 3, 4)
    s = make_tensor(shape, device=device, seed=31, scale=1e4)
    t = make_tensor(shape, device=device, seed=32, scale=1e4)
    if kind == "signs":
        s, t = torch.sign(s) * 1e4, torch.sign(t) * 1e4
    mask = _mask(shape, device)
    op = getattr(sk, fn)
    loss, g = _grad(op, s, t, tau, ignore_mask=mask)
    assert loss.isfinite() and bool(g.isfinite().all())
    want_loss, want_grad = (naive_pixel_kd if fn == "pixel_kd" else naive_pfs)(s, t, tau, ignore_mask=mask)
    assert loss.item() == pytest.approx(want_loss, rel=1e-4)
    torch.testing.assert_close(g.double().cpu(), want_grad, rtol=1e-4, atol=1e-6)
    gap = sk.knowledge_gap(s, t, tau)
    assert bool(gap.isfinite().all())
    # at the teacher itself: zero, no NaN from inf - inf
    loss0, g0 = _grad(op, t, t, tau)
    assert loss0.item() == pytest.approx(0.0, abs=1e-6) and g0.abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------
# 12. Triton kernels: both class paths (all K classes in one register tile; K looped over in
#     chunks with a second loop for the gradient), several pixel blocks per image, masked loads,
#     the two passes of pfs_pixel_kd, autograd glue, opcheck, compile
# ---------------------------------------------------------------------------------------------

@pytest.fixture(params=["one_tile", "k_loop"])
def pixel_path(request, monkeypatch):
    """Small tiles so that a few dozen pixels make several pixel blocks per image; 'k_loop' sends
    every K (K = 1 included) through the class loop in chunks of 2 (a partial last chunk when K
    is odd)."""
    monkeypatch.setattr(pixel_triton, "_WARP_TILE", 32)
    if request.param == "k_loop":
        monkeypatch.setattr(pixel_triton, "_MAX_BLOCK_K", 0)
        monkeypatch.setattr(pixel_triton, "_LOOP_BLOCK_K", 2)
    return request.param


def _check_path(path, shape):
    """The shape really takes the path under test, with more than one pixel block per image."""
    _, k, h, w = shape
    block_k, block_p, one_tile, _ = pixel_triton._blocks(k, h * w)
    assert one_tile == (path == "one_tile")
    assert h * w > block_p


TRITON_SHAPES = [(2, 3, 5, 13), (1, 5, 1, 37), (2, 1, 3, 7)]
VARIANTS = ["pixel_kd", "pixel_kd_weight_mask", "pfs_pixel_kd", "pfs_pixel_kd_mask"]


def _variant(variant, shape, dtype, device):
    """(op, oracle, kwargs) of one variant."""
    kwargs = {}
    if "mask" in variant:
        kwargs["ignore_mask"] = _mask(shape, device)
    if "weight" in variant:
        kwargs["weight"] = _weight(shape, dtype, device)
    if variant.startswith("pfs"):
        return sk.pfs_pixel_kd, naive_pfs, kwargs
    return sk.pixel_kd, naive_pixel_kd, kwargs


@pytest.mark.parametrize("shape,dtype", [(shape, torch.float64) for shape in TRITON_SHAPES]
                         + [(TRITON_SHAPES[0], torch.float32)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_paths_match_loop_oracle(variant, shape, dtype, pixel_path, device):
    _check_path(pixel_path, shape)
    s, t = _logits(shape, dtype, device, seed=7 + sum(shape))
    op, oracle, kwargs = _variant(variant, shape, dtype, device)
    loss = op(s, t, 1.5, backend="triton", **kwargs)
    assert loss.dim() == 0 and loss.dtype == dtype
    (-1.75 * loss).backward()  # grad_output != 1
    want_loss, want_grad = oracle(s, t, 1.5, **kwargs)
    assert loss.item() == pytest.approx(want_loss, **_approx(dtype))
    assert s.grad.dtype == dtype
    assert_close(s.grad.cpu(), -1.75 * want_grad.to(dtype))
    if "mask" in variant:
        assert bool((s.grad.permute(0, 2, 3, 1)[kwargs["ignore_mask"]] == 0).all())


@pytest.mark.parametrize("shape", [(2, 3, 5, 13), (2, 1, 3, 7)])
def test_triton_knowledge_gap_matches_loop_oracle(shape, pixel_path, device):
    _check_path(pixel_path, shape)
    s, t = _logits(shape, torch.float64, device, seed=71)
    gap = pixel_triton.knowledge_gap(s, t, 0.5)
    assert gap.shape == (shape[0], shape[2], shape[3]) and not gap.requires_grad
    assert_close(gap.cpu(), naive_gap(s, t, 0.5))


@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd"])
def test_triton_non_finite_ignored_pixels_and_all_ignored(fn, pixel_path, device):
    """NaN/Inf logits (and weights) at ignored pixels: exactly 0 gradient there, same result as
    finite values there; every pixel ignored and every logit NaN: loss 0, gradient exactly 0."""
    shape = (2, 3, 5, 13)
    _check_path(pixel_path, shape)
    s, t = _logits(shape, device=device, seed=72)
    mask = _mask(shape, device, seed=73)
    kwargs = {"ignore_mask": mask}
    if fn == "pixel_kd":
        kwargs["weight"] = _weight(shape, device=device)
    op = getattr(sk, fn)
    clean_loss, clean_g = _grad(op, s, t, 1.0, backend="triton", **kwargs)
    s_bad, t_bad = s.detach().clone(), t.clone()
    s_bad.permute(0, 2, 3, 1)[mask] = float("nan")
    t_bad.permute(0, 2, 3, 1)[mask] = float("inf")
    if fn == "pixel_kd":
        kwargs["weight"] = kwargs["weight"].clone()
        kwargs["weight"][mask] = float("nan")
    loss, g = _grad(op, s_bad, t_bad, 1.0, backend="triton", **kwargs)
    assert bool((g.permute(0, 2, 3, 1)[mask] == 0).all())
    assert_close(loss, clean_loss)
    assert_close(g, clean_g)

    everything = torch.ones(2, 5, 13, dtype=torch.bool, device=device)
    nan = torch.full(shape, float("nan"), dtype=torch.float64, device=device)
    loss, g = _grad(op, nan, nan, 1.0, backend="triton", ignore_mask=everything)
    assert loss.item() == 0.0 and bool((g == 0).all())


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd"])
def test_triton_reads_strided_logits(fn, layout, pixel_path, device):
    shape = (2, 3, 5, 13)
    _check_path(pixel_path, shape)
    s, t = _logits(shape, device=device, seed=74)
    mask = _mask(shape, device, seed=75)
    op = getattr(sk, fn)
    want_loss, want_grad = _grad(op, s, t, 2.0, backend="reference", ignore_mask=mask)
    s2 = LAYOUTS[layout](s.detach()).requires_grad_(True)
    loss, g = _grad(op, s2, LAYOUTS[layout](t), 2.0, backend="triton", ignore_mask=mask)
    assert_close(loss, want_loss)
    assert_close(g, want_grad)


@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd"])
def test_triton_gradient_survives_retain_graph_and_in_place_grad_edits(fn, device):
    """With grad_output == 1 the backward may hand out the gradient saved by the forward: a second
    backward through the retained graph must still see it intact after .grad is edited in place."""
    shape = (2, 3, 5, 13)
    s, t = _logits(shape, torch.float32, device, seed=81)
    op = getattr(sk, fn)
    _, want = _grad(op, s, t, 2.0, backend="reference")
    loss = op(s, t, 2.0, backend="triton")
    loss.backward(retain_graph=True)
    assert_close(s.grad, want)
    s.grad.mul_(0.0)
    loss.backward()
    assert_close(s.grad, want)


@pytest.mark.parametrize("kind", ["gaussian", "signs"])
@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd"])
def test_triton_huge_logits_fp32(fn, kind, pixel_path, device):
    shape = (2, 5, 3, 7)
    _check_path(pixel_path, shape)
    s = make_tensor(shape, device=device, seed=76, scale=1e4)
    t = make_tensor(shape, device=device, seed=77, scale=1e4)
    if kind == "signs":
        s, t = torch.sign(s) * 1e4, torch.sign(t) * 1e4
    mask = _mask(shape, device)
    op = getattr(sk, fn)
    loss, g = _grad(op, s, t, 0.5, backend="triton", ignore_mask=mask)
    want_loss, want_grad = (naive_pixel_kd if fn == "pixel_kd" else naive_pfs)(s, t, 0.5, ignore_mask=mask)
    assert loss.isfinite() and bool(g.isfinite().all())
    assert loss.item() == pytest.approx(want_loss, rel=1e-4)
    torch.testing.assert_close(g.double().cpu(), want_grad, rtol=1e-4, atol=1e-6)
    loss0, g0 = _grad(op, t, t, 0.5, backend="triton")
    assert loss0.item() == 0.0 and g0.abs().max().item() == 0.0  # identical logits: exactly 0


@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd"])
def test_triton_forward_computes_the_gradient_only_when_needed(fn, device):
    shape = (2, 3, 5, 13)
    s, t = _logits(shape, torch.float32, device, seed=78)
    mask = _mask(shape, device)
    op = pixel_triton.pixel_kd_triton if fn == "pixel_kd" else pixel_triton.pfs_pixel_kd_triton
    extra = (None, mask) if fn == "pixel_kd" else (mask,)
    assert op(s.detach(), t, 2.0, *extra, True)[1].shape == s.shape
    assert op(s.detach(), t, 2.0, *extra, False)[1].numel() == 0
    with torch.no_grad():
        loss_ng = getattr(sk, fn)(s, t, 2.0, backend="triton", ignore_mask=mask)
    assert not loss_ng.requires_grad
    loss, g = _grad(getattr(sk, fn), s, t, 2.0, backend="triton", ignore_mask=mask)
    assert torch.equal(loss_ng, loss)
    # called with needs_grad=False on a student that requires grad: the backward recomputes ds
    s2 = s.detach().requires_grad_(True)
    (g2,) = torch.autograd.grad(op(s2, t, 2.0, *extra, False)[0], s2)
    assert_close(g2, g)


# The registration (schema, fake, autograd) does not depend on the class path: one small shape.
@pytest.mark.parametrize("needs_grad", [True, False])
def test_opcheck_triton_ops(needs_grad, device):
    shape = (1, 3, 3, 5)
    s, t = _logits(shape, torch.float32, device, seed=79)
    mask, weight = _mask(shape, device), _weight(shape, torch.float32, device)
    if needs_grad:
        torch.library.opcheck(pixel_triton.pixel_kd_triton, (s, t, 2.0, weight, mask, True))
        torch.library.opcheck(pixel_triton.pfs_pixel_kd_triton, (s, t, 2.0, None, True))
        torch.library.opcheck(pixel_triton.knowledge_gap_triton, (s.detach(), t, 2.0))
    else:
        torch.library.opcheck(pixel_triton.pixel_kd_triton, (s, t, 2.0, None, None, False))
        torch.library.opcheck(pixel_triton.pfs_pixel_kd_triton, (s, t, 2.0, mask, False))


@pytest.mark.parametrize("variant", ["pixel_kd_weight_mask", "pfs_pixel_kd_mask", "knowledge_gap"])
def test_torch_compile_fullgraph_triton(variant, device):
    shape = (2, 3, 5, 7)
    s, t = _logits(shape, torch.float32, device, seed=80)
    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    torch._dynamo.reset()
    if variant == "knowledge_gap":
        fn = torch.compile(sk.knowledge_gap, fullgraph=True, backend=compile_backend)
        assert_close(fn(s, t, 2.0), sk.ops.pixel_kd.reference.per_pixel_kl(s.detach(), t, 2.0))
        return
    op, _, kwargs = _variant(variant, shape, torch.float32, device)
    want_loss, want_grad = _grad(op, s, t, 2.0, backend="reference", **kwargs)
    fn = torch.compile(op, fullgraph=True, backend=compile_backend)
    check_compiled_call(fn, s, t, want_loss, want_grad, 0.75, "triton", **kwargs)


# GPU only: the half-precision error budget (docs/backends.md) and a full-resolution batch.

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 19, 64, 128), (2, 150, 33, 47), (3, 1, 17, 19)],
                         ids=["cityscapes", "ade20k_k_loop", "one_class"])
@pytest.mark.parametrize("variant", ["pixel_kd_weight_mask", "pfs_pixel_kd_mask", "knowledge_gap"])
def test_cuda_half_precision_error_budget(variant, shape, dtype):
    s = make_tensor(shape, dtype=dtype, device="cuda", seed=81, scale=3.0)
    t = make_tensor(shape, dtype=dtype, device="cuda", seed=82, scale=3.0)
    if variant == "knowledge_gap":
        want = sk.knowledge_gap(s.double(), t.double(), 2.0)
        ref = pixel_api.reference.per_pixel_kl(s, t, 2.0).to(dtype)
        got = pixel_triton.knowledge_gap(s, t, 2.0)
        assert got.dtype == dtype and within_error_budget(got, ref, want)
        return
    op, _, kwargs = _variant(variant, shape, dtype, "cuda")
    up = {k: (v.double() if v.is_floating_point() else v) for k, v in kwargs.items()}
    want_loss, want_grad = _grad(op, s.double(), t.double(), 2.0, backend="reference", **up)
    ref_loss, ref_grad = _grad(op, s, t, 2.0, backend="reference", **kwargs)
    loss, g = _grad(op, s, t, 2.0, backend="triton", **kwargs)
    assert loss.dtype == dtype and g.dtype == dtype
    assert within_error_budget(loss, ref_loss, want_loss)
    assert within_error_budget(g, ref_grad, want_grad, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("fn", ["pixel_kd", "pfs_pixel_kd"])
def test_cuda_full_resolution_batch(fn):
    shape = (2, 19, 509, 1021)  # full-resolution Cityscapes-like logits, odd sizes
    s = make_tensor(shape, device="cuda", seed=83, scale=3.0)
    t = make_tensor(shape, device="cuda", seed=84, scale=3.0)
    mask = _mask(shape, "cuda")
    op = getattr(sk, fn)
    want_loss, want_grad = _grad(op, s.double(), t.double(), 1.0, backend="reference", ignore_mask=mask)
    loss, g = _grad(op, s, t, 1.0, backend="triton", ignore_mask=mask)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-4)
    torch.testing.assert_close(g.double(), want_grad, rtol=1e-3, atol=1e-5 * want_grad.abs().max().item())
