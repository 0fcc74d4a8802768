"""channel_wise_kd (docs/losses.md 1): values and gradients against an explicit-loop fp64 oracle, autograd
rules (teacher detached, grad_output, gradcheck), layouts, dtypes, torch.compile, input checks."""

import pytest
import torch

import segkd_kernels as sk
from segkd_kernels._backends import select_backend
from segkd_kernels.ops.channel_wise_kd import api as cwd_api
from segkd_kernels.ops.channel_wise_kd import triton as cwd_triton
from segkd_kernels.testing import (TOLERANCES, assert_close, channels_last, make_tensor, non_contiguous,
                                   within_error_budget)
from logit_kd_shared import bad_logit_cases, check_compiled_call, softmax_and_log

# P = 1 (loss 0), single channel, odd sizes, a long thin map.
SHAPES = [(1, 1, 1, 1), (1, 3, 5, 7), (2, 7, 1, 1), (3, 1, 3, 13), (2, 3, 5, 7)]
TAUS = [0.5, 1.0, 4.0]


# ---------------------------------------------------------------------------------------------
# Oracle: Python floats, one (n, c) row at a time, textbook softmax with math.exp / math.log.
# ---------------------------------------------------------------------------------------------

_softmax_row = softmax_and_log


def naive_cwd(student, teacher, tau):
    """(loss, d loss / d student) as Python float and fp64 tensor, straight from docs/losses.md 1."""
    n, c, h, w = student.shape
    s = student.detach().cpu().double().reshape(n, c, h * w).tolist()
    t = teacher.detach().cpu().double().reshape(n, c, h * w).tolist()
    total = 0.0
    grad = [[None] * c for _ in range(n)]
    for i in range(n):
        for j in range(c):
            p_s, log_p_s = _softmax_row(s[i][j], tau)
            p_t, log_p_t = _softmax_row(t[i][j], tau)
            total += sum(pt * (lt - ls) for pt, lt, ls in zip(p_t, log_p_t, log_p_s) if pt > 0)
            grad[i][j] = [tau / (n * c) * (ps - pt) for ps, pt in zip(p_s, p_t)]
    loss = tau * tau / (n * c) * total
    return loss, torch.tensor(grad, dtype=torch.float64).reshape(n, c, h, w)


def _inputs(shape, dtype, device, seed=0, scale=2.0):
    s = make_tensor(shape, dtype=dtype, device=device, seed=seed, scale=scale, requires_grad=True)
    t = make_tensor(shape, dtype=dtype, device=device, seed=seed + 100, scale=scale)
    return s, t


def _loss_and_grad(s, t, tau, **kw):
    s = s.detach().requires_grad_(True)
    loss = sk.channel_wise_kd(s, t, tau, **kw)
    (g,) = torch.autograd.grad(loss, s)
    return loss.detach(), g


# ---------------------------------------------------------------------------------------------
# 1, 2. Values and gradients against the oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("shape", SHAPES)
def test_value_and_grad_match_loop_oracle(shape, tau, dtype, backend, device):
    s, t = _inputs(shape, dtype, device, seed=sum(shape))
    loss = sk.channel_wise_kd(s, t, tau, backend=backend)
    assert loss.dim() == 0 and loss.dtype == dtype and loss.device.type == torch.device(device).type
    want_loss, want_grad = naive_cwd(s, t, tau)
    rtol, atol = TOLERANCES[dtype]
    assert loss.item() == pytest.approx(want_loss, rel=rtol, abs=atol)
    (g,) = torch.autograd.grad(loss, s)
    assert g.dtype == dtype and g.shape == s.shape
    assert_close(g.cpu(), want_grad.to(dtype))


def test_auto_backend_is_triton(device):
    """auto picks triton for CUDA tensors, and for CPU tensors under the interpreter (conftest)."""
    s, t = _inputs((2, 3, 5, 7), torch.float64, device)
    name = select_backend("channel_wise_kd", "auto", cwd_api.IMPLEMENTED, s)
    assert name == "triton" if device == "cpu" else name in ("triton", "cuda")  # cuda: per AUTO_ORDER_CUDA
    assert torch.equal(sk.channel_wise_kd(s, t, backend="auto"), sk.channel_wise_kd(s, t, backend=name))
    assert_close(sk.channel_wise_kd(s, t, backend="auto"), sk.channel_wise_kd(s, t, backend="reference"))
    # default tau is 4.0 (docs/losses.md 1)
    assert torch.equal(sk.channel_wise_kd(s, t), sk.channel_wise_kd(s, t, 4.0, backend=name))
    assert sk.channel_wise_kd(s, t).item() == pytest.approx(naive_cwd(s, t, 4.0)[0], rel=1e-9)


def test_integer_tau_accepted(device):
    s, t = _inputs((1, 3, 5, 7), torch.float64, device)
    assert sk.channel_wise_kd(s, t, 2).item() == pytest.approx(naive_cwd(s, t, 2.0)[0], rel=1e-9)


def test_softmax_is_over_positions_not_channels(device):
    """Shifting a whole (n, c) map by a constant leaves the loss unchanged; shifting a whole pixel's
    channel vector does not (it is not a softmax over C)."""
    s, t = _inputs((2, 3, 5, 7), torch.float64, device)
    base = sk.channel_wise_kd(s, t, 1.0)
    shift_map = make_tensor((2, 3, 1, 1), dtype=torch.float64, device=device, seed=7, scale=5.0)
    torch.testing.assert_close(sk.channel_wise_kd(s + shift_map, t, 1.0), base, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sk.channel_wise_kd(s, t - shift_map, 1.0), base, rtol=1e-12, atol=1e-12)
    shift_pixel = make_tensor((2, 1, 5, 7), dtype=torch.float64, device=device, seed=8, scale=5.0)
    assert abs(sk.channel_wise_kd(s + shift_pixel, t, 1.0).item() - base.item()) > 1e-3


@pytest.mark.parametrize("tau", TAUS)
def test_identical_inputs_give_zero_and_loss_is_nonnegative(tau, device):
    s, t = _inputs((2, 3, 5, 7), torch.float64, device)
    loss, g = _loss_and_grad(t, t, tau)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert g.abs().max().item() < 1e-15
    assert sk.channel_wise_kd(s, t, tau).item() > 0


@pytest.mark.parametrize("tau", [0.5, 4.0])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 3, 2, 3), (1, 2, 1, 5)])
def test_gradcheck_fp64(shape, tau, device):
    s, t = _inputs(shape, torch.float64, device, seed=11)
    assert torch.autograd.gradcheck(lambda x: sk.channel_wise_kd(x, t, tau, backend="reference"), (s,))
    if shape == (1, 2, 1, 5):
        assert torch.autograd.gradgradcheck(lambda x: sk.channel_wise_kd(x, t, tau, backend="reference"), (s,))


# ---------------------------------------------------------------------------------------------
# 4. Teacher is a target only
# ---------------------------------------------------------------------------------------------

def test_teacher_gets_no_gradient(device):
    s, t = _inputs((2, 3, 5, 7), torch.float64, device)
    t_req = t.clone().requires_grad_(True)
    loss = sk.channel_wise_kd(s, t_req, 2.0)
    (g_t,) = torch.autograd.grad(loss, t_req, allow_unused=True, retain_graph=True)
    assert g_t is None or torch.count_nonzero(g_t) == 0
    loss.backward()
    assert t_req.grad is None or torch.count_nonzero(t_req.grad) == 0
    # and the student's gradient is the same as with a plain teacher
    _, g_plain = _loss_and_grad(s, t, 2.0)
    assert_close(s.grad, g_plain)


def test_teacher_only_requires_grad_gives_constant(device):
    """Only the teacher requires grad: the loss is a constant (nothing to differentiate)."""
    s, t = _inputs((1, 3, 2, 5), torch.float64, device)
    loss = sk.channel_wise_kd(s.detach(), t.clone().requires_grad_(True), 1.0)
    assert not loss.requires_grad


# ---------------------------------------------------------------------------------------------
# 5. Layouts
# ---------------------------------------------------------------------------------------------

LAYOUTS = {"contiguous": lambda x: x, "non_contiguous": non_contiguous, "channels_last": channels_last}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout_t", list(LAYOUTS))
@pytest.mark.parametrize("layout_s", list(LAYOUTS))
def test_layouts_match_contiguous(layout_s, layout_t, dtype, device):
    s, t = _inputs((2, 3, 5, 7), dtype, device, seed=5)
    want_loss, want_grad = _loss_and_grad(s, t, 4.0)
    s2 = LAYOUTS[layout_s](s.detach()).requires_grad_(True)
    t2 = LAYOUTS[layout_t](t)
    if layout_s != "contiguous":
        assert not s2.is_contiguous()
    loss, g = _loss_and_grad(s2, t2, 4.0)
    assert_close(loss, want_loss)
    assert_close(g, want_grad)


# ---------------------------------------------------------------------------------------------
# 6. grad_output != 1
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_output_is_honoured(dtype, device):
    s, t = _inputs((2, 3, 5, 7), dtype, device, seed=9)
    _, g1 = _loss_and_grad(s, t, 1.0)

    s.grad = None
    (3.5 * sk.channel_wise_kd(s, t, 1.0)).backward()
    assert_close(s.grad, 3.5 * g1)

    s.grad = None
    (-0.25 * sk.channel_wise_kd(s, t, 1.0) + (s * s).sum()).backward()
    assert_close(s.grad, -0.25 * g1 + 2 * s.detach())

    # the same loss used twice in the graph: gradients add
    s.grad = None
    loss = sk.channel_wise_kd(s, t, 1.0)
    (loss * loss).backward()
    assert_close(s.grad, 2 * loss.detach() * g1)


# ---------------------------------------------------------------------------------------------
# 7. dtypes
# ---------------------------------------------------------------------------------------------

def test_fp64_stays_fp64(device):
    s, t = _inputs((1, 3, 5, 7), torch.float64, device)
    loss = sk.channel_wise_kd(s, t)
    loss.backward()
    assert loss.dtype == torch.float64 and s.grad.dtype == torch.float64
    # fp64 precision, not fp32: matches the oracle far below fp32 resolution
    assert abs(loss.item() - naive_cwd(s, t, 4.0)[0]) <= 1e-12 * abs(loss.item())


@pytest.mark.parametrize("near", [False, True], ids=["random", "student_near_teacher"])
@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_fp32(dtype, tau, near, device):
    """fp16/bf16 inputs: a 0-dim result in that dtype, equal to the fp32 computation on the upcast
    inputs up to one rounding of the result (so the math inside is fp32: with the student close to
    the teacher, log-probabilities rounded to 16 bits would change the small KL by far more)."""
    t = make_tensor((2, 3, 8, 9), dtype=dtype, device=device, seed=1, scale=3.0)
    if near:
        s = (t.double() + make_tensor(t.shape, dtype=torch.float64, device=device, seed=2, scale=0.02)).to(dtype)
    else:
        s = make_tensor(t.shape, dtype=dtype, device=device, seed=2, scale=3.0)
    s.requires_grad_(True)
    loss = sk.channel_wise_kd(s, t, tau)
    assert loss.dim() == 0 and loss.dtype == dtype
    loss.backward()
    assert s.grad.dtype == dtype

    want_loss, want_grad = _loss_and_grad(s.detach().float(), t.float(), tau)
    eps = torch.finfo(dtype).eps
    assert abs(loss.float().item() - want_loss.item()) <= eps * abs(want_loss.item()) + 1e-30
    tiny = 2.0 ** -24 if dtype == torch.float16 else 1e-38  # fp16 subnormal spacing
    err = (s.grad.float() - want_grad).abs()
    assert bool((err <= eps * want_grad.abs() + tiny).all())
    # and the fp32 computation itself is right (abs: fp32 cancellation in log p_t - log p_s, ~eps32 *
    # tau^2 * |log p|, dominates when the KL is small)
    assert want_loss.item() == pytest.approx(naive_cwd(s, t, tau)[0], rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# 8. torch.compile
# ---------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph_matches_eager(device):
    s, t = _inputs((2, 3, 5, 7), torch.float32, device, seed=21)
    want_loss, want_grad = _loss_and_grad(s, t, 2.0)
    torch._dynamo.reset()
    fn = torch.compile(sk.channel_wise_kd, fullgraph=True, backend="aot_eager")
    check_compiled_call(fn, s, t, want_loss, want_grad, 2.5, "reference")


# ---------------------------------------------------------------------------------------------
# 9. Bad inputs
# ---------------------------------------------------------------------------------------------

def _bad_cases(device):
    ok = make_tensor((2, 3, 4, 5), device=device)
    other = make_tensor((2, 3, 4, 5), device=device, seed=1)
    return bad_logit_cases(device, "student", "teacher", "channel") + [
        ("student rank 2", (ok[0, 0], other), {}, "student"),
        ("teacher not a tensor", (ok, 1.0), {}, "teacher"),
        ("unknown backend", (ok, other), {"backend": "numpy"}, "backend"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases("cpu"))),
                         ids=[c[0] for c in _bad_cases("cpu")])
def test_bad_inputs_raise_value_error_naming_the_argument(case, device):
    _, args, kwargs, match = _bad_cases(device)[case]
    with pytest.raises(ValueError, match=match):
        sk.channel_wise_kd(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# 10. Backends: a named one that is not implemented raises, never falls back
# ---------------------------------------------------------------------------------------------

# The op table is cut to the reference so that these checks hold whichever fused backends exist.
# ids not equal to "cuda": conftest skips every item with a "cuda" keyword, and a bare parametrize
# id counts as one.
@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=lambda b: f"backend={b}")
def test_named_unimplemented_backend_raises(backend, device, monkeypatch):
    monkeypatch.setattr(cwd_api, "IMPLEMENTED", {"reference": cwd_api.IMPLEMENTED["reference"]})
    s, t = _inputs((1, 2, 3, 4), torch.float32, device)
    with pytest.raises((RuntimeError, ValueError), match=f"no {backend} backend"):
        sk.channel_wise_kd(s, t, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=lambda b: f"backend={b}")
def test_env_override_to_unimplemented_backend_raises(backend, device, monkeypatch):
    monkeypatch.setattr(cwd_api, "IMPLEMENTED", {"reference": cwd_api.IMPLEMENTED["reference"]})
    monkeypatch.setenv("SEGKD_BACKEND", backend)
    s, t = _inputs((1, 2, 3, 4), torch.float32, device)
    with pytest.raises((RuntimeError, ValueError), match=f"no {backend} backend"):
        sk.channel_wise_kd(s, t)
    # an explicit backend is not overridden
    assert sk.channel_wise_kd(s, t, backend="reference").isfinite()


def test_env_override_to_reference_and_triton(device, monkeypatch):
    s, t = _inputs((1, 2, 3, 4), torch.float64, device)
    want = {b: sk.channel_wise_kd(s, t, backend=b) for b in ("reference", "triton")}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("SEGKD_BACKEND", backend)
        assert torch.equal(sk.channel_wise_kd(s, t), want[backend])


# ---------------------------------------------------------------------------------------------
# 11. Numerical safety
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gaussian", "signs"])
@pytest.mark.parametrize("tau", TAUS)
def test_huge_logits_fp32_finite(tau, kind, device):
    shape = (2, 3, 5, 7)
    s = make_tensor(shape, device=device, seed=31, scale=1e4)
    t = make_tensor(shape, device=device, seed=32, scale=1e4)
    if kind == "signs":
        s, t = torch.sign(s) * 1e4, torch.sign(t) * 1e4
    loss, g = _loss_and_grad(s, t, tau)
    assert loss.isfinite() and bool(g.isfinite().all())
    want_loss, want_grad = naive_cwd(s, t, tau)
    assert loss.item() == pytest.approx(want_loss, rel=1e-4)
    torch.testing.assert_close(g.double().cpu(), want_grad, rtol=1e-4, atol=1e-6)
    # and at the teacher itself: zero KL, a rounding-level gradient, no NaN from inf - inf
    loss0, g0 = _loss_and_grad(t, t, tau)
    assert loss0.item() == pytest.approx(0.0, abs=1e-6) and g0.abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------
# 12. Triton kernels: both paths (row in one tile with the gradient fused into the forward; long
#     rows: with a gradient, the persistent kernel of statistics and gradient items over row
#     groups; without, split over several programs, a recomputing backward if one is asked for
#     later), autograd glue, opcheck, compile
# ---------------------------------------------------------------------------------------------

@pytest.fixture(params=["one_tile", "split"])
def triton_path(request, monkeypatch):
    """'split' shrinks the tile and block sizes so that rows of a few dozen positions take the
    long-row path with several programs per row (a partial last block and a partial last split),
    and the persistent kernel's row-group budget, so that its rows form several groups."""
    if request.param == "split":
        monkeypatch.setattr(cwd_triton, "_MAX_TILE", 16)
        monkeypatch.setattr(cwd_triton, "_BLOCK", 8)
        monkeypatch.setattr(cwd_triton, "_TARGET_PROGRAMS", 16)
        monkeypatch.setattr(cwd_triton, "_GROUP_BYTES", 1200)
    return request.param


def _check_path(path, shape):
    """The shape really takes the path under test (so the test cannot silently cover the other)."""
    rows, p = shape[0] * shape[1], shape[2] * shape[3]
    assert (p <= cwd_triton._MAX_TILE) == (path == "one_tile")
    if path == "split":
        assert cwd_triton._plan(rows, p)[1] > 1
        # the persistent kernel: several chunks per row, several row groups (with a partial last
        # one where the rows do not divide)
        _steps, chunks, group_rows, groups, _programs = cwd_triton._stream_plan(rows, p, 8, torch.device("cpu"))
        assert chunks > 1 and (groups > 1 or rows <= 2)


TRITON_SHAPES = [(2, 3, 5, 13), (1, 2, 1, 37), (3, 1, 7, 9)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_paths_match_loop_oracle(shape, dtype, triton_path, device):
    _check_path(triton_path, shape)
    s, t = _inputs(shape, dtype, device, seed=3 + sum(shape))
    loss = sk.channel_wise_kd(s, t, 1.5, backend="triton")
    assert loss.dim() == 0 and loss.dtype == dtype
    (-2.5 * loss).backward()  # grad_output != 1
    want_loss, want_grad = naive_cwd(s, t, 1.5)
    assert loss.item() == pytest.approx(want_loss, **dict(zip(("rel", "abs"), TOLERANCES[dtype])))
    assert s.grad.dtype == dtype and s.grad.shape == s.shape
    assert_close(s.grad.cpu(), -2.5 * want_grad.to(dtype))


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_triton_paths_read_strided_inputs(layout, triton_path, device):
    shape = (2, 3, 5, 13)
    _check_path(triton_path, shape)
    s, t = _inputs(shape, torch.float64, device, seed=41)
    want_loss, want_grad = _loss_and_grad(s, t, 2.0, backend="reference")
    s2, t2 = LAYOUTS[layout](s.detach()).requires_grad_(True), LAYOUTS[layout](t)
    loss, g = _loss_and_grad(s2, t2, 2.0, backend="triton")
    assert_close(loss, want_loss)
    assert_close(g, want_grad)


def test_triton_forward_computes_the_gradient_only_when_needed(triton_path, device):
    shape = (2, 3, 5, 13)
    _check_path(triton_path, shape)
    s, t = _inputs(shape, torch.float32, device, seed=42)
    op = cwd_triton.channel_wise_kd_triton
    # both forwards write ds only when asked (long rows: the persistent kernel)
    assert op(s.detach(), t, 2.0, True)[1].numel() == s.numel()
    assert op(s.detach(), t, 2.0, False)[1].numel() == 0
    with torch.no_grad():
        loss_ng = sk.channel_wise_kd(s, t, 2.0, backend="triton")
    assert not loss_ng.requires_grad
    loss, g = _loss_and_grad(s, t, 2.0, backend="triton")
    if triton_path == "one_tile":
        assert torch.equal(loss_ng, loss)  # the same kernel, with or without the gradient store
    else:
        # long rows: split + combine without a gradient, the persistent kernel with one; the same
        # sums in another order, equal to fp32 rounding
        assert_close(loss_ng, loss)
    # called with needs_grad=False on a student that requires grad: the backward recomputes ds
    s2 = s.detach().requires_grad_(True)
    (g2,) = torch.autograd.grad(op(s2, t, 2.0, False)[0], s2)
    assert_close(g2, g)


def test_triton_gradient_survives_retain_graph_and_in_place_grad_edits(triton_path, device):
    """With grad_output == 1 the backward may hand out the gradient saved by the forward: a second
    backward through the retained graph must still see it intact after .grad is edited in place."""
    shape = (2, 3, 5, 13)
    _check_path(triton_path, shape)
    s, t = _inputs(shape, torch.float32, device, seed=43)
    _, want = _loss_and_grad(s, t, 2.0, backend="reference")
    loss = sk.channel_wise_kd(s, t, 2.0, backend="triton")
    loss.backward(retain_graph=True)
    assert_close(s.grad, want)
    s.grad.mul_(0.0)
    loss.backward()
    assert_close(s.grad, want)


@pytest.mark.parametrize("kind", ["gaussian", "signs"])
def test_triton_huge_logits_fp32(kind, triton_path, device):
    tau = 0.5
    shape = (2, 3, 5, 13)
    _check_path(triton_path, shape)
    s = make_tensor(shape, device=device, seed=51, scale=1e4)
    t = make_tensor(shape, device=device, seed=52, scale=1e4)
    if kind == "signs":
        s, t = torch.sign(s) * 1e4, torch.sign(t) * 1e4
    loss, g = _loss_and_grad(s, t, tau, backend="triton")
    want_loss, want_grad = naive_cwd(s, t, tau)
    assert loss.isfinite() and bool(g.isfinite().all())
    assert loss.item() == pytest.approx(want_loss, rel=1e-4)
    torch.testing.assert_close(g.double().cpu(), want_grad, rtol=1e-4, atol=1e-6)
    loss0, g0 = _loss_and_grad(t, t, tau, backend="triton")
    assert loss0.item() == 0.0 and g0.abs().max().item() == 0.0  # identical rows: exactly 0


@pytest.mark.parametrize("triton_path,needs_grad", [("one_tile", True), ("one_tile", False), ("split", True),
                                                    ("split", False)],
                         indirect=["triton_path"])
def test_opcheck_triton_ops(needs_grad, triton_path, device):
    shape = (1, 2, 3, 7)
    _check_path(triton_path, shape)
    s, t = _inputs(shape, torch.float32, device, seed=61)
    torch.library.opcheck(cwd_triton.channel_wise_kd_triton, (s, t, 2.0, needs_grad))
    lse = cwd_triton.channel_wise_kd_triton(s.detach(), t, 2.0, False)[2]
    grad = torch.tensor(1.5, device=device)
    torch.library.opcheck(cwd_triton.channel_wise_kd_backward_triton, (s.detach(), t, lse, grad, 2.0))


def test_torch_compile_fullgraph_triton(triton_path, device):
    shape = (2, 3, 5, 13)
    _check_path(triton_path, shape)
    s, t = _inputs(shape, torch.float32, device, seed=62)
    want_loss, want_grad = _loss_and_grad(s, t, 2.0, backend="reference")
    torch._dynamo.reset()
    fn = torch.compile(sk.channel_wise_kd, fullgraph=True,
                       backend="inductor" if device == "cuda" else "aot_eager")
    check_compiled_call(fn, s, t, want_loss, want_grad, 0.75, "triton")


# GPU only: the half-precision error budget (docs/backends.md) and a full-resolution row.

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 19, 64, 128), (2, 19, 97, 131), (1, 3, 517, 1029)],
                         ids=["one_tile", "split", "long_rows"])
def test_cuda_half_precision_error_budget(shape, dtype):
    s = make_tensor(shape, dtype=dtype, device="cuda", seed=71, scale=3.0)
    t = make_tensor(shape, dtype=dtype, device="cuda", seed=72, scale=3.0)
    want_loss, want_grad = _loss_and_grad(s.double(), t.double(), 4.0, backend="reference")
    ref_loss, ref_grad = _loss_and_grad(s, t, 4.0, backend="reference")
    loss, g = _loss_and_grad(s, t, 4.0, backend="triton")
    assert loss.dtype == dtype and g.dtype == dtype
    assert within_error_budget(loss, ref_loss, want_loss)
    assert within_error_budget(g, ref_grad, want_grad, atol=1e-7)


@pytest.mark.cuda
def test_cuda_rows_longer_than_a_million_positions():
    shape = (2, 3, 1031, 1033)  # P = 1,065,023: many splits per row, odd sizes everywhere
    assert shape[2] * shape[3] > 10**6
    s = make_tensor(shape, device="cuda", seed=81, scale=3.0)
    t = make_tensor(shape, device="cuda", seed=82, scale=3.0)
    want_loss, want_grad = _loss_and_grad(s.double(), t.double(), 4.0, backend="reference")
    loss, g = _loss_and_grad(s, t, 4.0, backend="triton")
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-4)
    # relative to the largest gradient entry (the entries are ~1e-7 here)
    torch.testing.assert_close(g.double(), want_grad, rtol=1e-3, atol=1e-5 * want_grad.abs().max().item())
