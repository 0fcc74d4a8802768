"""NaN and +/-Inf inputs: every backend propagates them exactly as the reference does.

API rule: non-finite inputs are not checked per call (too costly), but a NaN in must give a NaN
out, never a finite loss, and each backend must give the reference's pattern of NaN and +/-Inf in
its outputs and in its gradients, with the same finite values elsewhere.

Each op is called through one small adapter (student-like input, teacher-like input) -> outputs,
and differentiated through a fixed random linear functional of its outputs, so a non-finite
output does not by itself make every gradient non-finite. A backend is added to the comparison
with one line in BACKENDS. Without a GPU the cuda backend runs its unchanged kernels on CPU tensors
through the host build (segkd_kernels._cuda_host, inside _backends.host_execution()).
"""

from __future__ import annotations

import math

import pytest
import torch

import segkd_kernels as sk
from segkd_kernels._backends import host_execution, host_library
from segkd_kernels.testing import make_tensor

BACKENDS = ["triton", "cuda"]

NAN, INF = math.nan, math.inf
SHAPE = (2, 3, 7, 9)  # (N, C, H, W): a few rows, channels and odd spatial sizes
AT = (1, 2, 3, 4)  # where the non-finite value goes


@pytest.fixture
def device(backend):
    """The device the backend's inputs go to. Without a GPU the cuda backend runs on CPU tensors
    inside host_execution() (the CUDA kernels compiled for the host), entered for this test only."""
    if backend == "cuda" and not torch.cuda.is_available():
        host, reason = host_library()
        if host is None:
            pytest.skip(reason)
        with host_execution(host):
            yield "cpu"
        return
    report = sk.available_backends()
    if not report[backend]:
        pytest.skip(f"{backend} backend cannot run here: {report.reasons[backend]}")
    yield "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# Adapters: (backend, student, teacher) -> tuple of outputs. The "student" is differentiated; the
# "teacher" too where the op is differentiable in it (pool gates, CBAM gates).
# ----------------------------------------------------------------------------------------------

def _knowledge_gap(backend, s, t):
    # no backend argument: chosen like "auto", which SEGKD_BACKEND overrides
    mp = pytest.MonkeyPatch()
    mp.setenv("SEGKD_BACKEND", backend)
    try:
        return (sk.knowledge_gap(s, t, 2.0),)
    finally:
        mp.undo()


def _pixel_kd_masked(backend, s, t):
    mask = torch.zeros(s.shape[0], *s.shape[2:], dtype=torch.bool, device=s.device)
    mask[AT[0], AT[2], AT[3]] = True  # the non-finite value sits on an ignored pixel
    mask[0, 0, :3] = True
    return (sk.pixel_kd(s, t, 2.0, ignore_mask=mask, backend=backend),)


def _pixel_kd_weighted(backend, s, t):
    w = make_tensor((s.shape[0], *s.shape[2:]), seed=7, device=s.device).abs()
    return (sk.pixel_kd(s, t, 2.0, weight=w, backend=backend),)


def _channel_pool(backend, x, gate):
    return (sk.channel_pool(x, gate[:, :, 0, 0], backend=backend),)


def _cbam_gate(backend, x, gates):
    # gates: (N, C + 1, H, W); channel gate from [:, :C, 0, 0], spatial gate from [:, C]
    c = x.shape[1]
    return (sk.cbam_gate(x, gates[:, :c, 0, 0], gates[:, c], backend=backend),)


# name -> (adapter, teacher shape or None (no teacher), teacher differentiable)
OPS = {
    "channel_wise_kd": (lambda b, s, t: (sk.channel_wise_kd(s, t, 2.0, backend=b),), SHAPE, False),
    "pixel_kd": (lambda b, s, t: (sk.pixel_kd(s, t, 2.0, backend=b),), SHAPE, False),
    "pixel_kd_weighted": (_pixel_kd_weighted, SHAPE, False),
    "pixel_kd_masked": (_pixel_kd_masked, SHAPE, False),
    "knowledge_gap": (_knowledge_gap, SHAPE, False),
    "pfs_pixel_kd": (lambda b, s, t: (sk.pfs_pixel_kd(s, t, 2.0, backend=b),), SHAPE, False),
    "pairwise_kd": (lambda b, s, t: (sk.pairwise_kd(s, t, backend=b),), (2, 5, 7, 9), False),
    "pairwise_kd_pool2": (lambda b, s, t: (sk.pairwise_kd(s, t, pool=2, backend=b),), (2, 5, 7, 9), False),
    "cross_image_kd": (lambda b, s, t: (sk.cross_image_kd(s, t, 0.5, backend=b),), (2, 4, 7, 9), False),
    "ssim_kd": (lambda b, s, t: (sk.ssim_kd(s, t, window_size=5, backend=b),), SHAPE, False),
    "ssim_kd_raw": (lambda b, s, t: (sk.ssim_kd(s, t, window_size=5, normalize=False, padding="zeros",
                                                backend=b),), SHAPE, False),
    "ssim_kd_valid": (lambda b, s, t: (sk.ssim_kd(s, t, window_size=3, padding="valid", backend=b),),
                      SHAPE, False),
    "attnfd_loss": (lambda b, s, t: (sk.attnfd_loss(s, t, backend=b),), SHAPE, False),
    "spatial_pool": (lambda b, s, t: sk.spatial_pool(s, backend=b), None, False),
    "channel_pool": (_channel_pool, (SHAPE[0], SHAPE[1], 1, 1), True),
    "channel_pool_no_gate": (lambda b, s, t: (sk.channel_pool(s, backend=b),), None, False),
    "cbam_gate": (_cbam_gate, (SHAPE[0], SHAPE[1] + 1, SHAPE[2], SHAPE[3]), True),
}

# (where, value): a single non-finite element, or a whole tensor of NaN or +/-Inf (an all--inf
# softmax row is NaN in the reference: exp(-inf - (-inf)))
CASES = [("student", NAN), ("student", INF), ("student", -INF), ("teacher", NAN), ("teacher", INF),
         ("teacher", -INF), ("student_all", NAN), ("student_all", INF), ("student_all", -INF)]

# Known differences from the reference, expected to fail until fixed (strict: a fix shows up as
# an unexpected pass): entries are (backend, op, case). None at present.
KNOWN: set = set()


def _case_id(case) -> str:
    where, value = case
    return f"{where}-{value}"


def _inputs(op: str, case, device: str):
    _, t_shape, _ = OPS[op]
    s = make_tensor(SHAPE, seed=1, device=device)
    t = make_tensor(t_shape, seed=2, device=device) if t_shape is not None else None
    if op == "cbam_gate":
        t = torch.sigmoid(t)  # gates in (0, 1) as CBAM makes them
    where, value = case
    if where == "student":
        s[AT] = value
    elif where == "student_all":
        s.fill_(value)
    elif where == "teacher" and op == "cbam_gate":
        t[1, 2, 0, 0] = value  # one channel-gate entry and one spatial-gate pixel
        t[0, SHAPE[1], 3, 4] = value
    elif where == "teacher":
        t[tuple(i % d for i, d in zip(AT, t.shape))] = value
    return s, t


def _run(op: str, backend: str, s: torch.Tensor, t: torch.Tensor | None):
    """Outputs and gradients (student, and teacher where differentiable) of a fixed random linear
    functional of the outputs."""
    fn, _, t_grad = OPS[op]
    s = s.detach().clone().requires_grad_(True)
    if t is not None:
        t = t.detach().clone().requires_grad_(t_grad)
    outs = fn(backend, s, t)
    inputs = [s] + ([t] if t is not None and t_grad else [])
    if op == "knowledge_gap":  # detached by definition
        return [o.detach() for o in outs], []
    total = sum((o.float() * make_tensor(o.shape, seed=99 + i, device=o.device)).sum() for i, o in enumerate(outs))
    grads = torch.autograd.grad(total, inputs)
    return [o.detach() for o in outs], list(grads)


def _assert_same_pattern(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape, what
    nan_diff = (torch.isnan(got) != torch.isnan(want)).nonzero().tolist()
    assert not nan_diff, f"{what}: NaN where the reference is not (or the reverse) at {nan_diff[:6]}"
    for sign, name in ((1, "+inf"), (-1, "-inf")):
        diff = ((got == sign * INF) != (want == sign * INF)).nonzero().tolist()
        assert not diff, f"{what}: {name} pattern differs from the reference at {diff[:6]}"
    finite = torch.isfinite(want)
    if finite.any():
        # The finite entries only have to be the same numbers, not to fp32 accuracy (each op's
        # own tests hold them to their error budgets): a coarse 1e-4 of the largest finite value
        # (gradients are ~1 / numel and sums of cancelling terms) catches a wrong or swapped value
        # without depending on the summation order of the CPU's BLAS.
        scale = want[finite].abs().max().item()
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-3, atol=1e-4 * scale, msg=what)


# ----------------------------------------------------------------------------------------------
# The reference never hides a non-finite input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("op", sorted(OPS))
def test_reference_never_hides_nonfinite_input(op, case):
    if OPS[op][1] is None and case[0] == "teacher":
        pytest.skip("no teacher input")
    s, t = _inputs(op, case, "cpu")
    outs, _ = _run(op, "reference", s, t)
    if op == "pixel_kd_masked" and case[0] in ("student", "teacher"):
        # documented: ignored pixels contribute exactly nothing, whatever their logits
        assert all(torch.isfinite(o).all() for o in outs)
        return
    if op == "pairwise_kd_pool2" and case[1] == -INF and case[0] != "student_all":
        # max-pooling drops a -Inf next to finite values: the loss is finite by the math (an
        # all--inf student pools to -inf, whose normalisation is NaN)
        assert all(torch.isfinite(o).all() for o in outs)
        return
    assert any(not torch.isfinite(o).all() for o in outs), f"{op}: finite output for a non-finite input"
    if math.isnan(case[1]) and op not in ("spatial_pool", "channel_pool", "channel_pool_no_gate", "cbam_gate",
                                         "knowledge_gap"):
        # a NaN in gives a NaN loss
        assert all(torch.isnan(o).all() for o in outs), f"{op}: NaN input, loss {outs}"


def test_ssim_normalisation_propagates_nan():
    """One NaN pixel makes its map's min and max NaN, so the whole rescaled map and the loss are
    NaN; an all-NaN student too (it used to give 0.49999 through the flat-map branch)."""
    s, t = _inputs("ssim_kd", ("student", NAN), "cpu")
    assert torch.isnan(sk.ssim_kd(s, t, window_size=5, backend="reference"))
    assert torch.isnan(sk.ssim_kd(torch.full_like(s, NAN), t, window_size=5, backend="reference"))
    # a flat (constant) map still rescales to 0 with a zero gradient
    s_flat = torch.full_like(s, 0.25).requires_grad_(True)
    loss = sk.ssim_kd(s_flat, t, window_size=5, backend="reference")
    assert torch.isfinite(loss)
    (g,) = torch.autograd.grad(loss, s_flat)
    assert (g == 0).all()


def test_pixel_kd_ignored_nan_has_exact_zero_gradient():
    s, t = _inputs("pixel_kd_masked", ("student", NAN), "cpu")
    outs, (g,) = _run("pixel_kd_masked", "reference", s, t)
    assert torch.isfinite(outs[0])
    assert g[AT[0], :, AT[2], AT[3]].eq(0).all() and torch.isfinite(g).all()


# ----------------------------------------------------------------------------------------------
# Every backend: the reference's pattern, values and gradients
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_propagates_like_reference(backend, op, case, device, request):
    if OPS[op][1] is None and case[0] == "teacher":
        pytest.skip("no teacher input")
    if (backend, op, case) in KNOWN:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{backend} {op}: known difference, see KNOWN"))
    s, t = _inputs(op, case, "cpu")
    want_outs, want_grads = _run(op, "reference", s, t)
    got_outs, got_grads = _run(op, backend, s.to(device), None if t is None else t.to(device))
    for i, (got, want) in enumerate(zip(got_outs, want_outs)):
        _assert_same_pattern(got, want, f"{op} {backend} output {i}")
    for i, (got, want) in enumerate(zip(got_grads, want_grads)):
        _assert_same_pattern(got, want, f"{op} {backend} gradient {i}")


# ----------------------------------------------------------------------------------------------
# Triton softmax kernels on their streaming plans: an all--inf softmax row is NaN as in the
# reference, while -inf confined to the first blocks (or to a whole split) of a row that has
# finite values elsewhere gives no premature NaN (running maxima start at -inf)
# ----------------------------------------------------------------------------------------------

# (row, flat positions) of the CWD rows set to -inf; shape (2, 3, 10, 13): P = 130 in two splits of
# 80 positions and blocks of 16 (a partial block and a fully masked block in the last split)
_CWD_SHAPE = (2, 3, 10, 13)
_CWD_NEG_INF = {"row_all": [((0, 1), slice(None))],
                "first_blocks": [((0, 1), slice(0, 20)), ((1, 0), slice(0, 80)), ((1, 2), slice(80, 101))]}
# (pixel, classes) of the pixel-KD logits set to -inf; K = 40 classes in tiles of 16
_PIX_SHAPE = (2, 40, 5, 7)
_PIX_NEG_INF = {"row_all": [((0, 1, 2), slice(None))],
                "first_blocks": [((1, 3, 4), slice(0, 16)), ((1, 0, 0), slice(0, 20)), ((0, 4, 6), slice(16, 40))]}


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("pattern", ["row_all", "first_blocks"])
@pytest.mark.parametrize("op", ["channel_wise_kd", "pixel_kd", "pixel_kd_masked", "pixel_kd_weighted",
                                "knowledge_gap", "pfs_pixel_kd"])
@pytest.mark.parametrize("backend", ["triton"])
def test_triton_streaming_plans_match_reference_on_neg_inf_rows(backend, op, pattern, where, device,
                                                                 monkeypatch):
    from segkd_kernels.ops.channel_wise_kd import triton as cwd_triton
    from segkd_kernels.ops.pixel_kd import triton as pixel_triton

    if op == "channel_wise_kd":
        shape, spots = _CWD_SHAPE, _CWD_NEG_INF[pattern]
        monkeypatch.setattr(cwd_triton, "_MAX_TILE", 64)
        monkeypatch.setattr(cwd_triton, "_BLOCK", 16)
        monkeypatch.setattr(cwd_triton, "_TARGET_PROGRAMS", 12)
        rows, p = shape[0] * shape[1], shape[2] * shape[3]
        # the shape really takes the split plan: several splits of several blocks each
        chunk, splits = cwd_triton._plan(rows, p)
        assert p > cwd_triton._MAX_TILE and splits == 2 and chunk == 80
    else:
        shape, spots = _PIX_SHAPE, _PIX_NEG_INF[pattern]
        assert not pixel_triton._blocks(shape[1], shape[2] * shape[3])[2]  # classes looped in tiles
    s = make_tensor(shape, seed=1, device="cpu")
    t = make_tensor(shape, seed=2, device="cpu")
    x = s if where == "student" else t
    for index, part in spots:
        if op == "channel_wise_kd":
            x[index].view(-1)[part] = -INF
        else:
            x[index[0], part, index[1], index[2]] = -INF
    want_outs, want_grads = _run(op, "reference", s, t)
    got_outs, got_grads = _run(op, backend, s.to(device), t.to(device))
    for i, (got, want) in enumerate(zip(got_outs, want_outs)):
        _assert_same_pattern(got, want, f"{op} {backend} output {i}")
    for i, (got, want) in enumerate(zip(got_grads, want_grads)):
        _assert_same_pattern(got, want, f"{op} {backend} gradient {i}")
