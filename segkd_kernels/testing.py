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


def error_budget_atol(reference_fp64: torch.Tensor, dtype: torch.dtype, ulps: float = 8.0) -> float:
    """Floor of an error budget: a few rounding errors (ulps * eps of `dtype`) of the largest true
    value. It matters only where the reference run in `dtype` happens to be (nearly) exact, e.g. a
    handful of terms, and keeps the budget from demanding better than the dtype can store."""
    return ulps * torch.finfo(dtype).eps * reference_fp64.detach().abs().max().item()


def reference_error(fn, *inputs: torch.Tensor, draws: int = 4, seed: int = 0) -> float:
    """How far an evaluation of fn in the inputs' dtype lands from fp64, for inputs like these:
    max over `draws` of max|fn(x) - fn(x in fp64)|, x the inputs moved at random by about one ulp of
    their dtype (the first draw unmoved).

    The error of one evaluation is one sample of the problem's rounding noise (condition,
    accumulation length, magnitude of the terms): a few nearby inputs keep a lucky (nearly exact)
    sample, e.g. of a sum of two terms, from setting the scale."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for k in range(draws):
        moved = []
        for x in inputs:
            x = x.detach()
            if k > 0:
                eps = torch.finfo(x.dtype).eps
                noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device)
                x = (x.double() * (1 + eps * noise)).to(x.dtype)
            moved.append(x)
        low = fn(*moved)
        truth = fn(*(x.double() for x in moved))
        worst = max(worst, (low.double() - truth.double()).abs().max().item())
    return worst


def assert_within_error_budget(kernel: torch.Tensor, reference_fp64: torch.Tensor, reference_err: float, *,
                               what: str = "") -> None:
    """The error-budget rule for any dtype (fp32 too): max|kernel - fp64| <= 2 * reference_err +
    error_budget_atol, reference_err from reference_error (the reference run in the kernel's dtype).

    Two fp32 computations of the same sums in a different order (a Triton tile, numpy's BLAS
    under the interpreter, a torch convolution) differ by as much as either differs from the
    truth, and by how much depends on the CPU and BLAS (core type, threads): the kernel is held to
    twice the reference's own error, against fp64, instead of to a fixed fraction of the result,
    which cancellation (e.g. the SSIM gradient's sums of opposite terms) can beat."""
    atol = error_budget_atol(reference_fp64, kernel.dtype)
    err_kernel = (kernel.double() - reference_fp64.double()).abs().max().item()
    assert err_kernel <= 2 * reference_err + atol, (
        f"{what}: max error {err_kernel:.3e} against fp64, over the budget 2 * {reference_err:.3e} "
        f"(the reference in {kernel.dtype}) + {atol:.3e}")


def within_error_budget(kernel: torch.Tensor, reference_same_dtype: torch.Tensor, reference_fp64: torch.Tensor,
                        atol: float = 1e-5) -> bool:
    """fp16/bf16 rule (docs/backends.md): err(kernel) <= 2 * err(reference run in that dtype) + atol,
    both errors measured against the fp64 reference (max abs)."""
    truth = reference_fp64.double()
    err_kernel = (kernel.double() - truth).abs().max().item()
    err_reference = (reference_same_dtype.double() - truth).abs().max().item()
    return err_kernel <= 2 * err_reference + atol
