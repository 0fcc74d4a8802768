"""Pairwise and cross-image losses against resolution: time and peak memory, eager vs fused.

Public code materialises P x P similarity maps, so its memory grows as P^2 and it runs out of
memory at resolutions the fused kernels handle in O(N*P). Rows go to the same CSV (mode "full",
op "pairwise_kd" / "cross_image_kd", shape N x C x H x W per operand); a PNG plot goes beside it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .._backends import BackendUnavailableError
from . import cases as cases_module
from .harness import measure_case
from .hardware import peak_flops

# (H, W) per resolution step: P = 1024 ... 65536 pixels, aspect 1:1 or 1:2 as segmentation heads have.
RESOLUTIONS = [(32, 32), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)]
RESOLUTIONS_QUICK = [(4, 5), (8, 9)]
OPS = ("pairwise_kd", "cross_image_kd")


def run_scaling(dtype, device, timer, env, bandwidth, writer, quick: bool, max_p: int | None = None,
                ops=OPS, log=print) -> tuple[list[dict], list[str]]:
    n, cs, ct = (2, 8, 16) if quick else (8, 128, 256)
    rows, notes = [], []
    for op in [op for op in OPS if op in ops]:
        case = cases_module.CASES[op]
        peak = peak_flops(env["device"], "tensor16" if dtype != torch.float32 else "fp32")
        for provider in ("eager", "triton", "cuda"):
            fn = case.eager if provider == "eager" else (lambda *a, b=provider: case.api(*a, backend=b))
            for h, w in RESOLUTIONS_QUICK if quick else RESOLUTIONS:
                if max_p and h * w > max_p:
                    continue
                shapes = ((n, cs, h, w), (n, ct, h, w))
                row = dict(env, op=op, shape=cases_module.shape_label(shapes), mode="full", provider=provider,
                           dtype=str(dtype).removeprefix("torch."))
                try:
                    row.update(measure_case(case, fn, shapes, dtype, "full", device, timer, bandwidth, peak))
                except BackendUnavailableError as err:
                    notes.append(f"scaling {op}: {provider} unavailable ({err})")
                    break
                writer.write(row)
                rows.append(dict(row, pixels=h * w))
                ms = row["ms_p50"]
                log(f"scaling {op:<15}P={h * w:<7}{provider:<8}{ms if isinstance(ms, str) else f'{ms:10.3f} ms'}")
    return rows, notes


def plot_scaling(rows: list[dict], path: Path) -> str:
    """Time and peak memory against P, log-log, one line per (op, provider); out-of-memory points
    are marked on the top edge. Returns a note when matplotlib is missing (then no plot)."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "scaling plot skipped (matplotlib not installed)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (op, provider) in sorted({(r["op"], r["provider"]) for r in rows}):
        series = [r for r in rows if r["op"] == op and r["provider"] == provider]
        ok = [r for r in series if not isinstance(r["ms_p50"], str)]
        oom = [r for r in series if isinstance(r["ms_p50"], str)]
        style = "--" if provider == "eager" else "-"
        label = f"{op} {provider}"
        line = axes[0].loglog([r["pixels"] for r in ok], [r["ms_p50"] for r in ok], style, marker="o", label=label)[0]
        mem = [r for r in ok if not math.isnan(r["peak_mem_mb"])]
        axes[1].loglog([r["pixels"] for r in mem], [r["peak_mem_mb"] for r in mem], style, marker="o",
                       color=line.get_color(), label=label)
        for r in oom:
            for ax in axes:
                ax.annotate("OOM", (r["pixels"], 1), xycoords=("data", "axes fraction"), color=line.get_color(),
                            ha="center", va="top", fontsize=8)
    env = rows[0] if rows else {}
    for ax, what in zip(axes, ("fwd+bwd time (ms)", "peak extra memory (MiB)")):
        ax.set_xlabel("pixels per image P")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{env.get('device', '')}, {env.get('dtype', '')}, torch {env.get('torch', '')}, "
                 f"triton {env.get('triton', '')}, {env.get('date', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"
