"""Tests of sk.memory_contrast_kd (docs/losses.md 4b): CIRKD's memory-bank contrast terms.

The oracle re-derives the upstream computation step by step, in CIRKD's own order of operations:
unit rows, similarity logits divided by the contrast temperature, then log-softmax / softmax at the
KD temperature, `kl_div(..., reduction="batchmean")`, times the KD temperature squared. It shares
no code with segkd_kernels/ops/memory_contrast_kd/ (the reference folds both temperatures into one
scale; the Triton kernel streams the bank with an online log-sum-exp).

Without a GPU the Triton kernel runs under the interpreter, so its cases are a chosen subset.
"""

import pytest
import torch
import torch.nn.functional as F

import segkd_kernels as sk
from segkd_kernels.ops.memory_contrast_kd.api import IMPLEMENTED
from segkd_kernels.testing import assert_close, make_tensor, within_error_budget

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_AVAILABLE = sk.available_backends()
BACKENDS = [name for name in ("reference", "triton", "cuda") if name in IMPLEMENTED and _AVAILABLE[name]]
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available here")

# (M anchors, C channels, Q bank entries): a single anchor / entry / channel, sizes that straddle
# the kernels' 64-row and 64-entry tiles, 32-channel operand blocks and 64-channel gradient tiles.
SHAPES = [(1, 1, 1), (5, 3, 7), (37, 17, 65), (70, 4, 130), (65, 130, 9)]


def oracle(s, t, bank, contrast_tau, kd_tau):
    """CIRKD's StudentSegContrast loss on already-selected anchor rows and a sampled bank."""
    s = F.normalize(s.double(), p=2, dim=1)
    t = F.normalize(t.detach().double(), p=2, dim=1)
    bank = bank.double()
    s_logits = torch.div(torch.mm(s, bank.T), contrast_tau)
    t_logits = torch.div(torch.mm(t, bank.T), contrast_tau)
    log_p_s = F.log_softmax(s_logits / kd_tau, dim=1)
    p_t = F.softmax(t_logits / kd_tau, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * kd_tau**2


def _inputs(m, c, q, *, dtype=torch.float64, seed=0, bank_scale=1.0):
    s = make_tensor((m, c), dtype=dtype, device=DEVICE, seed=seed, requires_grad=True)
    t = make_tensor((m, c), dtype=dtype, device=DEVICE, seed=seed + 1)
    bank = F.normalize(make_tensor((q, c), dtype=torch.float64, device=DEVICE, seed=seed + 2), dim=1)
    return s, t, (bank * bank_scale).to(dtype)


def _loss_and_grad(s, t, bank, tau, kd_tau, backend):
    loss = sk.memory_contrast_kd(s, t, bank, tau, kd_tau, backend=backend)
    return loss, torch.autograd.grad(loss, s)[0]


@pytest.mark.parametrize("tau,kd_tau", [(0.1, 1.0), (0.07, 4.0), (1.0, 0.5)])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_the_upstream_formula(shape, tau, kd_tau):
    s, t, bank = _inputs(*shape)
    loss, grad = _loss_and_grad(s, t, bank, tau, kd_tau, "reference")
    expected = oracle(s, t, bank, tau, kd_tau)
    assert_close(loss, expected)
    assert_close(grad, torch.autograd.grad(expected, s)[0])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_the_reference(shape, dtype):
    s, t, bank = _inputs(*shape, dtype=dtype, seed=3)
    loss, grad = _loss_and_grad(s, t, bank, 0.1, 1.0, "triton")
    ref_loss, ref_grad = _loss_and_grad(s, t, bank, 0.1, 1.0, "reference")
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_close(loss, ref_loss, dtype=dtype)
    assert_close(grad, ref_grad, dtype=dtype)


@needs_triton
def test_triton_with_kd_temperature_a_scaled_output_and_a_non_unit_bank():
    """kd_tau != 1, a bank that is not made of unit rows (used as given), and grad_output != 1."""
    s, t, bank = _inputs(33, 6, 20, seed=5, bank_scale=1.7)
    out = {}
    for backend in ("triton", "reference"):
        loss = sk.memory_contrast_kd(s, t, bank, 0.2, 3.0, backend=backend)
        out[backend] = (loss, torch.autograd.grad(-2.5 * loss, s)[0])
    assert_close(out["triton"][0], out["reference"][0])
    assert_close(out["triton"][1], out["reference"][1])
    assert_close(out["reference"][0], oracle(s, t, bank, 0.2, 3.0))


@needs_triton
def test_triton_peaked_similarities_stay_finite():
    """tau = 0.01: logits up to +-100 over the bank, where exp overflows without the running max."""
    s, t, bank = _inputs(20, 5, 70, seed=7)
    loss, grad = _loss_and_grad(s, t, bank, 0.01, 1.0, "triton")
    ref_loss, ref_grad = _loss_and_grad(s, t, bank, 0.01, 1.0, "reference")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


@needs_triton
def test_triton_bf16_within_the_error_budget():
    s, t, bank = _inputs(40, 8, 30, dtype=torch.bfloat16, seed=9)
    truth = oracle(s, t, bank, 0.1, 1.0)
    ref = sk.memory_contrast_kd(s, t, bank, backend="reference")
    tri = sk.memory_contrast_kd(s, t, bank, backend="triton")
    assert tri.dtype == torch.bfloat16
    assert within_error_budget(tri, ref, truth)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    s, t, bank = _inputs(12, 9, 10, seed=11)
    s_nc = s.detach().T.contiguous().T.requires_grad_(True)  # same values, column-major
    assert not s_nc.is_contiguous()
    loss, grad = _loss_and_grad(s_nc, t[::1], bank.T.contiguous().T, 0.1, 1.0, backend)
    assert_close(loss, oracle(s, t, bank, 0.1, 1.0))
    assert_close(grad, torch.autograd.grad(oracle(s, t, bank, 0.1, 1.0), s)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile(backend):
    """fullgraph: the checks trace, and the Triton op has its fake implementations (aot_eager: no
    C++ compiler needed)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: sk.memory_contrast_kd(a, b, c, 0.2, 2.0, backend=backend),
                             fullgraph=True, backend="aot_eager")
    s, t, bank = _inputs(21, 5, 13, dtype=torch.float32, seed=17)
    loss = compiled(s, t, bank)
    ref = sk.memory_contrast_kd(s, t, bank, 0.2, 2.0, backend=backend)
    assert_close(loss, ref)
    assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(ref, s)[0])


def test_no_gradient_reaches_the_teacher_or_the_bank():
    s, t, bank = _inputs(6, 4, 5, seed=13)
    t.requires_grad_(True)
    bank.requires_grad_(True)
    sk.memory_contrast_kd(s, t, bank, backend="reference").backward()
    assert t.grad is None and bank.grad is None and s.grad is not None


def test_identical_student_and_teacher_give_zero():
    s, _, bank = _inputs(9, 4, 11, seed=15)
    loss = sk.memory_contrast_kd(s, 3.0 * s.detach(), bank, backend="reference")  # same unit rows
    assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("case,match", [
    (lambda s, t, b: (s[None], t, b), "student_embed: expected a 2-d tensor"),
    (lambda s, t, b: (s, t[:, :3], b), "teacher_embed: expected the shape of student_embed"),
    (lambda s, t, b: (s, t, b[:, :3]), "memory: expected 4 columns"),
    (lambda s, t, b: (s, t, b[None]), "memory: expected a 2-d tensor"),
    (lambda s, t, b: (s, t, b[:0]), "memory: expected a non-empty tensor"),
    (lambda s, t, b: (s, t.long(), b), "teacher_embed: expected a floating-point tensor"),
    (lambda s, t, b: (s.float(), t, b.float()), "teacher_embed: float64 needs a float64 student_embed"),
    (lambda s, t, b: (s.float(), t.float(), b), "memory: float64 needs a float64 student_embed"),
])
def test_bad_inputs(case, match):
    s, t, bank = _inputs(5, 4, 6)
    with pytest.raises(ValueError, match=match):
        sk.memory_contrast_kd(*case(s.detach(), t, bank))


@pytest.mark.parametrize("name,value", [("tau", 0.0), ("tau", float("inf")), ("kd_tau", -1.0), ("kd_tau", True)])
def test_bad_temperatures(name, value):
    s, t, bank = _inputs(5, 4, 6)
    with pytest.raises(ValueError, match=f"{name}: expected a positive"):
        sk.memory_contrast_kd(s, t, bank, **{name: value})


# ---- the CIRKD distiller's memory terms --------------------------------------------------------------

def _cirkd(weights=None, options=None, k=4, c_s=6, c_t=8):
    from segkd_kernels.train.distill import build_distiller

    return build_distiller("cirkd", {"logits": k, "embed": c_s}, {"logits": k, "embed": c_t}, k,
                           weights=weights, options=options, backend="reference")


def _outputs(k=4, c_s=6, c_t=8, n=2, h=4, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = {"logits": torch.randn(n, k, h, w, generator=g, requires_grad=True),
               "embed": torch.randn(n, c_s, h, w, generator=g, requires_grad=True)}
    teacher = {"logits": torch.randn(n, k, h, w, generator=g), "embed": torch.randn(n, c_t, h, w, generator=g)}
    labels = torch.randint(0, k, (n, 4 * h, 4 * w), generator=g)
    labels[:, :3] = 255
    return student, teacher, labels


def test_cirkd_distiller_memory_terms_follow_cirkd():
    """Defaults as CIRKD's training script, per-class bank slots size // K + 1, pixels drawn from the
    class, and each term is its weight times StudentSegContrast's loss on the embed-point embeddings."""
    from segkd_kernels.compat.cirkd import StudentSegContrast

    d = _cirkd(options={"pixel_memory_size": 30, "region_memory_size": 5, "pixel_contrast_size": 9,
                        "region_contrast_size": 6}, weights={"memory_pixel": 0.3, "memory_region": 0.02})
    assert d.default_weights["memory_pixel"] == 0.1 and d.default_weights["memory_region"] == 0.1
    assert d.default_options["pixel_memory_size"] == 20000 and d.default_options["region_memory_size"] == 2000
    m = d.memory
    assert isinstance(m, StudentSegContrast) and m.class_pixels
    assert (m.pixel_contrast_size, m.region_contrast_size) == (9 // 4 + 1, 6 // 4 + 1)
    assert tuple(m.teacher_pixel_queue.shape) == (4, 30, 8) and tuple(m.teacher_segment_queue.shape) == (4, 5, 8)
    before = m.teacher_pixel_queue.clone()
    # a twin module in the same state, driven by the same draws, gives the unweighted losses
    twin = StudentSegContrast(4, 30, 5, 2, 3, 1.0, 0.1, 6, 8, 255, class_pixels=True, backend="reference")
    twin.load_state_dict(m.state_dict())
    twin.generator = torch.Generator().manual_seed(0)
    d.memory.generator = torch.Generator().manual_seed(0)
    student, teacher, labels = _outputs()
    out = d(student, teacher, labels)
    assert set(out) == {"cross_image", "kd", "memory_pixel", "memory_region"}
    pixel, region = twin(student["embed"], teacher["embed"], labels)
    assert_close(out["memory_pixel"], 0.3 * pixel)
    assert_close(out["memory_region"], 0.02 * region)
    assert not torch.equal(before, m.teacher_pixel_queue)  # the queue took this step's teacher pixels
    sum(out.values()).backward()
    assert student["embed"].grad is not None
    assert all(p.grad is not None for p in m.project_head.parameters())  # trained with the student


def test_cirkd_distiller_without_memory_terms():
    d = _cirkd(weights={"memory_pixel": 0.0, "memory_region": 0.0})
    assert d.memory is None
    assert set(d(*_outputs())) == {"cross_image", "kd"}


@pytest.mark.parametrize("name,value", [("pixel_memory_size", 0), ("region_contrast_size", 2.5),
                                        ("pixel_contrast_size", True)])
def test_cirkd_distiller_bad_memory_options(name, value):
    with pytest.raises(ValueError, match=f"distill.options.{name}: expected a positive integer"):
        _cirkd(options={name: value})


def test_lower_precision_teacher_and_bank_are_read_exactly():
    s, t, bank = _inputs(9, 6, 11, dtype=torch.float32, seed=19)
    t16, bank16 = t.bfloat16(), bank.bfloat16()
    for backend in BACKENDS:
        torch.testing.assert_close(sk.memory_contrast_kd(s, t16, bank16, backend=backend),
                                   sk.memory_contrast_kd(s, t16.float(), bank16.float(), backend=backend),
                                   rtol=0, atol=0)
        out = sk.memory_contrast_kd(s.detach().bfloat16(), t, bank, backend=backend)
        assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("where", ["student", "teacher", "memory"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_input_gives_a_nan_loss_on_every_backend(where, value):
    """No silent masking: one non-finite entry anywhere makes the loss NaN (its row's unit vector,
    or every row's logits against that bank entry, is NaN), as in the reference."""
    s, t, bank = _inputs(10, 4, 7, dtype=torch.float32, seed=21)
    target = {"student": s, "teacher": t, "memory": bank}[where]
    with torch.no_grad():
        target[2, 1] = value
    for backend in BACKENDS:
        assert torch.isnan(sk.memory_contrast_kd(s, t, bank, backend=backend)), backend


# ---- the CUDA kernels (csrc/memory_contrast_kd.cu): on a GPU, or on CPU through the host build ------

def _cuda_target():
    """A context in which backend="cuda" runs: the GPU, or the host execution layer on CPU tensors."""
    import contextlib

    from segkd_kernels._backends import host_execution, host_library

    if torch.cuda.is_available() and _AVAILABLE["cuda"]:
        return contextlib.nullcontext("cuda")
    lib, reason = host_library()
    if lib is None or not hasattr(lib, "memory_contrast_forward"):
        pytest.skip(f"no GPU and no host build with this op's kernels: {reason}")

    @contextlib.contextmanager
    def run():
        with host_execution(lib):
            lib.host_reset()
            lib.host_set_seed(1234)
            yield "cpu"
            lib.host_reset()

    return run()


def _on(device, *tensors):
    return [x.detach().to(device).requires_grad_(x.requires_grad) for x in tensors]


@pytest.mark.parametrize("shape", SHAPES + [(33, 64, 32), (40, 33, 100)])
def test_cuda_matches_the_reference_fp32(shape):
    with _cuda_target() as device:
        s, t, bank = _on(device, *_inputs(*shape, dtype=torch.float32, seed=23))
        for tau, kd_tau in ((0.1, 1.0), (0.3, 2.5)):
            loss = sk.memory_contrast_kd(s, t, bank, tau, kd_tau, backend="cuda")
            grad = torch.autograd.grad(-1.5 * loss, s)[0]
            ref = sk.memory_contrast_kd(s, t, bank, tau, kd_tau, backend="reference")
            ref_grad = torch.autograd.grad(-1.5 * ref, s)[0]
            assert loss.dtype == torch.float32 and grad.dtype == torch.float32
            assert_close(loss, ref, dtype=torch.float32)
            assert_close(grad, ref_grad, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_within_the_error_budget(dtype):
    with _cuda_target() as device:
        s, t, bank = _on(device, *_inputs(45, 24, 70, dtype=dtype, seed=25))
        truth = oracle(s, t, bank, 0.1, 1.0)
        truth_grad = torch.autograd.grad(truth, s)[0]
        loss = sk.memory_contrast_kd(s, t, bank, backend="cuda")
        grad = torch.autograd.grad(loss, s)[0]
        ref = sk.memory_contrast_kd(s, t, bank, backend="reference")
        ref_grad = torch.autograd.grad(ref, s)[0]
        assert loss.dtype == dtype and grad.dtype == dtype
        assert within_error_budget(loss, ref, truth)
        assert within_error_budget(grad, ref_grad, truth_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernels_read_half_operands_exactly(dtype):
    """The launchers' fp16 / bf16 instantiations: the same values as fp32 operands holding the same
    (rounded) numbers, since every product and sum is fp32."""
    from segkd_kernels.ops.memory_contrast_kd.cuda import memory_contrast_kd_cuda

    with _cuda_target() as device:
        s, t, bank = _on(device, *_inputs(37, 40, 50, dtype=torch.float32, seed=27))
        a = F.normalize(s.detach(), dim=1).to(dtype).requires_grad_(True)
        b, q = F.normalize(t, dim=1).to(dtype), bank.to(dtype)
        loss, _ = memory_contrast_kd_cuda(a, b, q, 0.1, 2.0)
        grad = torch.autograd.grad(loss, a)[0]
        a32 = a.detach().float().requires_grad_(True)
        loss32, _ = memory_contrast_kd_cuda(a32, b.float(), q.float(), 0.1, 2.0)
        grad32 = torch.autograd.grad(loss32, a32)[0]
        assert loss.dtype == dtype and grad.dtype == dtype
        # identical fp32 arithmetic; only the outputs are rounded to the half dtype
        assert loss == loss32.to(dtype)
        assert torch.equal(grad, grad32.to(dtype))


def test_cuda_refuses_fp64_and_tensors_it_cannot_reach():
    s, t, bank = _inputs(3, 2, 4)
    with pytest.raises(sk.BackendUnavailableError, match="memory_contrast_kd"):
        sk.memory_contrast_kd(s, t, bank, backend="cuda")


def test_cirkd_distiller_state_dict_carries_the_memory_draws():
    """A distiller loaded from another's state dict (a resumed run) continues with the same queues
    and the same random draws."""
    options = {"pixel_memory_size": 30, "region_memory_size": 5, "pixel_contrast_size": 9, "region_contrast_size": 6}
    a = _cirkd(options=options)
    a(*_outputs(seed=1))
    b = _cirkd(options={**options, "memory_seed": 7})  # a different stream until loaded
    b.load_state_dict(a.state_dict())
    out_a, out_b = a(*_outputs(seed=2)), b(*_outputs(seed=2))
    for term in ("memory_pixel", "memory_region"):
        assert torch.equal(out_a[term], out_b[term]), term
    assert torch.equal(a.memory.teacher_pixel_queue, b.memory.teacher_pixel_queue)
