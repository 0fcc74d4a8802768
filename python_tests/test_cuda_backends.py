"""The hand-written CUDA backend (csrc/ -> segkd_kernels._cuda) of every op.

Without a GPU: the library is built where nvcc exists, every launcher of csrc/launchers.h is bound,
host-side argument checks raise ValueError before touching a device, empty launches are no-ops,
a launch without a device raises (never crashes), every cuda custom op refuses CPU tensors with a
clear error, the public functions report backend="cuda" as unavailable on CPU tensors, the fake
implementations give the right shapes, and the AttnFD gradient coefficients match autograd.
With a GPU (@pytest.mark.cuda): values and gradients against the reference on odd shapes, fp32
tolerances and the fp16/bf16 error budget, grad_output != 1, channels_last / non-contiguous
inputs, opcheck of every custom op, torch.compile(fullgraph=True), a non-default stream.
Those GPU tests take a `target` device; test_cuda_host.py runs them again on CPU tensors through the
host execution layer (the same kernels compiled by g++), so CI runs them without a GPU.
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import segkd_kernels as sk
from segkd_kernels._backends import BackendUnavailableError, cuda_library
from segkd_kernels.ops.attnfd_loss import reference as attnfd_reference
from segkd_kernels.ops.attnfd_loss.cuda import (attnfd_loss_backward_cuda, attnfd_loss_cuda,
                                                 gradient_coefficients)
from segkd_kernels.ops.cbam_gate.cuda import cbam_gate_backward_cuda, cbam_gate_cuda
from segkd_kernels.ops.channel_pool.cuda import channel_pool_backward_cuda, channel_pool_cuda
from segkd_kernels.ops.channel_wise_kd.cuda import channel_wise_kd_cuda
from segkd_kernels.ops.cross_image_kd.cuda import cross_image_kd_backward_cuda, cross_image_kd_cuda
from segkd_kernels.ops.pairwise_kd.cuda import pairwise_kd_backward_cuda, pairwise_kd_cuda
from segkd_kernels.ops.pixel_kd.cuda import knowledge_gap_cuda, pfs_pixel_kd_cuda, pixel_kd_cuda
from segkd_kernels.ops.ssim_kd import reference as ssim_reference
from segkd_kernels.ops.ssim_kd.cuda import ssim_kd_backward_cuda, ssim_kd_cuda
from segkd_kernels.testing import assert_close, channels_last, make_tensor, non_contiguous, within_error_budget

HAS_CUDA = torch.cuda.is_available()
LIB, LIB_REASON = cuda_library()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"segkd_kernels._cuda not built: {LIB_REASON}")
LAUNCHERS_H = Path(__file__).resolve().parents[1] / "csrc" / "launchers.h"
OP_MODULES = ["attnfd_loss", "cbam_gate", "channel_pool", "channel_wise_kd", "cross_image_kd", "pairwise_kd",
              "pixel_kd", "ssim_kd", "spatial_pool"]


# ---------------------------------------------------------------------------------------------
# Without a GPU
# ---------------------------------------------------------------------------------------------

def test_library_is_built_where_nvcc_exists():
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("no nvcc/cmake here: the library is legitimately absent")
    if LIB is None and "SEGKD_CUDA=0" in LIB_REASON:
        pytest.skip("installed with SEGKD_CUDA=0")
    assert LIB is not None, LIB_REASON


def test_host_module_is_built_where_cmake_and_a_compiler_exist():
    # the host execution build is what runs the kernels in CI: it must not go missing silently
    from segkd_kernels._backends import host_library

    lib, reason = host_library()
    if shutil.which("cmake") is None or shutil.which("g++") is None:
        pytest.skip("no cmake/g++ here: the host build is legitimately absent")
    if "SEGKD_CUDA_HOST=0" in reason:
        pytest.skip("installed with SEGKD_CUDA_HOST=0")
    assert lib is not None, reason
    declared = set(re.findall(r"^(?:void|int64_t) (\w+)\(", LAUNCHERS_H.read_text(), flags=re.M))
    assert lib.HOST_EXECUTION and not sorted(n for n in declared if not hasattr(lib, n))


@needs_lib
def test_every_launcher_is_bound():
    declared = set(re.findall(r"^(?:void|int64_t) (\w+)\(", LAUNCHERS_H.read_text(), flags=re.M))
    assert len(declared) >= 20, declared  # the regex still finds the declarations
    missing = sorted(name for name in declared if not hasattr(LIB, name))
    assert not missing, f"declared in launchers.h but not bound in bindings.cpp: {missing}"


def _host_check_cases():
    # Argument checks run before any CUDA call, so they raise ValueError on any machine.
    f32 = 0
    return {
        "cwd plane 0": lambda: LIB.channel_wise_kd_forward(*[0] * 6, 1, 0, 1.0, 1.0, 0, f32, 0, 0),
        "cwd tau 0": lambda: LIB.channel_wise_kd_forward(*[0] * 6, 1, 4, 0.0, 1.0, 0, f32, 0, 0),
        "pixel no classes": lambda: LIB.pixel_kd_forward(0, 0, 0, 0, False, 0, 0, 0, 0, 0, 1, 0, 4, 1.0, f32, 0, 0),
        "pixel grad without coef": lambda: LIB.pixel_kd_forward(0, 0, 0, 0, False, 0, 0, 0, 8, 0, 1, 3, 4, 1.0, f32, 0, 0),
        "ssim even window": lambda: LIB.ssim_forward(*[0] * 8, 1, 16, 16, 4, 1.5, 1.0, 0, f32, 0, 0),
        "ssim window 17": lambda: LIB.ssim_forward(*[0] * 8, 1, 32, 32, 17, 1.5, 1.0, 0, f32, 0, 0),
        "ssim sigma 0": lambda: LIB.ssim_forward(*[0] * 8, 1, 16, 16, 5, 0.0, 1.0, 0, f32, 0, 0),
        "ssim padding 3": lambda: LIB.ssim_forward(*[0] * 8, 1, 16, 16, 5, 1.5, 1.0, 3, f32, 0, 0),
        "ssim valid too small": lambda: LIB.ssim_forward(*[0] * 8, 1, 4, 16, 5, 1.5, 1.0, 2, f32, 0, 0),
        "ssim reflect too small": lambda: LIB.ssim_forward(*[0] * 8, 1, 2, 16, 5, 1.5, 1.0, 0, f32, 0, 0),
        "ssim data_range 0": lambda: LIB.ssim_forward(*[0] * 8, 1, 16, 16, 5, 1.5, 0.0, 0, f32, 0, 0),
        "attnfd partials": lambda: LIB.attnfd_dots(0, 0, 0, 100, 7, f32, 0, 0),
        "attnfd finish negative partials": lambda: LIB.attnfd_finish(0, -1, 0, 0, 1, 1e-12, f32, 0, 0),
        "attnfd finish batch 0": lambda: LIB.attnfd_finish(0, 0, 0, 0, 0, 1e-12, f32, 0, 0),
        "attnfd backward batch 0": lambda: LIB.attnfd_backward_dots(*[0] * 5, 8, 0, 1e-12, f32, 0, 0),
        "channel_pool dgate without gate": lambda: LIB.channel_pool_backward(*[0] * 5, 8, 0, 0, 1, 2, 3, f32, 0, 0),
        "channel_pool no channels": lambda: LIB.channel_pool_forward(0, 0, 0, 0, 1, 0, 4, f32, 0, 0),
        "cross_image tau 0": lambda: LIB.cross_image_forward(*[0] * 6, 2, 3, 3, 5, 0.0, f32, 0, 0),
    }


@needs_lib
@pytest.mark.parametrize("case", list(_host_check_cases()))
def test_launcher_argument_checks_raise_value_error(case):
    with pytest.raises(ValueError):
        _host_check_cases()[case]()


@needs_lib
def test_empty_launches_touch_no_device():
    f32 = 0
    # Null pointers everywhere: any kernel launch or device query would fail without a GPU.
    LIB.channel_wise_kd_forward(*[0] * 6, 0, 5, 1.0, 1.0, 0, f32, 0, 0)
    LIB.pixel_kd_forward(0, 0, 0, 0, False, 0, 0, 0, 0, 0, 0, 3, 5, 1.0, f32, 0, 0)
    LIB.channel_pool_forward(0, 0, 0, 0, 0, 3, 5, f32, 0, 0)
    LIB.channel_pool_backward(0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 5, f32, 0, 0)
    LIB.attnfd_dots(0, 0, 0, 0, 0, f32, 0, 0)
    LIB.attnfd_backward_dots(*[0] * 5, 0, 1, 1e-12, f32, 0, 0)
    LIB.cbam_gate_forward(0, 0, 0, 0, 0, 3, 5, f32, 0, 0)
    LIB.ssim_forward(*[0] * 8, 0, 16, 16, 5, 1.5, 1.0, 0, f32, 0, 0)
    LIB.normalize_pixels(0, 0, 0, 0, 3, 5, 1e-12, f32, 0, 0)
    LIB.pixel_inv_norm(0, 0, 0, 0, 3, 5, 1e-12, f32, 0, 0)
    LIB.pairwise_gram(0, 0, 0, 0, 0, 0, 3, 3, 5, 1, False, f32, 0, 0)
    LIB.pairwise_grad_mma(*[0] * 8, 0, 3, 3, 5, 1.0, 2, 0, 0)
    LIB.cross_image_forward(*[0] * 6, 0, 3, 3, 5, 0.1, f32, 0, 0)
    assert LIB.ssim_num_partials(0, 16, 16, 5, 0) == 0


@needs_lib
def test_partial_counts():
    # ssim: blocks of 128 output columns by strips of rows (16 rows below 64 output rows, else 64);
    # valid padding shrinks the map by window - 1
    assert LIB.ssim_num_partials(6, 33, 40, 11, 0) == 6 * 1 * 3
    assert LIB.ssim_num_partials(6, 33, 40, 11, 2) == 6 * 1 * 2
    assert LIB.ssim_num_partials(2, 70, 300, 11, 0) == 2 * 3 * 2
    assert LIB.ssim_num_partials(2, 70, 300, 11, 2) == 2 * 3 * 4
    assert 1 <= LIB.attnfd_num_partials(10) <= LIB.attnfd_num_partials(10**9) <= 4096


@needs_lib
@pytest.mark.skipif(HAS_CUDA, reason="checks the no-device error path")
def test_launch_without_a_device_raises_runtime_error():
    with pytest.raises(RuntimeError, match="cuda"):
        LIB.attnfd_backward_dots(*[0] * 5, 1, 1, 1e-12, 0, 0, 0)


def _cpu_op_calls():
    x = torch.randn(2, 3, 5, 7)
    gate = torch.rand(2, 3)
    return {
        "channel_wise_kd": lambda: channel_wise_kd_cuda(x, x, 2.0, True),
        "pixel_kd": lambda: pixel_kd_cuda(x, x, 1.0, None, None, True),
        "pfs_pixel_kd": lambda: pfs_pixel_kd_cuda(x, x, 1.0, None, True),
        "knowledge_gap": lambda: knowledge_gap_cuda(x, x, 1.0),
        "channel_pool": lambda: channel_pool_cuda(x, gate),
        "channel_pool_backward": lambda: channel_pool_backward_cuda(
            torch.randn(2, 2, 5, 7), torch.zeros(2, 5, 7, dtype=torch.int32), x, gate),
        "cbam_gate": lambda: cbam_gate_cuda(x, gate, torch.rand(2, 5, 7)),
        "cbam_gate_backward": lambda: cbam_gate_backward_cuda(x, x, gate, torch.rand(2, 5, 7)),
        "attnfd_loss": lambda: attnfd_loss_cuda(x, x),
        "attnfd_loss_backward": lambda: attnfd_loss_backward_cuda(x, x, torch.ones(3, dtype=torch.float64),
                                                                  torch.ones(())),
        "ssim_kd": lambda: ssim_kd_cuda(x, x, 3, 1.5, 1.0, "reflect", True, True),
        "ssim_kd_backward": lambda: ssim_kd_backward_cuda(torch.ones(()), torch.zeros(3, 6, 5, 7), x, x,
                                                          torch.zeros(0), 3, 1.5, "reflect"),
        "pairwise_kd": lambda: pairwise_kd_cuda(x, x, False),
        "pairwise_kd_backward": lambda: pairwise_kd_backward_cuda(
            torch.ones(()), x, x, torch.zeros(2, 3, 3, dtype=torch.float64), torch.zeros(2, 3, 3, dtype=torch.float64),
            False),
        "cross_image_kd": lambda: cross_image_kd_cuda(x, x, 0.1),
        "cross_image_kd_backward": lambda: cross_image_kd_backward_cuda(torch.ones(()), x, x,
                                                                        torch.zeros(2, 2, 2, 35), 0.1),
    }


@pytest.mark.skipif(HAS_CUDA, reason="CPU-tensor error path")
@pytest.mark.parametrize("op", list(_cpu_op_calls()))
def test_cuda_ops_refuse_cpu_tensors(op):
    # Built: "needs CUDA tensors"; not built: "CUDA library not built". Never a crash or a result.
    with pytest.raises(RuntimeError, match="(needs CUDA tensors|CUDA library not built)"):
        _cpu_op_calls()[op]()


def _public_calls(device="cpu", dtype=torch.float32):
    x = make_tensor((2, 3, 9, 11), dtype=dtype, device=device, seed=1)
    y = make_tensor((2, 3, 9, 11), dtype=dtype, device=device, seed=2)
    return {
        "channel_wise_kd": lambda b: sk.channel_wise_kd(x, y, backend=b),
        "pixel_kd": lambda b: sk.pixel_kd(x, y, backend=b),
        "pfs_pixel_kd": lambda b: sk.pfs_pixel_kd(x, y, backend=b),
        "channel_pool": lambda b: sk.channel_pool(x, backend=b),
        "cbam_gate": lambda b: sk.cbam_gate(x, torch.rand(2, 3, device=device), torch.rand(2, 9, 11, device=device),
                                            backend=b),
        "attnfd_loss": lambda b: sk.attnfd_loss(x, y, backend=b),
        "ssim_kd": lambda b: sk.ssim_kd(x, y, window_size=5, backend=b),
        "pairwise_kd": lambda b: sk.pairwise_kd(x, y, backend=b),
        "cross_image_kd": lambda b: sk.cross_image_kd(x, y, backend=b),
        "spatial_pool": lambda b: sk.spatial_pool(x, backend=b),
    }


@pytest.mark.parametrize("module", OP_MODULES)
def test_cuda_backend_is_wired_into_the_public_api(module):
    import importlib

    api = importlib.import_module(f"segkd_kernels.ops.{module}.api")
    assert "cuda" in api.IMPLEMENTED
    assert api.IMPLEMENTED["cuda"] == frozenset({torch.float16, torch.bfloat16, torch.float32})


@pytest.mark.skipif(HAS_CUDA, reason="CPU-tensor path")
@pytest.mark.parametrize("op", list(_public_calls()))
def test_explicit_cuda_backend_on_cpu_tensors_is_unavailable(op):
    assert sk.available_backends()["cuda"] is False
    with pytest.raises(BackendUnavailableError, match="cuda"):
        _public_calls()[op]("cuda")


def test_fake_implementations_give_the_right_shapes():
    m = dict(device="meta")
    s = torch.empty(2, 3, 5, 7, **m)
    t4 = torch.empty(2, 4, 5, 7, **m)
    loss, grad = channel_wise_kd_cuda(s, s, 2.0, True)
    assert loss.shape == () and grad.shape == s.shape
    assert channel_wise_kd_cuda(s, s, 2.0, False)[1].numel() == 0
    assert pixel_kd_cuda(s, s, 1.0, None, None, True)[1].shape == s.shape
    assert pfs_pixel_kd_cuda(s, s, 1.0, None, False)[1].numel() == 0
    assert knowledge_gap_cuda(s, s, 1.0).shape == (2, 5, 7)
    out, argmax = channel_pool_cuda(s, torch.empty(2, 3, **m))
    assert out.shape == (2, 2, 5, 7) and argmax.shape == (2, 5, 7) and argmax.dtype == torch.int32
    assert cbam_gate_cuda(s, torch.empty(2, 3, **m), torch.empty(2, 5, 7, **m)).shape == s.shape
    loss, dmaps, stats = ssim_kd_cuda(s, s, 3, 1.5, 1.0, "valid", True, True)
    assert dmaps.shape == (3, 6, 3, 5) and stats.shape == (4, 6)
    loss, aa, ab = pairwise_kd_cuda(s, t4, False)
    assert aa.shape == (2, 3, 3) and ab.shape == (2, 3, 4) and aa.dtype == torch.float64
    loss, lse = cross_image_kd_cuda(s, t4, 0.1)
    assert lse.shape == (2, 2, 2, 35)
    assert attnfd_loss_cuda(s, s)[1].shape == (3,)


@pytest.mark.parametrize("scale", [1.0, 1e-14])  # 1e-14: ||s|| < eps, the clamped branch
def test_attnfd_gradient_coefficients_match_autograd(scale):
    s = make_tensor((2, 3, 4, 5), dtype=torch.float64, seed=3, scale=scale, requires_grad=True)
    t = make_tensor((2, 3, 4, 5), dtype=torch.float64, seed=4)
    (expected,) = torch.autograd.grad(attnfd_reference.attnfd_loss(s, t), s)
    sd = s.detach()
    dots = torch.stack([(sd * sd).sum(), (t * t).sum(), (sd * t).sum()])
    alpha, beta = gradient_coefficients(dots, 2).tolist()
    torch.testing.assert_close(alpha * sd + beta * t, expected, rtol=1e-10, atol=1e-300)


# ---------------------------------------------------------------------------------------------
# With a GPU: the full matrix
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def target() -> str:
    """Device of the tensors the cuda backend runs on: a GPU here. test_cuda_host.py runs these same
    tests with target "cpu" inside _backends.host_execution() (the kernels on the host layer)."""
    return "cuda"


def _mask(n, h, w, seed, frac=0.3, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, h, w, generator=gen) < frac).to(device)


# name -> (input shapes, student/teacher builder kwargs, call(student, teacher, extra, backend))
# Shapes: batch 1, odd sizes, sizes larger than one block or tile, a channel count that differs.
def _gpu_cases():
    cases = {}
    # (1, 2, 300, 301), (1, 3, 257, 259): few long rows, several work items per row of the persistent
    # plan (with a gradient; split over several blocks per row without one)
    for shape in [(1, 3, 5, 7), (2, 4, 16, 16), (2, 3, 37, 71), (1, 2, 50, 61), (1, 2, 300, 301), (1, 3, 257, 259)]:
        cases[f"cwd{shape}"] = (shape, shape, None, lambda s, t, e, b: sk.channel_wise_kd(s, t, 2.0, backend=b))
    for shape in [(1, 5, 3, 7), (2, 19, 17, 33), (1, 40, 9, 13)]:  # classes in registers and not
        cases[f"pixel_kd{shape}"] = (shape, shape, "mask+weight",
                                     lambda s, t, e, b: sk.pixel_kd(s, t, 1.5, weight=e[1], ignore_mask=e[0],
                                                                    backend=b))
        cases[f"pixel_kd_plain{shape}"] = (shape, shape, None, lambda s, t, e, b: sk.pixel_kd(s, t, backend=b))
        cases[f"pfs{shape}"] = (shape, shape, "mask",
                                lambda s, t, e, b: sk.pfs_pixel_kd(s, t, 2.0, ignore_mask=e[0], backend=b))
    # (2, 5, 32, 40): H*W a multiple of 8, so the 128-bit / 4-wide paths run (the others take the
    # element-by-element fallbacks)
    for shape in [(1, 3, 5, 7), (2, 33, 9, 17), (2, 5, 32, 40)]:
        # channel_pool takes only the channel gate: a spatial gate leaf would get no gradient
        cases[f"channel_pool{shape}"] = (shape, None, "channel_gate",
                                         lambda s, t, e, b: sk.channel_pool(s, e[2], backend=b))
        cases[f"channel_pool_nogate{shape}"] = (shape, None, None, lambda s, t, e, b: sk.channel_pool(s, backend=b))
        cases[f"cbam_gate{shape}"] = (shape, None, "gate",
                                      lambda s, t, e, b: sk.cbam_gate(s, e[2], e[3], backend=b))
        cases[f"attnfd{shape}"] = (shape, shape, None, lambda s, t, e, b: sk.attnfd_loss(s, t, backend=b))
    # one row per block: planes below and above 256 threads; (2, 3, 64, 72): 128-bit loads, two per
    # step and a one-vector tail in the forward, several blocks per row in the backward
    for shape in [(1, 3, 5, 7), (2, 5, 17, 33), (2, 3, 64, 72)]:
        cases[f"spatial_pool{shape}"] = (shape, None, None, lambda s, t, e, b: torch.cat(
            [x.flatten() for x in sk.spatial_pool(s, backend=b)]))
    for padding in ["reflect", "zeros", "valid"]:
        for window in [3, 11, 15]:
            for normalize in [True, False]:
                shape = (2, 3, 19, 45)
                cases[f"ssim-{padding}-{window}-{normalize}"] = (
                    shape, shape, None,
                    lambda s, t, e, b, p=padding, k=window, z=normalize: sk.ssim_kd(
                        s, t, window_size=k, padding=p, normalize=z, data_range=2.0, backend=b))
    for pool in [None, 2]:
        for detach in [False, True]:
            cases[f"pairwise-{pool}-{detach}"] = (
                (2, 5, 13, 21), (2, 7, 13, 21), None,
                lambda s, t, e, b, p=pool, d=detach: sk.pairwise_kd(s, t, pool=p, detach_norm=d, backend=b))
    for shape_s, shape_t in [((1, 3, 5, 7), (1, 4, 5, 7)), ((3, 6, 9, 11), (3, 5, 9, 11))]:
        cases[f"cross_image{shape_s}"] = (shape_s, shape_t, None,
                                          lambda s, t, e, b: sk.cross_image_kd(s, t, 0.5, backend=b))
    return cases


GPU_CASES = _gpu_cases()


def _extras(kind, shape, device="cuda"):
    if kind is None:
        return (None, None, None, None)
    n, c, h, w = shape
    mask = _mask(n, h, w, seed=7, device=device) if "mask" in kind else None
    gen = torch.Generator().manual_seed(8)
    weight = (torch.rand(n, h, w, generator=gen) + 0.5).to(device) if "weight" in kind else None
    gate = (torch.rand(n, c, generator=gen) + 0.1).to(device) if kind in ("gate", "channel_gate") else None
    spatial = torch.rand(n, h, w, generator=gen).to(device) if kind == "gate" else None
    return (mask, weight, gate, spatial)


def _run(case, dtype, backend, layout=None, grad_scale=0.7, device="cuda"):
    """(output, gradients of every floating input that requires grad) for one case."""
    shape_s, shape_t, kind, call = GPU_CASES[case]
    s = make_tensor(shape_s, dtype=dtype, device=device, seed=11, scale=1.5)
    t = None if shape_t is None else make_tensor(shape_t, dtype=dtype, device=device, seed=12, scale=1.5)
    if t is not None and shape_t == shape_s:
        t = (s.detach() + 0.5 * t).to(dtype)  # correlated maps: realistic distillation inputs
    if layout == "channels_last":
        s = channels_last(s)
    elif layout == "non_contiguous":
        s = non_contiguous(s)
    s.requires_grad_(True)
    extras = list(_extras(kind, shape_s, device))
    leaves = [s]
    for k in (2, 3):  # gates are differentiable
        if extras[k] is not None:
            extras[k] = extras[k].to(dtype).requires_grad_(True)
            leaves.append(extras[k])
    out = call(s, t, extras, backend)
    g = torch.full_like(out, grad_scale) if out.dim() == 0 else make_tensor(out.shape, dtype=out.dtype,
                                                                              device=device, seed=13)
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), [x.detach() for x in grads]


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_cuda_matches_reference_fp32(case, target):
    out, grads = _run(case, torch.float32, "cuda", device=target)
    ref_out, ref_grads = _run(case, torch.float32, "reference", device=target)
    assert_close(out, ref_out, msg=f"{case}: value")
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, msg=f"{case}: gradient")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in GPU_CASES if not c.startswith("ssim") or c.endswith("11-True")])
def test_cuda_half_precision_within_error_budget(case, dtype, target):
    out, grads = _run(case, dtype, "cuda", device=target)
    ref_out, ref_grads = _run(case, dtype, "reference", device=target)
    # The fp64 truth: the same inputs (rounded to dtype) through the reference in fp64.
    truth_out, truth_grads = _run_truth(case, dtype, target)
    # atol relative to the size of the result, so that tiny gradients are still checked
    atol = lambda x: 1e-4 * x.abs().max().item() + 1e-12  # noqa: E731
    assert within_error_budget(out, ref_out, truth_out, atol=atol(truth_out)), f"{case}: value {out} vs {truth_out}"
    for got, want, truth in zip(grads, ref_grads, truth_grads):
        assert within_error_budget(got, want, truth, atol=atol(truth)), f"{case}: gradient"


def _run_truth(case, dtype, device="cuda"):
    """Inputs rounded to dtype exactly as _run makes them, then the reference in fp64."""
    shape_s, shape_t, kind, call = GPU_CASES[case]
    s = make_tensor(shape_s, dtype=dtype, device=device, seed=11, scale=1.5)
    t = None if shape_t is None else make_tensor(shape_t, dtype=dtype, device=device, seed=12, scale=1.5)
    if t is not None and shape_t == shape_s:
        t = (s.detach() + 0.5 * t).to(dtype)
    s = s.double().requires_grad_(True)
    t = None if t is None else t.double()
    extras = list(_extras(kind, shape_s, device))
    leaves = [s]
    for k in (2, 3):
        if extras[k] is not None:
            extras[k] = extras[k].to(dtype).double().requires_grad_(True)
            leaves.append(extras[k])
    if extras[1] is not None:
        extras[1] = extras[1].double()
    out = call(s, t, extras, "reference")
    g = torch.full_like(out, 0.7) if out.dim() == 0 else make_tensor(out.shape, dtype=dtype, device=device,
                                                                     seed=13).double()
    return out.detach(), [x.detach() for x in torch.autograd.grad(out, leaves, g)]


LAYOUT_CASES = ["cwd(2, 3, 37, 71)", "pixel_kd(2, 19, 17, 33)", "pfs(2, 19, 17, 33)", "channel_pool(2, 33, 9, 17)",
                "cbam_gate(2, 33, 9, 17)", "attnfd(2, 33, 9, 17)", "ssim-reflect-11-True", "pairwise-None-False",
                "cross_image(3, 6, 9, 11)"]
COMPILE_CASES = ["cwd(2, 3, 37, 71)", "pixel_kd(2, 19, 17, 33)", "pfs(2, 19, 17, 33)", "channel_pool(2, 33, 9, 17)",
                 "cbam_gate(2, 33, 9, 17)", "attnfd(2, 33, 9, 17)", "ssim-zeros-11-True", "pairwise-2-False",
                 "cross_image(3, 6, 9, 11)"]
STREAM_CASES = ["cwd(2, 3, 37, 71)", "pixel_kd(2, 19, 17, 33)", "channel_pool(2, 33, 9, 17)", "ssim-valid-3-False",
                "pairwise-None-True", "cross_image(3, 6, 9, 11)"]


def test_gpu_case_lists_name_existing_cases():
    # runs everywhere, so a renamed case cannot silently break the GPU-only tests
    for name in LAYOUT_CASES + COMPILE_CASES + STREAM_CASES:
        assert name in GPU_CASES, name


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_cuda_layouts(case, layout, target):
    out, grads = _run(case, torch.float32, "cuda", layout=layout, device=target)
    ref_out, ref_grads = _run(case, torch.float32, "reference", layout=layout, device=target)
    assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want)


@pytest.mark.cuda
def test_pixel_kd_ignored_pixels_get_exact_zero_gradient_with_non_finite_logits(target):
    n, k, h, w = 2, 7, 9, 13
    s = make_tensor((n, k, h, w), device=target, seed=20)
    t = make_tensor((n, k, h, w), device=target, seed=21)
    mask = _mask(n, h, w, seed=22, frac=0.4, device=target)
    bad = mask[:, None].expand_as(s)
    s = torch.where(bad, torch.full_like(s, float("nan")), s).requires_grad_(True)
    t = torch.where(bad, torch.full_like(t, float("inf")), t)
    for fn in (lambda: sk.pixel_kd(s, t, ignore_mask=mask, backend="cuda"),
               lambda: sk.pfs_pixel_kd(s, t, ignore_mask=mask, backend="cuda")):
        loss = fn()
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss)
        assert (g[bad] == 0).all() and torch.isfinite(g).all()
    all_ignored = torch.ones(n, h, w, dtype=torch.bool, device=target)
    assert sk.pixel_kd(s, t, ignore_mask=all_ignored, backend="cuda").item() == 0.0


@pytest.mark.cuda
def test_knowledge_gap_matches_reference(target):
    s = make_tensor((2, 19, 17, 33), device=target, seed=29)
    t = make_tensor((2, 19, 17, 33), device=target, seed=30)
    assert_close(knowledge_gap_cuda(s, t, 2.0), sk.knowledge_gap(s, t, 2.0).float())


@pytest.mark.cuda
def test_ssim_flat_map_gives_zero_gradient(target):
    s = make_tensor((1, 2, 16, 16), device=target, seed=23)
    s[:, 0] = 3.0  # a dead channel
    s.requires_grad_(True)
    t = make_tensor((1, 2, 16, 16), device=target, seed=24)
    (g,) = torch.autograd.grad(sk.ssim_kd(s, t, backend="cuda"), s)
    assert (g[:, 0] == 0).all()
    (g_ref,) = torch.autograd.grad(sk.ssim_kd(s, t, backend="reference"), s)
    assert_close(g, g_ref)


@pytest.mark.cuda
@pytest.mark.parametrize("noise", [1e-2, 1e-3])
def test_near_equality_cancellation(noise, target):
    # pairwise (Gram identity) and AttnFD (2 - 2 cos) both cancel when student ~ teacher
    t = make_tensor((2, 16, 12, 20), device=target, seed=25)
    s = (t + noise * make_tensor(t.shape, device=target, seed=26)).requires_grad_(True)
    for fn in (sk.pairwise_kd, sk.attnfd_loss):
        got = fn(s, t, backend="cuda")
        want = fn(s.double(), t.double(), backend="reference")
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)


@pytest.mark.cuda
def test_cross_image_wide_channels_take_the_atomic_backward(target):
    # C_s x 32 fp32 accumulators no longer fit in shared memory: the per-tile atomic kernel runs
    s = make_tensor((2, 2048, 5, 7), device=target, seed=32, requires_grad=True)
    t = make_tensor((2, 24, 5, 7), device=target, seed=33)
    got = sk.cross_image_kd(s, t, 0.5, backend="cuda")
    want = sk.cross_image_kd(s, t, 0.5, backend="reference")
    assert_close(got, want)
    assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])


@pytest.mark.cuda
def test_cwd_long_rows_and_vector_path_agree(target):
    # P = 4096 (128-bit loads, row larger than the register cache) and P = 4095 (scalar path)
    for hw in [(64, 64), (63, 65)]:
        s = make_tensor((2, 3, *hw), device=target, seed=27, requires_grad=True)
        t = make_tensor((2, 3, *hw), device=target, seed=28)
        got = sk.channel_wise_kd(s, t, backend="cuda")
        want = sk.channel_wise_kd(s, t, backend="reference")
        assert_close(got, want)
        assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("case", COMPILE_CASES)
def test_cuda_under_torch_compile(case, target):
    shape_s, shape_t, kind, call = GPU_CASES[case]
    s = make_tensor(shape_s, device=target, seed=30, requires_grad=True)
    t = None if shape_t is None else make_tensor(shape_t, device=target, seed=31)
    extras = _extras(kind, shape_s, target)
    compiled = torch.compile(lambda a, b: call(a, b, extras, "cuda"), fullgraph=True)
    got = compiled(s, t)
    want = call(s, t, extras, "cuda")
    assert_close(got, want)
    g = torch.ones_like(got)
    assert_close(torch.autograd.grad(got, s, g)[0], torch.autograd.grad(want, s, g)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("case", STREAM_CASES)
def test_cuda_runs_on_the_current_stream(case):
    expected, expected_grads = _run(case, torch.float32, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, grads = _run(case, torch.float32, "cuda")
    side.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, want in zip(grads, expected_grads):
        # atomics (cross_image, pairwise) may add in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _opcheck_samples(device="cuda"):
    c = dict(device=device)
    s = make_tensor((2, 3, 9, 11), seed=40, **c).requires_grad_(True)
    t = make_tensor((2, 3, 9, 11), seed=41, **c)
    t4 = make_tensor((2, 4, 9, 11), seed=42, **c)
    gate = (torch.rand(2, 3, **c) + 0.1).requires_grad_(True)
    spatial = torch.rand(2, 9, 11, **c).requires_grad_(True)
    mask = _mask(2, 9, 11, seed=43, device=device)
    weight = torch.rand(2, 9, 11, **c)
    _, dmaps, stats = ssim_kd_cuda(s, t, 5, 1.5, 1.0, "reflect", True, True)
    _, aa, ab = pairwise_kd_cuda(s, t4, False)
    _, lse = cross_image_kd_cuda(s, t4, 0.5)
    _, argmax = channel_pool_cuda(s, gate)
    g = torch.tensor(0.7, **c)
    sd, gd, spd = s.detach(), gate.detach(), spatial.detach()  # backward ops have no autograd of their own
    return [
        (channel_wise_kd_cuda, (s, t, 2.0, True)),
        (channel_wise_kd_cuda, (sd, t, 2.0, False)),  # need_grad=False has no backward: no grad leaf
        (pixel_kd_cuda, (s, t, 1.0, weight, mask, True)),
        (pfs_pixel_kd_cuda, (s, t, 1.0, mask, True)),
        (knowledge_gap_cuda, (sd, t, 2.0)),  # no autograd formula (a detached weight): no grad leaf
        (channel_pool_cuda, (s, gate)),
        (channel_pool_backward_cuda, (make_tensor((2, 2, 9, 11), seed=44, **c), argmax, sd, gd)),
        (cbam_gate_cuda, (s, gate, spatial)),
        (cbam_gate_backward_cuda, (make_tensor((2, 3, 9, 11), seed=45, **c), sd, gd, spd)),
        (attnfd_loss_cuda, (s, t)),
        (attnfd_loss_backward_cuda, (sd, t, attnfd_loss_cuda(sd, t)[1], g)),
        (ssim_kd_cuda, (s, t, 5, 1.5, 1.0, "reflect", True, True)),
        (ssim_kd_backward_cuda, (g, dmaps, sd, t, stats, 5, 1.5, "reflect")),
        (pairwise_kd_cuda, (s, t4, False)),
        (pairwise_kd_backward_cuda, (g, sd, t4, aa, ab, False)),
        (cross_image_kd_cuda, (s, t4, 0.5)),
        (cross_image_kd_backward_cuda, (g, sd, t4, lse, 0.5)),
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("index", range(17))
def test_opcheck_cuda_ops(index, target):
    op, args = _opcheck_samples(target)[index]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# Without a GPU: the Python glue of every cuda op (output allocation, scaling, autograd, fake
# implementations, opcheck) against a stand-in library that implements each launcher's contract
# (csrc/launchers.h) in torch on CPU memory. The CUDA code itself is only checked on a GPU.
# ---------------------------------------------------------------------------------------------

_CODE_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double, torch.float16: ctypes.c_uint16,
           torch.bfloat16: ctypes.c_uint16, torch.int32: ctypes.c_int32, torch.bool: ctypes.c_uint8}


def _view(ptr: int, shape, dtype) -> torch.Tensor:
    """The CPU memory at address ptr as a tensor (what a kernel sees through its pointer)."""
    count = math.prod(shape)
    assert ptr != 0 and count > 0
    buf = (_CTYPES[dtype] * count).from_address(ptr)
    return torch.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class EmulatedLib:
    """segkd_kernels._cuda's launchers, each written from its contract in csrc/launchers.h."""

    @staticmethod
    def channel_wise_kd_workspace(rows, plane, dtype, device):
        return rows * 2 * 5  # as if each row were split over two blocks

    @staticmethod
    def channel_wise_kd_forward(s, t, row_kl, grad, workspace, workspace_floats, rows, plane, tau, grad_scale,
                                grad_mult, dtype, device, stream):
        assert workspace and workspace_floats == rows * 2 * 5
        dt = _CODE_DTYPES[dtype]
        mult = _view(grad_mult, (1,), dt).float() if grad_mult else torch.ones(1)
        if grad_mult and mult.item() == 1.0:
            return
        log_s = F.log_softmax(_view(s, (rows, plane), dt).float() / tau, dim=1)
        log_t = F.log_softmax(_view(t, (rows, plane), dt).float() / tau, dim=1)
        if row_kl:
            _view(row_kl, (rows,), torch.float32).copy_((log_t.exp() * (log_t - log_s)).sum(1))
        if grad:  # in the input dtype
            _view(grad, (rows, plane), dt).copy_(mult * grad_scale * (log_s.exp() - log_t.exp()))

    @staticmethod
    def saved_grad_scale(x, g, n, dtype, device, stream):
        dt = _CODE_DTYPES[dtype]
        gv = _view(g, (1,), dt).float()
        if gv.item() != 1.0:
            v = _view(x, (n,), dt)
            v.copy_(v.float() * gv)

    @staticmethod
    def pixel_kd_num_partials(batch, plane):
        return batch  # one sum per image: any split whose total is the sum of out keeps the contract

    @staticmethod
    def pixel_kd_forward(s, t, ignore, weight, clamp_weight, coef, out, partials, grad, grad_mult, batch, classes,
                         plane, tau, dtype, device, stream):
        dt, shape = _CODE_DTYPES[dtype], (batch, classes, plane)
        mult = _view(grad_mult, (1,), dt).float() if grad_mult else torch.ones(1)
        if grad_mult and mult.item() == 1.0:
            return
        mask = _view(ignore, (batch, plane), torch.bool) if ignore else torch.zeros(batch, plane, dtype=torch.bool)
        xs = torch.where(mask[:, None], 0.0, _view(s, shape, dt).float())  # ignored pixels are never read
        xt = torch.where(mask[:, None], 0.0, _view(t, shape, dt).float())
        log_s, log_t = F.log_softmax(xs / tau, dim=1), F.log_softmax(xt / tau, dim=1)
        kl = (log_t.exp() * (log_t - log_s)).sum(1)
        w = _view(weight, (batch, plane), torch.float32).clone() if weight else torch.ones(batch, plane)
        if clamp_weight:
            w = w.clamp_min(0) / _view(coef, (2,), torch.float32)[1]
        w = torch.where(mask, 0.0, w)
        if out:
            _view(out, (batch, plane), torch.float32).copy_(torch.where(mask, 0.0, w * kl))
        if partials:
            _view(partials, (batch,), torch.float32).copy_(torch.where(mask, 0.0, w * kl).sum(1))
        if grad:
            c = _view(coef, (1,), torch.float32)[0]
            _view(grad, shape, dt).copy_(mult * c * w[:, None] * (log_s.exp() - log_t.exp()))

    @staticmethod
    def channel_pool_forward(x, gate, out, argmax, batch, channels, plane, dtype, device, stream):
        dt = _CODE_DTYPES[dtype]
        v = _view(x, (batch, channels, plane), dt).float()
        if gate:
            v = v * _view(gate, (batch, channels), torch.float32)[..., None]
        mx, idx = v.max(dim=1)
        _view(out, (batch, 2, plane), dt).copy_(torch.stack([mx, v.mean(1)], 1))
        _view(argmax, (batch, plane), torch.int32).copy_(idx)

    @staticmethod
    def channel_pool_backward_workspace(batch, channels, plane, device):
        return batch * channels * 2  # as if each row were split over two blocks

    @staticmethod
    def channel_pool_backward(grad_out, argmax, x, gate, dx, dgate, workspace, workspace_floats, batch, channels,
                              plane, dtype, device, stream):
        assert not dgate or (workspace and workspace_floats == batch * channels * 2)
        dt = _CODE_DTYPES[dtype]
        g = _view(grad_out, (batch, 2, plane), dt).float()
        onehot = F.one_hot(_view(argmax, (batch, plane), torch.int32).long(), channels).permute(0, 2, 1)
        d = g[:, 1:2] / channels + onehot * g[:, 0:1]
        gv = _view(gate, (batch, channels), torch.float32)[..., None] if gate else 1.0
        _view(dx, (batch, channels, plane), dt).copy_(gv * d)
        if dgate:
            xv = _view(x, (batch, channels, plane), dt).float()
            _view(dgate, (batch, channels), torch.float32).copy_((xv * d).sum(2))

    @staticmethod
    def attnfd_num_partials(total):
        return 3

    @staticmethod
    def attnfd_dots(s, t, partials, total, num_partials, dtype, device, stream):
        dt = _CODE_DTYPES[dtype]
        a, b = _view(s, (total,), dt).double(), _view(t, (total,), dt).double()
        p = _view(partials, (num_partials, 3), torch.float64)
        half = total // 2  # two non-zero partials: the caller must add them
        p.zero_()
        for row, sl in ((0, slice(0, half)), (1, slice(half, total))):
            p[row] = torch.stack([(a[sl] * a[sl]).sum(), (b[sl] * b[sl]).sum(), (a[sl] * b[sl]).sum()])

    @staticmethod
    def attnfd_finish(partials, num_partials, loss, dots, batch, eps, loss_dtype, device, stream):
        p = _view(partials, (num_partials, 3), torch.float64) if num_partials else torch.zeros(0, 3, dtype=torch.float64)
        ss, tt, st = p.sum(0).unbind()
        ns, nt = ss.sqrt().clamp_min(eps), tt.sqrt().clamp_min(eps)
        _view(dots, (3,), torch.float64).copy_(torch.stack([ss, tt, st]))
        _view(loss, (1,), _CODE_DTYPES[loss_dtype]).copy_((ss / (ns * ns) + tt / (nt * nt) - 2 * st / (ns * nt)) / batch)

    @staticmethod
    def attnfd_backward_dots(s, t, dots, grad, ds, total, batch, eps, dtype, device, stream):
        dt = _CODE_DTYPES[dtype]
        alpha, beta = gradient_coefficients(_view(dots, (3,), torch.float64), batch) * _view(grad, (1,), dt).double()
        _view(ds, (total,), dt).copy_(alpha * _view(s, (total,), dt).double() + beta * _view(t, (total,), dt).double())

    @staticmethod
    def cbam_gate_forward(x, channel_gate, spatial_gate, out, batch, channels, plane, dtype, device, stream):
        dt = _CODE_DTYPES[dtype]
        mc = _view(channel_gate, (batch, channels), torch.float32)[..., None]
        ms = _view(spatial_gate, (batch, plane), torch.float32)[:, None]
        _view(out, (batch, channels, plane), dt).copy_(ms * (mc * _view(x, (batch, channels, plane), dt).float()))

    @staticmethod
    def cbam_gate_backward_workspace(batch, channels, plane, device):
        return batch * channels * 2  # as if each row were split over two blocks

    @staticmethod
    def cbam_gate_backward(grad_out, x, channel_gate, spatial_gate, dx, d_channel_gate, d_spatial_gate, workspace,
                           workspace_floats, batch, channels, plane, dtype, device, stream):
        assert workspace and workspace_floats == batch * channels * 2
        dt = _CODE_DTYPES[dtype]
        g = _view(grad_out, (batch, channels, plane), dt).float()
        xv = _view(x, (batch, channels, plane), dt).float()
        mc = _view(channel_gate, (batch, channels), torch.float32)[..., None]
        ms = _view(spatial_gate, (batch, plane), torch.float32)[:, None]
        _view(dx, (batch, channels, plane), dt).copy_(g * mc * ms)
        _view(d_channel_gate, (batch, channels), torch.float32).copy_((g * xv * ms).sum(2))
        _view(d_spatial_gate, (batch, plane), torch.float32).copy_((g * xv * mc).sum(1))

    @staticmethod
    def ssim_num_partials(maps, h, w, window, padding):
        return 2

    @staticmethod
    def _ssim_inputs(s, t, lo_s, scale_s, lo_t, scale_t, maps, h, w, dt):
        x = _view(s, (maps, 1, h, w), dt).double()
        y = _view(t, (maps, 1, h, w), dt).double()
        if lo_s:
            x = (x - _view(lo_s, (maps, 1, 1, 1), torch.float32)) * _view(scale_s, (maps, 1, 1, 1), torch.float32)
            y = (y - _view(lo_t, (maps, 1, 1, 1), torch.float32)) * _view(scale_t, (maps, 1, 1, 1), torch.float32)
        return x, y

    @staticmethod
    def _gaussian_matrix(h, w, window, sigma, padding):
        """The padded Gaussian filter as a dense (H' W') x (H W) matrix: the filter of every basis image.
        (Explicit, because autograd does not record inside a custom op's implementation.)"""
        mode = ("reflect", "zeros", "valid")[padding]
        taps = ssim_reference.gaussian_taps(window, sigma, torch.float64, "cpu")
        basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
        return ssim_reference.gaussian_filter(basis, taps, mode).reshape(h * w, -1).T

    @staticmethod
    def ssim_forward(s, t, lo_s, scale_s, lo_t, scale_t, partials, dmaps, maps, h, w, window, sigma, data_range,
                     padding, dtype, device, stream):
        x, y = EmulatedLib._ssim_inputs(s, t, lo_s, scale_s, lo_t, scale_t, maps, h, w, _CODE_DTYPES[dtype])
        g = EmulatedLib._gaussian_matrix(h, w, window, sigma, padding)
        mu_x, mu_y, e_xx, e_yy, e_xy = [z.reshape(maps, h * w) @ g.T for z in (x, y, x * x, y * y, x * y)]
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        a1, a2 = 2 * mu_x * mu_y + c1, 2 * (e_xy - mu_x * mu_y) + c2
        b1, b2 = mu_x ** 2 + mu_y ** 2 + c1, e_xx - mu_x ** 2 + e_yy - mu_y ** 2 + c2
        num, den = a1 * a2, b1 * b2 + 1e-12
        u = (1 - num / den) / 2
        total = u.clamp(0, 1).sum()
        _view(partials, (2,), torch.float32).copy_(torch.stack([total / 2, total / 2]))
        if dmaps:  # l'(p) d map / d (mu_x, E[x^2], E[xy]) from docs/losses.md 5, l' of the clamped mean
            lp = torch.where((u >= 0) & (u <= 1), -0.5 / u.numel(), 0.0)
            q = num / den ** 2
            d = torch.stack([lp * (2 * mu_y * (a2 - a1) / den - q * 2 * mu_x * (b2 - b1)), lp * (-q * b1),
                             lp * (2 * a1 / den)])
            _view(dmaps, (3, maps, g.shape[0]), torch.float32).copy_(d)

    @staticmethod
    def ssim_backward(dmaps, emaps, s, t, lo_s, scale_s, lo_t, scale_t, grad_loss, ds, maps, h, w, window, sigma,
                      padding, dtype, device, stream):
        dt = _CODE_DTYPES[dtype]
        x, y = EmulatedLib._ssim_inputs(s, t, lo_s, scale_s, lo_t, scale_t, maps, h, w, dt)
        g = EmulatedLib._gaussian_matrix(h, w, window, sigma, padding)
        d = _view(dmaps, (3, maps, g.shape[0]), torch.float32).double()
        adj = [(d[k] @ g).reshape(maps, 1, h, w) for k in range(3)]  # G^T D_k
        scale = _view(scale_s, (maps, 1, 1, 1), torch.float32).double() if scale_s else 1.0
        gl = _view(grad_loss, (1,), torch.float32)[0].double()
        _view(ds, (maps, 1, h, w), dt).copy_(gl * scale * (adj[0] + 2 * x * adj[1] + y * adj[2]))

    @staticmethod
    def pixel_norm(x, norm, batch, channels, plane, dtype, device, stream):
        v = _view(x, (batch, channels, plane), _CODE_DTYPES[dtype]).float()
        _view(norm, (batch, plane), torch.float32).copy_(v.norm(dim=1))

    @staticmethod
    def normalize_pixels(x, out, norm, batch, channels, plane, eps, dtype, device, stream):
        v = _view(x, (batch, channels, plane), _CODE_DTYPES[dtype]).float()
        nv = v.norm(dim=1)
        _view(norm, (batch, plane), torch.float32).copy_(nv)
        _view(out, (batch, channels, plane), torch.float32).copy_(v / nv.clamp_min(eps)[:, None])

    @staticmethod
    def normalize_pixels_backward(da, x, norm, dx, batch, channels, plane, eps, detach_norm, dtype, device, stream):
        dt = _CODE_DTYPES[dtype]
        v = _view(x, (batch, channels, plane), dt).float()
        d = _view(da, (batch, channels, plane), torch.float32)
        nv = v.norm(dim=1, keepdim=True)
        a = v / nv.clamp_min(eps)
        through = (nv >= eps) & (not detach_norm)  # clamp_min passes the gradient where norm >= eps
        g = torch.where(through, d - a * (a * d).sum(1, keepdim=True), d) / nv.clamp_min(eps)
        _view(dx, (batch, channels, plane), dt).copy_(g)

    @staticmethod
    def pixel_inv_norm(x, norm, inv, batch, channels, plane, eps, dtype, device, stream):
        nv = _view(x, (batch, channels, plane), _CODE_DTYPES[dtype]).double().norm(dim=1)
        _view(norm, (batch, plane), torch.float64).copy_(nv)
        _view(inv, (batch, plane), torch.float64).copy_(1.0 / nv.clamp_min(eps))

    @staticmethod
    def pairwise_gram(s, inv_s, t, inv_t, part, batch, cs, ct, plane, splits, fast, dtype, device, stream):
        # one split holding all pixels, the rest zero: the host's sum over splits gives the same G
        dt, tile = _CODE_DTYPES[dtype], 64
        ta, tb = -(-cs // tile), -(-ct // tile)
        z = torch.zeros(batch, (ta + tb) * tile, plane, dtype=torch.float64)
        z[:, :cs] = _view(s, (batch, cs, plane), dt).double() * _view(inv_s, (batch, 1, plane), torch.float64)
        z[:, ta * tile:ta * tile + ct] = (_view(t, (batch, ct, plane), dt).double()
                                          * _view(inv_t, (batch, 1, plane), torch.float64))
        g = (z @ z.transpose(1, 2)).unflatten(1, (ta + tb, tile)).unflatten(3, (ta + tb, tile)).transpose(2, 3)
        iu = torch.triu_indices(ta + tb, ta + tb)
        out = _view(part, (batch, splits, len(iu[0]), tile, tile), torch.float64)
        out.zero_()
        out[:, 0] = g[:, iu[0], iu[1]]

    @staticmethod
    def pairwise_grad_mma(aa, ab, s, t, inv_s, inv_t, grad_loss, da, batch, cs, ct, plane, scale, dtype, device,
                          stream):
        dt = _CODE_DTYPES[dtype]
        a = _view(s, (batch, cs, plane), dt).double() * _view(inv_s, (batch, 1, plane), torch.float64)
        b = _view(t, (batch, ct, plane), dt).double() * _view(inv_t, (batch, 1, plane), torch.float64)
        g = _view(grad_loss, (1,), torch.float32)[0].double() * scale
        _view(da, (batch, cs, plane), torch.float32).copy_(
            (_view(aa, (batch, cs, cs), torch.float64) @ a - _view(ab, (batch, cs, ct), torch.float64) @ b) * g)

    @staticmethod
    def _cross_image_sims(xs, xt, inv_s, inv_t, batch, cs, ct, plane, tau, dt):
        a = _view(xs, (batch, cs, plane), dt).float() * _view(inv_s, (batch, 1, plane), torch.float32)
        b = _view(xt, (batch, ct, plane), dt).float() * _view(inv_t, (batch, 1, plane), torch.float32)
        return a, torch.einsum("icr,jcs->ijrs", a, a) / tau, torch.einsum("icr,jcs->ijrs", b, b) / tau

    @staticmethod
    def cross_image_forward(xs, xt, inv_s, inv_t, row_kl, lse, batch, cs, ct, plane, tau, dtype, device, stream):
        _, s_sim, t_sim = EmulatedLib._cross_image_sims(xs, xt, inv_s, inv_t, batch, cs, ct, plane, tau,
                                                        _CODE_DTYPES[dtype])
        log_s, log_t = F.log_softmax(s_sim, dim=-1), F.log_softmax(t_sim, dim=-1)
        _view(row_kl, (batch, batch, plane), torch.float32).copy_((log_t.exp() * (log_t - log_s)).sum(-1))
        _view(lse, (2, batch, batch, plane), torch.float32).copy_(
            torch.stack([s_sim.logsumexp(-1), t_sim.logsumexp(-1)]))

    @staticmethod
    def cross_image_backward(xs, xt, inv_s, inv_t, lse, grad_loss, da, batch, cs, ct, plane, tau, dtype, device,
                             stream):
        a, s_sim, t_sim = EmulatedLib._cross_image_sims(xs, xt, inv_s, inv_t, batch, cs, ct, plane, tau,
                                                        _CODE_DTYPES[dtype])
        saved = _view(lse, (2, batch, batch, plane), torch.float32)
        g = _view(grad_loss, (1,), torch.float32)[0]
        d_sim = ((s_sim - saved[0][..., None]).exp() - (t_sim - saved[1][..., None]).exp()) * g / (
            batch * batch * plane * tau)
        grad = torch.einsum("ijrs,jcs->icr", d_sim, a) + torch.einsum("ijrs,icr->jcs", d_sim, a)
        _view(da, (batch, cs, plane), torch.float32).add_(grad)


@pytest.fixture
def emulated(monkeypatch):
    """Every cuda op module runs on CPU tensors with the stand-in library."""
    import importlib

    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

    def fake_launch_args(op, x):
        if x.dtype not in codes:
            raise RuntimeError(f"{op}: dtype {x.dtype} not supported by the cuda backend")
        return {"dtype": codes[x.dtype], "device": 0, "stream": 0}

    for name in OP_MODULES:
        module = importlib.import_module(f"segkd_kernels.ops.{name}.cuda")
        monkeypatch.setattr(module, "cuda_lib", lambda op: EmulatedLib)
        monkeypatch.setattr(module, "launch_args", fake_launch_args)
    return EmulatedLib


def _emulated_cases():
    """name -> (call(student, teacher, extras) through the cuda op, same through the reference, shapes)."""
    from segkd_kernels.ops.attnfd_loss import reference as attnfd_ref
    from segkd_kernels.ops.cbam_gate import reference as cbam_ref
    from segkd_kernels.ops.channel_pool import reference as pool_ref
    from segkd_kernels.ops.channel_wise_kd import reference as cwd_ref
    from segkd_kernels.ops.cross_image_kd import reference as ci_ref
    from segkd_kernels.ops.pairwise_kd import reference as pw_ref
    from segkd_kernels.ops.pixel_kd import reference as px_ref

    need = torch.is_grad_enabled
    return {
        "cwd": (lambda s, t, e: channel_wise_kd_cuda(s, t, 2.0, need())[0],
                lambda s, t, e: cwd_ref.channel_wise_kd(s, t, 2.0), (2, 3, 5, 7), (2, 3, 5, 7)),
        "pixel_kd": (lambda s, t, e: pixel_kd_cuda(s, t, 1.5, e["weight"], e["mask"], need())[0],
                     lambda s, t, e: px_ref.pixel_kd(s, t, 1.5, e["weight"], e["mask"]), (2, 5, 4, 6), (2, 5, 4, 6)),
        "pfs": (lambda s, t, e: pfs_pixel_kd_cuda(s, t, 2.0, e["mask"], need())[0],
                lambda s, t, e: px_ref.pfs_pixel_kd(s, t, 2.0, e["mask"]), (2, 5, 4, 6), (2, 5, 4, 6)),
        "pfs_identical": (lambda s, t, e: pfs_pixel_kd_cuda(s, s.detach(), 4.0, None, need())[0],
                          lambda s, t, e: px_ref.pfs_pixel_kd(s, s.detach(), 4.0, None), (1, 3, 2, 3), (1, 3, 2, 3)),
        "channel_pool": (lambda s, t, e: channel_pool_cuda(s, e["gate"])[0],
                         lambda s, t, e: pool_ref.channel_pool(s, e["gate"]), (2, 3, 4, 5), None),
        "cbam_gate": (lambda s, t, e: cbam_gate_cuda(s, e["gate"], e["spatial"]),
                      lambda s, t, e: cbam_ref.cbam_gate(s, e["gate"], e["spatial"]), (2, 3, 4, 5), None),
        "attnfd": (lambda s, t, e: attnfd_loss_cuda(s, t)[0], lambda s, t, e: attnfd_ref.attnfd_loss(s, t),
                   (2, 3, 4, 5), (2, 3, 4, 5)),
        "ssim": (lambda s, t, e: ssim_kd_cuda(s, t, 5, 1.5, 1.0, "reflect", True, need())[0],
                 lambda s, t, e: ssim_reference.ssim_kd(s, t, 5, 1.5, 1.0, "reflect", True), (2, 2, 7, 9),
                 (2, 2, 7, 9)),
        "ssim_valid": (lambda s, t, e: ssim_kd_cuda(s, t, 3, 1.0, 2.0, "valid", False, need())[0],
                       lambda s, t, e: ssim_reference.ssim_kd(s, t, 3, 1.0, 2.0, "valid", False), (1, 2, 7, 9),
                       (1, 2, 7, 9)),
        "pairwise": (lambda s, t, e: pairwise_kd_cuda(s, t, False)[0],
                     lambda s, t, e: pw_ref.pairwise_kd(s, t, None, False), (2, 3, 4, 5), (2, 4, 4, 5)),
        "pairwise_detach": (lambda s, t, e: pairwise_kd_cuda(s, t, True)[0],
                            lambda s, t, e: pw_ref.pairwise_kd(s, t, None, True), (2, 3, 4, 5), (2, 4, 4, 5)),
        "cross_image": (lambda s, t, e: cross_image_kd_cuda(s, t, 0.5)[0],
                        lambda s, t, e: ci_ref.cross_image_kd(s, t, 0.5), (2, 3, 4, 5), (2, 4, 4, 5)),
    }


def _emulated_inputs(shape_s, shape_t, seed=50, dtype=torch.float32, teacher_dtype=None):
    s = make_tensor(shape_s, seed=seed, scale=1.5, dtype=dtype, requires_grad=True)
    t = None if shape_t is None else make_tensor(shape_t, seed=seed + 1, scale=1.5, dtype=teacher_dtype or dtype)
    n, c, h, w = shape_s
    gen = torch.Generator().manual_seed(seed + 2)
    extras = {"mask": torch.rand(n, h, w, generator=gen) < 0.3,
              "weight": torch.rand(n, h, w, generator=gen) + 0.5,
              "gate": (torch.rand(n, c, generator=gen) + 0.1).to(dtype).requires_grad_(True),
              "spatial": torch.rand(n, h, w, generator=gen).to(dtype).requires_grad_(True)}
    return s, t, extras


# bf16 student with an fp32 teacher takes the "both in fp32" path of the ops
@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-fp32-teacher"])
@pytest.mark.parametrize("case", list(_emulated_cases()))
def test_cuda_glue_against_the_reference_with_an_emulated_library(case, dtypes, emulated):
    if dtypes[0] != torch.float32 and case.endswith(("_valid", "_detach")):
        pytest.skip("one variant per op in low precision")
    call, ref, shape_s, shape_t = _emulated_cases()[case]
    s, t, extras = _emulated_inputs(shape_s, shape_t, dtype=dtypes[0], teacher_dtype=dtypes[1])
    leaves = [s] + ([extras["gate"]] if case in ("channel_pool", "cbam_gate") else []) + (
        [extras["spatial"]] if case == "cbam_gate" else [])
    got = call(s, t, extras)
    want = ref(s, t, extras)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_close(got, want)
    g = make_tensor(got.shape, seed=60, dtype=got.dtype) if got.dim() else torch.tensor(0.7, dtype=got.dtype)
    for x, y in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):  # grad_output != 1
        assert x.dtype == y.dtype and x.shape == y.shape
        assert_close(x, y)
    with torch.no_grad():  # need_grad=False path
        assert_close(call(s, t, extras), want.detach())


def _emulated_opcheck_samples():
    s, t, e = _emulated_inputs((2, 3, 5, 6), (2, 3, 5, 6))
    t4 = make_tensor((2, 4, 5, 6), seed=70)
    sd, gd, spd = s.detach(), e["gate"].detach(), e["spatial"].detach()
    g = torch.tensor(0.7)
    _, dmaps, stats = ssim_kd_cuda(sd, t, 5, 1.5, 1.0, "reflect", True, True)
    _, aa, ab = pairwise_kd_cuda(sd, t4, False)
    _, lse = cross_image_kd_cuda(sd, t4, 0.5)
    _, argmax = channel_pool_cuda(sd, gd)
    return {
        "cwd": (channel_wise_kd_cuda, (s, t, 2.0, True)),
        "pixel_kd": (pixel_kd_cuda, (s, t, 1.5, e["weight"], e["mask"], True)),
        "pfs": (pfs_pixel_kd_cuda, (s, t, 1.5, e["mask"], True)),
        "knowledge_gap": (knowledge_gap_cuda, (sd, t, 1.5)),
        "channel_pool": (channel_pool_cuda, (s, e["gate"])),
        "channel_pool_backward": (channel_pool_backward_cuda, (make_tensor((2, 2, 5, 6), seed=71), argmax, sd, gd)),
        "cbam_gate": (cbam_gate_cuda, (s, e["gate"], e["spatial"])),
        "cbam_gate_backward": (cbam_gate_backward_cuda, (make_tensor((2, 3, 5, 6), seed=72), sd, gd, spd)),
        "attnfd": (attnfd_loss_cuda, (s, t)),
        "attnfd_backward": (attnfd_loss_backward_cuda, (sd, t, attnfd_loss_cuda(sd, t)[1], g)),
        "ssim": (ssim_kd_cuda, (s, t, 5, 1.5, 1.0, "reflect", True, True)),
        "ssim_backward": (ssim_kd_backward_cuda, (g, dmaps, sd, t, stats, 5, 1.5, "reflect")),
        "pairwise": (pairwise_kd_cuda, (s, t4, False)),
        "pairwise_backward": (pairwise_kd_backward_cuda, (g, sd, t4, aa, ab, False)),
        "cross_image": (cross_image_kd_cuda, (s, t4, 0.5)),
        "cross_image_backward": (cross_image_kd_backward_cuda, (g, sd, t4, lse, 0.5)),
    }


@pytest.mark.parametrize("case", ["cwd", "pixel_kd", "pfs", "knowledge_gap", "channel_pool", "channel_pool_backward",
                                  "cbam_gate", "cbam_gate_backward", "attnfd", "attnfd_backward", "ssim",
                                  "ssim_backward", "pairwise", "pairwise_backward", "cross_image",
                                  "cross_image_backward"])
def test_cuda_ops_pass_opcheck_with_an_emulated_library(case, emulated):
    op, args = _emulated_opcheck_samples()[case]
    torch.library.opcheck(op, args)
