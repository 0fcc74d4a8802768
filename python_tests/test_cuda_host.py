"""The CUDA kernels of csrc/, unchanged, run on the CPU through the host execution layer (csrc/host/,
built by the normal install into segkd_kernels._cuda_host).

1. Every GPU-marked value/gradient test of test_cuda_backends.py runs again here, on CPU tensors
   inside _backends.host_execution() (same functions, same cases; only `target` differs).
2. Launcher plans that need big inputs or big GPUs on real hardware are forced at small sizes by
   overriding the device attributes the launchers query (SM count, shared-memory opt-in), and each
   test checks that the intended plan ran (launch counts).
3. The layer itself: launch-limit errors raise like the CUDA runtime, seeds change the thread order
   but not the results (beyond atomics' order), the testing hook does not leak.
"""

from __future__ import annotations

import math
import os
import types

import pytest
import torch

import segkd_kernels as sk
import test_cuda_backends as gpu_tests
from segkd_kernels._backends import BackendUnavailableError, host_execution, host_library
from segkd_kernels.testing import assert_close, make_tensor, within_error_budget

HOST, HOST_REASON = host_library()
pytestmark = pytest.mark.skipif(HOST is None, reason=HOST_REASON)


# A library built from one (possibly mutated) kernel file by cuda_host_tools, instead of the
# module's own launchers for that file: set by test_cuda_host_mutations.py only.
LIBRARY_OVERRIDE = os.environ.get("SEGKD_TEST_HOST_LIBRARY")


def _library():
    if not LIBRARY_OVERRIDE:
        return None
    from cuda_host_tools import ShimLibrary

    return ShimLibrary(LIBRARY_OVERRIDE, HOST)


@pytest.fixture
def target():
    """The cuda backend on CPU tensors, through the host build, with default device attributes."""
    with host_execution(_library()):
        HOST.host_reset()
        # the thread/block order; SEGKD_TEST_HOST_SEED explores others (results must not depend on it)
        HOST.host_set_seed(int(os.environ.get("SEGKD_TEST_HOST_SEED", "1234")))
        yield "cpu"
        HOST.host_reset()


@pytest.fixture
def host(target):
    return HOST


def _on_host(fn):
    """fn from test_cuda_backends.py collected here without its `cuda` mark (so it runs on CPU)."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__dict__.update(fn.__dict__)
    copy.pytestmark = [m for m in getattr(fn, "pytestmark", []) if m.name != "cuda"]
    return copy


# Torch.compile (needs a C++ toolchain per graph, minutes on CPU) and streams (the host layer runs
# every stream on the calling thread) stay GPU-only.
test_cuda_matches_reference_fp32 = _on_host(gpu_tests.test_cuda_matches_reference_fp32)
test_cuda_half_precision_within_error_budget = _on_host(gpu_tests.test_cuda_half_precision_within_error_budget)
test_cuda_layouts = _on_host(gpu_tests.test_cuda_layouts)
test_pixel_kd_ignored_pixels_get_exact_zero_gradient_with_non_finite_logits = _on_host(
    gpu_tests.test_pixel_kd_ignored_pixels_get_exact_zero_gradient_with_non_finite_logits)
test_knowledge_gap_matches_reference = _on_host(gpu_tests.test_knowledge_gap_matches_reference)
test_ssim_flat_map_gives_zero_gradient = _on_host(gpu_tests.test_ssim_flat_map_gives_zero_gradient)
test_near_equality_cancellation = _on_host(gpu_tests.test_near_equality_cancellation)
test_cwd_long_rows_and_vector_path_agree = _on_host(gpu_tests.test_cwd_long_rows_and_vector_path_agree)
test_opcheck_cuda_ops = _on_host(gpu_tests.test_opcheck_cuda_ops)


# ---------------------------------------------------------------------------------------------
# Plans forced through device attributes
# ---------------------------------------------------------------------------------------------

def _check_op(fn, shape_s, shape_t, dtype, seed=0):
    """Value and gradient (grad_output 0.7) of fn(s, t, backend) on cuda vs the reference: fp32
    tolerances, or the fp16/bf16 error budget against the fp64 reference."""
    s = make_tensor(shape_s, dtype=dtype, seed=seed, scale=1.5, requires_grad=True)
    t = make_tensor(shape_t, dtype=dtype, seed=seed + 1, scale=1.5)
    got = fn(s, t, "cuda")
    (g,) = torch.autograd.grad(got, s, torch.tensor(0.7, dtype=got.dtype))
    want = fn(s, t, "reference")
    (gw,) = torch.autograd.grad(want, s, torch.tensor(0.7, dtype=want.dtype))
    if dtype == torch.float32:
        assert_close(got, want)
        assert_close(g, gw)
        return
    s64 = s.detach().double().requires_grad_(True)
    truth = fn(s64, t.double(), "reference")
    (gt,) = torch.autograd.grad(truth, s64, torch.tensor(0.7, dtype=torch.float64))
    atol = lambda x: 1e-4 * x.abs().max().item() + 1e-12  # noqa: E731
    assert within_error_budget(got, want, truth, atol=atol(truth)), (got, want, truth)
    assert within_error_budget(g, gw, gt, atol=atol(gt))


def _launches(lib, fn) -> int:
    """Kernel launches made by fn()."""
    before = lib.host_stats()["launches"]
    fn()
    return lib.host_stats()["launches"] - before


CWD = lambda s, t, b: sk.channel_wise_kd(s, t, 2.0, backend=b)  # noqa: E731


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hw", [(5, 7), (16, 16), (64, 64), (63, 65)],
                         ids=["register-scalar", "register-vector", "long-vector", "long-scalar"])
def test_cwd_one_block_per_row_plans(host, hw, dtype):
    # rows of <= 256 threads x 8 values stay in registers; 128-bit loads when H*W % (16 / size) == 0
    _check_op(CWD, (2, 3, *hw), (2, 3, *hw), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vector", [True, False])
def test_cwd_split_rows_plan(host, dtype, vector):
    # With one SM, one row and >= 2 x 256 threads x 16 loads per split, each row is split over
    # several blocks: two kernels (statistics, then finish) instead of one.
    host.host_set_attribute("multiprocessor_count", 1)
    elems = 16 // torch.tensor([], dtype=dtype).element_size()
    plane = 2 * 256 * elems * 16 + (elems * 11 if vector else 3)
    shape = (1, 1, 1, plane)
    s = make_tensor(shape, dtype=dtype, seed=5)
    assert _launches(host, lambda: sk.channel_wise_kd(s, s, backend="cuda")) == 2
    _check_op(CWD, shape, shape, dtype, seed=5)


@pytest.mark.parametrize("case", [("student", "all", -math.inf), ("teacher", "all", -math.inf),
                                  ("student", "one", math.inf), ("teacher", "one", math.nan)],
                         ids=lambda c: "-".join(map(str, c)))
def test_cwd_split_rows_plan_nonfinite(host, case):
    # The split plan merges per-split softmax states in a fresh state: a split that saw only -inf
    # (sum NaN, from exp(-inf - (-inf))) must keep its NaN there, as torch's log_softmax of an
    # all--inf row is NaN; one +inf makes the row NaN (inf - inf), one NaN too.
    host.host_set_attribute("multiprocessor_count", 1)
    shape = (1, 1, 1, 2 * 256 * 4 * 16 + 3)
    where, how, value = case
    s = make_tensor(shape, seed=5)
    t = make_tensor(shape, seed=6)
    x = s if where == "student" else t
    if how == "all":
        x.fill_(value)
    else:
        x[0, 0, 0, 1000] = value
    assert _launches(host, lambda: sk.channel_wise_kd(s, t, backend="cuda")) == 2
    outs = []
    for backend in ("reference", "cuda"):
        sv = s.clone().requires_grad_(True)
        loss = CWD(sv, t, backend)
        (g,) = torch.autograd.grad(loss, sv)
        outs.append((loss.detach(), g))
    for want, got in zip(outs[0], outs[1]):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (case, got, want)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (case, got, want)


CROSS = lambda s, t, b: sk.cross_image_kd(s, t, 0.5, backend=b)  # noqa: E731


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # FMA / wmma tiles
@pytest.mark.parametrize("plan", ["owned", "atomic"])
def test_cross_image_backward_plans(host, plan, dtype):
    # Owned-pixel kernels keep C_s x 32 fp32 accumulators in (opt-in) shared memory; below that the
    # per-tile atomic kernel runs. 33 pixels: two tiles, the second with one valid pixel.
    shape_s, shape_t = (2, 6, 3, 11), (2, 5, 3, 11)
    s = make_tensor(shape_s, dtype=dtype, seed=3, requires_grad=True)
    t = make_tensor(shape_t, dtype=dtype, seed=4)

    def backward_launches():
        loss = sk.cross_image_kd(s, t, 0.5, backend="cuda")
        return _launches(host, lambda: torch.autograd.grad(loss, s))

    owned = backward_launches()
    host.host_set_attribute("max_shared_memory_per_block_optin", 1024)
    assert backward_launches() == owned - 1  # one atomic kernel instead of the rows and columns kernels
    if plan == "owned":
        host.host_set_attribute("max_shared_memory_per_block_optin", 232448)
    _check_op(CROSS, shape_s, shape_t, dtype, seed=3)


@pytest.mark.parametrize("padding", ["reflect", "zeros", "valid"])
@pytest.mark.parametrize("window", [3, 5, 7, 9, 13, 15])  # 11: in the GPU matrix
def test_ssim_paddings_and_windows(host, padding, window):
    # 37 x 133: two column blocks of 128 and three row strips of 16, halos at every edge
    fn = lambda s, t, b: sk.ssim_kd(s, t, window_size=window, padding=padding, data_range=2.0,  # noqa: E731
                                    backend=b)
    _check_op(fn, (1, 2, 37, 133), (1, 2, 37, 133), torch.float32, seed=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pairwise_tiles_and_pixel_splits(host, dtype):
    # 40 x 35 channels: 2 x 2 Gram tiles of 32; 65 x 65 = 4225 pixels: two splits of 4096 (atomics)
    fn = lambda s, t, b: sk.pairwise_kd(s, t, backend=b)  # noqa: E731
    _check_op(fn, (1, 40, 65, 65), (1, 35, 65, 65), dtype, seed=9)


# ---------------------------------------------------------------------------------------------
# The layer itself
# ---------------------------------------------------------------------------------------------

def test_block_size_above_the_device_limit_raises(host):
    host.host_set_attribute("max_threads_per_block", 128)  # every launcher uses 256 threads
    x = make_tensor((1, 3, 5, 7), seed=1)
    with pytest.raises(RuntimeError, match="cudaErrorInvalidConfiguration.*too many threads"):
        sk.spatial_pool(x, backend="cuda")


def test_grid_above_the_device_limit_raises(host):
    host.host_set_attribute("max_grid_dim_y", 1)  # ssim puts row strips on grid y: 17 rows need 2
    x = make_tensor((1, 1, 17, 20), seed=1)
    with pytest.raises(RuntimeError, match="grid dimension above the limit"):
        sk.ssim_kd(x, x, window_size=3, backend="cuda")


def test_errors_do_not_stick_to_later_launches(host):
    host.host_set_attribute("max_threads_per_block", 128)
    x = make_tensor((1, 3, 5, 7), seed=1)
    with pytest.raises(RuntimeError):
        sk.spatial_pool(x, backend="cuda")
    host.host_reset()
    assert_close(sk.spatial_pool(x, backend="cuda")[0], sk.spatial_pool(x, backend="reference")[0])


def test_thread_order_changes_with_the_seed_not_the_result(host):
    # Atomic adds (cross_image backward) follow the random block and thread order: gradients may
    # differ in the last bits between seeds, never beyond fp32 rounding. Same seed: bit-identical.
    s = make_tensor((2, 6, 3, 11), seed=3, requires_grad=True)
    t = make_tensor((2, 5, 3, 11), seed=4)
    grads = []
    for seed in (1, 2, 1):
        host.host_set_seed(seed)
        (g,) = torch.autograd.grad(sk.cross_image_kd(s, t, 0.5, backend="cuda"), s)
        grads.append(g)
    assert torch.equal(grads[0], grads[2])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_host_execution_does_not_leak():
    x = make_tensor((2, 3, 5, 7), seed=1)
    with host_execution():
        sk.spatial_pool(x, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        sk.spatial_pool(x, backend="cuda")
    assert sk.available_backends()["cuda"] is torch.cuda.is_available()


def test_shared_memory_is_poisoned_and_counted(host):
    x = make_tensor((2, 3, 5, 7), seed=1)
    host.host_reset()
    sk.channel_wise_kd(x, x, backend="cuda")
    stats = host.host_stats()
    assert stats["launches"] == 1 and stats["blocks"] == 6 and stats["barriers"] > 0 and stats["collectives"] > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["channel_wise_kd", "pixel_kd", "pfs_pixel_kd"])
def test_half_precision_gradients_are_rounded_once(host, op, dtype):
    # The op saves d loss / d student for grad_output = 1 in fp32; the backward scales it by
    # grad_output and rounds to the student's dtype once. (Saved in the student's dtype and scaled
    # afterwards, about a quarter of the bf16 elements came out double-rounded.)
    from segkd_kernels.ops.channel_wise_kd.cuda import channel_wise_kd_cuda
    from segkd_kernels.ops.pixel_kd.cuda import pfs_pixel_kd_cuda, pixel_kd_cuda

    s = make_tensor((2, 5, 13, 17), dtype=dtype, seed=40, requires_grad=True)
    t = make_tensor((2, 5, 13, 17), dtype=dtype, seed=41)
    call = {"channel_wise_kd": lambda: channel_wise_kd_cuda(s, t, 2.0, True),
            "pixel_kd": lambda: pixel_kd_cuda(s, t, 1.5, None, None, True),
            "pfs_pixel_kd": lambda: pfs_pixel_kd_cuda(s, t, 1.5, None, True)}[op]
    loss, saved = call()
    assert saved.dtype == torch.float32
    g_out = torch.tensor(0.7, dtype=loss.dtype)
    (g,) = torch.autograd.grad(loss, s, g_out)
    assert torch.equal(g, (saved * g_out.float()).to(dtype))
    assert not torch.equal(g, (saved.to(dtype).float() * g_out.float()).to(dtype))  # the double rounding
