"""Tests of sk.pairwise_kd (docs/losses.md 3): pairwise pixel-similarity distillation.

The oracle here is the naive N x P x P form (CIRKD's CriterionStructuralKD): build both cosine
similarity matrices per image and take the mean of the squared differences. It shares no code
with the Gram-identity reference in segkd_kernels/ops/pairwise_kd/reference.py.
"""

import contextlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.gradcheck import GradcheckError

import segkd_kernels as sk
from segkd_kernels._backends import host_execution, host_library
from segkd_kernels.ops.pairwise_kd.api import IMPLEMENTED
from segkd_kernels.testing import assert_close, channels_last, make_tensor, non_contiguous, within_error_budget
from feature_pair_checks import (BAD_SHAPES, check_bad_dtypes_and_types, check_bad_shape, check_different_devices,
                                 check_missing_backend, good_pair)
from feature_pair_checks import features as _features
from feature_pair_checks import value_and_grad as _value_and_grad

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_AVAILABLE = sk.available_backends()
# Every backend this op implements that can run here (reference, and triton: on CPU under the
# interpreter); the parametrised tests below pick up every backend registered in IMPLEMENTED.
BACKENDS = [name for name in ("reference", "triton", "cuda") if name in IMPLEMENTED and _AVAILABLE[name]]

# (N, C_s, C_t, H, W): odd sizes, C_s != C_t, a 1x1 map (P = 1) and a single row / column.
SHAPES = [
    (1, 3, 5, 5, 7),
    (2, 1, 4, 9, 11),
    (3, 5, 3, 1, 1),
    (2, 4, 4, 3, 1),
    (3, 3, 5, 1, 6),
]


def _skip_unsupported(backend, dtype):
    if dtype not in IMPLEMENTED[backend]:
        pytest.skip(f"{backend} backend of pairwise_kd does not take {dtype}")


def naive_pairwise(s, t, pool=None, detach_norm=False):
    """Naive form: per image, the P x P cosine-similarity matrices of student and teacher, the mean
    over N * P * P of their squared difference. With detach_norm the per-pixel norm is a constant."""
    t = t.detach()
    if pool is not None:
        s = F.max_pool2d(s, kernel_size=pool, stride=pool, ceil_mode=True)
        t = F.max_pool2d(t, kernel_size=pool, stride=pool, ceil_mode=True)

    def similarity(x):  # x: (C, H, W) -> (P, P)
        f = x.reshape(x.shape[0], -1)  # (C, P)
        if detach_norm:
            norm = f.norm(dim=0, keepdim=True).clamp_min(1e-12).detach()
            f = f / norm
        else:
            f = F.normalize(f, p=2, dim=0, eps=1e-12)
        return torch.mm(f.t(), f)

    sims_s = torch.stack([similarity(s[i]) for i in range(s.shape[0])])  # (N, P, P)
    sims_t = torch.stack([similarity(t[i]) for i in range(t.shape[0])])
    return ((sims_s - sims_t) ** 2).mean()


# --------------------------------------------------------------------------------------------
# 1. Gram path vs the naive P x P form
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_naive_pxp(shape, detach_norm, dtype, backend):
    _skip_unsupported(backend, dtype)
    s, t = _features(*shape, dtype=dtype, seed=sum(shape))
    loss, grad = _value_and_grad(sk.pairwise_kd, s, t, detach_norm=detach_norm, backend=backend)
    # The oracle runs in fp64 on the (upcast) inputs: fp32 results are checked against the truth.
    ref_loss, ref_grad = _value_and_grad(naive_pairwise, s.double(), t.double(), detach_norm=detach_norm)
    assert loss.dtype == dtype and loss.dim() == 0
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, dtype=dtype)
    assert_close(grad, ref_grad, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("pool", [2, 3])
def test_matches_naive_pxp_pooled(pool, detach_norm, backend):
    s, t = _features(2, 3, 5, 7, 9, dtype=torch.float64, seed=3)
    loss, grad = _value_and_grad(sk.pairwise_kd, s, t, pool=pool, detach_norm=detach_norm, backend=backend)
    ref_loss, ref_grad = _value_and_grad(naive_pairwise, s, t, pool=pool, detach_norm=detach_norm)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


def test_detach_norm_changes_the_gradient_not_the_value():
    """Guards the oracle comparisons above: the two gradients really differ, so a backend that
    ignored detach_norm could not pass both."""
    s, t = _features(2, 3, 4, 5, 7, dtype=torch.float64)
    loss_a, grad_a = _value_and_grad(sk.pairwise_kd, s, t, detach_norm=False)
    loss_b, grad_b = _value_and_grad(sk.pairwise_kd, s, t, detach_norm=True)
    assert_close(loss_a, loss_b)
    assert (grad_a - grad_b).abs().max() > 1e-3 * grad_a.abs().max()


def test_zero_teacher_pixels():
    """A teacher pixel with all-zero features normalises to 0 (max(||t||, eps)), not NaN."""
    s, t = _features(2, 3, 4, 5, 7, dtype=torch.float64, seed=5)
    t = t.clone()
    t[0, :, 1, 2] = 0
    t[1, :, 4, :] = 0
    loss, grad = _value_and_grad(sk.pairwise_kd, s, t)
    ref_loss, ref_grad = _value_and_grad(naive_pairwise, s, t)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


def test_known_value():
    """Hand-computed: one image, two pixels. Student pixels orthogonal (similarity 0 off the
    diagonal), teacher pixels parallel (similarity 1): the two off-diagonal entries differ by 1,
    the diagonal by 0, so loss = 2 / (1 * 2^2) = 0.5."""
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 3.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    t = torch.tensor([[[[2.0, 5.0]]]], dtype=torch.float64)  # (1, 1, 1, 2)
    assert sk.pairwise_kd(s, t).item() == pytest.approx(0.5, rel=1e-12)


# --------------------------------------------------------------------------------------------
# 2. student ~ teacher: the three Gram terms nearly cancel
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 4, 31, 33), (1, 16, 20, 25)], ids=lambda s: "x".join(map(str, s)))
def test_near_cancellation_fp32(shape, backend):
    """s = t + 1e-3 noise in fp32. The loss is ~1e-7 while each Gram term is ~P^2 / C: combining
    the terms in fp32 (or even fp32 Gram matrices combined in fp64) is off by 0.1% to 10% here."""
    n, c, h, w = shape
    t = make_tensor(shape, device=DEVICE, seed=11)
    noise = make_tensor(shape, dtype=torch.float64, device=DEVICE, seed=12) * 1e-3
    s = (t.double() + noise).float()
    loss, grad = _value_and_grad(sk.pairwise_kd, s, t, backend=backend)
    ref_loss, ref_grad = _value_and_grad(naive_pairwise, s.double(), t.double())
    assert 0 < ref_loss.item() < 1e-5  # the regime this test is about
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * ref_loss.item()
    # The gradient is O(noise) too; fp32 output, so compare relative to its largest entry.
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_student_equals_teacher_is_zero(dtype, backend):
    _skip_unsupported(backend, dtype)
    t = make_tensor((2, 6, 9, 11), dtype=dtype, device=DEVICE, seed=13)
    s = t.clone().requires_grad_(True)
    loss = sk.pairwise_kd(s, t, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert abs(loss.item()) < 1e-10
    assert grad.abs().max().item() < 1e-8


# --------------------------------------------------------------------------------------------
# 2b. precision="exact" | "fast": every backend against the fp64 oracle, within the bound of
#     docs/losses.md 3
# --------------------------------------------------------------------------------------------

U32 = 2.0 ** -24  # fp32 unit roundoff
FAST_CHUNK = 64
# Without a GPU the CUDA kernels still run, on CPU tensors through the host execution layer
PRECISION_BACKENDS = BACKENDS + (["cuda-on-host"] if "cuda" not in BACKENDS and host_library()[0] else [])


@contextlib.contextmanager
def _run_on(backend):
    if backend == "cuda-on-host":
        with host_execution():
            yield "cuda"
    else:
        yield backend


def _entry_error(precision, c, p):
    """e of docs/losses.md 3: every Gram entry is off by at most e * H_cc' (H = |Z|^T |Z|)."""
    if precision == "exact":
        # fp64 unit features (a norm of c squares, a division) and fp64 sums of p products
        return (p + c + 8) * 2.0 ** -53
    # fp32 unit features (2 roundings each), 3xTF32 products (3 * 2^-22), 3 K fp32 additions of
    # partial products per chunk with a truncating adder (2u each), chunk sums in fp64
    return 4 * U32 + 12 * U32 + 6 * FAST_CHUNK * U32 + 2.0 ** -44


def _loss_error_bound(s, t, precision):
    """|computed - true loss| <= this, for any summation order (docs/losses.md 3), including the
    fp64 rounding of the final combination of the squared entries."""
    a = F.normalize(s.detach().double().flatten(2), dim=1, eps=1e-12)
    b = F.normalize(t.detach().double().flatten(2), dim=1, eps=1e-12)
    z = torch.cat([a, b], dim=1)  # (N, C_s + C_t, P)
    n, c, p = z.shape
    g = z @ z.transpose(1, 2)
    h = z.abs() @ z.abs().transpose(1, 2)
    e = _entry_error(precision, c, p)
    gram = (2 * g.abs() * e * h + (e * h) ** 2).sum()
    combine = 2.0 ** -53 * (c * c + 8) * g.square().sum()
    return (gram + combine).item() / (n * p * p)


def _hard_case():
    """student = teacher + 1e-3 noise (fp32); the teacher's channels twice (C_t = 2 C_s, same
    similarities), so the loss is ~1e-7 of each Gram term."""
    t = make_tensor((2, 16, 32, 40), device=DEVICE, seed=91)
    s = (t.double() + 1e-3 * make_tensor(t.shape, dtype=torch.float64, device=DEVICE, seed=92)).float()
    return s, torch.cat([t, t], dim=1)


@pytest.mark.parametrize("backend", PRECISION_BACKENDS)
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_precision_error_within_bound_hard_case(precision, backend):
    s, t = _hard_case()
    with _run_on(backend) as name:
        loss, grad = _value_and_grad(sk.pairwise_kd, s, t, precision=precision, backend=name)
    ref_loss, ref_grad = _value_and_grad(sk.pairwise_kd, s.double(), t.double(), backend="reference")
    assert loss.dtype == torch.float32
    truth = ref_loss.item()
    assert 0 < truth < 1e-5  # the near-cancelling regime
    # the result is rounded once to fp32 at the end
    bound = _loss_error_bound(s, t, precision) + U32 * truth
    assert abs(loss.item() - truth) <= bound, (loss.item(), truth, bound)
    if precision == "exact":  # the exact bound itself is a few ppm of this loss
        assert bound <= 1e-5 * truth
    # the gradient is unaffected by the mode (the backward does not cancel)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.parametrize("backend", PRECISION_BACKENDS)
def test_precision_fast_unrelated_features(backend):
    """Student and teacher unrelated: no cancellation, and the fast bound is ~1e-4 of the loss, so
    a fast path that dropped or repeated a chunk or a split would fail here."""
    s, t = _features(2, 20, 36, 23, 29, dtype=torch.float32, seed=93)
    with _run_on(backend) as name:
        loss = sk.pairwise_kd(s, t, precision="fast", backend=name)
    truth = sk.pairwise_kd(s.double(), t.double(), backend="reference").item()
    bound = _loss_error_bound(s, t, "fast") + U32 * truth
    assert bound < 1e-3 * truth
    assert abs(loss.item() - truth) <= bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_precision_fast_fp64_inputs_compute_in_fp64(backend):
    _skip_unsupported(backend, torch.float64)
    s, t = _features(2, 3, 5, 5, 7, dtype=torch.float64, seed=94)
    assert torch.equal(sk.pairwise_kd(s, t, precision="fast", backend=backend),
                       sk.pairwise_kd(s, t, precision="exact", backend=backend))


@pytest.mark.parametrize("precision", ["EXACT", "fp32", "", None, True, 1, "tf32"])
def test_bad_precision(precision):
    s, t = _good()
    with pytest.raises(ValueError, match="precision"):
        sk.pairwise_kd(s, t, precision=precision)
    with pytest.raises(ValueError, match="precision"):
        sk.nn.PairwiseKD(precision=precision)


def test_module_passes_precision():
    s, t = _hard_case()
    for precision in ("exact", "fast"):
        module = sk.nn.PairwiseKD(precision=precision, backend="reference")
        assert f"precision={precision!r}" in repr(module)
        assert torch.equal(module(s, t), sk.pairwise_kd(s, t, precision=precision, backend="reference"))


# --------------------------------------------------------------------------------------------
# 3. pool = max_pool2d(pool, pool, ceil_mode=True) on both features, then pool=None
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", [2, 3])
@pytest.mark.parametrize("detach_norm", [False, True])
def test_pool_is_ceil_max_pool(pool, detach_norm, backend):
    s, t = _features(2, 3, 5, 7, 9, dtype=torch.float64, seed=21)
    loss, grad = _value_and_grad(sk.pairwise_kd, s, t, pool=pool, detach_norm=detach_norm, backend=backend)

    def pooled_then_full(s_, t_, **kw):
        mp = lambda x: F.max_pool2d(x, kernel_size=pool, stride=pool, ceil_mode=True)  # noqa: E731
        return sk.pairwise_kd(mp(s_), mp(t_), pool=None, **kw)

    ref_loss, ref_grad = _value_and_grad(pooled_then_full, s, t, detach_norm=detach_norm, backend=backend)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)
    # 7x9 is odd on both axes: the floor-mode result is a different number.
    floor_s = F.max_pool2d(s, pool, pool, ceil_mode=False)
    floor_t = F.max_pool2d(t, pool, pool, ceil_mode=False)
    assert abs(sk.pairwise_kd(floor_s, floor_t).item() - loss.item()) > 1e-6


def test_pool_one_is_no_pool():
    s, t = _features(2, 3, 5, 7, 9, dtype=torch.float64, seed=22)
    assert_close(sk.pairwise_kd(s, t, pool=1), sk.pairwise_kd(s, t, pool=None))


# --------------------------------------------------------------------------------------------
# 5. gradcheck (fp64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", [None, 2])
def test_gradcheck(pool, backend):
    s = make_tensor((2, 3, 3, 5), dtype=torch.float64, seed=31, requires_grad=True, device=DEVICE)
    t = make_tensor((2, 2, 3, 5), dtype=torch.float64, seed=32, device=DEVICE)
    # fast mode for the kernels: the interpreter makes each call ~0.1 s
    assert torch.autograd.gradcheck(lambda x: sk.pairwise_kd(x, t, pool=pool, backend=backend), (s,),
                                    fast_mode=backend != "reference")


def _pooled_unit(x, norm, pool):
    """x max-pooled (ceil mode), flattened to (N, C, P), divided by the given per-pixel norm."""
    if pool is not None:
        x = F.max_pool2d(x, pool, pool, ceil_mode=True)
    return x.flatten(2) / norm


class _FixedNormProbe(torch.autograd.Function):
    """Forward: the naive loss with the student's per-pixel norms frozen at n0 (those of the point
    being checked). Backward: sk.pairwise_kd(..., detach_norm=True)'s gradient. At x with
    ||x|| = n0 the detach_norm gradient must be the true derivative of this forward, so gradcheck's
    finite differences check it, independently of autograd through the naive form."""

    @staticmethod
    def forward(ctx, x, t, n0, pool, backend):
        ctx.save_for_backward(x, t)
        ctx.pool = pool
        ctx.backend = backend
        a = _pooled_unit(x, n0, pool)
        t_pooled = _pooled_unit(t, 1.0, pool)
        b = t_pooled / t_pooled.norm(dim=1, keepdim=True)
        sims_s = a.transpose(1, 2) @ a
        sims_t = b.transpose(1, 2) @ b
        return ((sims_s - sims_t) ** 2).mean()

    @staticmethod
    def backward(ctx, grad_out):
        x, t = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            loss = sk.pairwise_kd(x, t, pool=ctx.pool, detach_norm=True, backend=ctx.backend)
            (grad,) = torch.autograd.grad(loss, x)
        return grad_out * grad, None, None, None, None


# reference only: the kernels' detach_norm gradients are compared with the naive form's
# (test_matches_naive_pxp, test_tiles_against_naive_pxp), and this probe costs ~100 kernel calls.
@pytest.mark.parametrize("backend", ["reference"])
@pytest.mark.parametrize("pool", [None, 2])
def test_gradcheck_detach_norm(pool, backend):
    """detach_norm=True is, by design, not the derivative of the loss (plain gradcheck fails), but
    it is the derivative of the loss with the student's norms frozen at their current value."""
    s = make_tensor((2, 3, 3, 5), dtype=torch.float64, seed=33, requires_grad=True, device=DEVICE)
    t = make_tensor((2, 2, 3, 5), dtype=torch.float64, seed=34, device=DEVICE)
    pooled = s.detach() if pool is None else F.max_pool2d(s.detach(), pool, pool, ceil_mode=True)
    n0 = pooled.flatten(2).norm(dim=1, keepdim=True)
    fast = backend != "reference"  # the interpreter makes each kernel call ~0.1 s
    assert torch.autograd.gradcheck(lambda x: _FixedNormProbe.apply(x, t, n0, pool, backend), (s,), fast_mode=fast)
    # and the value is the ordinary loss
    assert_close(_FixedNormProbe.apply(s, t, n0, pool, backend), sk.pairwise_kd(s, t, pool=pool, backend=backend))
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda x: sk.pairwise_kd(x, t, pool=pool, detach_norm=True, backend=backend), (s,),
                                 fast_mode=fast)


# --------------------------------------------------------------------------------------------
# 6. teacher, layouts, grad_output, dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("detach_norm", [False, True])
def test_teacher_gets_no_gradient(detach_norm, backend):
    s = make_tensor((2, 3, 5, 7), device=DEVICE, seed=41, requires_grad=True)
    t = make_tensor((2, 4, 5, 7), device=DEVICE, seed=42, requires_grad=True)
    loss = sk.pairwise_kd(s, t, detach_norm=detach_norm, backend=backend)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None or not t.grad.any()
    # The teacher's value still counts: a different teacher gives a different student gradient.
    s2 = s.detach().clone().requires_grad_(True)
    other_teacher = t.detach() * torch.linspace(0.5, 2, 4, device=DEVICE).view(1, 4, 1, 1)
    sk.pairwise_kd(s2, other_teacher, backend=backend).backward()
    assert not torch.allclose(s.grad, s2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["non_contiguous", "channels_last", "both_channels_last", "mixed"])
@pytest.mark.parametrize("pool", [None, 2])
def test_layouts(layout, pool, backend):
    s, t = _features(2, 3, 5, 7, 9, dtype=torch.float32, seed=43)
    loss, grad = _value_and_grad(sk.pairwise_kd, s, t, pool=pool, backend=backend)
    if layout == "non_contiguous":
        s2, t2 = non_contiguous(s), non_contiguous(t)
    elif layout == "channels_last":
        s2, t2 = channels_last(s), t
    elif layout == "both_channels_last":
        s2, t2 = channels_last(s), channels_last(t)
    else:
        s2, t2 = non_contiguous(s), channels_last(t)
    loss2 = sk.pairwise_kd(s2, t2, pool=pool, backend=backend)
    (grad2,) = torch.autograd.grad(loss2, s2)
    assert grad2.shape == s.shape
    assert_close(loss2, loss)
    assert_close(grad2, grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_output_is_honoured(dtype, backend):
    _skip_unsupported(backend, dtype)
    s, t = _features(2, 3, 5, 5, 7, dtype=dtype, seed=44)
    loss, grad = _value_and_grad(sk.pairwise_kd, s, t, backend=backend)
    s2 = s.detach().clone().requires_grad_(True)
    (2.5 * sk.pairwise_kd(s2, t, backend=backend)).backward()
    assert_close(s2.grad, 2.5 * grad)
    s3 = s.detach().clone().requires_grad_(True)
    loss3 = sk.pairwise_kd(s3, t, backend=backend)
    (grad3,) = torch.autograd.grad(loss3, s3, grad_outputs=torch.tensor(-0.75, dtype=dtype, device=DEVICE))
    assert_close(grad3, -0.75 * grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_output_dtype(dtype, backend):
    _skip_unsupported(backend, dtype)
    s, t = _features(2, 3, 4, 5, 7, dtype=dtype, seed=45)
    loss = sk.pairwise_kd(s, t, backend=backend)
    loss.backward()
    assert loss.dtype == dtype and loss.shape == ()
    assert s.grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pool", [None, 2])
def test_half_precision_is_fp32_math_rounded(dtype, pool, backend):  # the kernels upcast on load too
    """fp16/bf16 inputs: the value (and gradient) of the fp32 computation on the upcast inputs,
    rounded once to the input dtype."""
    _skip_unsupported(backend, dtype)
    s, t = _features(2, 3, 5, 7, 9, dtype=dtype, seed=46)
    loss, grad = _value_and_grad(sk.pairwise_kd, s, t, pool=pool, backend=backend)
    ref_loss, ref_grad = _value_and_grad(sk.pairwise_kd, s.float(), t.float(), pool=pool, backend="reference")
    assert loss.dtype == dtype and grad.dtype == dtype
    ulp = torch.finfo(dtype).eps  # one unit in the last place, relative
    assert abs(loss.item() - ref_loss.item()) <= ulp * abs(ref_loss.item())
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.float(), ref_grad, rtol=ulp, atol=1e-3 * scale)


# --------------------------------------------------------------------------------------------
# 7. torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [{}, {"pool": 2, "detach_norm": True}], ids=str)
def test_torch_compile(kwargs, backend):
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x, y: sk.pairwise_kd(x, y, backend=backend, **kwargs), fullgraph=True, backend="aot_eager"
    )
    s, t = _features(2, 3, 4, 5, 7, dtype=torch.float32, seed=51)
    loss, grad = _value_and_grad(compiled, s, t)
    ref_loss, ref_grad = _value_and_grad(sk.pairwise_kd, s, t, backend=backend, **kwargs)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


# --------------------------------------------------------------------------------------------
# 8, 9. errors
# --------------------------------------------------------------------------------------------


def _good():
    return good_pair(61)


@pytest.mark.parametrize("student_shape, teacher_shape, name", BAD_SHAPES)
def test_bad_shapes(student_shape, teacher_shape, name):
    check_bad_shape(sk.pairwise_kd, student_shape, teacher_shape, name)


def test_bad_dtypes_and_types():
    check_bad_dtypes_and_types(sk.pairwise_kd, *_good())


def test_different_devices():
    check_different_devices(sk.pairwise_kd, *_good())


@pytest.mark.parametrize("pool", [0, -1, 1.5, True, False, "2", 2.0])
def test_bad_pool(pool):
    s, t = _good()
    with pytest.raises(ValueError, match="pool"):
        sk.pairwise_kd(s, t, pool=pool)


def test_bad_backend_name():
    s, t = _good()
    with pytest.raises(ValueError, match="backend"):
        sk.pairwise_kd(s, t, backend="fastest")


# ids avoid the bare keyword "cuda", which conftest.py reads as the "needs a CUDA device" marker
@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=["named-triton", "named-cuda"])
def test_missing_backend_raises(backend):
    check_missing_backend(sk.pairwise_kd, "pairwise_kd", IMPLEMENTED, backend, *_good())


def test_auto_and_reference_agree():
    s, t = _good()
    assert_close(sk.pairwise_kd(s, t), sk.pairwise_kd(s, t, backend="reference"))


# --------------------------------------------------------------------------------------------
# 10. memory: full resolution without a P x P matrix
# --------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import time, torch, segkd_kernels as sk
    def peak_mib():
        # this process's own high-water mark (VmHWM, reset by exec); ru_maxrss can start at the
        # parent's peak when the parent is a large test process
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 64, 128, 128, generator=gen).requires_grad_(True)
    t = torch.randn(2, 128, 128, 128, generator=gen)
    base = peak_mib()
    start = time.perf_counter()
    loss = sk.pairwise_kd(s, t)
    loss.backward()
    seconds = time.perf_counter() - start
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    print(f"{base:.1f} {peak_mib():.1f} {seconds:.3f} {loss.item():.8e}")
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_full_resolution_memory():
    """P = 128 * 128 = 16384, N = 2: one P x P fp32 matrix per image would be 1 GiB (2 GiB for the
    batch, twice that for student and teacher). The whole child process must stay well below."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEGKD_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a GPU machine
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    base, peak, seconds, loss = map(float, proc.stdout.split())
    assert peak - base < 400, f"forward+backward raised max RSS by {peak - base:.0f} MiB"
    assert peak < 1024, f"child max RSS {peak:.0f} MiB"
    assert seconds < 20, f"forward+backward took {seconds:.1f} s"
    assert math.isfinite(loss) and 0 < loss < 1


# --------------------------------------------------------------------------------------------
# 11. kernels: several tiles, wide channels, custom ops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", PRECISION_BACKENDS)  # on CPU the CUDA kernels too (3xTF32 backward)
@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 257, 3, 17, 19),  # P = 323: more than one pixel block; C_s over two channel tiles, odd
        (2, 5, 130, 9, 13),  # wide teacher: several C_t tiles in G_ab, G_bb and the backward
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_tiles_against_naive_pxp(shape, detach_norm, backend):
    s, t = _features(*shape, dtype=torch.float32, seed=sum(shape))
    with _run_on(backend) as name:
        loss, grad = _value_and_grad(sk.pairwise_kd, s, t, detach_norm=detach_norm, backend=name)
    ref_loss, ref_grad = _value_and_grad(naive_pairwise, s.double(), t.double(), detach_norm=detach_norm)
    assert_close(loss, ref_loss, dtype=torch.float32)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("detach_norm", [False, True])
def test_opcheck_triton_ops(dtype, detach_norm):
    from segkd_kernels.ops.pairwise_kd.triton import pairwise_kd_backward_triton, pairwise_kd_triton

    s, t = _features(2, 3, 4, 5, 7, dtype=dtype, seed=71)
    s, t = s.detach().flatten(2).requires_grad_(True), t.flatten(2)
    torch.library.opcheck(pairwise_kd_triton, (s, t, detach_norm))
    saved = pairwise_kd_triton(s.detach(), t, detach_norm)[1:]
    grad = torch.tensor(-0.5, dtype=dtype, device=DEVICE)
    torch.library.opcheck(pairwise_kd_backward_triton, (grad, s.detach(), t, *saved, detach_norm))


# --------------------------------------------------------------------------------------------
# 12. GPU only: fp16 / bf16 error budget, C = 2048, the benchmark shape
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pool", [None, 2])
def test_cuda_half_error_budget(dtype, pool):
    """err(triton in dtype) <= 2 err(reference in dtype) + atol, both against fp64, value and gradient."""
    s, t = _features(2, 128, 256, 33, 47, dtype=torch.float64, seed=81)
    s, t = s.detach().to("cuda"), t.to("cuda")
    ref64 = _value_and_grad(sk.pairwise_kd, s, t, pool=pool, backend="reference")
    ref_half = _value_and_grad(sk.pairwise_kd, s.to(dtype), t.to(dtype), pool=pool, backend="reference")
    out = _value_and_grad(sk.pairwise_kd, s.to(dtype), t.to(dtype), pool=pool, backend="triton")
    assert out[0].dtype == dtype and out[1].dtype == dtype
    scale = ref64[1].abs().max().item()
    assert within_error_budget(out[0], ref_half[0], ref64[0], atol=1e-4 * abs(ref64[0].item()))
    assert within_error_budget(out[1], ref_half[1], ref64[1], atol=1e-3 * scale)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, 2048, 7, 9, 11), (1, 1, 2048, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_wide_channels(shape):
    s, t = _features(*shape, dtype=torch.float32, seed=82)
    s, t = s.detach().to("cuda"), t.to("cuda")
    out = _value_and_grad(sk.pairwise_kd, s, t, backend="triton")
    ref = _value_and_grad(sk.pairwise_kd, s.double(), t.double(), backend="reference")
    assert_close(out[0], ref[0], dtype=torch.float32)
    scale = ref[1].abs().max().item()
    torch.testing.assert_close(out[1].double(), ref[1], rtol=1e-4, atol=1e-5 * max(scale, 1e-6))


@pytest.mark.cuda
def test_cuda_benchmark_shape_memory():
    """P = 64 x 128, C_s 128 / C_t 256, N = 8 (the issue's benchmark shape): no P x P matrix, so
    the extra memory is O(N C^2 + N C P), far below one image's 256 MiB similarity matrix, and
    student ~ teacher still matches the fp64 reference (the near-cancellation regime)."""
    t = make_tensor((8, 128, 64, 128), device="cuda", seed=83)
    s = (t.double() + 1e-3 * make_tensor(t.shape, dtype=torch.float64, device="cuda", seed=84)).float()
    t = torch.cat([t, t], dim=1)  # C_t = 256 with the same similarities
    ref = _value_and_grad(sk.pairwise_kd, s.double(), t.double(), backend="reference")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = _value_and_grad(sk.pairwise_kd, s, t, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 128 * 2**20, f"{extra / 2**20:.0f} MiB beyond the inputs"
    assert abs(out[0].item() - ref[0].item()) <= 1e-4 * ref[0].item()
    scale = ref[1].abs().max().item()
    torch.testing.assert_close(out[1].double(), ref[1], rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_fp32_operands_for_older_triton(dtype, monkeypatch):
    """Triton before 3.9 gets fp32 operands for the fp64 Gram of 16-bit inputs (it cannot lower the
    16-bit load + fp64 dot): the upcast path gives the same loss and gradient as the direct one."""
    from segkd_kernels.ops.pairwise_kd import triton as pairwise_triton

    s = make_tensor((2, 5, 7, 9), dtype=dtype, seed=11).requires_grad_()
    t = make_tensor((2, 6, 7, 9), dtype=dtype, seed=12)
    results = []
    for upcast in (False, True):
        monkeypatch.setattr(pairwise_triton, "_GRAM_UPCAST_16BIT", upcast)
        loss = sk.pairwise_kd(s, t, backend="triton")
        (grad,) = torch.autograd.grad(loss, s)
        results.append((loss.float(), grad.float()))
    # fp32 holds every 16-bit value exactly, so both paths feed the fp64 dot the same numbers
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
