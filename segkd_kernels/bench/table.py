"""Markdown tables from a results CSV: fwd+bwd time per provider, speed-ups and hardware fractions."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
FUSED = ("triton", "cuda")


def _num(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


def _ms(value: str) -> str:
    if value == "oom":
        return "OOM"
    x = _num(value)
    return "" if math.isnan(x) else f"{x:.3g}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if a > 0 and b > 0 and not (math.isnan(a) or math.isnan(b)) else ""


def markdown(csv_path: Path, mode: str = "full") -> str:
    with Path(csv_path).open() as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == mode and r["op"] != "copy"]
    if not rows:
        return f"No `{mode}` rows in {csv_path}.\n"
    groups: dict[tuple, dict] = defaultdict(dict)
    for r in rows:  # the last measurement of a (op, shape, dtype, provider) wins
        groups[(r["op"], r["shape"], r["dtype"])][r["provider"]] = r
    providers = sorted({r["provider"] for r in rows},
                       key=lambda p: (["eager", "compile", "triton", "cuda"] + [p]).index(p))
    first = rows[0]
    head = (f"Device {first['device']}, torch {first['torch']}, triton {first['triton']}, CUDA {first['cuda']}, "
            f"commit {first['commit']}, {first['date']}. Mode `{mode}` (forward+backward), median ms.\n\n")
    cols = ["op", "shape", "dtype"] + [f"{p} ms" for p in providers] + [
        "best fused vs eager", "vs compile", "GB/s", "roofline (inherent / 3-pass floor)", "peak MiB eager / fused"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (op, shape, dtype), by in groups.items():
        fused = [by[p] for p in FUSED if p in by and not math.isnan(_num(by[p]["ms_p50"]))]
        best = min(fused, key=lambda r: _num(r["ms_p50"])) if fused else None
        best_ms = _num(best["ms_p50"]) if best else math.nan
        eager_ms = _num(by["eager"]["ms_p50"]) if "eager" in by else math.nan
        compile_ms = _num(by["compile"]["ms_p50"]) if "compile" in by else math.nan
        gbps = f"{_num(best['gbps']):.0f}" if best and best["gbps"] else ""
        frac = f"{_num(best['roofline_frac']):.0%}" if best and best["roofline_frac"] else ""
        if frac and best.get("pass3_frac"):
            frac += f" / {_num(best['pass3_frac']):.0%}"
        eager_mem = by["eager"]["peak_mem_mb"] if "eager" in by else ""
        mem = f"{_ms(eager_mem)} / {_ms(best['peak_mem_mb'])}" if best else ""
        cells = [op, shape, dtype] + [_ms(by[p]["ms_p50"]) if p in by else "" for p in providers] + [
            _ratio(eager_ms, best_ms), _ratio(compile_ms, best_ms), gbps, frac, mem]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def update_readme(readme: Path, csv_paths: list[Path]) -> None:
    """Replace the block between the results markers of `readme` with one table per CSV."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme}: no {START} ... {END} block to fill")
    tables = "\n".join(f"### {Path(p).stem}\n\n{markdown(p)}" for p in csv_paths)
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{tables}{END}{after}")
