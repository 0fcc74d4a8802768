"""Backend reporting and the single dispatch point (docs/api.md rules)."""

import pytest
import torch

import segkd_kernels as sk
from segkd_kernels import _backends
from segkd_kernels._backends import BackendUnavailableError, select_backend
from segkd_kernels.ops import implemented_backends
from segkd_kernels.ops.spatial_pool.api import IMPLEMENTED as POOL_IMPLEMENTED

PUBLIC_OPS = ["channel_wise_kd", "pixel_kd", "pfs_pixel_kd", "pairwise_kd", "cross_image_kd", "memory_contrast_kd", "ssim_kd",
              "attnfd_loss", "spatial_pool", "channel_pool", "cbam_gate"]


def test_available_backends_reports_every_backend_with_a_reason():
    report = sk.available_backends()
    assert set(report) == {"reference", "triton", "cuda"}
    assert report["reference"] is True
    assert all(isinstance(v, bool) for v in report.values())
    assert all(isinstance(report.reasons[k], str) and report.reasons[k] for k in report)
    assert "triton" in repr(report) and "cuda" in repr(report)


def test_every_public_op_has_a_reference():
    impls = implemented_backends()
    assert sorted(impls) == sorted(PUBLIC_OPS)
    for op, backends in impls.items():
        assert "reference" in backends, op
        assert torch.float64 in backends["reference"], op


def test_unknown_backend_name():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="backend: expected one of"):
        sk.spatial_pool(x, backend="fast")


def test_segkd_backend_overrides_auto(monkeypatch):
    x = torch.zeros(1, 1, 2, 2)
    monkeypatch.setenv("SEGKD_BACKEND", "reference")
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x) == "reference"
    # an explicit backend argument wins over the environment
    monkeypatch.setenv("SEGKD_BACKEND", "cuda")
    assert select_backend("spatial_pool", "reference", POOL_IMPLEMENTED, x) == "reference"


def test_segkd_backend_that_cannot_run_raises_and_names_the_variable(monkeypatch):
    monkeypatch.setenv("SEGKD_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="SEGKD_BACKEND='cuda'"):
        sk.spatial_pool(torch.zeros(1, 1, 2, 2))
    monkeypatch.setenv("SEGKD_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SEGKD_BACKEND"):
        sk.spatial_pool(torch.zeros(1, 1, 2, 2))


def test_explicit_backend_never_falls_back():
    x = torch.zeros(1, 2, 3, 3)
    with pytest.raises(BackendUnavailableError, match="has no triton backend"):
        select_backend("some_op", "triton", {"reference": POOL_IMPLEMENTED["reference"]}, x)
    with pytest.raises(BackendUnavailableError, match="tensor on cpu|not built"):
        sk.spatial_pool(x, backend="cuda")


def test_dtype_the_backend_does_not_support():
    x = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    assert torch.float64 not in POOL_IMPLEMENTED["cuda"]
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64 not supported by the cuda backend"):
        select_backend("spatial_pool", "cuda", POOL_IMPLEMENTED, x)


def test_error_type_is_both_runtime_and_value_error():
    assert issubclass(BackendUnavailableError, RuntimeError)
    assert issubclass(BackendUnavailableError, ValueError)


def test_auto_on_cpu_uses_triton_only_under_the_interpreter(monkeypatch):
    x = torch.zeros(1, 1, 2, 2)
    monkeypatch.setattr(_backends, "TRITON_INTERPRET", True)
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x) == "triton"
    assert select_backend("channel_wise_kd", "auto", {"reference": POOL_IMPLEMENTED["reference"]}, x) == "reference"
    monkeypatch.setattr(_backends, "TRITON_INTERPRET", False)
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x) == "reference"
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        select_backend("spatial_pool", "triton", POOL_IMPLEMENTED, x)


def test_missing_libraries_are_reported(monkeypatch):
    monkeypatch.setattr(_backends, "_TRITON_STATUS", (False, "triton not installed (ImportError: x)"))
    monkeypatch.setattr(_backends, "_CUDA_LIBRARY", (None, "CUDA library not built (test)"))
    report = sk.available_backends()
    assert report == {"reference": True, "triton": False, "cuda": False}
    assert "not installed" in report.reasons["triton"] and "not built" in report.reasons["cuda"]
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(BackendUnavailableError, match="triton not installed"):
        sk.spatial_pool(x, backend="triton")
    with pytest.raises(BackendUnavailableError, match="CUDA library not built"):
        sk.spatial_pool(x, backend="cuda")
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x) == "reference"


@pytest.mark.cuda
def test_auto_on_cuda_picks_a_fused_backend():
    x = torch.zeros(1, 1, 2, 2, device="cuda")
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x) in ("triton", "cuda")
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x.double()) in ("triton", "reference")
