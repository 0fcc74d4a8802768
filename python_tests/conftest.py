"""Test configuration. Runs before the package is imported: without CUDA, the Triton kernels run on
CPU tensors through the Triton interpreter, so every backend except cuda is tested everywhere."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import segkd_kernels as sk  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
BACKENDS = sk.available_backends()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped on CPU)")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # get_closest_marker, not `"cuda" in item.keywords`: a parametrize id "cuda" is a keyword too
        if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a SEGKD_BACKEND in the caller's shell must not leak in."""
    monkeypatch.delenv("SEGKD_BACKEND", raising=False)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models and tensors: on a loaded 2-core machine intra-op threads only add contention and
    synchronisation (used by the trainer and CLI test modules through pytestmark)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
