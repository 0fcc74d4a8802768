"""Out-of-bounds global memory accesses of a kernel fail under AddressSanitizer: csrc/pairwise_kd.cu
is built with -fsanitize=address against the host execution layer (which tells ASan about every
fiber stack switch), linked into a small driver that gives each launcher buffers of exactly the
size the launcher contract (csrc/launchers.h) promises. The unchanged file runs clean; the same
file with one tile-edge comparison `<` turned into `<=` reads one element past the end of an input
and ASan stops it with a heap-buffer-overflow report.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from cuda_host_tools import HOST_INCLUDE, compiler, copy_sources

DRIVER = r"""
#include <cstdint>
#include <cstdio>
#include <vector>
#include "launchers.h"

// pairwise_gram over 2 images of 5 x 7 channels and 4100 pixels (two pixel splits of 2112 and 1988),
// every buffer exactly as large as csrc/launchers.h says.
int main() {
  const int64_t batch = 2, cs = 5, ct = 7, plane = 4100, splits = 2, n_up = 3;
  std::vector<float> x(batch * cs * plane), y(batch * ct * plane);
  std::vector<double> nx(batch * plane), ix(batch * plane), ny(batch * plane), iy(batch * plane);
  std::vector<double> gram(batch * splits * n_up * 64 * 64);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 37) % 11) - 5.f;
  for (size_t i = 0; i < y.size(); ++i) y[i] = static_cast<float>((i * 53) % 13) - 6.f;
  auto u = [](auto& v) { return reinterpret_cast<std::uintptr_t>(v.data()); };
  segkd::pixel_inv_norm(u(x), u(nx), u(ix), batch, cs, plane, 1e-12, segkd::DType::Float32, 0, 0);
  segkd::pixel_inv_norm(u(y), u(ny), u(iy), batch, ct, plane, 1e-12, segkd::DType::Float32, 0, 0);
  segkd::pairwise_gram(u(x), u(ix), u(y), u(iy), u(gram), batch, cs, ct, plane, splits, false, segkd::DType::Float32,
                       0, 0);
  double sum = 0;
  for (double g : gram) sum += g;
  std::printf("gram sum %.6f\n", sum);
  return 0;
}
"""


def _supports_asan(cxx: str, tmp_path) -> bool:
    probe = tmp_path / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    done = subprocess.run([cxx, "-fsanitize=address", str(probe), "-o", str(tmp_path / "probe")],
                          capture_output=True, text=True)
    return done.returncode == 0


def _build_and_run(tmp_path, mutate: bool) -> subprocess.CompletedProcess:
    cxx = compiler()
    src = copy_sources(tmp_path / "src")
    if mutate:
        path = src / "pairwise_kd.cu"
        text = path.read_text()
        assert text.count("      if (p < p_end) {") == 1, "the mutation site is gone from csrc/pairwise_kd.cu"
        path.write_text(text.replace("      if (p < p_end) {", "      if (p <= p_end) {"))
    driver = tmp_path / "driver.cpp"
    driver.write_text(DRIVER)
    exe = tmp_path / "driver"
    cmd = [cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-fno-strict-aliasing",
           f"-I{HOST_INCLUDE}", f"-I{src}", "-x", "c++", str(src / "pairwise_kd.cu"), str(driver), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def cxx(tmp_path):
    cxx = compiler()
    if cxx is None or not _supports_asan(cxx, tmp_path):
        pytest.skip("no C++ compiler with AddressSanitizer")
    return cxx


def test_unchanged_kernels_run_clean_under_asan(cxx, tmp_path):
    done = _build_and_run(tmp_path, mutate=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gram sum" in done.stdout and "AddressSanitizer" not in done.stderr


def test_out_of_bounds_read_fails_under_asan(cxx, tmp_path):
    done = _build_and_run(tmp_path, mutate=True)
    assert done.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in done.stderr, done.stderr[-3000:]
