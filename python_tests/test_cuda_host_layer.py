"""The host execution layer (csrc/host/) on its own: small kernels (cuda_host_layer_kernels.cu)
compiled with g++ against it check each CUDA feature it emulates against what CUDA specifies:
shuffles (index, up, down, xor, sub-warp widths), votes, partial-warp masks, barrier variants,
1-3-D indices, shared-memory poisoning, dynamic shared memory limits, deadlock and exited-lane
detection, atomics, wmma fragments (fp16/bf16 m16n16k16, tf32 m16n16k8), fp16/bf16 round-to-nearest-even conversions (bitwise
against torch's) and the tf32 rounding (round to nearest, ties away from zero)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from cuda_host_tools import HOST_INCLUDE, compiler

KERNELS = __import__("pathlib").Path(__file__).resolve().parent / "cuda_host_layer_kernels.cu"
pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")


# x86-64 switches fibers with a few instructions of its own; "ucontext" is glibc's portable path
@pytest.fixture(scope="module", params=["default", "ucontext"])
def layer(tmp_path_factory, request):
    import subprocess

    out = tmp_path_factory.mktemp("layer") / "layer.so"
    flags = ["-DSEGKD_HOST_UCONTEXT"] if request.param == "ucontext" else []
    cmd = [compiler(), "-std=c++17", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", *flags, f"-I{HOST_INCLUDE}",
           "-x", "c++", str(KERNELS), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lib = ctypes.CDLL(str(out))
    lib.segkd_layer_error.restype = ctypes.c_char_p
    lib.segkd_layer_seed(ctypes.c_uint64(7))
    return lib


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def test_shuffles(layer):
    n = 64
    out = np.zeros(6 * n, dtype=np.int32)
    assert layer.segkd_layer_shuffles(_ptr(out), n) == 0
    out = out.reshape(6, n)
    t = np.arange(n)
    lane, base = t % 32, t - t % 32
    v = lambda src: 10 * src  # noqa: E731
    np.testing.assert_array_equal(out[0], v(base + (lane + 3) % 32))
    np.testing.assert_array_equal(out[1], v(np.where(lane >= 1, t - 1, t)))
    np.testing.assert_array_equal(out[2], v(np.where(lane + 2 < 32, t + 2, t)))
    np.testing.assert_array_equal(out[3], v(base + (lane ^ 5)))
    np.testing.assert_array_equal(out[4], v(base + (lane // 8) * 8 + 1))
    np.testing.assert_array_equal(out[5], v(base + (lane ^ 4)))


def test_votes_and_partial_masks(layer):
    n = 64
    out = np.zeros(5 * n, dtype=np.uint32)
    assert layer.segkd_layer_votes(_ptr(out), n) == 0
    out = out.reshape(5, n)
    t = np.arange(n)
    for w in range(2):
        lanes = t[32 * w:32 * w + 32]
        ballot = sum(1 << int(l % 32) for l in lanes if l % 3 == 0)
        assert (out[0, lanes] == ballot).all()
    assert (out[1] == 1).all() and (out[2] == 0).all() and (out[3] == 1).all()
    np.testing.assert_array_equal(out[4], t ^ 1)  # each half-warp shuffled within itself


@pytest.mark.parametrize("block,grid", [((96, 1, 1), (2, 1, 1)), ((8, 4, 3), (2, 3, 2))])
def test_barrier_variants_and_indices(layer, block, grid):
    n, blocks = int(np.prod(block)), int(np.prod(grid))
    out = np.zeros(3 * n, dtype=np.int32)
    ids = np.zeros(blocks * n, dtype=np.int32)
    assert layer.segkd_layer_barriers(_ptr(out), _ptr(ids), *block, *grid) == 0
    count = sum(1 for t in range(n) if t % 4 == 1)
    assert (out[:n] == count).all() and (out[n:2 * n] == 0).all() and (out[2 * n:] == 1).all()
    np.testing.assert_array_equal(ids, (np.arange(blocks)[:, None] * 1000 + np.arange(n)[None]).ravel())


def test_shared_memory_is_poisoned_at_block_start(layer):
    n = 256
    out = np.zeros(n, dtype=np.float32)
    assert layer.segkd_layer_neighbour(_ptr(out), n, -1) == 0
    np.testing.assert_array_equal(out, (np.arange(n) + 1) % n)
    assert layer.segkd_layer_neighbour(_ptr(out), n, 5) == 0  # threads 5, 69, ... never write
    unwritten = (np.arange(n) + 1) % 64 == 5
    assert np.isnan(out[unwritten]).all() and not np.isnan(out[~unwritten]).any()


def test_dynamic_shared_memory_limits(layer):
    out = np.zeros(64, dtype=np.float32)
    assert layer.segkd_layer_dynamic(_ptr(out), 64, 4096, -1) == 0 and (out == 1).all()
    # above 48 KiB without raising the kernel's attribute: a launch configuration error
    assert layer.segkd_layer_dynamic(_ptr(out), 64, 64 * 1024, -1) == 9  # cudaErrorInvalidConfiguration
    assert b"dynamic shared memory" in layer.segkd_layer_error()
    assert layer.segkd_layer_dynamic(_ptr(out), 64, 64 * 1024, 64 * 1024) == 0
    # an attribute above the device's opt-in (227 KiB by default) is refused
    assert layer.segkd_layer_dynamic(_ptr(out), 64, 1024, 300 * 1024) == -1  # -cudaErrorInvalidValue


def test_block_and_thread_limits(layer):
    out = np.zeros(2048 * 6, dtype=np.int32)
    assert layer.segkd_layer_shuffles(_ptr(out), 2048) == 9
    assert b"too many threads per block" in layer.segkd_layer_error()
    assert layer.segkd_layer_shuffles(_ptr(out), 0) == 9


def test_deadlocks_and_exited_lanes_fail_the_launch(layer):
    out = np.zeros(64, dtype=np.int32)
    assert layer.segkd_layer_deadlock(_ptr(out)) == 4  # cudaErrorLaunchFailure
    assert b"deadlock" in layer.segkd_layer_error()
    assert layer.segkd_layer_exited_lane(_ptr(out)) == 4
    assert b"exited" in layer.segkd_layer_error()
    # a failed launch does not poison the next one
    assert layer.segkd_layer_shuffles(_ptr(np.zeros(6 * 32, dtype=np.int32)), 32) == 0


def test_atomics(layer):
    d, f = np.zeros(1), np.zeros(1, dtype=np.float32)
    assert layer.segkd_layer_atomics(_ptr(d), _ptr(f), 3, 96) == 0
    assert d[0] == 0.5 * 288 and f[0] == 288


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wmma_tile(layer, dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 16, generator=gen).to(dtype)
    c = torch.randn(16, 16, generator=gen)
    d = torch.zeros(16, 16)
    bits = lambda x: x.contiguous().view(torch.int16).numpy()  # noqa: E731
    a_bits, b_bits = bits(a), bits(b.T.contiguous())  # B is loaded col-major
    # wmma pointers must be 256-bit aligned
    buf = [torch.empty(256 + 16, dtype=torch.int16) for _ in range(2)]
    arrays = []
    for src, tmp in zip((a_bits, b_bits), buf):
        off = (-tmp.data_ptr() % 32) // 2
        tmp[off:off + 256] = torch.from_numpy(src.reshape(-1).copy())
        arrays.append(tmp[off:off + 256])
    fn = layer.segkd_layer_mma_half if dtype == torch.float16 else layer.segkd_layer_mma_bf16
    cf = torch.empty(256 + 8)
    co = (-cf.data_ptr() % 32) // 4
    cf[co:co + 256] = c.reshape(-1)
    df = torch.zeros(256 + 8)
    do = (-df.data_ptr() % 32) // 4
    assert fn(*(ctypes.c_void_p(x.data_ptr()) for x in (arrays[0], arrays[1], cf[co:], df[do:]))) == 0
    d = df[do:do + 256].reshape(16, 16)
    want = a.double() @ b.double() + c.double()  # products exact, sums in fp32: 16 terms
    torch.testing.assert_close(d.double(), want, rtol=0, atol=1e-5 * (want.abs().max().item() + 1))


def test_half_conversions_round_to_nearest_even(layer):
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([
        torch.randn(20000, generator=gen) * 10,
        torch.randn(5000, generator=gen) * 1e-6,   # fp16 subnormals
        torch.randn(2000, generator=gen) * 1e-38,  # fp32 subnormals (bf16 keeps them)
        torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e5, -1e5, float("inf"), float("-inf"),
                      2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -14, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11,
                      3.3895314e38, 3.4e38]),
    ]).float()
    # every tie of fp16 and bf16 around random values: x with the dropped bits exactly half
    ties = torch.randn(4000, generator=gen).float().view(torch.int32)
    x = torch.cat([x, ((ties & ~0x1FFF) | 0x1000).view(torch.float32), ((ties & ~0xFFFF) | 0x8000).view(torch.float32)])
    n = x.numel()
    xn = x.numpy()
    hb, bb = np.zeros(n, dtype=np.uint16), np.zeros(n, dtype=np.uint16)
    hf, bf = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
    layer.segkd_layer_convert(_ptr(xn), _ptr(hb), _ptr(bb), _ptr(hf), _ptr(bf), ctypes.c_int64(n))
    np.testing.assert_array_equal(hb, x.half().view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(bb, x.bfloat16().view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(hf, x.half().float().numpy())
    np.testing.assert_array_equal(bf, x.bfloat16().float().numpy())
    # NaN stays NaN
    nan = np.array([np.nan], dtype=np.float32)
    layer.segkd_layer_convert(_ptr(nan), _ptr(hb), _ptr(bb), _ptr(hf), _ptr(bf), ctypes.c_int64(1))
    assert np.isnan(hf[0]) and np.isnan(bf[0])


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """A copy of the fp32 tensor x at a 256-bit aligned address (wmma requires it)."""
    buf = torch.zeros(x.numel() + 8)
    off = (-buf.data_ptr() % 32) // 4
    buf[off:off + x.numel()] = x.reshape(-1)
    return buf[off:off + x.numel()]


def _tf32_oracle(x: np.ndarray) -> np.ndarray:
    """cvt.rna.tf32.f32 by its definition: of the two tf32 neighbours (10 mantissa bits) of each
    finite x, the nearer one, the one farther from zero on a tie; computed in fp64."""
    with np.errstate(invalid="ignore", over="ignore"):  # infinities: their NaN candidates are never picked
        return _tf32_oracle_finite(x.astype(np.float32))


def _tf32_oracle_finite(x: np.ndarray) -> np.ndarray:
    down = (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)  # toward zero
    ulp = (((down.view(np.uint32) & np.uint32(0x7F800000)) | np.uint32(0x2000)).view(np.float32).astype(np.float64)
           - (down.view(np.uint32) & np.uint32(0x7F800000)).view(np.float32).astype(np.float64))
    ulp = np.where((down.view(np.uint32) & 0x7F800000) == 0, 2.0 ** -136, ulp)  # subnormals: fixed spacing
    mag = np.abs(x.astype(np.float64)) - np.abs(down.astype(np.float64))
    up = np.sign(x) * (np.abs(down.astype(np.float64)) + ulp)
    return np.where(mag >= ulp / 2, up, down.astype(np.float64)).astype(np.float32)


def test_tf32_rounding_is_nearest_ties_away(layer):
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([
        torch.randn(20000, generator=gen) * 10,
        torch.randn(2000, generator=gen) * 1e-39,  # fp32 subnormals
        torch.tensor([0.0, -0.0, 1.0, 3.4028235e38, -3.4028235e38, float("inf"), float("-inf"),
                      1.0 + 2.0 ** -11, -(1.0 + 2.0 ** -11), 1.0 + 2.0 ** -11 - 2.0 ** -23, 1.0 + 3 * 2.0 ** -11]),
    ]).float()
    ties = torch.randn(4000, generator=gen).float().view(torch.int32)
    x = torch.cat([x, ((ties & ~0x1FFF) | 0x1000).view(torch.float32)])  # every dropped part exactly half
    xn = x.numpy()
    out = np.zeros_like(xn)
    layer.segkd_layer_tf32(_ptr(xn), _ptr(out), ctypes.c_int64(xn.size))
    np.testing.assert_array_equal(out, _tf32_oracle(xn))
    assert (out.view(np.uint32) & 0x1FFF).max() == 0
    # hand-checked: a tie rounds away from zero, the largest float overflows to infinity
    assert out[-4011 + 7] == 1.0 + 2.0 ** -10 and out[-4011 + 8] == -(1.0 + 2.0 ** -10)
    assert out[-4011 + 9] == 1.0 and out[-4011 + 10] == 1.0 + 4 * 2.0 ** -11
    assert np.isinf(out[-4011 + 3]) and out[-4011 + 3] > 0
    nan = np.array([np.nan], dtype=np.float32)
    layer.segkd_layer_tf32(_ptr(nan), _ptr(out), ctypes.c_int64(1))
    assert np.isnan(out[0])


def test_wmma_tf32_tile(layer):
    assert layer.segkd_layer_tf32_fragment_elements() == 448  # 4, 4 and 8 elements per lane, as CUDA
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(16, 8, generator=gen)
    b = torch.randn(8, 16, generator=gen)
    c = torch.randn(16, 16, generator=gen)
    pa, pb, pc = _aligned(a), _aligned(b.T.contiguous()), _aligned(c)  # B is loaded col-major
    pd = _aligned(torch.zeros(16, 16))
    args = [ctypes.c_void_p(x.data_ptr()) for x in (pa, pb, pc, pd)]
    assert layer.segkd_layer_mma_tf32(*args, 1) == 0, layer.segkd_layer_error()
    d = pd.reshape(16, 16).double()
    ar = torch.from_numpy(_tf32_oracle(a.numpy())).double()
    br = torch.from_numpy(_tf32_oracle(b.numpy())).double()
    want = ar @ br + c.double()  # tf32 products exact in fp32, 8 fp32 additions
    torch.testing.assert_close(d, want, rtol=0, atol=8 * 2.0 ** -24 * (ar.abs() @ br.abs() + c.double().abs()).max().item())
    # the rounding happened: against the unrounded product the result is off by about 2^-11
    assert (d - (a.double() @ b.double() + c.double())).abs().max().item() > 1e-5
    # operands that are not tf32 values (a kernel that forgot __float_to_tf32) fail the launch
    assert layer.segkd_layer_mma_tf32(*args, 0) != 0
    assert b"tf32" in layer.segkd_layer_error()
