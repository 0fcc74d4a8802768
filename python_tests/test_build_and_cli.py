"""The compiled CUDA library (built wherever nvcc and cmake exist) and the `segkd` command."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from segkd_kernels import _backends

CAN_BUILD_CUDA = bool(shutil.which("nvcc") and shutil.which("cmake")) and os.environ.get("SEGKD_CUDA", "auto") != "0"


@pytest.mark.skipif(not CAN_BUILD_CUDA, reason="nvcc/cmake not found or SEGKD_CUDA=0: _cuda is not built here")
def test_cuda_library_was_built_and_links():
    """Where nvcc exists the install must have compiled and linked every kernel (no silent skip)."""
    lib, reason = _backends.cuda_library()
    assert lib is not None, reason
    for name in ("spatial_pool_forward", "spatial_pool_backward"):
        assert callable(getattr(lib, name))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_library_without_gpu_raises_instead_of_crashing():
    lib, _ = _backends.cuda_library()
    if lib is None:
        pytest.skip("_cuda not built")
    with pytest.raises(RuntimeError, match="cuda"):
        lib.spatial_pool_forward(0, 0, 0, 0, 0, 0, 2, 4, 0, 0, 0)


def run_cli(*args, env_update=None):
    env = dict(os.environ, **(env_update or {}))
    return subprocess.run([sys.executable, "-m", "segkd_kernels.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_segkd_info():
    out = run_cli("info", env_update={"TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr
    for needle in ("torch", "backends:", "reference", "triton", "cuda", "_cuda library", "spatial_pool"):
        assert needle in out.stdout
    if not torch.cuda.is_available():
        assert "no CUDA device" in out.stdout  # says why triton/cuda cannot run


def test_import_without_interpreter_reports_triton_unavailable_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    code = "import segkd_kernels as sk; r = sk.available_backends(); print(r['triton'], r.reasons['triton'])"
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False") and "TRITON_INTERPRET=1" in out.stdout


def test_selfcheck_passes():
    out = run_cli("selfcheck")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all backends agree with the reference" in out.stdout
    for op in ("channel_wise_kd", "pairwise_kd", "ssim_kd", "spatial_pool"):
        assert op in out.stdout
