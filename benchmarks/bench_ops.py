"""Kernel micro-benchmarks: providers x modes x shapes -> benchmarks/results/<device>.csv."""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import segkd_kernels as sk

COLUMNS = ["op", "shape", "dtype", "mode", "provider", "ms_p50", "ms_p20", "ms_p80", "peak_mem_mb", "gbps",
           "roofline_frac", "device", "torch", "triton", "cuda", "commit", "date"]
RESULTS = Path(__file__).resolve().parent / "results"


def eager_spatial_pool(x):
    """As AttnFD/CBAM code writes it."""
    n, c = x.shape[:2]
    return F.adaptive_avg_pool2d(x, 1).view(n, c), F.adaptive_max_pool2d(x, 1).view(n, c)


def providers_spatial_pool(device: str) -> dict:
    ref = lambda x: sk.spatial_pool(x, backend="reference")  # noqa: E731
    # inductor on GPUs; on CPU (harness check only) aot_eager, which compiles in seconds not ~30 s
    out = {"eager": eager_spatial_pool, "compile": torch.compile(ref, backend="inductor" if device == "cuda" else "aot_eager")}
    report = sk.available_backends()
    for name in ("triton", "cuda"):
        if report[name] and device == "cuda":
            out[name] = lambda x, b=name: sk.spatial_pool(x, backend=b)
    return out


def time_ms(fn, device: str, quick: bool) -> tuple[float, float, float]:
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    samples = []
    for _ in range(3 if quick else 20):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=10) if len(samples) > 2 else samples * 3
    return statistics.median(samples), q[1], q[7]


def bench_spatial_pool(shape, dtype, device, quick):
    rows = []
    for provider, fn in providers_spatial_pool(device).items():
        x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
        for mode in ("forward", "backward", "full"):
            if mode == "forward":
                run = lambda: fn(x)  # noqa: E731
            else:
                outs = fn(x)
                loss = outs[0].sum() + outs[1].sum()
                if mode == "backward":
                    run = lambda: torch.autograd.grad(loss, x, retain_graph=True)  # noqa: E731
                else:
                    run = lambda: torch.autograd.grad(sum(o.sum() for o in fn(x)), x)  # noqa: E731
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            p50, p20, p80 = time_ms(run, device, quick)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
            moved = x.numel() * x.element_size() * (2 if mode == "full" else 1)
            rows.append(dict(op="spatial_pool", shape="x".join(map(str, shape)), dtype=str(dtype)[6:], mode=mode,
                             provider=provider, ms_p50=p50, ms_p20=p20, ms_p80=p80, peak_mem_mb=peak,
                             gbps=moved / (p50 * 1e-3) / 1e9, roofline_frac=""))
    return rows


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                triton=triton_version, cuda=torch.version.cuda or "", commit=commit,
                date=datetime.date.today().isoformat())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (harness check)")
    parser.add_argument("--out", type=Path, default=None, help="CSV file (default results/<device>.csv)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        print("bench_ops: no CUDA device; only --quick runs on CPU")
        return 0
    shapes = [(2, 8, 9, 11)] if args.quick else [(8, 256, 64, 128), (8, 512, 128, 256)]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    env = environment(device)
    rows = [dict(r, **env) for s in shapes for d in dtypes for r in bench_spatial_pool(s, d, device, args.quick)]
    out = args.out or RESULTS / f"{env['device'].replace(' ', '_')}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(f"{r['op']:<14}{r['shape']:<16}{r['dtype']:<10}{r['mode']:<9}{r['provider']:<9}{r['ms_p50']:>10.3f} ms")
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
