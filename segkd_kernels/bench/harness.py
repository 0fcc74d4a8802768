"""Timing, memory and CSV rows shared by the op, scaling and end-to-end benchmarks."""

from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import logging
import math
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import torch

COLUMNS = ["op", "shape", "dtype", "mode", "provider", "ms_p50", "ms_p20", "ms_p80", "peak_mem_mb", "gbps",
           "roofline_frac", "pass3_frac", "device", "torch", "triton", "cuda", "commit", "date"]
MODES = ("forward", "backward", "full")


def make_timer(device: str, quick: bool):
    """fn -> (p50, p20, p80) in ms. triton.testing.do_bench on CUDA (it flushes L2 between runs);
    a perf_counter loop on CPU, where the numbers only check the harness."""
    if device == "cuda":
        import triton.testing  # noqa: PLC0415

        return lambda fn: tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))

    def cpu_timer(fn):
        fn()  # warm-up (first calls compile or allocate)
        samples = []
        for _ in range(3 if quick else 10):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        ordered = sorted(samples)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return statistics.median(samples), pick(0.2), pick(0.8)

    return cpu_timer


def scalar(out) -> torch.Tensor:
    """One number to differentiate, whatever the op returns (a loss, or pooled maps)."""
    if isinstance(out, (tuple, list)):
        return sum(o.float().sum() for o in out)
    return out.float().sum() if out.dim() else out


def runner(fn, inputs, mode: str):
    """The closure to time for one mode. `backward` times only the backward of a kept graph."""
    tensors = inputs.tensors
    grad_inputs = [tensors[i] for i in inputs.grad_of]
    if mode == "forward":
        # With grad enabled, as in training: a fused forward that also produces the gradient
        # pays for it here.
        return lambda: fn(*tensors, **inputs.kwargs)
    if mode == "backward":
        loss = scalar(fn(*tensors, **inputs.kwargs))
        return lambda: torch.autograd.grad(loss, grad_inputs, retain_graph=True)
    return lambda: torch.autograd.grad(scalar(fn(*tensors, **inputs.kwargs)), grad_inputs)


def measure(run, device: str, timer) -> dict:
    """Time `run` and report the peak memory it needs beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    p50, p20, p80 = timer(run)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    return dict(ms_p50=p50, ms_p20=p20, ms_p80=p80, peak_mem_mb=peak)


def measure_case(case, fn, shapes, dtype, mode: str, device: str, timer, bandwidth, peak) -> dict:
    """Time one provider of a case on fresh inputs: timing, peak memory and floor columns, or `oom`
    columns when the device runs out of memory. Other errors (an unavailable backend, a peer that
    rejects the dtype) propagate to the caller, which decides what they mean."""
    inputs = None
    try:
        inputs = case.make(shapes, dtype, device)
        out = measure(runner(fn, inputs, mode), device, timer)
    except RuntimeError as err:
        if not is_oom(err):
            raise
        out = oom_row()
    finally:
        inputs = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    nbytes = case.bytes(shapes, dtype, mode) if case.bytes else None
    nflops = case.flops(shapes, mode) if case.flops else None
    out.update(floors(nbytes, nflops, out["ms_p50"], bandwidth, peak))
    # the same fraction held against the single-pass floor (each input read once), where it differs
    pass3 = case.pass3_bytes(shapes, dtype, mode) if case.pass3_bytes else nbytes
    out["pass3_frac"] = floors(pass3, nflops, out["ms_p50"], bandwidth, peak)["roofline_frac"]
    return out


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def oom_row() -> dict:
    return dict(ms_p50="oom", ms_p20="oom", ms_p80="oom", peak_mem_mb="oom")


def floors(case_bytes: float | None, case_flops: float | None, ms: float, bandwidth: float | None,
           peak: float | None) -> dict:
    """gbps = bytes that must move / time; roofline_frac = floor time / measured time, where the
    floor is the slower of moving the bytes at the measured copy bandwidth and doing the FLOPs at
    the device's peak (each term only where known)."""
    out = dict(gbps="", roofline_frac="")
    if not isinstance(ms, float) or math.isnan(ms) or ms <= 0:
        return out
    seconds = ms * 1e-3
    floor = 0.0
    if case_bytes:
        out["gbps"] = case_bytes / seconds / 1e9
        if bandwidth:
            floor = max(floor, case_bytes / bandwidth)
    if case_flops and peak:
        floor = max(floor, case_flops / peak)
    if floor > 0:
        out["roofline_frac"] = floor / seconds
    return out


def environment(device: str) -> dict:
    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                triton=triton_version, cuda=torch.version.cuda or "", commit=commit,
                date=datetime.date.today().isoformat())


def device_slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def format_number(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class CsvWriter:
    """Appends rows as they are measured (flushed each time, so an interrupted run keeps them)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.file = self.path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS)
        if new:
            self.writer.writeheader()
        self.count = 0

    def write(self, row: dict) -> None:
        self.writer.writerow({k: format_number(row.get(k, "")) for k in COLUMNS})
        self.file.flush()
        self.count += 1

    def close(self) -> None:
        self.file.close()


# torch's own loggers that print to stderr (torch._logging gives each its handler and turns off
# propagation, so each one is redirected, not just the root "torch").
COMPILER_LOGGERS = ("torch", "torch._dynamo", "torch._inductor", "torch.fx", "torch._functorch",
                    "torch._functorch._aot_autograd", "torch._subclasses.fake_tensor",
                    "torch.fx.experimental.symbolic_shapes")
# Every (case, shape, dtype) compiles the reference once; the limit must never make dynamo fall
# back to eager, or `compile` rows would silently time eager code.
RECOMPILE_LIMIT = 1024


@contextlib.contextmanager
def compiler_messages_to(log_path: Path):
    """Send torch's compiler log records and Python warnings to `log_path` instead of the terminal,
    so the printed table holds only rows, and raise dynamo's recompile limits for the duration."""
    import torch._dynamo  # noqa: PLC0415

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="a", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = []
    for name in COMPILER_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False

    def to_file(message, category, filename, lineno, file=None, line=None):
        handler.acquire()
        try:
            with log_path.open("a") as f:
                f.write(warnings.formatwarning(message, category, filename, lineno, line))
        finally:
            handler.release()

    limits = {k: RECOMPILE_LIMIT for k in ("recompile_limit", "accumulated_recompile_limit")
              if hasattr(torch._dynamo.config, k)}
    try:
        with warnings.catch_warnings(), torch._dynamo.config.patch(**limits):
            warnings.showwarning = to_file
            yield log_path
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        handler.close()
