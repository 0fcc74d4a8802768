"""`segkd selfcheck`: every loss on synthetic tensors with every available backend, against the reference.

For each op and backend: the loss (or a fixed random projection of the op's outputs) and the
student gradient, compared with the reference run in fp64 on the same inputs. Prints a table and
returns 1 if any backend is off by more than its tolerance.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import segkd_kernels as sk
from segkd_kernels.ops import implemented_backends
from segkd_kernels.testing import make_tensor

# Relative error allowed against the fp64 reference, per input dtype.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass
class Case:
    op: str
    shapes: tuple  # (student shape, teacher shape)
    call: Callable  # call(student, teacher, backend) -> tensor or tuple of tensors
    grad: bool = True  # False for outputs that are detached by definition (knowledge_gap)


@contextlib.contextmanager
def _backend_env(backend: str):
    """SEGKD_BACKEND=backend for the duration: knowledge_gap has no backend argument and follows
    "auto", which the variable overrides."""
    old = os.environ.get("SEGKD_BACKEND")
    os.environ["SEGKD_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            del os.environ["SEGKD_BACKEND"]
        else:
            os.environ["SEGKD_BACKEND"] = old


def _knowledge_gap(s, t, backend):
    with _backend_env(backend):
        return sk.knowledge_gap(s, t, 1.0)


def _project(out) -> torch.Tensor:
    """A scalar from one or several outputs, with fixed random weights so every element counts."""
    outs = out if isinstance(out, tuple) else (out,)
    total = torch.zeros((), dtype=torch.float64, device=outs[0].device)
    for k, o in enumerate(outs):
        weights = make_tensor(o.shape, dtype=torch.float64, seed=100 + k).to(o.device)
        total = total + (o.double() * weights).sum()
    return total


def _cases(size: str) -> list[Case]:
    n, h, w = (2, 13, 17) if size == "small" else (4, 64, 128)
    k, c_s, c_t = 19, 24, 40
    logits, feats_s, feats_t = (n, k, h, w), (n, c_s, h, w), (n, c_t, h, w)
    feats = (n, c_t, h, w)
    m, q = n * h * w // 4, (257 if size == "small" else 1029)
    # cbam_gate: x (N, C, H, W), the channel gate from the teacher tensor's first column, the
    # spatial gate from its first channel; squashed to (0, 1) as CBAM's sigmoids are.
    def gate(s, t, b):
        return sk.cbam_gate(s, t[:, :, 0, 0].sigmoid(), t[:, :1].sigmoid(), backend=b)

    return [
        Case("channel_wise_kd", (logits, logits), lambda s, t, b: sk.channel_wise_kd(s, t, 4.0, backend=b)),
        Case("pixel_kd", (logits, logits), lambda s, t, b: sk.pixel_kd(s, t, 1.0, backend=b)),
        Case("knowledge_gap", (logits, logits), _knowledge_gap, grad=False),
        Case("pfs_pixel_kd", (logits, logits), lambda s, t, b: sk.pfs_pixel_kd(s, t, 1.0, backend=b)),
        Case("pairwise_kd", (feats_s, feats_t), lambda s, t, b: sk.pairwise_kd(s, t, backend=b)),
        Case("cross_image_kd", (feats_s, feats_t), lambda s, t, b: sk.cross_image_kd(s, t, 0.1, backend=b)),
        # memory_contrast_kd: anchors (M, C_t) and, as the teacher tensor, M teacher rows followed by a
        # bank of Q rows (unit length, as CIRKD's queue)
        Case("memory_contrast_kd", ((m, c_t), (m + q, c_t)),
             lambda s, t, b: sk.memory_contrast_kd(s, t[:m], F.normalize(t[m:], dim=1), backend=b)),
        Case("ssim_kd", (feats, feats), lambda s, t, b: sk.ssim_kd(s, t, window_size=7, backend=b)),
        Case("attnfd_loss", (feats, feats), lambda s, t, b: sk.attnfd_loss(s, t, backend=b)),
        Case("spatial_pool", (feats, feats), lambda s, t, b: sk.spatial_pool(s, backend=b)),
        Case("channel_pool", (feats, feats), lambda s, t, b: sk.channel_pool(s, t[:, :, 0, 0].sigmoid(), backend=b)),
        Case("cbam_gate", (feats, feats), gate),
    ]


# knowledge_gap runs on the pixel_kd kernels and has their backends.
IMPLEMENTED_AS = {"knowledge_gap": "pixel_kd"}

# The public functions selfcheck runs (every op of segkd_kernels.__all__; tests compare the two).
CHECKED_OPS = tuple(case.op for case in _cases("small"))


def _run(case: Case, backend: str, student: torch.Tensor, teacher: torch.Tensor):
    s = student.detach().clone().requires_grad_(case.grad)
    start = time.perf_counter()
    value = _project(case.call(s, teacher, backend))
    grad = torch.autograd.grad(value, s)[0] if case.grad else None
    if s.is_cuda:
        torch.cuda.synchronize()
    return value.detach(), grad, (time.perf_counter() - start) * 1e3


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.double().abs().max().clamp_min(1e-12)
    return ((x.double() - ref.double()).abs().max() / scale).item()


def run_selfcheck(size: str = "small", ops=None) -> int:
    """`ops`: the op names to check (default: all of CHECKED_OPS)."""
    unknown = sorted(set(ops or ()) - set(CHECKED_OPS))
    if unknown:
        raise ValueError(f"ops: unknown op(s) {unknown}; expected names from {list(CHECKED_OPS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = sk.available_backends()
    runnable = [name for name, ok in report.items() if ok]
    print(f"segkd selfcheck on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"backends: {', '.join(runnable)}")
    for name, ok in report.items():
        if not ok:
            print(f"  {name} skipped: {report.reasons[name]}")
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    header = f"{'op':<20}{'backend':<11}{'dtype':<10}{'loss':>14}{'rel err':>11}{'grad rel err':>14}{'ms':>10}  status"
    print("\n" + header + "\n" + "-" * len(header))
    failures = 0
    implemented = implemented_backends()
    for case in _cases(size):
        if ops and case.op not in ops:
            continue
        impls = implemented[IMPLEMENTED_AS.get(case.op, case.op)]
        for dtype in dtypes:
            student = make_tensor(case.shapes[0], dtype=dtype, device=device, seed=1)
            teacher = make_tensor(case.shapes[1], dtype=dtype, device=device, seed=2)
            ref_value, ref_grad, _ = _run(case, "reference", student.double(), teacher.double())
            for backend in ("reference", "triton", "cuda"):
                if backend not in impls or not report[backend]:
                    continue
                if dtype not in impls[backend]:
                    continue
                try:
                    value, grad, ms = _run(case, backend, student, teacher)
                except Exception as err:  # report, keep checking the others
                    failures += 1
                    print(f"{case.op:<20}{backend:<11}{str(dtype)[6:]:<10}  ERROR {type(err).__name__}: {err}")
                    continue
                err_v = _rel_err(value, ref_value)
                err_g = _rel_err(grad, ref_grad) if case.grad else 0.0
                ok = err_v <= REL_TOL[dtype] and err_g <= REL_TOL[dtype]
                failures += not ok
                shown_g = f"{err_g:>14.2e}" if case.grad else f"{'(detached)':>14}"
                print(f"{case.op:<20}{backend:<11}{str(dtype)[6:]:<10}{value.item():>14.6g}{err_v:>11.2e}"
                      f"{shown_g}{ms:>10.1f}  {'ok' if ok else 'MISMATCH'}")
    print(f"\nerrors are relative to the reference run in fp64 on the same inputs; tolerance {REL_TOL[torch.float32]:g} "
          "for fp32" + (f", {REL_TOL[torch.bfloat16]:g} for bf16" if device == "cuda" else ""))
    print("ms: one forward+backward call, first-call compilation (or interpretation) included; "
          "for timings use benchmarks/")
    print("selfcheck: " + ("all backends agree with the reference" if not failures else f"{failures} mismatches"))
    return 1 if failures else 0
