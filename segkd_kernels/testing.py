"""Input factories and tolerance helpers shared by the tests, the self-check and the benchmarks."""

from __future__ import annotations

import torch

# (rtol, atol) for comparing a backend with the reference in the same dtype.
TOLERANCES = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


def make_tensor(shape, *, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0,
                requires_grad: bool = False) -> torch.Tensor:
    """Deterministic standard-normal tensor (times `scale`), generated in fp64 on CPU then cast."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Same values as x, as a non-contiguous view (every other element of a wider buffer)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x.detach()
    view = wide[..., ::2]
    assert not view.is_contiguous() or x.shape[-1] == 1
    return view.requires_grad_(x.requires_grad)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(x.requires_grad)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 msg: str = "") -> None:
    """torch.testing.assert_close with this project's per-dtype tolerances."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=msg or None)


def within_error_budget(kernel: torch.Tensor, reference_same_dtype: torch.Tensor, reference_fp64: torch.Tensor,
                        atol: float = 1e-5) -> bool:
    """fp16/bf16 rule (ARCHITECTURE.md): err(kernel) <= 2 * err(reference run in that dtype) + atol,
    both errors measured against the fp64 reference (max abs)."""
    truth = reference_fp64.double()
    err_kernel = (kernel.double() - truth).abs().max().item()
    err_reference = (reference_same_dtype.double() - truth).abs().max().item()
    return err_kernel <= 2 * err_reference + atol
