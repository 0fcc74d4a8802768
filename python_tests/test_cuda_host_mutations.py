"""The host-built CUDA suite catches planted bugs: each mutation below is applied to a copy of one
kernel file, that file alone is compiled against the host execution layer (cuda_host_tools, g++
-O1, seconds), and the suite's own value/gradient test (test_cuda_backends'
test_cuda_matches_reference_fp32, on the host) runs against it for a few cases of that op: at
least one must fail (a wrong value or gradient, or a launch error). The same file unmodified, built
and run the same way, must pass every one of those cases, so a failure is the mutation's doing.

The five mutations the layer was built to expose (a warp-shuffle offset, a missing
__syncthreads, a tile edge `<` -> `<=`, an SSIM reflect index, a work-item length), plus a
read of shared memory nobody wrote (caught by the poison pattern) and plain tf32 products where
the fp32 cross-image kernels split each operand for 3xTF32 (the fp32 tolerance tells them apart).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import test_cuda_backends as gpu_tests
from cuda_host_tools import ShimLibrary, build_library, compiler, copy_sources
from segkd_kernels._backends import host_execution, host_library

HOST, HOST_REASON = host_library()
pytestmark = [pytest.mark.skipif(HOST is None, reason=HOST_REASON),
              pytest.mark.skipif(compiler() is None, reason="no C++ compiler")]

# name -> (kernel file, original text, mutated text, cases of test_cuda_backends.GPU_CASES)
MUTATIONS = {
    "warp-shuffle offset": (
        "channel_wise_kd", "  __device__ __forceinline__ void warp_merge() {\n    for (int offset = 16;",
        "  __device__ __forceinline__ void warp_merge() {\n    for (int offset = 8;",
        ["cwd(1, 3, 5, 7)", "cwd(2, 3, 37, 71)"]),
    "missing __syncthreads": (
        "cross_image_kd",
        "    f32_tile_dots(smem, L, buf, cs16, ct16);\n    __syncthreads();  // S and T in L.out;",
        "    f32_tile_dots(smem, L, buf, cs16, ct16);\n    // S and T in L.out;",
        ["cross_image(1, 3, 5, 7)"]),
    "1xTF32 instead of 3xTF32": (
        "cross_image_kd",
        "  nvcuda::wmma::mma_sync(acc, a_lo, b_hi, acc);\n  nvcuda::wmma::mma_sync(acc, a_hi, b_lo, acc);\n",
        "",
        ["cross_image(1, 3, 5, 7)", "cross_image(3, 6, 9, 11)"]),
    "tile edge < to <=": (
        "pairwise_kd", "      if (p < p_end) {", "      if (p <= p_end) {", ["pairwise-None-False"]),
    "ssim reflect index": (
        "ssim_kd", "    if (i >= n) i = 2 * (n - 1) - i;", "    if (i >= n) i = 2 * n - 1 - i;",
        ["ssim-reflect-3-True", "ssim-zeros-3-True"]),
    # (rows longer than the register cache now take the persistent plan whenever a gradient is
    # written, so a longer register cache is no longer reachable there: the length that matters for
    # them is the work item's)
    "work-item length": (
        "channel_wise_kd",
        "const int64_t chunk_len = static_cast<int64_t>(blockDim.x) * V * kStreamUnroll;",
        "const int64_t chunk_len = static_cast<int64_t>(blockDim.x) * V * (kStreamUnroll - 1);",
        ["cwd(2, 3, 37, 71)", "cwd(1, 3, 257, 259)"]),
    "unwritten shared memory": (
        "ssim_kd", "    for (int ly = 0; ly < K; ++ly) {\n      const int gy = i0 + ly < in_rows",
        "    for (int ly = 0; ly < K - 1; ++ly) {\n      const int gy = i0 + ly < in_rows",
        ["ssim-reflect-3-True", "ssim-zeros-3-True"]),
}
UNITS = sorted({m[0] for m in MUTATIONS.values()})


def _build(work: Path, unit: str, mutation: tuple[str, str] | None) -> Path | None:
    src = copy_sources(work / "src")
    if mutation is not None:
        path = src / f"{unit}.cu"
        text = path.read_text()
        if text.count(mutation[0]) != 1:
            return None  # the mutation site is gone: reported by the test
        path.write_text(text.replace(*mutation))
    return build_library(src, unit, work / f"{unit}.so")


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """Every unmodified unit and every mutant, built two at a time."""
    jobs = {("baseline", u): (u, None) for u in UNITS}
    jobs.update({("mutant", name): (m[0], (m[1], m[2])) for name, m in MUTATIONS.items()})
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(_build, tmp_path_factory.mktemp("mut"), *job) for key, job in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


def _failures(library: Path, cases: list[str]) -> dict[str, str]:
    """case -> why it failed, for the suite's fp32 test run with `library`."""
    failed = {}
    with host_execution(ShimLibrary(library, HOST)):
        HOST.host_reset()
        HOST.host_set_seed(1234)
        for case in cases:
            try:
                gpu_tests.test_cuda_matches_reference_fp32(case, "cpu")
            except (AssertionError, RuntimeError, ValueError) as err:
                failed[case] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return failed


@pytest.mark.parametrize("unit", UNITS)
def test_unmodified_kernels_pass_through_the_same_harness(libraries, unit):
    cases = sorted({c for m in MUTATIONS.values() if m[0] == unit for c in m[3]})
    assert all(c in gpu_tests.GPU_CASES for c in cases)
    assert _failures(libraries[("baseline", unit)], cases) == {}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_planted_bug_fails_the_suite(libraries, name):
    library = libraries[("mutant", name)]
    assert library is not None, f"the mutation site of {name!r} is gone from csrc/{MUTATIONS[name][0]}.cu"
    failed = _failures(library, MUTATIONS[name][3])
    assert failed, f"{name}: the suite still passes"
    print(f"{name}: caught by {failed}")
