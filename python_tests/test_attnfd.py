"""AttnFD (docs/losses.md 6): sk.attnfd_loss, sk.channel_pool, sk.nn.CBAM and sk.nn.AttnFD.

Oracles are written here, independently of the reference: the loss in its dot-product form with
exact (math.fsum) fp64 sums and its analytic gradient; channel_pool by explicit loops over the
channels; CBAM from plain torch.nn.functional ops sharing the module's parameters.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import segkd_kernels as sk
from segkd_kernels.testing import assert_close, channels_last, make_tensor, non_contiguous

COMPILE = {"fullgraph": True, "backend": "aot_eager"}
ODD_SHAPES = [(n, c, h, w) for n, c, (h, w) in itertools.product((1, 2, 3), (1, 3, 5), ((1, 1), (5, 7), (9, 4)))]


def _id(shape) -> str:
    return "x".join(map(str, shape))


# --------------------------------------------------------------------------------------------
# oracles
# --------------------------------------------------------------------------------------------


def _fsum(values: torch.Tensor) -> float:
    return math.fsum(values.detach().double().flatten().tolist())


def attnfd_oracle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(2 - 2 <s,t> / (||s|| ||t||)) / N, every sum exact in fp64 (math.fsum)."""
    s, t = student.detach().double(), teacher.detach().double()
    st, ss, tt = _fsum(s * t), _fsum(s * s), _fsum(t * t)
    return torch.tensor((2.0 - 2.0 * st / math.sqrt(ss * tt)) / s.shape[0], dtype=torch.float64)


def attnfd_grad_oracle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """d/ds of the dot-product form: -2/N (t / (|s||t|) - <s,t> s / (|s|^3 |t|))."""
    s, t = student.detach().double(), teacher.detach().double()
    st, ss, tt = _fsum(s * t), _fsum(s * s), _fsum(t * t)
    ns, nt = math.sqrt(ss), math.sqrt(tt)
    return -2.0 / s.shape[0] * (t / (ns * nt) - st * s / (ns ** 3 * nt))


def _gate_nc(gate: torch.Tensor | None, n: int, c: int) -> torch.Tensor:
    if gate is None:
        return torch.ones(n, c, dtype=torch.float64)
    return gate.detach().double().reshape(n, c)


def channel_pool_oracle(x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """[max over C, mean over C] of x * gate, by an explicit loop over the channels, in fp64."""
    n, c = x.shape[:2]
    g = _gate_nc(gate, n, c)
    xd = x.detach().double()
    best = xd[:, 0] * g[:, 0, None, None]
    total = best.clone()
    for k in range(1, c):
        v = xd[:, k] * g[:, k, None, None]
        best = torch.where(v > best, v, best)
        total = total + v
    return torch.stack([best, total / c], dim=1)


def channel_pool_grad_oracle(x, gate, grad_out):
    """(dx, dgate (N, C)) of channel_pool by loops: the max's gradient goes to the maximal channel."""
    n, c = x.shape[:2]
    g = _gate_nc(gate, n, c)
    xd, go = x.detach().double(), grad_out.detach().double()
    best, arg = xd[:, 0] * g[:, 0, None, None], torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long)
    for k in range(1, c):
        v = xd[:, k] * g[:, k, None, None]
        arg = torch.where(v > best, k, arg)
        best = torch.where(v > best, v, best)
    dx = torch.zeros_like(xd)
    dgate = torch.zeros(n, c, dtype=torch.float64)
    for k in range(c):
        d_gated = go[:, 0] * (arg == k) + go[:, 1] / c  # d loss / d (x * gate)[:, k]
        dx[:, k] = g[:, k, None, None] * d_gated
        dgate[:, k] = (xd[:, k] * d_gated).sum(dim=(1, 2))
    return dx, dgate


def _assert_no_channel_ties(x: torch.Tensor, gate: torch.Tensor | None, gap: float = 1e-4) -> None:
    """Precondition of the gradient tests: the maximal channel is unique at every pixel."""
    n, c = x.shape[:2]
    if c < 2:
        return
    gated = x.detach().double() * _gate_nc(gate, n, c)[:, :, None, None]
    top2 = gated.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > gap, "test input has (near) ties in the channel max"


def _gate(n: int, c: int, *, seed: int, dtype=torch.float32, four_d: bool = False, requires_grad=False):
    """A gate in (0.5, 1.5), like a sigmoid output: positive and away from 0 (no ties at 0)."""
    g = (torch.sigmoid(make_tensor((n, c), dtype=torch.float64, seed=seed)) + 0.5).to(dtype)
    if four_d:
        g = g.reshape(n, c, 1, 1)
    return g.requires_grad_(requires_grad)


def cbam_by_hand(m: sk.nn.CBAM, x: torch.Tensor, running_mean=None, running_var=None) -> torch.Tensor:
    """CBAM written from docs/losses.md 6 with plain torch ops and the module's parameters.

    In training mode the batch-norm running statistics are the given tensors (updated in place)."""
    lin1, lin2 = m.mlp[0], m.mlp[2]

    def mlp(v):
        return F.linear(F.relu(F.linear(v, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)

    avg = F.adaptive_avg_pool2d(x, 1).flatten(1)
    mx = F.adaptive_max_pool2d(x, 1).flatten(1)
    m_c = torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]
    f1 = m_c * x
    pooled = torch.cat([torch.max(f1, dim=1, keepdim=True).values, torch.mean(f1, dim=1, keepdim=True)], dim=1)
    k = m.conv.weight.shape[-1]
    z = F.conv2d(pooled, m.conv.weight, padding=(k - 1) // 2)
    bn = m.bn
    if running_mean is None:
        running_mean, running_var = bn.running_mean, bn.running_var
    z = F.batch_norm(z, running_mean, running_var, bn.weight, bn.bias, training=m.training,
                     momentum=bn.momentum, eps=bn.eps)
    m_s = torch.sigmoid(z)
    return m_s * f1


def _randomize_cbam(m: sk.nn.CBAM, seed: int) -> None:
    """Non-trivial batch-norm affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.bn.weight.copy_(1.0 + torch.rand(1, generator=gen))
        m.bn.bias.copy_(torch.rand(1, generator=gen) - 0.5)
        m.bn.running_mean.copy_(torch.rand(1, generator=gen) - 0.5)
        m.bn.running_var.copy_(0.5 + torch.rand(1, generator=gen))
        m.conv.weight.mul_(3.0)  # a spatial gate far from 1/2 everywhere


# --------------------------------------------------------------------------------------------
# attnfd_loss: value and gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attnfd_loss_matches_dot_product_form(shape, dtype):
    s = make_tensor(shape, dtype=dtype, seed=1, requires_grad=True)
    t = make_tensor(shape, dtype=dtype, seed=2)
    loss = sk.attnfd_loss(s, t, backend="reference")
    assert loss.shape == () and loss.dtype == dtype
    assert_close(loss, attnfd_oracle(s, t), dtype=dtype)
    grad_out = 0.7
    (loss * grad_out).backward()
    assert_close(s.grad, grad_out * attnfd_grad_oracle(s, t), dtype=dtype)


def test_attnfd_grad_oracle_is_the_gradient_of_the_form():
    """Checks the test's own analytic gradient against autograd of the dot-product form."""
    s = make_tensor((2, 3, 5, 7), dtype=torch.float64, seed=3, requires_grad=True)
    t = make_tensor((2, 3, 5, 7), dtype=torch.float64, seed=4)
    form = (2 - 2 * (s * t).sum() / ((s * s).sum().sqrt() * (t * t).sum().sqrt())) / s.shape[0]
    (grad,) = torch.autograd.grad(form, s)
    torch.testing.assert_close(grad, attnfd_grad_oracle(s, t), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_attnfd_loss_gradcheck(backend):
    s = make_tensor((2, 3, 2, 3), dtype=torch.float64, seed=5, requires_grad=True)
    t = make_tensor((2, 3, 2, 3), dtype=torch.float64, seed=6)
    assert torch.autograd.gradcheck(lambda a: sk.attnfd_loss(a, t, backend=backend), (s,))
    assert torch.autograd.gradgradcheck(lambda a: sk.attnfd_loss(a, t, backend=backend), (s,))


def test_attnfd_loss_known_values():
    t = make_tensor((2, 4, 3, 5), seed=7)
    # scale invariant: identical directions give 0, opposite ones 4 / N
    assert sk.attnfd_loss(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert sk.attnfd_loss(-0.5 * t, t).item() == pytest.approx(4.0 / 2, rel=1e-6)
    # orthogonal maps: 2 / N
    s = torch.zeros_like(t)
    s[0, 0, 0, 0], u = 1.0, torch.zeros_like(t)
    u[1, 1, 1, 1] = 5.0
    assert sk.attnfd_loss(s, u).item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-8, 1e-3, 1e4])
def test_attnfd_loss_is_scale_invariant(dtype, scale):
    """Tiny and large maps: the normalisation (no eps in the way) makes the loss scale-free."""
    s = make_tensor((2, 3, 5, 7), dtype=dtype, seed=24)
    t = make_tensor((2, 3, 5, 7), dtype=dtype, seed=25)
    expected = attnfd_oracle(s, t)
    assert_close(sk.attnfd_loss(s * scale, t), expected, dtype=dtype)
    assert_close(sk.attnfd_loss(s, t * scale), expected, dtype=dtype)
    s_scaled = (s * scale).requires_grad_(True)
    (grad,) = torch.autograd.grad(sk.attnfd_loss(s_scaled, t), s_scaled)
    assert_close(grad * scale, attnfd_grad_oracle(s, t), dtype=dtype)


def test_attnfd_loss_teacher_gets_no_gradient():
    s = make_tensor((2, 3, 4, 5), seed=8, requires_grad=True)
    t = make_tensor((2, 3, 4, 5), seed=9, requires_grad=True)
    loss = sk.attnfd_loss(s, t)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None or not t.grad.any()
    # the loss is a function of the student only: teacher requires_grad alone does not make it differentiable
    loss_t_only = sk.attnfd_loss(s.detach(), t)
    assert not loss_t_only.requires_grad or torch.autograd.grad(loss_t_only, t, allow_unused=True)[0] is None


def test_attnfd_loss_near_equal_maps_no_cancellation():
    """Student == teacher + small noise: the loss is tiny and must still be accurate in fp32."""
    t = make_tensor((2, 8, 16, 16), seed=10)
    s = t + make_tensor((2, 8, 16, 16), seed=11, scale=1e-3)
    expected = attnfd_oracle(s, t)
    assert 0 < expected.item() < 1e-5
    # the sum form is exact to ~1e-7 here; 2 - 2 cos from fp32 dot products is off by ~8%
    torch.testing.assert_close(sk.attnfd_loss(s, t).double(), expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attnfd_loss_half_precision_accumulates_in_fp32(dtype):
    shape = (2, 16, 32, 32)  # 32k elements: a half-precision accumulation would be far off
    s = make_tensor(shape, dtype=dtype, seed=12, scale=4.0, requires_grad=True)
    t = make_tensor(shape, dtype=dtype, seed=13, scale=4.0)
    s_near = (t.double() + 0.3 * s.detach().double()).to(dtype).requires_grad_(True)  # loss well away from 2/N
    for student in (s, s_near):
        loss = sk.attnfd_loss(student, t)
        assert loss.dtype == dtype
        assert_close(loss, attnfd_oracle(student, t), dtype=dtype)
        loss.backward()
        assert student.grad.dtype == dtype
        torch.testing.assert_close(student.grad.double(), attnfd_grad_oracle(student, t),
                                   rtol=2e-2, atol=2e-2 * attnfd_grad_oracle(student, t).abs().max().item())


def test_attnfd_loss_mixed_dtypes_teacher_half():
    """An autocast teacher (bf16) against an fp32 student: the result is in the student's dtype."""
    s = make_tensor((2, 3, 5, 7), seed=14, requires_grad=True)
    t = make_tensor((2, 3, 5, 7), dtype=torch.bfloat16, seed=15)
    loss = sk.attnfd_loss(s, t)
    assert loss.dtype == torch.float32
    assert_close(loss, attnfd_oracle(s, t), dtype=torch.float32)


def test_attnfd_loss_zero_maps_are_finite():
    t = make_tensor((2, 3, 4, 5), seed=16)
    s = torch.zeros(2, 3, 4, 5, requires_grad=True)
    loss = sk.attnfd_loss(s, t)
    assert torch.isfinite(loss)
    # A zero map has no direction: the loss is 1/N (sum form) or 2/N (dot-product form), not NaN.
    assert 0.0 <= loss.item() <= 2.0 / 2 + 1e-6
    loss.backward()
    assert torch.isfinite(s.grad).all()
    s2 = make_tensor((2, 3, 4, 5), seed=17, requires_grad=True)
    loss2 = sk.attnfd_loss(s2, torch.zeros(2, 3, 4, 5))
    assert torch.isfinite(loss2)
    loss2.backward()
    assert torch.isfinite(s2.grad).all()
    both = sk.attnfd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3))
    assert torch.isfinite(both)


# --------------------------------------------------------------------------------------------
# attnfd_loss: layouts, grad_output, compile, validation, backends
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [non_contiguous, channels_last], ids=["non_contiguous", "channels_last"])
@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_attnfd_loss_layouts(layout, which):
    shape = (2, 5, 9, 4)
    s = make_tensor(shape, seed=18, requires_grad=True)
    t = make_tensor(shape, seed=19)
    loss = sk.attnfd_loss(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    s2 = layout(s) if which != "teacher" else s.detach().clone().requires_grad_(True)
    t2 = layout(t) if which != "student" else t
    if which != "teacher" and layout is non_contiguous:
        assert not s2.is_contiguous()
    loss2 = sk.attnfd_loss(s2, t2)
    (grad2,) = torch.autograd.grad(loss2, s2)
    assert_close(loss2, loss)
    assert grad2.shape == s.shape
    assert_close(grad2, grad)


def test_attnfd_loss_grad_output_scales():
    s = make_tensor((3, 5, 5, 7), seed=20, requires_grad=True)
    t = make_tensor((3, 5, 5, 7), seed=21)
    (g1,) = torch.autograd.grad(sk.attnfd_loss(s, t), s)
    (g2,) = torch.autograd.grad(sk.attnfd_loss(s, t), s, grad_outputs=torch.tensor(-2.5))
    assert_close(g2, -2.5 * g1)
    assert g1.abs().max() > 0


def test_attnfd_loss_compiles():
    s = make_tensor((2, 3, 5, 7), seed=22, requires_grad=True)
    t = make_tensor((2, 3, 5, 7), seed=23)
    compiled = torch.compile(sk.attnfd_loss, **COMPILE)
    loss_c = compiled(s, t)
    (grad_c,) = torch.autograd.grad(3.0 * loss_c, s)
    loss_e = sk.attnfd_loss(s, t)
    (grad_e,) = torch.autograd.grad(3.0 * loss_e, s)
    assert_close(loss_c, loss_e)
    assert_close(grad_c, grad_e)


@pytest.mark.parametrize(
    "student, teacher, name",
    [
        (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 6), "teacher_refined"),  # shape mismatch
        (torch.randn(2, 3, 4, 5), torch.randn(2, 4, 4, 5), "teacher_refined"),  # channels differ
        (torch.randn(3, 4, 5), torch.randn(3, 4, 5), "student_refined"),  # rank 3
        (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5, 1), "teacher_refined"),  # rank 5
        (torch.randint(0, 5, (2, 3, 4, 5)), torch.randn(2, 3, 4, 5), "student_refined"),  # integer
        (torch.randn(2, 3, 4, 5), torch.randint(0, 5, (2, 3, 4, 5)), "teacher_refined"),
        (torch.randn(2, 3, 4, 5), torch.ones(2, 3, 4, 5, dtype=torch.bool), "teacher_refined"),
        (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5, device="meta"), "teacher_refined"),  # device
        (torch.randn(2, 3, 4, 5, device="meta"), torch.randn(2, 3, 4, 5), "teacher_refined"),
        (torch.randn(0, 3, 4, 5), torch.randn(0, 3, 4, 5), "student_refined"),  # empty
        (torch.randn(2, 3, 0, 5), torch.randn(2, 3, 0, 5), "student_refined"),
        ([[1.0]], torch.randn(2, 3, 4, 5), "student_refined"),  # not a tensor
    ],
    ids=["shape", "channels", "rank3", "rank5", "int_student", "int_teacher", "bool_teacher",
         "meta_teacher", "meta_student", "empty_batch", "empty_spatial", "not_tensor"],
)
def test_attnfd_loss_bad_inputs(student, teacher, name):
    with pytest.raises(ValueError, match=name):
        sk.attnfd_loss(student, teacher)


def test_attnfd_loss_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        sk.attnfd_loss(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), backend="fast")


# ids avoid the bare word "cuda": conftest skips items whose keywords contain it (GPU tests)
@pytest.mark.parametrize("op", ["attnfd_loss", "channel_pool", "channel_pool_gated", "cbam_gate"])
def test_named_cuda_backend_on_cpu_tensors_raises(op):
    """Naming the cuda backend for CPU tensors raises (no such backend, library not built, or tensor
    on CPU), never falls back silently."""
    x = torch.randn(1, 2, 3, 3)
    calls = {
        "attnfd_loss": lambda: sk.attnfd_loss(x, x, backend="cuda"),
        "channel_pool": lambda: sk.channel_pool(x, backend="cuda"),
        "channel_pool_gated": lambda: sk.channel_pool(x, torch.ones(1, 2), backend="cuda"),
        "cbam_gate": lambda: sk.cbam_gate(x, torch.ones(1, 2), torch.ones(1, 3, 3), backend="cuda"),
    }
    why = "no cuda backend|tensor on cpu|not built"
    with pytest.raises(RuntimeError, match=why):  # BackendUnavailableError is both
        calls[op]()
    with pytest.raises(ValueError, match=why):
        calls[op]()


def test_env_override_is_honoured_and_never_silent(monkeypatch):
    x = torch.randn(1, 2, 3, 3)
    monkeypatch.setenv("SEGKD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SEGKD_BACKEND"):
        sk.attnfd_loss(x, x)
    with pytest.raises(ValueError, match="SEGKD_BACKEND"):
        sk.channel_pool(x)
    monkeypatch.setenv("SEGKD_BACKEND", "reference")
    assert torch.isfinite(sk.attnfd_loss(x, x))


# --------------------------------------------------------------------------------------------
# channel_pool
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=_id)
@pytest.mark.parametrize("gate_kind", ["none", "nc", "nc11"])
def test_channel_pool_matches_loops(shape, gate_kind):
    n, c = shape[:2]
    x = make_tensor(shape, dtype=torch.float64, seed=30, requires_grad=True)
    gate = None if gate_kind == "none" else _gate(n, c, seed=31, dtype=torch.float64,
                                                    four_d=gate_kind == "nc11", requires_grad=True)
    out = sk.channel_pool(x, gate, backend="reference")
    assert out.shape == (n, 2, *shape[2:]) and out.dtype == x.dtype
    assert_close(out, channel_pool_oracle(x, gate))
    # gradient with a random grad_output (max routed to the unique maximal channel)
    _assert_no_channel_ties(x, gate)
    grad_out = make_tensor(out.shape, dtype=torch.float64, seed=32)
    inputs = (x,) if gate is None else (x, gate)
    grads = torch.autograd.grad(out, inputs, grad_out)
    dx, dgate = channel_pool_grad_oracle(x, gate, grad_out)
    assert_close(grads[0], dx)
    if gate is not None:
        assert grads[1].shape == gate.shape
        assert_close(grads[1].reshape(n, c), dgate)


@pytest.mark.parametrize("shape", ODD_SHAPES[::4], ids=_id)
def test_channel_pool_fp32(shape):
    n, c = shape[:2]
    x = make_tensor(shape, seed=33, requires_grad=True)
    gate = _gate(n, c, seed=34, requires_grad=True)
    out = sk.channel_pool(x, gate)
    assert out.dtype == torch.float32
    assert_close(out, channel_pool_oracle(x, gate), dtype=torch.float32)
    _assert_no_channel_ties(x, gate)
    grad_out = make_tensor(out.shape, seed=35)
    gx, gg = torch.autograd.grad(out, (x, gate), grad_out)
    dx, dgate = channel_pool_grad_oracle(x, gate, grad_out)
    assert_close(gx, dx, dtype=torch.float32)
    assert_close(gg, dgate, dtype=torch.float32)


def test_channel_pool_order_is_max_then_mean():
    # channels 0..4 hold 1, 2, 3, 4, 10: max 10, mean 4
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]).reshape(1, 5, 1, 1).expand(1, 5, 2, 3).contiguous()
    out = sk.channel_pool(x)
    torch.testing.assert_close(out[:, 0], torch.full((1, 2, 3), 10.0))
    torch.testing.assert_close(out[:, 1], torch.full((1, 2, 3), 4.0))
    # the gate applies before pooling: gating channel 4 by 0.1 makes channel 3 the maximum
    gate = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.1]])
    out = sk.channel_pool(x, gate)
    torch.testing.assert_close(out[:, 0], torch.full((1, 2, 3), 4.0))
    torch.testing.assert_close(out[:, 1], torch.full((1, 2, 3), 11.0 / 5))
    # negative gates flip signs: max of the gated map, not of x
    out = sk.channel_pool(x, -torch.ones(1, 5))
    torch.testing.assert_close(out[:, 0], torch.full((1, 2, 3), -1.0))


def test_channel_pool_tied_max_gradient_goes_to_one_channel():
    """Ties in the channel max: the max's gradient is not split, it goes whole to one tied channel."""
    x = torch.zeros(1, 4, 2, 3)
    x[:, 1] = 2.0
    x[:, 3] = 2.0  # channels 1 and 3 tie for the max everywhere
    x[:, 0] = -1.0
    x.requires_grad_(True)
    grad_out = torch.zeros(1, 2, 2, 3)
    grad_out[:, 0] = 1.0  # only the max channel
    (dx,) = torch.autograd.grad(sk.channel_pool(x), x, grad_out)
    torch.testing.assert_close(dx.sum(dim=1), torch.ones(1, 2, 3))
    assert ((dx == 1.0) | (dx == 0.0)).all()
    assert (dx[:, [0, 2]] == 0).all()


def test_channel_pool_gate_is_per_image():
    x = torch.ones(2, 3, 2, 2)
    gate = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = sk.channel_pool(x, gate)
    torch.testing.assert_close(out[0, 0], torch.full((2, 2), 3.0))
    torch.testing.assert_close(out[1, 0], torch.full((2, 2), 6.0))
    torch.testing.assert_close(out[1, 1], torch.full((2, 2), 5.0))


@pytest.mark.parametrize("gate_kind", ["none", "nc", "nc11"])
def test_channel_pool_gradcheck(gate_kind):
    n, c = 2, 3
    x = make_tensor((n, c, 2, 3), dtype=torch.float64, seed=36, requires_grad=True)
    if gate_kind == "none":
        _assert_no_channel_ties(x, None, gap=1e-3)
        assert torch.autograd.gradcheck(lambda a: sk.channel_pool(a), (x,))
        return
    gate = _gate(n, c, seed=37, dtype=torch.float64, four_d=gate_kind == "nc11", requires_grad=True)
    _assert_no_channel_ties(x, gate, gap=1e-3)
    assert torch.autograd.gradcheck(lambda a, g: sk.channel_pool(a, g), (x, gate))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("gate_dtype", ["same", "float32"])
def test_channel_pool_dtypes(dtype, gate_dtype):
    n, c = 2, 5
    x = make_tensor((n, c, 5, 7), dtype=dtype, seed=38, requires_grad=True)
    gate = _gate(n, c, seed=39, dtype=dtype if gate_dtype == "same" else torch.float32, requires_grad=True)
    out = sk.channel_pool(x, gate)
    assert out.dtype == dtype
    assert_close(out, channel_pool_oracle(x, gate), dtype=dtype)
    grad_out = torch.ones_like(out)
    gx, gg = torch.autograd.grad(out, (x, gate), grad_out)
    assert gx.dtype == dtype and gg.dtype == gate.dtype
    if dtype == torch.float64:
        dx, dgate = channel_pool_grad_oracle(x, gate, grad_out)
        assert_close(gx, dx)
        assert_close(gg, dgate, dtype=gate.dtype)


def test_channel_pool_channel_count_one():
    x = make_tensor((2, 1, 3, 4), seed=40, requires_grad=True)
    gate = _gate(2, 1, seed=41, requires_grad=True)
    out = sk.channel_pool(x, gate)
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 0], x[:, 0] * gate[:, 0, None, None])


@pytest.mark.parametrize("layout", [non_contiguous, channels_last], ids=["non_contiguous", "channels_last"])
def test_channel_pool_layouts(layout):
    n, c = 2, 5
    x = make_tensor((n, c, 9, 4), seed=42, requires_grad=True)
    gate = _gate(n, c, seed=43, requires_grad=True)
    grad_out = make_tensor((n, 2, 9, 4), seed=44)
    out = sk.channel_pool(x, gate)
    gx, gg = torch.autograd.grad(out, (x, gate), grad_out)
    x2 = layout(x)
    gate2 = non_contiguous(gate.detach()).requires_grad_(True)
    assert not gate2.is_contiguous()
    out2 = sk.channel_pool(x2, gate2)
    gx2, gg2 = torch.autograd.grad(out2, (x2, gate2), grad_out)
    assert_close(out2, out)
    assert_close(gx2, gx)
    assert_close(gg2, gg)
    # a non-contiguous (N, C, 1, 1) gate too
    gate4 = non_contiguous(gate.detach().reshape(n, c, 1, 1))
    assert_close(sk.channel_pool(x2, gate4), out)


def test_channel_pool_grad_output_scales():
    x = make_tensor((2, 3, 5, 7), seed=45, requires_grad=True)
    gate = _gate(2, 3, seed=46, requires_grad=True)
    grad_out = make_tensor((2, 2, 5, 7), seed=47)
    g1 = torch.autograd.grad(sk.channel_pool(x, gate), (x, gate), grad_out)
    g2 = torch.autograd.grad(sk.channel_pool(x, gate), (x, gate), 4.0 * grad_out)
    for a, b in zip(g1, g2):
        assert_close(b, 4.0 * a)
        assert a.abs().max() > 0


def test_channel_pool_compiles():
    x = make_tensor((2, 5, 5, 7), seed=48, requires_grad=True)
    gate = _gate(2, 5, seed=49, requires_grad=True)
    grad_out = make_tensor((2, 2, 5, 7), seed=50)

    def both(a, g):
        return sk.channel_pool(a) + sk.channel_pool(a, g)

    compiled = torch.compile(both, **COMPILE)
    out_c = compiled(x, gate)
    grads_c = torch.autograd.grad(out_c, (x, gate), grad_out)
    out_e = both(x, gate)
    grads_e = torch.autograd.grad(out_e, (x, gate), grad_out)
    assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        assert_close(a, b)


@pytest.mark.parametrize(
    "gate",
    [
        torch.ones(2, 3, 1),  # rank 3
        torch.ones(2, 4),  # wrong C
        torch.ones(3, 3),  # wrong N
        torch.ones(3),  # rank 1
        torch.ones(2, 3, 2, 1),  # not (N, C, 1, 1)
        torch.ones(2, 3, 5, 7),  # a full map is not a gate
        torch.ones(2, 3, dtype=torch.int64),  # integer
        torch.ones(2, 3, device="meta"),  # device
        torch.ones(0, 3),  # empty
        [[1.0, 1.0, 1.0]] * 2,  # not a tensor
    ],
    ids=["rank3", "wrong_c", "wrong_n", "rank1", "n_c_2_1", "full_map", "int", "meta", "empty", "list"],
)
def test_channel_pool_bad_gate(gate):
    x = torch.randn(2, 3, 5, 7)
    with pytest.raises(ValueError, match="gate"):
        sk.channel_pool(x, gate)


@pytest.mark.parametrize(
    "x",
    [torch.randn(3, 5, 7), torch.randint(0, 3, (2, 3, 5, 7)), torch.randn(2, 0, 5, 7), torch.randn(1, 2, 3, 4, 5)],
    ids=["rank3", "int", "empty", "rank5"],
)
def test_channel_pool_bad_x(x):
    with pytest.raises(ValueError, match="x"):
        sk.channel_pool(x)


# --------------------------------------------------------------------------------------------
# CBAM
# --------------------------------------------------------------------------------------------


def _params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(m.named_parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("dtype, shape, reduction, kernel_size",
                         [(torch.float64, (2, 5, 5, 7), 2, 7),
                          (torch.float64, (3, 6, 9, 4), 4, 3),
                          (torch.float32, (2, 8, 6, 5), 3, 5)],
                         ids=["fp64_k7", "fp64_k3", "fp32_k5"])
def test_cbam_matches_hand_written(mode, backend, dtype, shape, reduction, kernel_size):
    torch.manual_seed(0)
    m = sk.nn.CBAM(shape[1], reduction=reduction, kernel_size=kernel_size, backend=backend).to(dtype)
    _randomize_cbam(m, seed=1)
    m.train(mode == "train")
    x = make_tensor(shape, dtype=dtype, seed=51, requires_grad=True)
    grad_out = make_tensor(shape, dtype=dtype, seed=52)
    rm, rv = m.bn.running_mean.clone(), m.bn.running_var.clone()

    out = m(x)
    assert out.shape == x.shape and out.dtype == dtype
    names = list(_params(m))
    grads = torch.autograd.grad(out, [x, *_params(m).values()], grad_out)

    x_hand = x.detach().clone().requires_grad_(True)
    expected = cbam_by_hand(m, x_hand, rm, rv)
    grads_hand = torch.autograd.grad(expected, [x_hand, *_params(m).values()], grad_out)

    assert_close(out, expected, dtype=dtype)
    for name, g, gh in zip(["x", *names], grads, grads_hand):
        assert_close(g, gh, dtype=dtype, msg=f"gradient of {name}")
        assert g.abs().max() > 0, f"no gradient reaches {name}"
    # running statistics move exactly as in the hand-written batch norm (train) or not at all (eval)
    assert_close(m.bn.running_mean, rm, dtype=dtype)
    assert_close(m.bn.running_var, rv, dtype=dtype)
    if mode == "eval":
        assert m.bn.num_batches_tracked.item() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cbam_half_precision(dtype):
    """A half-precision CBAM stays in that dtype and is as accurate as plain torch ops in it."""
    from segkd_kernels.testing import within_error_budget

    torch.manual_seed(10)
    m = sk.nn.CBAM(8, reduction=2)
    _randomize_cbam(m, seed=11)
    m_half, m64 = copy.deepcopy(m).to(dtype), copy.deepcopy(m).to(dtype).double()  # same rounded weights
    x = make_tensor((2, 8, 6, 5), dtype=dtype, seed=66)
    out = m_half(x)
    assert out.dtype == dtype
    truth = cbam_by_hand(m64, x.double())
    plain = cbam_by_hand(copy.deepcopy(m).to(dtype), x)
    assert within_error_budget(out, plain, truth, atol=1e-3)
    with torch.autocast("cpu", dtype=dtype):  # fp32 module under autocast
        assert torch.isfinite(m(x.float())).all() and torch.isfinite(m(x)).all()


def test_cbam_gates_are_not_trivial():
    """The test input gives gates far from constant, so the comparison above can fail."""
    torch.manual_seed(0)
    m = sk.nn.CBAM(5, reduction=2).double()
    _randomize_cbam(m, seed=1)
    x = make_tensor((2, 5, 5, 7), dtype=torch.float64, seed=51)
    m_c = m.channel_gate(x)
    m_s = m.spatial_gate(x, m_c)
    assert m_c.shape == (2, 5) and m_s.shape == (2, 1, 5, 7)
    assert m_c.std() > 0.01 and m_s.std() > 0.05


@pytest.mark.parametrize("channels, reduction", [(1, 16), (1, 1), (3, 16), (20, 16), (7, 100)])
def test_cbam_small_channel_counts(channels, reduction):
    torch.manual_seed(2)
    m = sk.nn.CBAM(channels, reduction=reduction).double()
    hidden = max(1, channels // reduction)
    assert m.mlp[0].out_features == hidden and m.mlp[2].in_features == hidden
    x = make_tensor((2, channels, 5, 4), dtype=torch.float64, seed=53, requires_grad=True)
    hand = copy.deepcopy(m)
    out = m(x)
    expected = cbam_by_hand(hand, x.detach())
    assert_close(out, expected)
    assert_close(m.bn.running_mean, hand.bn.running_mean)
    assert_close(m.bn.running_var, hand.bn.running_var)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_cbam_default_hyper_parameters():
    m = sk.nn.CBAM(64)
    assert m.mlp[0].in_features == 64 and m.mlp[0].out_features == 4  # r = 16
    assert m.conv.kernel_size == (7, 7) and m.conv.padding == (3, 3) and m.conv.bias is None
    assert m.conv.in_channels == 2 and m.conv.out_channels == 1
    assert isinstance(m.bn, torch.nn.BatchNorm2d) and m.bn.num_features == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [({"channels": 0}, "channels"), ({"channels": -3}, "channels"), ({"channels": 4, "kernel_size": 4}, "kernel_size"),
     ({"channels": 4, "kernel_size": 0}, "kernel_size"), ({"channels": 4, "kernel_size": -1}, "kernel_size"),
     ({"channels": 4, "reduction": 0}, "reduction")],
)
def test_cbam_bad_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sk.nn.CBAM(**kwargs)


@pytest.mark.parametrize("x", [torch.randn(2, 5, 4, 4), torch.randn(3, 4, 4)], ids=["channels", "rank"])
def test_cbam_bad_input(x):
    m = sk.nn.CBAM(3, reduction=1)
    with pytest.raises(ValueError, match="x"):
        m(x)


def test_cbam_backend_passthrough():
    x = make_tensor((2, 4, 3, 5), seed=54)
    with pytest.raises(ValueError, match="no cuda backend|cuda"):
        sk.nn.CBAM(4, reduction=2, backend="cuda")(x)
    with pytest.raises(ValueError, match="backend"):
        sk.nn.CBAM(4, reduction=2, backend="bogus")(x)


# --------------------------------------------------------------------------------------------
# AttnFD module
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cs, ct, backend", [(6, 10, "reference"), (8, 4, "reference"), (5, 5, "auto")])
def test_attnfd_module_matches_hand_composition(mode, cs, ct, backend):
    torch.manual_seed(4)
    m = sk.nn.AttnFD(cs, ct, reduction=2, backend=backend).double()
    _randomize_cbam(m.student_cbam, seed=5)
    _randomize_cbam(m.teacher_cbam, seed=6)
    m.train(mode == "train")
    hand = copy.deepcopy(m)
    fs = make_tensor((2, cs, 5, 7), dtype=torch.float64, seed=56, requires_grad=True)
    ft = make_tensor((2, ct, 5, 7), dtype=torch.float64, seed=57, requires_grad=True)

    loss = m(fs, ft)
    assert loss.shape == () and loss.dtype == torch.float64
    student_params = list(m.student_cbam.parameters()) + list(m.connector.parameters())
    grads = torch.autograd.grad(3.0 * loss, [fs, *student_params])

    fs_h = fs.detach().clone().requires_grad_(True)
    a_s = hand.connector(hand.student_cbam(fs_h))
    a_t = hand.teacher_cbam(ft.detach())
    assert a_s.shape == a_t.shape == (2, ct, 5, 7)
    assert_close(loss, attnfd_oracle(a_s, a_t))
    expected = sk.attnfd_loss(a_s, a_t, backend="reference")
    hand_params = list(hand.student_cbam.parameters()) + list(hand.connector.parameters())
    grads_h = torch.autograd.grad(3.0 * expected, [fs_h, *hand_params])
    for g, gh in zip(grads, grads_h):
        assert_close(g, gh)
        assert g.abs().max() > 0
    # the same batch-norm statistics were used and recorded
    for (name, b), b_h in zip(m.named_buffers(), hand.buffers()):
        assert_close(b.double(), b_h.double(), msg=name)


def test_attnfd_module_teacher_is_frozen():
    torch.manual_seed(7)
    m = sk.nn.AttnFD(6, 10, reduction=2)
    assert all(not p.requires_grad for p in m.teacher_cbam.parameters())
    assert all(p.requires_grad for p in m.student_cbam.parameters())
    assert all(p.requires_grad for p in m.connector.parameters())
    fs = make_tensor((2, 6, 4, 5), seed=58, requires_grad=True)
    ft = make_tensor((2, 10, 4, 5), seed=59, requires_grad=True)
    m(fs, ft).backward()
    assert ft.grad is None
    assert fs.grad is not None and fs.grad.abs().max() > 0
    for p in m.teacher_cbam.parameters():
        assert p.grad is None
    for name, p in [*m.student_cbam.named_parameters(), *m.connector.named_parameters()]:
        assert p.grad is not None and p.grad.abs().max() > 0, name
    # an optimizer over the trainable parameters leaves the teacher CBAM as it was
    before = copy.deepcopy(m.teacher_cbam.state_dict())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    for k, v in m.teacher_cbam.state_dict().items():
        if not k.startswith("bn.running") and k != "bn.num_batches_tracked":
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_attnfd_module_structure():
    m = sk.nn.AttnFD(6, 10)
    conv, bn = m.connector[0], m.connector[1]
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    assert conv.in_channels == 6 and conv.out_channels == 10
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == 10
    assert m.student_cbam.channels == 6 and m.teacher_cbam.channels == 10


def test_attnfd_module_bad_inputs():
    m = sk.nn.AttnFD(6, 10, reduction=2)
    with pytest.raises(ValueError, match="x"):  # teacher channels differ from teacher_channels
        m(torch.randn(2, 6, 4, 5), torch.randn(2, 6, 4, 5))
    with pytest.raises(ValueError, match="teacher_refined"):  # spatial sizes differ
        m(torch.randn(2, 6, 4, 5), torch.randn(2, 10, 4, 6))


def test_attnfd_module_backend_passthrough():
    fs, ft = make_tensor((2, 6, 4, 5), seed=60), make_tensor((2, 10, 4, 5), seed=61)
    with pytest.raises(ValueError, match="no cuda backend|tensor on cpu|not built"):
        sk.nn.AttnFD(6, 10, reduction=2, backend="cuda")(fs, ft)
    torch.manual_seed(8)
    a = sk.nn.AttnFD(6, 10, reduction=2, backend="reference")
    b = copy.deepcopy(a)
    b.backend = b.student_cbam.backend = b.teacher_cbam.backend = "auto"
    assert_close(a(fs, ft), b(fs, ft))


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
def test_attnfd_module_passes_backend_to_every_op(monkeypatch, backend):
    """Both CBAMs' poolings and the loss get the module's backend (spies around the ops)."""
    import segkd_kernels.nn as sk_nn

    calls = []

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, kwargs.get("backend")))
            return fn(*args, **kwargs)
        return wrapper

    for name in ("spatial_pool", "channel_pool", "cbam_gate", "attnfd_loss"):
        monkeypatch.setattr(sk_nn, name, spy(name, getattr(sk_nn, name)))
    m = sk.nn.AttnFD(6, 10, reduction=2, backend=backend)
    m(make_tensor((2, 6, 4, 5), seed=64), make_tensor((2, 10, 4, 5), seed=65))
    assert sorted(calls) == sorted([("spatial_pool", backend)] * 2 + [("channel_pool", backend)] * 2
                                   + [("cbam_gate", backend)] * 2 + [("attnfd_loss", backend)])


def test_attnfd_module_compiles():
    """Also covers CBAM under torch.compile (both CBAMs, the student's with parameter gradients)."""
    torch.manual_seed(9)
    m = sk.nn.AttnFD(6, 4, reduction=2)
    m_c = copy.deepcopy(m)
    fs = make_tensor((2, 6, 5, 7), seed=62, requires_grad=True)
    ft = make_tensor((2, 4, 5, 7), seed=63)
    loss_e = m(fs, ft)
    g_e = torch.autograd.grad(2.0 * loss_e, [fs, *(p for p in m.parameters() if p.requires_grad)])
    loss_c = torch.compile(m_c, **COMPILE)(fs, ft)
    g_c = torch.autograd.grad(2.0 * loss_c, [fs, *(p for p in m_c.parameters() if p.requires_grad)])
    assert_close(loss_c, loss_e)
    for a, b in zip(g_c, g_e):
        assert_close(a, b)
