"""Tests of sk.cross_image_kd (docs/losses.md 4): cross-image pixel-to-pixel similarity distillation.

The oracle here loops over ordered image pairs (i, j) and rows r and uses the textbook softmax
(exp / sum exp) in fp64; it shares no code with segkd_kernels/ops/cross_image_kd/reference.py (a
row-blocked streaming form) or the Triton kernel. A second oracle, the naive P x P form (CIRKD's
eager pair loop), checks larger maps where the row loop is too slow.

Without a GPU the Triton kernel runs under the interpreter (about a second per call at these sizes),
so its cases are a chosen subset; the reference runs every case.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import segkd_kernels as sk
from segkd_kernels._backends import host_execution, host_library
from segkd_kernels.ops.cross_image_kd import reference as reference_module
from segkd_kernels.ops.cross_image_kd.api import IMPLEMENTED
from segkd_kernels.testing import (TOLERANCES, assert_close, channels_last, make_tensor, non_contiguous,
                                   within_error_budget)
from feature_pair_checks import (BAD_SHAPES, check_bad_dtypes_and_types, check_bad_shape, check_different_devices,
                                 check_missing_backend, good_pair)
from feature_pair_checks import features as _features
from feature_pair_checks import value_and_grad as _value_and_grad

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_AVAILABLE = sk.available_backends()
# Every backend this op implements that can run here.
BACKENDS = [name for name in ("reference", "triton", "cuda") if name in IMPLEMENTED and _AVAILABLE[name]]

# (N, C_s, C_t, H, W): odd sizes, C_s != C_t, N = 1, 2, 3, a 1x1 map (P = 1).
SHAPES = [
    (1, 3, 5, 5, 7),
    (2, 1, 4, 3, 5),
    (3, 5, 3, 2, 3),
    (2, 4, 4, 1, 1),
    (3, 2, 6, 1, 5),
]
TAUS = [0.1, 0.5, 1.0]


def _skip_unsupported(backend, dtype):
    if dtype not in IMPLEMENTED[backend]:
        pytest.skip(f"{backend} backend of cross_image_kd does not take {dtype}")


def oracle_cross_image(s, t, tau):
    """docs/losses.md 4 term by term, in fp64: explicit loops over image pairs and rows."""
    s = s.double()
    t = t.detach().double()
    n, _, h, w = s.shape
    p = h * w

    def unit_columns(x):  # (C, H, W) -> (C, P), each pixel's feature vector divided by its norm
        f = x.reshape(x.shape[0], p)
        return f / torch.sqrt((f * f).sum(dim=0, keepdim=True)).clamp_min(1e-12)

    a = [unit_columns(s[i]) for i in range(n)]
    b = [unit_columns(t[i]) for i in range(n)]
    total = s.new_zeros(())
    for i in range(n):
        for j in range(n):
            kl_rows = s.new_zeros(())
            for r in range(p):
                s_row = (a[i][:, r : r + 1] * a[j]).sum(dim=0) / tau  # pixel r of image i vs all of j
                t_row = (b[i][:, r : r + 1] * b[j]).sum(dim=0) / tau
                p_s = torch.exp(s_row) / torch.exp(s_row).sum()
                p_t = torch.exp(t_row) / torch.exp(t_row).sum()
                kl_rows = kl_rows + (p_t * (torch.log(p_t) - torch.log(p_s))).sum()
            total = total + kl_rows / p
    return total / (n * n)


def naive_pxp(s, t, tau):
    """CIRKD's eager form: per ordered pair, both P x P similarity matrices, then the row-wise KL
    with torch's log_softmax and kl_div (batchmean over rows), averaged over pairs."""
    t = t.detach()
    n = s.shape[0]
    a = F.normalize(s.flatten(2), dim=1)
    b = F.normalize(t.flatten(2), dim=1)
    total = 0
    for i in range(n):
        for j in range(n):
            log_p_s = F.log_softmax(a[i].T @ a[j] / tau, dim=1)
            log_p_t = F.log_softmax(b[i].T @ b[j] / tau, dim=1)
            total = total + F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return total / (n * n)


# --------------------------------------------------------------------------------------------
# 4. against the loop oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_loop_oracle(shape, tau, dtype, backend):
    _skip_unsupported(backend, dtype)
    if backend == "triton" and DEVICE == "cpu" and tau != TAUS[SHAPES.index(shape) % len(TAUS)]:
        pytest.skip("interpreter: one tau per shape (every tau is covered across the shapes)")
    s, t = _features(*shape, dtype=dtype, seed=sum(shape))
    loss, grad = _value_and_grad(sk.cross_image_kd, s, t, tau, backend=backend)
    ref_loss, ref_grad = _value_and_grad(oracle_cross_image, s.double(), t.double(), tau)
    assert loss.dtype == dtype and loss.dim() == 0
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, dtype=dtype)
    if shape[1] == 1 and dtype == torch.float32:
        # One student channel: a = s / |s| = +-1, so the exact gradient is 0; in fp32 what is left is
        # the rounding of s / |s| (~eps) amplified by 1 / |s| and the 1 / tau logit scale.
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-4)
    else:
        assert_close(grad, ref_grad, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_student_channel_has_zero_gradient(backend):
    """With C_s = 1 every normalised student pixel is +1 or -1: the loss is locally constant."""
    s, t = _features(2, 1, 4, 3, 5, seed=6)
    loss, grad = _value_and_grad(sk.cross_image_kd, s, t, 0.1, backend=backend)
    assert loss.item() > 0.01
    assert grad.abs().max().item() < 1e-10


def test_default_tau_is_0_1():
    s, t = _features(2, 3, 4, 3, 5, seed=7)
    assert_close(sk.cross_image_kd(s, t), sk.cross_image_kd(s, t, 0.1))
    assert_close(sk.cross_image_kd(s, t), oracle_cross_image(s, t, 0.1))


def test_cross_pairs_count():
    """Guards the i != j terms: a batch is not the mean of its images taken one at a time."""
    s, t = _features(3, 3, 4, 3, 5, seed=8)
    singles = sum(sk.cross_image_kd(s[i : i + 1], t[i : i + 1], 0.5) for i in range(3)) / 3
    assert abs(sk.cross_image_kd(s, t, 0.5).item() - singles.item()) > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_teacher_pixels(backend):
    """A teacher pixel with all-zero features normalises to 0 (max(||t||, eps)), not NaN."""
    s, t = _features(2, 3, 4, 3, 5, seed=9)
    t = t.clone()
    t[0, :, 1, 2] = 0
    t[1, :, 2, :] = 0
    loss, grad = _value_and_grad(sk.cross_image_kd, s, t, 0.5, backend=backend)
    ref_loss, ref_grad = _value_and_grad(oracle_cross_image, s, t, 0.5)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_student_equals_teacher_is_zero(dtype, backend):
    t = make_tensor((2, 5, 4, 6), dtype=dtype, seed=10, device=DEVICE)
    s = t.clone().requires_grad_(True)
    loss = sk.cross_image_kd(s, t, 0.1, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    # identical inputs give identical S and T tiles: zero up to the rounding of the log-sum-exps
    bound = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(loss.item()) < bound
    assert grad.abs().max().item() < 100 * bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharp_softmax_fp32(backend):
    """Small tau with near-parallel pixels: logits up to 1/tau = 100, so a naive exp overflows in
    fp32; the result must stay finite and match the fp64 oracle."""
    s, t = _features(2, 3, 4, 3, 5, dtype=torch.float32, seed=11)
    with torch.no_grad():
        s[:, 0] += 5.0  # most pixels point nearly the same way: similarities close to 1
    tau = 0.01
    loss, grad = _value_and_grad(sk.cross_image_kd, s, t, tau, backend=backend)
    ref_loss, ref_grad = _value_and_grad(oracle_cross_image, s.double(), t.double(), tau)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-5)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-4 * scale)


# --------------------------------------------------------------------------------------------
# 5. gradcheck (fp64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, tau, fast_mode", [(1, 1.0, False), (2, 0.1, False), (3, 0.5, True)])
def test_gradcheck(n, tau, fast_mode):
    s = make_tensor((n, 3, 2, 3), dtype=torch.float64, seed=21, requires_grad=True)
    t = make_tensor((n, 2, 2, 3), dtype=torch.float64, seed=22)
    assert torch.autograd.gradcheck(lambda x: sk.cross_image_kd(x, t, tau, backend="reference"), (s,),
                                    fast_mode=fast_mode)


def test_gradcheck_reference_row_blocks(monkeypatch):
    """Several row blocks per image (the last one short): the blocked backward still sums both the
    row and the partner sides of every block."""
    monkeypatch.setattr(reference_module, "ROW_BLOCK_ELEMENTS", 2 * 2 * 5)  # blocks of 2 rows (N = 2, P = 5)
    assert reference_module._row_block(2, 5) == 2
    s = make_tensor((2, 2, 1, 5), dtype=torch.float64, seed=23, requires_grad=True)
    t = make_tensor((2, 3, 1, 5), dtype=torch.float64, seed=24)
    assert torch.autograd.gradcheck(lambda x: sk.cross_image_kd(x, t, 0.3, backend="reference"), (s,))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
def test_gradcheck_triton_fp64():
    s = make_tensor((2, 3, 2, 3), dtype=torch.float64, seed=25, requires_grad=True, device=DEVICE)
    t = make_tensor((2, 2, 2, 3), dtype=torch.float64, seed=26, device=DEVICE)
    assert torch.autograd.gradcheck(lambda x: sk.cross_image_kd(x, t, 0.2, backend="triton"), (s,), fast_mode=True)


# --------------------------------------------------------------------------------------------
# 6. teacher, layouts, grad_output, dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    s = make_tensor((2, 3, 3, 5), device=DEVICE, seed=31, requires_grad=True)
    t = make_tensor((2, 4, 3, 5), device=DEVICE, seed=32, requires_grad=True)
    sk.cross_image_kd(s, t, 0.5, backend=backend).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None or not t.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["non_contiguous", "channels_last", "both_channels_last", "mixed"])
def test_layouts(layout, backend):
    s, t = _features(3, 3, 5, 5, 7, dtype=torch.float32, seed=33)
    loss, grad = _value_and_grad(sk.cross_image_kd, s, t, 0.2, backend=backend)
    if layout == "non_contiguous":
        s2, t2 = non_contiguous(s), non_contiguous(t)
    elif layout == "channels_last":
        s2, t2 = channels_last(s), t
    elif layout == "both_channels_last":
        s2, t2 = channels_last(s), channels_last(t)
    else:
        s2, t2 = non_contiguous(s), channels_last(t)
    loss2 = sk.cross_image_kd(s2, t2, 0.2, backend=backend)
    (grad2,) = torch.autograd.grad(loss2, s2)
    assert grad2.shape == s.shape
    assert_close(loss2, loss)
    assert_close(grad2, grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_output_is_honoured(dtype, backend):
    _skip_unsupported(backend, dtype)
    s, t = _features(2, 3, 4, 3, 5, dtype=dtype, seed=34)
    loss, grad = _value_and_grad(sk.cross_image_kd, s, t, 0.3, backend=backend)
    s2 = s.detach().clone().requires_grad_(True)
    (2.5 * sk.cross_image_kd(s2, t, 0.3, backend=backend)).backward()
    assert_close(s2.grad, 2.5 * grad)
    s3 = s.detach().clone().requires_grad_(True)
    loss3 = sk.cross_image_kd(s3, t, 0.3, backend=backend)
    (grad3,) = torch.autograd.grad(loss3, s3, grad_outputs=torch.tensor(-0.75, dtype=dtype, device=DEVICE))
    assert_close(grad3, -0.75 * grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_output_dtype(dtype, backend):
    _skip_unsupported(backend, dtype)
    s, t = _features(2, 3, 4, 3, 5, dtype=dtype, seed=35)
    loss = sk.cross_image_kd(s, t, 0.5, backend=backend)
    loss.backward()
    assert loss.dtype == dtype and loss.shape == ()
    assert s.grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_half_precision_is_fp32_math_rounded(dtype, tau, backend):
    """fp16/bf16 inputs: the value (and gradient) of the fp32 computation on the upcast inputs,
    rounded once to the input dtype (with tau = 0.1 the logits reach 10: fp16 exp would overflow
    in a kernel that did the math in fp16). On a GPU the Triton kernel feeds the tensor cores
    fp16/bf16 operands (exp and sums stay fp32): test_cuda_half_error_budget covers it there."""
    _skip_unsupported(backend, dtype)
    if backend == "triton" and DEVICE == "cuda":
        pytest.skip("tensor-core operands: checked against the error budget instead")
    s, t = _features(2, 3, 5, 5, 7, dtype=dtype, seed=36)
    loss, grad = _value_and_grad(sk.cross_image_kd, s, t, tau, backend=backend)
    ref_loss, ref_grad = _value_and_grad(sk.cross_image_kd, s.float(), t.float(), tau, backend="reference")
    assert loss.dtype == dtype and grad.dtype == dtype
    ulp = torch.finfo(dtype).eps  # one unit in the last place, relative
    assert abs(loss.item() - ref_loss.item()) <= ulp * abs(ref_loss.item())
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.float(), ref_grad, rtol=ulp, atol=1e-3 * scale)


# --------------------------------------------------------------------------------------------
# 7. torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.1, 0.7])
def test_torch_compile(tau, backend):
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: sk.cross_image_kd(x, y, tau, backend=backend), fullgraph=True,
                             backend="aot_eager")
    s, t = _features(2, 3, 4, 3, 5, dtype=torch.float32, seed=41)
    loss, grad = _value_and_grad(compiled, s, t)
    ref_loss, ref_grad = _value_and_grad(sk.cross_image_kd, s, t, tau, backend=backend)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


# --------------------------------------------------------------------------------------------
# 8, 9. errors
# --------------------------------------------------------------------------------------------


def _good():
    return good_pair(51)


@pytest.mark.parametrize("student_shape, teacher_shape, name", BAD_SHAPES)
def test_bad_shapes(student_shape, teacher_shape, name):
    check_bad_shape(sk.cross_image_kd, student_shape, teacher_shape, name)


def test_bad_dtypes_and_types():
    check_bad_dtypes_and_types(sk.cross_image_kd, *_good())


def test_different_devices():
    check_different_devices(sk.cross_image_kd, *_good())


@pytest.mark.parametrize("tau", [0, 0.0, -0.5, -1, float("nan"), True, "0.1", None])
def test_bad_tau(tau):
    s, t = _good()
    with pytest.raises(ValueError, match="tau"):
        sk.cross_image_kd(s, t, tau)


def test_bad_backend_name():
    s, t = _good()
    with pytest.raises(ValueError, match="backend"):
        sk.cross_image_kd(s, t, backend="fastest")


# ids avoid the bare keyword "cuda", which conftest.py reads as the "needs a CUDA device" marker
@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=["named-triton", "named-cuda"])
def test_missing_backend_raises(backend):
    check_missing_backend(sk.cross_image_kd, "cross_image_kd", IMPLEMENTED, backend, *_good())


def test_auto_and_reference_agree():
    s, t = _good()
    assert_close(sk.cross_image_kd(s, t), sk.cross_image_kd(s, t, backend="reference"))


# --------------------------------------------------------------------------------------------
# 10. larger maps against the naive P x P form: tiles, row blocks, wide channels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape, tau",
    [
        ((2, 70, 20, 9, 13), 0.1),  # P = 117: two 64-pixel tiles, the second partly masked; C_s > one K block
        ((1, 4, 7, 11, 12), 0.5),  # N = 1, P = 132
        ((1, 2048, 3, 2, 3), 0.1),  # the widest channel count the op promises
        ((2, 1, 16, 5, 13), 1.0),  # one student channel
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_matches_naive_pxp(shape, tau, backend):
    s, t = _features(*shape, dtype=torch.float32, seed=sum(shape))
    loss, grad = _value_and_grad(sk.cross_image_kd, s, t, tau, backend=backend)
    ref_loss, ref_grad = _value_and_grad(naive_pxp, s.double(), t.double(), tau)
    assert_close(loss, ref_loss, dtype=torch.float32)
    scale = ref_grad.abs().max().item()
    # fp32 logits carry ~eps / tau absolute error; a relative bound on the largest entry absorbs it
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-4, atol=max(1e-5 * scale, 1e-6))


def test_reference_row_blocks_match_one_block(monkeypatch):
    """The streaming reference gives the same value and gradient however the rows are blocked."""
    s, t = _features(3, 5, 6, 7, 9, dtype=torch.float64, seed=61)
    whole = _value_and_grad(sk.cross_image_kd, s, t, 0.2, backend="reference")
    monkeypatch.setattr(reference_module, "ROW_BLOCK_ELEMENTS", 3 * 63 * 10)  # blocks of 10 rows of 63
    assert reference_module._row_block(3, 63) == 10
    blocked = _value_and_grad(sk.cross_image_kd, s, t, 0.2, backend="reference")
    assert_close(blocked[0], whole[0])
    assert_close(blocked[1], whole[1])
    ref = _value_and_grad(naive_pxp, s, t, 0.2)
    assert_close(blocked[0], ref[0])
    assert_close(blocked[1], ref[1])


# --------------------------------------------------------------------------------------------
# 11. custom ops
# --------------------------------------------------------------------------------------------


def test_opcheck_reference_ops():
    s, t = _features(2, 3, 4, 3, 5, seed=71)
    a = reference_module.unit_pixels(s.detach()).requires_grad_(True)
    b = reference_module.unit_pixels(t)
    torch.library.opcheck(reference_module.cross_image_kl, (a, b, 0.3))
    grad = torch.tensor(1.5, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(reference_module.cross_image_kl_backward, (grad, a.detach(), b, 0.3))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_triton_ops(dtype):
    from segkd_kernels.ops.cross_image_kd.triton import cross_image_kd_backward_triton, cross_image_kd_triton

    s, t = _features(2, 3, 4, 3, 5, dtype=dtype, seed=72)
    a = reference_module.unit_pixels(s.detach()).transpose(1, 2).contiguous().requires_grad_(True)
    b = reference_module.unit_pixels(t).transpose(1, 2).contiguous()
    torch.library.opcheck(cross_image_kd_triton, (a, b, 0.3))
    _, lse_s, lse_t = cross_image_kd_triton(a.detach(), b, 0.3)
    grad = torch.tensor(-0.5, dtype=dtype, device=DEVICE)
    torch.library.opcheck(cross_image_kd_backward_triton, (grad, a.detach(), b, lse_s, lse_t, 0.3))


# --------------------------------------------------------------------------------------------
# 12. memory: full resolution on CPU without a P x P matrix
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
    s = torch.randn(2, 16, 64, 128, generator=gen).requires_grad_(True)
    t = torch.randn(2, 32, 64, 128, generator=gen)
    base = peak_mib()
    start = time.perf_counter()
    loss = sk.cross_image_kd(s, t, 0.1)
    loss.backward()
    seconds = time.perf_counter() - start
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    print(f"{base:.1f} {peak_mib():.1f} {seconds:.3f} {loss.item():.8e}")
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_full_resolution_memory():
    """P = 64 * 128 = 8192, N = 2 (auto on CPU: the streaming reference): the naive form holds
    2 x 268 MB of logits per pair and keeps all four pairs' softmaxes for the backward (> 4 GB)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEGKD_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a GPU machine
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    base, peak, seconds, loss = map(float, proc.stdout.split())
    assert peak - base < 400, f"forward+backward raised max RSS by {peak - base:.0f} MiB"
    assert peak < 1024, f"child max RSS {peak:.0f} MiB"
    assert seconds < 120, f"forward+backward took {seconds:.1f} s"
    assert 0 < loss < 100


# --------------------------------------------------------------------------------------------
# 13. GPU only: the Triton kernel in fp16 / bf16 and at benchmark sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_cuda_half_error_budget(dtype, tau):
    """err(triton in dtype) <= 2 err(reference in dtype) + atol, both against fp64, value and gradient."""
    s, t = _features(2, 128, 256, 24, 40, dtype=torch.float64, seed=81)  # P = 960
    s, t = s.detach().to("cuda"), t.to("cuda")
    ref64 = _value_and_grad(sk.cross_image_kd, s, t, tau, backend="reference")
    ref_half = _value_and_grad(sk.cross_image_kd, s.to(dtype), t.to(dtype), tau, backend="reference")
    out = _value_and_grad(sk.cross_image_kd, s.to(dtype), t.to(dtype), tau, backend="triton")
    assert out[0].dtype == dtype and out[1].dtype == dtype
    scale = ref64[1].abs().max().item()
    assert within_error_budget(out[0], ref_half[0], ref64[0], atol=1e-4 * abs(ref64[0].item()))
    assert within_error_budget(out[1], ref_half[1], ref64[1], atol=1e-3 * scale)


@pytest.mark.cuda
def test_cuda_benchmark_shape_fp32():
    """The issue's benchmark shape (P = 64 x 128, C_s 128 / C_t 256), N = 2 to keep the fp64
    reference affordable: the kernel against the streaming reference, and memory O(N P)."""
    s, t = _features(2, 128, 256, 64, 128, dtype=torch.float32, seed=82)
    s, t = s.detach().to("cuda"), t.to("cuda")
    ref = _value_and_grad(sk.cross_image_kd, s.double(), t.double(), 0.1, backend="reference")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = _value_and_grad(sk.cross_image_kd, s, t, 0.1, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # O(N P C): unit features and their pixel-major copies, gradients (~100 MiB here); one P x P
    # fp32 matrix alone would be 256 MiB, and the eager form keeps several per pair
    assert extra < 192 * 2**20, f"{extra / 2**20:.0f} MiB beyond the inputs"
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out[0].double(), ref[0], rtol=10 * rtol, atol=atol)
    scale = ref[1].abs().max().item()
    torch.testing.assert_close(out[1].double(), ref[1], rtol=1e-3, atol=1e-4 * scale)


# --------------------------------------------------------------------------------------------
# 14. The CUDA tensor-core kernels on CPU (host execution layer, csrc/host/)
# --------------------------------------------------------------------------------------------

HOST, HOST_REASON = host_library()


@pytest.mark.skipif(HOST is None, reason=str(HOST_REASON))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [
        # P = 96 (a multiple of 8: 16-byte cp.async copies), two 64-row tiles (the second half
        # masked), three 32-pixel column tiles (double buffers swap twice), C_s = 20 padded to 32
        (2, 20, 24, 8, 12),
        # P = 35: element-wise staging, a column tile with 3 valid pixels; C_t = 40 (three MMA K steps)
        (3, 5, 40, 5, 7),
        # C_s + C_t = 450: 13 + 16 channel blocks, past the 24 A fragments the forward holds in
        # registers (the teacher's last blocks come from shared memory)
        (1, 200, 250, 2, 8),
    ],
    ids=lambda v: "x".join(map(str, v)),
)
def test_cuda_tensor_core_kernels_on_host(shape, dtype):
    """The fp16/bf16 tensor-core kernels (resident row tiles, cp.async column tiles, one-pass
    backward) against the fp64 reference within the dtype's error budget, and the plan they take
    (64-row tiles: half the blocks of the 32-row kernels, forward and backward)."""
    n, c_s, c_t, h, w = shape
    p = h * w
    s64, t64 = _features(*shape, dtype=torch.float64, seed=sum(shape))
    s = s64.detach().to(dtype).requires_grad_(True)
    t = t64.to(dtype)
    with host_execution():
        HOST.host_reset()
        HOST.host_set_seed(1234)
        before = HOST.host_stats()["blocks"]
        out = _value_and_grad(sk.cross_image_kd, s, t, 0.5, backend="cuda")
        blocks_tc = HOST.host_stats()["blocks"] - before
        HOST.host_set_attribute("max_shared_memory_per_block_optin", 1024)  # the 32-row kernels
        before = HOST.host_stats()["blocks"]
        _value_and_grad(sk.cross_image_kd, s, t, 0.5, backend="cuda")
        blocks_small = HOST.host_stats()["blocks"] - before
        HOST.host_reset()
    tiles = lambda rows: -(-p // rows)  # noqa: E731
    assert blocks_small - blocks_tc == 2 * n * n * (tiles(32) - tiles(64))
    ref_half = _value_and_grad(sk.cross_image_kd, s.detach().requires_grad_(True), t, 0.5, backend="reference")
    truth = _value_and_grad(sk.cross_image_kd, s.detach().double().requires_grad_(True), t.double(), 0.5,
                            backend="reference")
    scale = truth[1].abs().max().item()
    assert within_error_budget(out[0], ref_half[0], truth[0], atol=1e-4 * abs(truth[0].item()))
    assert within_error_budget(out[1], ref_half[1], truth[1], atol=1e-4 * scale)


def _f32_bytes(c_s, c_t, backward, stages):
    """Dynamic shared memory of the fp32 tensor-core kernels (csrc/cross_image_kd.cu, F32Layout):
    resident 32-row tiles, `stages` 16-pixel column buffers, the S / T halves, in the backward
    the two dS tiles and the column gradient; every region 128-byte aligned."""
    up = lambda v, m: -(-v // m) * m  # noqa: E731
    cs16, ct16 = up(c_s, 16), up(c_t, 16)
    total = up((cs16 + ct16) * 36 * 4, 128) + stages * up((cs16 + ct16) * 20 * 4, 128) + up(2 * 2 * 32 * 20 * 4, 128)
    if backward:
        total += 2 * up(32 * 20 * 4, 128) + up(cs16 * 20 * 4, 128)
    return total


@pytest.mark.skipif(HOST is None, reason=str(HOST_REASON))
@pytest.mark.parametrize(
    "shape",
    [
        # P = 96: 16-byte cp.async copies, three 32-row tiles, six 16-pixel column tiles
        (2, 20, 24, 8, 12),
        # P = 35: element-wise staging, partial row and column tiles; C_s + C_t padded 16 + 48
        (3, 5, 40, 5, 7),
    ],
    ids=lambda v: "x".join(map(str, v)),
)
def test_cuda_fp32_tensor_core_kernels_on_host(shape):
    """The fp32 tensor-core kernels (3xTF32 on tf32 wmma) with two column buffers, with one (the
    backward, then the forward, where the opt-in shared memory holds no more) and the 32 x 32 FMA
    kernels below that: every plan within the fp32 error budget of the fp64 truth. The budget is
    tight enough to tell 3xTF32 from plain tf32 (a 2^-11 relative error per operand: the planted
    1xTF32 mutation in test_cuda_host_mutations.py fails the fp32 suite)."""
    n, c_s, c_t, h, w = shape
    p = h * w
    s = make_tensor((n, c_s, h, w), dtype=torch.float32, device="cpu", seed=sum(shape), scale=1.5)
    t = make_tensor((n, c_t, h, w), dtype=torch.float32, device="cpu", seed=7)
    truth = _value_and_grad(sk.cross_image_kd, s.double(), t.double(), 0.5, backend="reference")
    ref32 = _value_and_grad(sk.cross_image_kd, s, t, 0.5, backend="reference")
    scale = truth[1].abs().max().item()
    fwd2, bwd2 = _f32_bytes(c_s, c_t, False, 2), _f32_bytes(c_s, c_t, True, 2)
    bwd1, fwd1 = _f32_bytes(c_s, c_t, True, 1), _f32_bytes(c_s, c_t, False, 1)
    assert fwd1 < fwd2 < bwd1 < bwd2
    tiles32 = n * n * -(-p // 32)
    # opt-in -> (forward on tensor cores, backward on tensor cores); 1024: the FMA kernels
    plans = {bwd2: (True, True), bwd1: (True, True), fwd2: (True, False), fwd1: (True, False), 1024: (False, False)}
    threads = {}
    with host_execution():
        for optin, (tc_fwd, tc_bwd) in plans.items():
            HOST.host_reset()
            HOST.host_set_seed(optin)
            HOST.host_set_attribute("max_shared_memory_per_block_optin", optin)
            before = HOST.host_stats()["threads"]
            out = _value_and_grad(sk.cross_image_kd, s, t, 0.5, backend="cuda")
            threads[optin] = HOST.host_stats()["threads"] - before
            assert within_error_budget(out[0], ref32[0], truth[0], atol=1e-6 * abs(truth[0].item())), optin
            assert within_error_budget(out[1], ref32[1], truth[1], atol=2e-6 * scale), optin
        HOST.host_reset()
    # the tensor-core kernels run 128 threads per 32-row block, the FMA ones 256 (the atomic
    # backward at 1024, the two owned-pixel kernels at fwd1 / fwd2)
    assert threads[1024] - threads[bwd2] == 2 * tiles32 * 128
    assert threads[bwd2] == threads[bwd1]
    assert threads[fwd2] - threads[bwd2] == 2 * tiles32 * 256 - tiles32 * 128
    assert threads[fwd1] == threads[fwd2]
