"""Triton kernels of the AttnFD ops (channel_pool, cbam_gate, attnfd_loss) against the references.

On CPU the kernels run under the Triton interpreter (conftest), so shapes stay tiny but are chosen
to cross every block boundary: C above BLOCK_C (8, or 64 for channels_last), H*W above BLOCK_P
(256), spatial dims that do not merge (transposed views), C = 1 and H*W = 1. GPU-only checks
(fp16/bf16 error budgets on realistic shapes) are marked cuda.
"""

from __future__ import annotations

import math

import pytest
import torch

import segkd_kernels as sk
from segkd_kernels.ops.attnfd_loss import triton as attnfd_triton
from segkd_kernels.ops.attnfd_loss.triton import attnfd_dots_backward_triton, attnfd_dots_triton
from segkd_kernels.ops.cbam_gate.triton import cbam_gate_backward_triton, cbam_gate_triton
from segkd_kernels.ops.channel_pool.triton import channel_pool_backward_triton, channel_pool_triton
from segkd_kernels.testing import assert_close, channels_last, make_tensor, non_contiguous, within_error_budget

COMPILE = {"fullgraph": True, "backend": "aot_eager"}
# (N, C, H, W): batch 1, C = 1, H*W = 1, C > BLOCK_C, H*W > BLOCK_P, odd sizes throughout
SHAPES = [(1, 1, 1, 1), (2, 1, 5, 7), (3, 5, 1, 1), (2, 11, 9, 13), (1, 3, 17, 19)]
HALF = [torch.float16, torch.bfloat16]


def _id(shape) -> str:
    return "x".join(map(str, shape))


def transposed(x: torch.Tensor) -> torch.Tensor:
    """Same values, stored as (N, C, W, H) and viewed back: H and W strides do not merge."""
    view = x.detach().transpose(2, 3).contiguous().transpose(2, 3)
    return view.requires_grad_(x.requires_grad)


LAYOUTS = {"non_contiguous": non_contiguous, "channels_last": channels_last, "transposed": transposed}


def _gate(n: int, c: int, *, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Gate values in (0.5, 1.5) like a sigmoid output, plus one negative channel (sign flips)."""
    g = torch.sigmoid(make_tensor((n, c), dtype=torch.float64, seed=seed)) + 0.5
    g[:, c // 2] *= -1.0
    return g.to(dtype).requires_grad_(True)


def _unique_max(x: torch.Tensor, gate: torch.Tensor | None, gap: float = 0.5) -> torch.Tensor:
    """x with one channel per pixel raised so that the max over C of x * gate is unique (ties in
    low precision would route the max's gradient to a different, equally valid channel)."""
    n, c = x.shape[:2]
    g = torch.ones(n, c, dtype=torch.float64) if gate is None else gate.detach().double().reshape(n, c)
    xd = x.detach().double()
    winner = torch.randint(0, c, (n, 1, *x.shape[2:]), generator=torch.Generator().manual_seed(c))
    gated = xd * g[:, :, None, None]
    target = gated.max(dim=1, keepdim=True).values + gap
    g_win = g.gather(1, winner.flatten(1)).reshape(winner.shape)
    xd = xd.scatter(1, winner, target / g_win)
    gated = xd * g[:, :, None, None]
    if c > 1:
        top2 = gated.topk(2, dim=1).values
        assert (top2[:, 0] - top2[:, 1]).min() > gap / 4
    return xd.to(x.dtype).requires_grad_(x.requires_grad)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, [i for i in inputs if i is not None], grad_out)


# --------------------------------------------------------------------------------------------
# channel_pool
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate_kind", ["none", "nc", "nc11"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_channel_pool_triton_matches_reference(shape, gate_kind):
    n, c = shape[:2]
    gate = None if gate_kind == "none" else _gate(n, c, seed=1)
    if gate is not None and gate_kind == "nc11":
        gate = gate.detach().reshape(n, c, 1, 1).requires_grad_(True)
    x = _unique_max(make_tensor(shape, dtype=torch.float64, seed=2), gate).requires_grad_(True)
    grad_out = make_tensor((n, 2, *shape[2:]), dtype=torch.float64, seed=3)
    out = sk.channel_pool(x, gate, backend="triton")
    expected = sk.channel_pool(x, gate, backend="reference")
    assert out.shape == expected.shape and out.dtype == x.dtype
    assert_close(out, expected)
    for name, g, ge in zip(["dx", "dgate"], _grads(out, (x, gate), grad_out), _grads(expected, (x, gate), grad_out)):
        assert g.shape == ge.shape, name
        assert_close(g, ge, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("gate_dtype", ["same", "float32"])
def test_channel_pool_triton_dtypes(dtype, gate_dtype):
    n, c = 2, 11
    gate = _gate(n, c, seed=4, dtype=dtype if gate_dtype == "same" else torch.float32)
    x = _unique_max(make_tensor((n, c, 5, 7), dtype=dtype, seed=5), gate).requires_grad_(True)
    grad_out = make_tensor((n, 2, 5, 7), dtype=dtype, seed=6)
    out = sk.channel_pool(x, gate, backend="triton")
    expected = sk.channel_pool(x, gate, backend="reference")
    assert out.dtype == dtype
    assert_close(out, expected, dtype=dtype)
    grads, grads_e = _grads(out, (x, gate), grad_out), _grads(expected, (x, gate), grad_out)
    assert grads[0].dtype == dtype and grads[1].dtype == gate.dtype
    for g, ge in zip(grads, grads_e):
        assert_close(g, ge, dtype=dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(2, 11, 9, 13), (1, 70, 3, 5)], ids=_id)
def test_channel_pool_triton_layouts(layout, shape):
    """Strided inputs are read in place; dx comes back in x's layout where x is dense."""
    n, c = shape[:2]
    gate = _gate(n, c, seed=7, dtype=torch.float32)
    x = _unique_max(make_tensor(shape, seed=8), gate).requires_grad_(True)
    grad_out = make_tensor((n, 2, *shape[2:]), seed=9)
    expected = sk.channel_pool(x, gate, backend="reference")
    grads_e = _grads(expected, (x, gate), grad_out)
    x2 = LAYOUTS[layout](x)
    gate2 = non_contiguous(gate.detach()).requires_grad_(True)
    out = sk.channel_pool(x2, gate2, backend="triton")
    grads = _grads(out, (x2, gate2), grad_out)
    assert_close(out, expected)
    for g, ge in zip(grads, grads_e):
        assert_close(g, ge)
    if layout == "channels_last":
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


def test_channel_pool_triton_ties_go_to_the_first_channel():
    x = torch.zeros(1, 12, 2, 3)
    x[:, 3] = x[:, 9] = 2.0  # tied maxima in different channel tiles (BLOCK_C = 8)
    x[:, 0] = -1.0
    out, argmax = channel_pool_triton(x, None)
    assert (argmax == 3).all()
    x.requires_grad_(True)
    grad_out = torch.zeros(1, 2, 2, 3)
    grad_out[:, 0] = 1.0
    (dx,) = torch.autograd.grad(sk.channel_pool(x, backend="triton"), x, grad_out)
    assert (dx[:, 3] == 1.0).all() and (dx.sum(dim=1) == 1.0).all()


def test_channel_pool_triton_channel_lanes_merge_like_torch_max():
    """The forward keeps max / argmax / sum per channel lane through the channel loop and merges
    the lanes once: ties and NaNs spread over lanes and tiles resolve as torch.max does (first
    maximal channel, NaN wins with its first channel)."""
    from segkd_kernels.ops.channel_pool import triton as pool_triton

    c = 150
    block_c = pool_triton._fwd_blocks(torch.empty(2, c, 3, 5), 15)[0]
    assert c > 2 * block_c  # several channel tiles, a partial last one
    x = make_tensor((2, c, 3, 5), seed=13)
    x[0, [7, 7 + block_c, 90], 0, 0] = 9.0        # tie in one lane across tiles, and in another lane
    x[0, [70, 5], 1, 1] = 9.0                     # the later tile's lane has the smaller channel
    x[1, [100, 37, 140], 1, 2] = float("nan")     # NaNs in several lanes: the first one wins
    x[1, 3, 2, 4] = float("nan")
    gate = _gate(2, c, seed=14, dtype=torch.float32).detach()
    gate[0] = gate[0].abs()
    for g in (None, gate):
        out, argmax = channel_pool_triton(x, g)
        gated = x if g is None else x * g[:, :, None, None]
        want = gated.max(dim=1)
        torch.testing.assert_close(out[:, 0], want.values, equal_nan=True)
        assert torch.equal(argmax.long(), want.indices)
        assert_close(out[:, 1][~out[:, 1].isnan()], gated.mean(dim=1)[~out[:, 1].isnan()])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the interpreter
def test_channel_pool_triton_negative_infinity():
    """-inf entries (and -inf gated by a negative gate, i.e. +inf) pool like the reference."""
    x = make_tensor((1, 5, 3, 4), seed=10)
    x[0, 1, 0, 0] = float("-inf")
    x[0, :, 1, 1] = float("-inf")  # a pixel where every channel is -inf
    gate = torch.tensor([[1.0, 1.0, -1.0, 1.0, 1.0]])
    x[0, 2, 2, 3] = float("-inf")  # becomes +inf after the negative gate
    for g in (None, gate):
        out = sk.channel_pool(x, g, backend="triton")
        torch.testing.assert_close(out, sk.channel_pool(x, g, backend="reference"), equal_nan=True)


def test_channel_pool_triton_grad_output_scales():
    x = make_tensor((2, 5, 5, 7), seed=11, requires_grad=True)
    gate = _gate(2, 5, seed=12, dtype=torch.float32)
    grad_out = make_tensor((2, 2, 5, 7), seed=13)
    g1 = _grads(sk.channel_pool(x, gate, backend="triton"), (x, gate), grad_out)
    g2 = _grads(sk.channel_pool(x, gate, backend="triton"), (x, gate), -2.5 * grad_out)
    for a, b in zip(g1, g2):
        assert_close(b, -2.5 * a)
        assert a.abs().max() > 0


def test_channel_pool_triton_gradcheck():
    x = make_tensor((1, 3, 2, 3), dtype=torch.float64, seed=14)
    gate = _gate(1, 3, seed=15)
    x = _unique_max(x, gate).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, g: sk.channel_pool(a, g, backend="triton"), (x, gate))


def test_channel_pool_opcheck():
    x = make_tensor((2, 5, 2, 3), seed=16, requires_grad=True)
    gate = _gate(2, 5, seed=17, dtype=torch.float32)
    torch.library.opcheck(channel_pool_triton, (x, gate))
    torch.library.opcheck(channel_pool_triton, (x, None))
    _, argmax = channel_pool_triton(x.detach(), gate.detach())
    grad = make_tensor((2, 2, 2, 3), seed=18)
    torch.library.opcheck(channel_pool_backward_triton, (grad, x.detach(), gate.detach(), argmax))
    torch.library.opcheck(channel_pool_backward_triton, (grad, channels_last(x.detach()), None, argmax))


def test_channel_pool_triton_compiles():
    x = make_tensor((2, 5, 5, 7), seed=19, requires_grad=True)
    gate = _gate(2, 5, seed=20, dtype=torch.float32)
    grad_out = make_tensor((2, 2, 5, 7), seed=21)

    def fn(a, g):
        return sk.channel_pool(a, g, backend="triton") + sk.channel_pool(a, backend="triton")

    out = torch.compile(fn, **COMPILE)(x, gate)
    expected = fn(x, gate)
    assert_close(out, expected)
    for a, b in zip(_grads(out, (x, gate), grad_out), _grads(expected, (x, gate), grad_out)):
        assert_close(a, b)


# --------------------------------------------------------------------------------------------
# cbam_gate
# --------------------------------------------------------------------------------------------


def _cbam_inputs(shape, *, dtype=torch.float64, gate_dtype=None, seed=0, mc_4d=False, ms_3d=False):
    n, c, h, w = shape
    gate_dtype = gate_dtype or dtype
    x = make_tensor(shape, dtype=dtype, seed=seed, requires_grad=True)
    m_c = _gate(n, c, seed=seed + 1, dtype=gate_dtype)
    m_s = torch.sigmoid(make_tensor((n, 1, h, w), dtype=torch.float64, seed=seed + 2)).to(gate_dtype)
    if mc_4d:
        m_c = m_c.detach().reshape(n, c, 1, 1)
    if ms_3d:
        m_s = m_s.reshape(n, h, w)
    return x, m_c.detach().requires_grad_(True), m_s.requires_grad_(True)


@pytest.mark.parametrize("gate_shapes", ["nc_n1hw", "nc11_nhw"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_cbam_gate_matches_formula_and_reference(shape, gate_shapes):
    x, m_c, m_s = _cbam_inputs(shape, seed=30, mc_4d=gate_shapes == "nc11_nhw", ms_3d=gate_shapes == "nc11_nhw")
    n, c, h, w = shape
    grad_out = make_tensor(shape, dtype=torch.float64, seed=33)
    # independent of the reference: the product written out, autograd for the gradients
    formula = m_s.reshape(n, 1, h, w) * (m_c.reshape(n, c, 1, 1) * x)
    grads_f = _grads(formula, (x, m_c, m_s), grad_out)
    for backend in ("reference", "triton"):
        out = sk.cbam_gate(x, m_c, m_s, backend=backend)
        assert out.shape == shape and out.dtype == x.dtype
        assert_close(out, formula)
        for name, g, gf in zip(["dx", "dm_c", "dm_s"], _grads(out, (x, m_c, m_s), grad_out), grads_f):
            assert g.shape == gf.shape, name
            assert_close(g, gf, msg=f"{backend} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("gate_dtype", ["same", "float32"])
def test_cbam_gate_triton_dtypes(dtype, gate_dtype):
    shape = (2, 11, 5, 7)
    # the backward's channels come in 2 slices (8 + a partial 3), summed after the kernel
    from segkd_kernels.ops.cbam_gate import triton as cbam_triton
    assert cbam_triton.channel_slices(11, cbam_triton._blocks(torch.empty(shape), 35)[0], 2) == (8, 2)
    x, m_c, m_s = _cbam_inputs(shape, dtype=dtype, gate_dtype=dtype if gate_dtype == "same" else torch.float32,
                               seed=34)
    grad_out = make_tensor(shape, dtype=dtype, seed=37)
    out = sk.cbam_gate(x, m_c, m_s, backend="triton")
    expected = sk.cbam_gate(x, m_c, m_s, backend="reference")
    assert out.dtype == dtype
    assert_close(out, expected, dtype=dtype)
    grads = _grads(out, (x, m_c, m_s), grad_out)
    assert [g.dtype for g in grads] == [dtype, m_c.dtype, m_s.dtype]
    # the reference's gradients come from autograd in fp32 with one rounding per op; compare in
    # x's dtype tolerance (the sums over C and H*W are fp32 in both)
    for g, ge in zip(grads, _grads(expected, (x, m_c, m_s), grad_out)):
        assert_close(g, ge, dtype=dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cbam_gate_triton_layouts(layout):
    shape = (2, 70, 3, 5)
    x, m_c, m_s = _cbam_inputs(shape, dtype=torch.float32, seed=38)
    grad_out = make_tensor(shape, seed=41)
    expected = sk.cbam_gate(x, m_c, m_s, backend="reference")
    grads_e = _grads(expected, (x, m_c, m_s), grad_out)
    to = LAYOUTS[layout]
    x2, m_s2 = to(x), to(m_s)
    m_c2 = non_contiguous(m_c.detach()).requires_grad_(True)
    out = sk.cbam_gate(x2, m_c2, m_s2, backend="triton")
    assert_close(out, expected)
    for g, ge in zip(_grads(out, (x2, m_c2, m_s2), to(grad_out).detach()), grads_e):
        assert_close(g, ge)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_cbam_gate_triton_expanded_grad_output():
    """out.sum().backward() hands the kernel a gradient with all strides 0."""
    x, m_c, m_s = _cbam_inputs((2, 5, 4, 3), dtype=torch.float32, seed=42)
    grads = torch.autograd.grad(sk.cbam_gate(x, m_c, m_s, backend="triton").sum(), (x, m_c, m_s))
    grads_e = torch.autograd.grad(sk.cbam_gate(x, m_c, m_s, backend="reference").sum(), (x, m_c, m_s))
    for g, ge in zip(grads, grads_e):
        assert_close(g, ge)


def test_cbam_gate_triton_gradcheck():
    x, m_c, m_s = _cbam_inputs((1, 3, 2, 3), seed=43)
    assert torch.autograd.gradcheck(lambda *a: sk.cbam_gate(*a, backend="triton"), (x, m_c, m_s))


def test_cbam_gate_opcheck():
    x, m_c, m_s = _cbam_inputs((2, 5, 3, 4), dtype=torch.float32, seed=44, ms_3d=True)
    torch.library.opcheck(cbam_gate_triton, (x, m_c, m_s))
    torch.library.opcheck(cbam_gate_triton, (channels_last(x), m_c, m_s))
    grad = make_tensor((2, 5, 3, 4), seed=47)
    torch.library.opcheck(cbam_gate_backward_triton, (grad, x.detach(), m_c.detach(), m_s.detach()))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cbam_gate_compiles(backend):
    x, m_c, m_s = _cbam_inputs((2, 5, 5, 7), dtype=torch.float32, seed=48)
    grad_out = make_tensor((2, 5, 5, 7), seed=51)

    def fn(a, mc, ms):
        return sk.cbam_gate(a, mc, ms, backend=backend)

    out = torch.compile(fn, **COMPILE)(x, m_c, m_s)
    expected = fn(x, m_c, m_s)
    assert_close(out, expected)
    for a, b in zip(_grads(out, (x, m_c, m_s), 3.0 * grad_out), _grads(expected, (x, m_c, m_s), 3.0 * grad_out)):
        assert_close(a, b)


@pytest.mark.parametrize(
    "x, m_c, m_s, name",
    [
        (torch.randn(2, 3, 4), torch.ones(2, 3), torch.ones(2, 3, 4), "x"),
        (torch.randint(0, 2, (2, 3, 4, 5)), torch.ones(2, 3), torch.ones(2, 4, 5), "x"),
        (torch.randn(2, 3, 4, 5), torch.ones(2, 4), torch.ones(2, 4, 5), "channel_gate"),
        (torch.randn(2, 3, 4, 5), torch.ones(2, 3, 4, 5), torch.ones(2, 4, 5), "channel_gate"),
        (torch.randn(2, 3, 4, 5), torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 4, 5), "channel_gate"),
        (torch.randn(2, 3, 4, 5), torch.ones(2, 3), torch.ones(2, 5, 4), "spatial_gate"),
        (torch.randn(2, 3, 4, 5), torch.ones(2, 3), torch.ones(2, 2, 4, 5), "spatial_gate"),
        (torch.randn(2, 3, 4, 5), torch.ones(2, 3), torch.ones(1, 4, 5), "spatial_gate"),
        (torch.randn(2, 3, 4, 5), torch.ones(2, 3), torch.ones(2, 4, 5, device="meta"), "spatial_gate"),
        (torch.randn(2, 3, 4, 5), [[1.0] * 3] * 2, torch.ones(2, 4, 5), "channel_gate"),
    ],
    ids=["x_rank3", "x_int", "mc_wrong_c", "mc_full_map", "mc_int", "ms_swapped_hw", "ms_two_channels",
         "ms_wrong_n", "ms_meta", "mc_list"],
)
def test_cbam_gate_bad_inputs(x, m_c, m_s, name):
    with pytest.raises(ValueError, match=name):
        sk.cbam_gate(x, m_c, m_s)


# --------------------------------------------------------------------------------------------
# attnfd_loss
# --------------------------------------------------------------------------------------------


def _loss_fp64(s: torch.Tensor, t: torch.Tensor) -> float:
    """The clamped form with exact fp64 sums (math.fsum)."""
    sd, td = s.detach().double().flatten().tolist(), t.detach().double().flatten().tolist()
    ss = math.fsum(a * a for a in sd)
    tt = math.fsum(b * b for b in td)
    st = math.fsum(a * b for a, b in zip(sd, td))
    ns, nt = max(math.sqrt(ss), 1e-12), max(math.sqrt(tt), 1e-12)
    return (ss / ns ** 2 + tt / nt ** 2 - 2 * st / (ns * nt)) / s.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_attnfd_triton_matches_reference(shape, dtype):
    s = make_tensor(shape, dtype=dtype, seed=60, requires_grad=True)
    t = make_tensor(shape, dtype=dtype, seed=61)
    loss = sk.attnfd_loss(s, t, backend="triton")
    expected = sk.attnfd_loss(s, t, backend="reference")
    assert loss.shape == () and loss.dtype == dtype
    assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss, s, torch.tensor(-1.7, dtype=dtype))
    (ge,) = torch.autograd.grad(expected, s, torch.tensor(-1.7, dtype=dtype))
    assert_close(g, ge, dtype=dtype)


def test_attnfd_triton_many_programs(monkeypatch):
    """More blocks than programs: each program strides over several blocks."""
    monkeypatch.setattr(attnfd_triton, "MAX_PROGRAMS", 3)
    s = make_tensor((2, 7, 31, 37), seed=62, requires_grad=True)  # 32 blocks of 512 over 3 programs
    t = make_tensor((2, 7, 31, 37), seed=63)
    dots = attnfd_dots_triton(s.detach(), t)
    sd, td = s.detach().double(), t.double()
    torch.testing.assert_close(dots, torch.stack([(sd * sd).sum(), (td * td).sum(), (sd * td).sum()]),
                               rtol=1e-12, atol=0)
    loss = sk.attnfd_loss(s, t, backend="triton")
    assert loss.item() == pytest.approx(_loss_fp64(s, t), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 3.0, 1e-4])
def test_attnfd_triton_near_equal_maps(dtype, scale):
    """student = scale * (teacher + tiny noise): loss ~1e-7, where fp32 dot products cancel."""
    t = make_tensor((2, 8, 16, 16), seed=64).to(dtype)
    noise = make_tensor((2, 8, 16, 16), seed=65, scale=1e-3 if dtype == torch.float32 else 3e-2)
    s = ((t.double() + noise.double()) * scale).to(dtype)
    expected = _loss_fp64(s, t)  # of the rounded inputs: the kernel's only error is its arithmetic
    assert 0 < expected < 1e-2
    loss = sk.attnfd_loss(s, t, backend="triton")
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # the result is rounded to the input dtype
    assert loss.double().item() == pytest.approx(expected, rel=tol)


def test_attnfd_triton_zero_maps_use_the_clamped_form():
    t = make_tensor((2, 3, 4, 5), seed=66)
    zero = torch.zeros(2, 3, 4, 5, requires_grad=True)
    for s, teacher in ((zero, t), (t.clone().requires_grad_(True), torch.zeros_like(t))):
        loss = sk.attnfd_loss(s, teacher, backend="triton")
        assert loss.item() == pytest.approx(1.0 / 2, rel=1e-6)  # 1/N, not 2/N
        expected = sk.attnfd_loss(s, teacher, backend="reference")
        (g,) = torch.autograd.grad(loss, s)
        (ge,) = torch.autograd.grad(expected, s)
        assert torch.isfinite(g).all()
        # gradients are O(1 / ns); a zero teacher makes the student's exactly 0 up to rounding
        scale = 1.0 / max(s.detach().norm().item(), 1e-12)
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-6 * scale)
    both = sk.attnfd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), backend="triton")
    assert both.item() == 0.0


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("which", ["student", "both"])
def test_attnfd_triton_layouts(layout, which):
    shape = (2, 5, 9, 4)
    s = make_tensor(shape, seed=67, requires_grad=True)
    t = make_tensor(shape, seed=68)
    expected = sk.attnfd_loss(s, t, backend="reference")
    (ge,) = torch.autograd.grad(expected, s)
    s2 = LAYOUTS[layout](s)
    t2 = LAYOUTS[layout](t) if which == "both" else t
    loss = sk.attnfd_loss(s2, t2, backend="triton")
    (g,) = torch.autograd.grad(loss, s2)
    assert_close(loss, expected)
    assert_close(g, ge)
    if layout == "channels_last" and which == "both":
        assert g.is_contiguous(memory_format=torch.channels_last)


def test_attnfd_dots_gradcheck_both_inputs():
    """The custom op's own autograd, teacher gradient included (the public function detaches it)."""
    s = make_tensor((2, 1, 2, 3), dtype=torch.float64, seed=69, requires_grad=True)
    t = make_tensor((2, 1, 2, 3), dtype=torch.float64, seed=70, requires_grad=True)
    assert torch.autograd.gradcheck(attnfd_dots_triton, (s, t))
    assert torch.autograd.gradgradcheck(attnfd_dots_triton, (s, t))


def test_attnfd_opcheck():
    s = make_tensor((2, 3, 4, 5), seed=71, requires_grad=True)
    t = make_tensor((2, 3, 4, 5), seed=72)
    torch.library.opcheck(attnfd_dots_triton, (s, t))
    torch.library.opcheck(attnfd_dots_triton, (channels_last(s), channels_last(t)))
    coef = torch.tensor([0.3, -1.2], dtype=torch.float64)
    torch.library.opcheck(attnfd_dots_backward_triton, (s.detach(), t, coef))
    torch.library.opcheck(attnfd_dots_backward_triton, (channels_last(s.detach()), channels_last(t), coef))


def test_attnfd_triton_compiles():
    s = make_tensor((2, 3, 5, 7), seed=73, requires_grad=True)
    t = make_tensor((2, 3, 5, 7), seed=74)
    loss = torch.compile(lambda a, b: sk.attnfd_loss(a, b, backend="triton"), **COMPILE)(s, t)
    expected = sk.attnfd_loss(s, t, backend="reference")
    assert_close(loss, expected)
    assert_close(torch.autograd.grad(2.0 * loss, s)[0], torch.autograd.grad(2.0 * expected, s)[0])


# --------------------------------------------------------------------------------------------
# GPU: fp16 / bf16 error budgets on realistic shapes (docs/backends.md rule)
# --------------------------------------------------------------------------------------------


def _budget(kernel, same_dtype, fp64, atol):
    assert within_error_budget(kernel, same_dtype, fp64, atol=atol), (
        f"kernel err {(kernel.double() - fp64.double()).abs().max().item():.3g}, "
        f"reference err {(same_dtype.double() - fp64.double()).abs().max().item():.3g}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_channel_pool_error_budget(dtype, layout):
    n, c = 4, 96
    gate = _gate(n, c, seed=80, dtype=dtype).detach()
    x = _unique_max(make_tensor((n, c, 33, 47), dtype=dtype, seed=81), gate)
    if layout == "channels_last":
        x = channels_last(x)
    x, gate = x.cuda().requires_grad_(True), gate.cuda().requires_grad_(True)
    x64, gate64 = x.detach().double().requires_grad_(True), gate.detach().double().requires_grad_(True)
    grad_out = make_tensor((n, 2, 33, 47), dtype=dtype, seed=82, device="cuda")
    out = sk.channel_pool(x, gate, backend="triton")
    ref = sk.channel_pool(x, gate, backend="reference")
    ref64 = sk.channel_pool(x64, gate64, backend="reference")
    _budget(out, ref, ref64, 1e-3)
    for g, gr, g64 in zip(_grads(out, (x, gate), grad_out), _grads(ref, (x, gate), grad_out),
                          _grads(ref64, (x64, gate64), grad_out.double())):
        _budget(g, gr, g64, 1e-3 * g64.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_cbam_gate_error_budget(dtype, layout):
    x, m_c, m_s = (t.detach() for t in _cbam_inputs((4, 96, 33, 47), dtype=dtype, seed=83))
    if layout == "channels_last":
        x = channels_last(x)
    x, m_c, m_s = (t.cuda().requires_grad_(True) for t in (x, m_c, m_s))
    x64, mc64, ms64 = (t.detach().double().requires_grad_(True) for t in (x, m_c, m_s))
    grad_out = make_tensor(x.shape, dtype=dtype, seed=86, device="cuda")
    out = sk.cbam_gate(x, m_c, m_s, backend="triton")
    ref = sk.cbam_gate(x, m_c, m_s, backend="reference")
    ref64 = sk.cbam_gate(x64, mc64, ms64, backend="reference")
    _budget(out, ref, ref64, 1e-3)
    for g, gr, g64 in zip(_grads(out, (x, m_c, m_s), grad_out), _grads(ref, (x, m_c, m_s), grad_out),
                          _grads(ref64, (x64, mc64, ms64), grad_out.double())):
        _budget(g, gr, g64, 1e-3 * g64.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("near", [False, True], ids=["far", "near"])
def test_gpu_attnfd_error_budget(dtype, near):
    shape = (4, 96, 65, 65)  # 1.6M elements: many blocks per program
    t = make_tensor(shape, dtype=dtype, seed=87, device="cuda")
    noise = make_tensor(shape, seed=88, scale=0.05 if near else 1.0, device="cuda")
    s = (t.float() + noise).to(dtype).requires_grad_(True)
    s64 = s.detach().double().requires_grad_(True)
    loss = sk.attnfd_loss(s, t, backend="triton")
    ref = sk.attnfd_loss(s, t, backend="reference")
    ref64 = sk.attnfd_loss(s64, t.double(), backend="reference")
    _budget(loss, ref, ref64, 1e-4 * ref64.abs().item())
    (g,) = torch.autograd.grad(loss, s)
    (gr,) = torch.autograd.grad(ref, s)
    (g64,) = torch.autograd.grad(ref64, s64)
    _budget(g, gr, g64, 1e-3 * g64.abs().max().item())
