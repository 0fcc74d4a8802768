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
    # With one SM and one row of at least 4 splits of 256 threads x 1 vector load, the row is split
    # over several blocks: two kernels (statistics, then finish) instead of one.
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


def _stream_shape(dtype, vector, rows=(2, 3)):
    """A row of 3 work items of the persistent plan (256 threads x 4 vector loads each, the last
    one partial), 16-byte aligned or not."""
    elems = 16 // torch.tensor([], dtype=dtype).element_size()
    return (*rows, 1, 2 * 256 * elems * 4 + (elems * 11 if vector else 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vector", [True, False])
@pytest.mark.parametrize("groups", ["one", "several"])
def test_cwd_stream_plan(host, dtype, vector, groups):
    # Rows longer than the register cache, with a gradient: one persistent launch (statistics
    # items, then gradient items re-reading their row group). An L2 of 4 x 2 rows of s and t makes
    # groups of 2 rows, so the 6 rows take 3 groups and the S(1) items run before D(0); gradient
    # with grad_output 0.7 (recomputed in fp16/bf16 by the same launch with a multiplier).
    shape = _stream_shape(dtype, vector)
    size = torch.tensor([], dtype=dtype).element_size()
    if groups == "several":
        host.host_set_attribute("l2_cache_size", 4 * 2 * (2 * shape[-1] * size))
    s = make_tensor(shape, dtype=dtype, seed=7, requires_grad=True)
    t = make_tensor(shape, dtype=dtype, seed=8)
    assert _launches(host, lambda: sk.channel_wise_kd(s, t, backend="cuda")) == 1
    _check_op(CWD, shape, shape, dtype, seed=7)


def test_cwd_stream_plan_is_deterministic_and_falls_back(host):
    # The loss is merged from per-chunk states in chunk order: the same bits whatever the block
    # order; a row of s and t above a quarter of the L2 cannot stay resident between its two
    # reads, so it takes the split plan (statistics, then finish) with one SM.
    shape = _stream_shape(torch.float32, True)
    host.host_set_attribute("l2_cache_size", 4 * 2 * (2 * shape[-1] * 4))
    s = make_tensor(shape, seed=9, requires_grad=True)
    t = make_tensor(shape, seed=10)
    outs = []
    for seed in (1, 2):
        host.host_set_seed(seed)
        loss = CWD(s, t, "cuda")
        outs.append((loss.detach(), torch.autograd.grad(loss, s)[0]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    host.host_set_attribute("multiprocessor_count", 1)
    host.host_set_attribute("l2_cache_size", 4 * 2 * shape[-1] * 4 - 4)
    assert _launches(host, lambda: CWD(s, t, "cuda")) == 2
    _check_op(CWD, shape, shape, torch.float32, seed=9)


CROSS = lambda s, t, b: sk.cross_image_kd(s, t, 0.5, backend=b)  # noqa: E731


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # FMA / wmma tiles
@pytest.mark.parametrize("plan", ["tensor_cores", "owned", "atomic"])
def test_cross_image_backward_plans(host, plan, dtype):
    # With the opt-in shared memory of the tensor-core kernels (about 36 KB for fp16/bf16 here, 24 KB
    # for fp32): one kernel, on 64-row tiles of 256 threads (fp16/bf16) or 32-row tiles of 128
    # threads (fp32, 3xTF32); below that the owned-pixel kernels (rows and columns, C_s x 32 fp32
    # accumulators in shared memory); below that the per-tile atomic kernel on 32-row tiles of 256
    # threads. Blocks and threads tell them apart. 33 pixels: two 32-pixel tiles, the second with
    # one valid pixel.
    shape_s, shape_t = (2, 6, 3, 11), (2, 5, 3, 11)
    s = make_tensor(shape_s, dtype=dtype, seed=3, requires_grad=True)
    t = make_tensor(shape_t, dtype=dtype, seed=4)
    # fp32: 16 KB holds the owned-pixel kernels (13 KB) but neither fp32 tensor-core kernel (17 KB+)
    optin = {"tensor_cores": 232448, "owned": 16384 if dtype == torch.float32 else 24576, "atomic": 1024}

    def backward_work(size):
        host.host_set_attribute("max_shared_memory_per_block_optin", size)
        loss = sk.cross_image_kd(s, t, 0.5, backend="cuda")
        before = host.host_stats()
        launches = _launches(host, lambda: torch.autograd.grad(loss, s))
        after = host.host_stats()
        return launches, after["blocks"] - before["blocks"], after["threads"] - before["threads"]

    work = {name: backward_work(size) for name, size in optin.items()}
    pairs = shape_s[0] ** 2
    assert work["owned"][0] == work["atomic"][0] + 1  # rows and columns kernels instead of one
    assert work["owned"][1] - work["atomic"][1] == 2 * pairs * 2 - pairs * 2  # 2 x 2 tiles of 32 vs 2
    assert work["tensor_cores"][0] == work["atomic"][0]
    if dtype == torch.float32:
        assert work["tensor_cores"][1] == work["atomic"][1]  # 32-row tiles both
        assert work["atomic"][2] - work["tensor_cores"][2] == pairs * 2 * (256 - 128)
    else:
        assert work["atomic"][1] - work["tensor_cores"][1] == pairs * 2 - pairs * 1  # 32- vs 64-row tiles
    host.host_set_attribute("max_shared_memory_per_block_optin", optin[plan])
    _check_op(CROSS, shape_s, shape_t, dtype, seed=3)


@pytest.mark.parametrize("padding", ["reflect", "zeros", "valid"])
@pytest.mark.parametrize("window", [3, 5, 7, 9, 13, 15])  # 11: in the GPU matrix
def test_ssim_paddings_and_windows(host, padding, window):
    # 37 x 133: two column blocks of 128 and three row strips of 16, halos at every edge
    fn = lambda s, t, b: sk.ssim_kd(s, t, window_size=window, padding=padding, data_range=2.0,  # noqa: E731
                                    backend=b)
    _check_op(fn, (1, 2, 37, 133), (1, 2, 37, 133), torch.float32, seed=window)


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pairwise_tiles_and_pixel_splits(host, dtype, precision):
    # 40 + 35 channels: one 64-channel tile of Z each (3 upper tiles); 65 x 65 = 4225 pixels: 9
    # pixel splits of 512 (partials summed on the host), the last one short
    fn = lambda s, t, b: sk.pairwise_kd(s, t, precision=precision, backend=b)  # noqa: E731
    _check_op(fn, (1, 40, 65, 65), (1, 35, 65, 65), dtype, seed=9)


def _seeds_agree(host, fn):
    """fn() under two thread/block orders: bit-identical (fixed-order combines, no atomics)."""
    got = []
    for seed in (1, 2):
        host.host_set_seed(seed)
        got.append(fn())
    for a, b in zip(got[0], got[1]):
        assert torch.equal(a, b)
    return got[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vector", [True, False])
def test_spatial_pool_split_rows_plan(host, dtype, vector):
    # One SM (two waves = 16 blocks) and 6 rows of two ranges of two 128-bit loads per thread: each
    # row runs over two blocks, then a combine kernel. The same maximum in both ranges: the first
    # position keeps the max's gradient, as without the split.
    host.host_set_attribute("multiprocessor_count", 1)
    elems = 16 // torch.tensor([], dtype=dtype).element_size()
    plane = 2 * 2 * 256 * elems + (0 if vector else 3)
    x = make_tensor((2, 3, 1, plane), dtype=dtype, seed=9, requires_grad=True)
    with torch.no_grad():
        x[1, 2, 0, 5] = 8.0
        x[1, 2, 0, plane - 2] = 8.0
    assert _launches(host, lambda: sk.spatial_pool(x, backend="cuda")) == 2
    avg, mx = _seeds_agree(host, lambda: sk.spatial_pool(x, backend="cuda"))
    want_avg, want_mx = sk.spatial_pool(x, backend="reference")
    assert_close(avg, want_avg)
    assert torch.equal(mx, want_mx)
    (dx,) = torch.autograd.grad(sk.spatial_pool(x, backend="cuda")[1].sum(), x)
    assert dx[1, 2, 0, 5] == 1 and dx[1, 2, 0, plane - 2] == 0 and dx.sum() == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attnfd_epilogue_on_the_device(host, dtype):
    # 300 partials: more than the finish block's 256 threads, so some threads add two partials
    # before the warp and block combines. The loss and the gradient are kernel work only (2 launches
    # forward, 1 backward), bit-identical under two thread orders, and match the fp64 reference.
    from segkd_kernels.ops._cuda_common import cuda_lib

    shape = (1, 4, 240, 320)
    assert cuda_lib("attnfd_loss").attnfd_num_partials(math.prod(shape)) == 300
    s = make_tensor(shape, dtype=dtype, seed=21, requires_grad=True)
    t = (s.detach() + 0.5 * make_tensor(shape, dtype=dtype, seed=22)).to(dtype)
    g = torch.tensor(0.7, dtype=dtype)

    def run():
        loss = sk.attnfd_loss(s, t, backend="cuda")
        return loss.detach(), torch.autograd.grad(loss, s, g)[0]

    loss = sk.attnfd_loss(s, t, backend="cuda")
    assert _launches(host, lambda: sk.attnfd_loss(s, t, backend="cuda")) == 2
    assert _launches(host, lambda: torch.autograd.grad(loss, s, g)) == 1
    got_loss, got_grad = _seeds_agree(host, run)
    s64 = s.detach().double().requires_grad_(True)
    want = sk.attnfd_loss(s64, t.double(), backend="reference")
    (want_grad,) = torch.autograd.grad(want, s64, g.double())
    # fp32: products exact in fp64, sums of 3e5 terms; one rounding of the loss and of each
    # coefficient to fp32 (bf16: the outputs' own rounding dominates)
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(got_loss.double(), want, **tol)
    torch.testing.assert_close(got_grad.double(), want_grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vector", [True, False])
def test_channel_rows_split_plans(host, dtype, vector):
    # One SM and 6 (n, c) rows of at least two ranges of 256 threads x 4 positions: the rows of the
    # channel_pool backward (with a gate) run over two blocks each, and the per-range gate gradients
    # are added by one more kernel, in range order (the cbam_gate backward's own plans:
    # test_cuda_host_gate_plans.py).
    host.host_set_attribute("multiprocessor_count", 1)
    hw = (32, 64) if vector else (31, 67)
    x = make_tensor((2, 3, *hw), dtype=dtype, seed=11, requires_grad=True)
    gate = make_tensor((2, 3), seed=12, requires_grad=True)
    ms = make_tensor((2, 1, *hw), seed=13, requires_grad=True)
    up_pool = make_tensor((2, 2, *hw), dtype=dtype, seed=14)
    up_gate = make_tensor((2, 3, *hw), dtype=dtype, seed=15)

    def pool_grads(backend):
        return torch.autograd.grad(sk.channel_pool(x, gate, backend=backend), (x, gate), up_pool)

    def gate_grads(backend):
        return torch.autograd.grad(sk.cbam_gate(x, gate, ms, backend=backend), (x, gate, ms), up_gate)

    out = sk.channel_pool(x, gate, backend="cuda")
    assert _launches(host, lambda: torch.autograd.grad(out, (x, gate), up_pool)) == 2  # rows, combine
    out = sk.cbam_gate(x, gate, ms, backend="cuda")
    # cbam_gate: one pass, then the dM_c partials of its pixel tiles added (one SM: one channel slice)
    assert _launches(host, lambda: torch.autograd.grad(out, (x, gate, ms), up_gate)) == 2
    for got, want in ((_seeds_agree(host, lambda: pool_grads("cuda")), pool_grads("reference")),
                      (_seeds_agree(host, lambda: gate_grads("cuda")), gate_grads("reference"))):
        for g, w in zip(got, want):
            assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pixel_norm_channels_split_over_warps(host, dtype):
    # 16 warps share 32 pixels: fewer channels than warps, exactly 16, more (not a multiple), and a
    # partial last pixel tile. fp32 sums of C squares: relative error below (C + 1) 2^-24 (sqrt
    # halves the sum's error and adds half an ulp), against the fp64 norm of the same inputs.
    from segkd_kernels.ops._cuda_common import cuda_lib
    from segkd_kernels.ops.pairwise_kd.cuda import pixel_norms

    for c in (3, 16, 37):
        x = make_tensor((3, c, 5, 9), dtype=dtype, seed=c)
        got = pixel_norms(cuda_lib("pairwise_kd"), x)
        want = x.double().reshape(3, c, 45).norm(dim=1)
        torch.testing.assert_close(got.double(), want, rtol=(c + 1) * 2.0 ** -24, atol=0)


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


def _saved_grad_call(op, s, t):
    from segkd_kernels.ops.channel_wise_kd.cuda import channel_wise_kd_cuda
    from segkd_kernels.ops.pixel_kd.cuda import pfs_pixel_kd_cuda, pixel_kd_cuda

    return {"channel_wise_kd": lambda: channel_wise_kd_cuda(s, t, 2.0, True),
            "pixel_kd": lambda: pixel_kd_cuda(s, t, 1.5, None, None, True),
            "pfs_pixel_kd": lambda: pfs_pixel_kd_cuda(s, t, 1.5, None, True)}[op]()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["channel_wise_kd", "pixel_kd", "pfs_pixel_kd"])
def test_saved_gradient_is_handed_out_or_rescaled_in_place(host, op, dtype):
    # The op saves d loss / d student for grad_output = 1 in the student's dtype, and a backward that
    # cannot run again hands that tensor out itself: untouched for grad_output = 1 (the kernels read
    # grad_output and return), rescaled in place otherwise: fp32 times grad_output, fp16/bf16
    # recomputed from the inputs and rounded once (the fp32 gradient times grad_output, rounded).
    s = make_tensor((2, 5, 13, 17), dtype=dtype, seed=40, requires_grad=True)
    t = make_tensor((2, 5, 13, 17), dtype=dtype, seed=41)
    _, exact = _saved_grad_call(op, s.detach().float(), t.float())  # the same math in fp32
    for g_value in (1.0, 0.7):
        loss, saved = _saved_grad_call(op, s, t)
        assert saved.dtype == dtype
        first = saved.clone()
        g_out = torch.tensor(g_value, dtype=loss.dtype)
        (g,) = torch.autograd.grad(loss, s, g_out)
        assert g.data_ptr() == saved.data_ptr()  # the saved tensor itself, no copy
        if g_value == 1.0:
            assert torch.equal(g, first)
        elif dtype == torch.float32:
            assert torch.equal(g, first * g_out)
        else:  # one rounding of the fp32 gradient (up to the fp32 kernel's own last bits)
            want = (exact * g_out.float()).double()
            info = torch.finfo(dtype)
            spacing = (info.eps * torch.exp2(torch.floor(torch.log2(want.abs())))).clamp_min(info.tiny * info.eps)
            # half a spacing per element (a second rounding of the already rounded gradient breaks it
            # by up to half a spacing more), plus 1e-5 relative for the fp32 arithmetic of two kernels
            # (block sizes, summation orders, exp2f's 2 ulp: a few fp32 ulps)
            err = (g.double() - want).abs()
            assert bool((err <= 0.5 * spacing + 1e-5 * want.abs()).all())
            assert not torch.equal(g, first)


@pytest.mark.parametrize("op", ["channel_wise_kd", "pixel_kd", "pfs_pixel_kd"])
def test_saved_gradient_survives_retain_graph_and_in_place_grad_edits(host, op):
    # With retain_graph (or create_graph) the saved gradient must stay as the forward wrote it: a
    # second backward with another grad_output, after .grad was edited in place, sees it intact.
    s = make_tensor((2, 5, 13, 17), seed=42, requires_grad=True)
    t = make_tensor((2, 5, 13, 17), seed=43)
    loss, saved = _saved_grad_call(op, s, t)
    keep = saved.clone()
    loss.backward(torch.tensor(0.5), retain_graph=True)
    assert torch.equal(s.grad, keep * 0.5) and s.grad.data_ptr() != saved.data_ptr()
    s.grad.mul_(0.0)
    assert torch.equal(saved, keep)
    (g,) = torch.autograd.grad(loss, s, torch.tensor(-2.0), create_graph=True)
    assert torch.equal(g, keep * -2.0) and torch.equal(saved, keep)
    loss.backward()  # the last one may consume it
    assert torch.equal(s.grad, keep)
