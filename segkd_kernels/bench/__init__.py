"""`segkd bench`: kernel benchmarks, resolution scaling and end-to-end steps, written to a CSV.

    segkd bench                          # on a GPU: every op, fp32 and bf16, scaling, end to end
    segkd bench --ops ssim_kd,pixel_kd   # a subset
    segkd bench --quick                  # tiny shapes, few repeats; also runs on CPU (harness check)
    segkd bench --static                 # no GPU: compile every kernel for sm_90/sm_80, registers,
                                         # spills, occupancy, SASS mix -> benchmarks/results/static_sm*.csv
    segkd bench --host                   # no GPU: host time per forward+backward call, kernels stubbed,
                                         # next to the eager baseline -> benchmarks/results/host_cpu.csv

Each run writes into its own folder, runs/bench/<device>-<date>-<time>/ (relative to the current
directory): <device>.csv with the rows (columns in harness.COLUMNS, appended as they are measured,
so an interrupted run keeps what it measured), the scaling plot, and <device>.log with the
compiler's messages and warnings (kept out of the printed table). `--out FILE.csv` appends to that file instead, e.g.
`--out benchmarks/results/<device>.csv` for results meant to be committed; `--out FOLDER` writes
FOLDER/<device>.csv. The first row of a run is the device's measured copy bandwidth (op "copy"),
the memory-bound floor that `roofline_frac` uses.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

from . import cases
from .hardware import copy_bandwidth
from .harness import CsvWriter, compiler_messages_to, device_slug, environment, make_timer
from .scaling import OPS as scaling_ops
from .scaling import plot_scaling, run_scaling

# Default: a fresh folder per run under the current directory (never inside the package or the
# checkout's committed results: those are written only when --out names them).
DEFAULT_RUNS = Path("runs") / "bench"
# The static report is a committed artefact (the README table is generated from it).
DEFAULT_STATIC = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _list(text: str, choices, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in choices]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {sorted(choices)}")
    return items


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="segkd bench", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=lambda s: _list(s, cases.CASES, "op"), default=list(cases.CASES),
                        help="comma-separated ops (default: all): " + ",".join(cases.CASES))
    parser.add_argument("--dtypes", type=lambda s: _list(s, DTYPES, "dtype"), default=None,
                        help="comma-separated dtypes (default float32,bfloat16; float32 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (runs on CPU too)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the pairwise/cross-image resolution sweep")
    parser.add_argument("--max-p", type=int, default=None, help="largest P in the resolution sweep")
    parser.add_argument("--e2e", action="store_true", help="also time one distillation training step per method")
    parser.add_argument("--out", type=Path, default=None,
                        help="a CSV file to append to, or a folder for <device>.csv "
                             "(default: a new folder runs/bench/<device>-<date>-<time>/)")
    parser.add_argument("--static", action="store_true",
                        help="compile-only report (no GPU, nothing launched): static_sm90.csv / static_sm80.csv in "
                             "the folder --out names (default benchmarks/results, the committed report)")
    parser.add_argument("--host", action="store_true",
                        help="host overhead per forward+backward call with the kernels stubbed, next to the eager "
                             "baseline, on CPU (default --out benchmarks/results/host_cpu.csv, the committed table)")
    return parser


def output_path(out: Path | None, slug: str, now: datetime.datetime | None = None) -> Path:
    """The CSV a run writes: `out` if it names a .csv file, `out`/<slug>.csv for a folder, else
    <slug>.csv in a new run folder runs/bench/<slug>-<YYYYmmdd-HHMMSS>/."""
    if out is not None:
        out = Path(out)
        return out if out.suffix.lower() == ".csv" else out / f"{slug}.csv"
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    folder = DEFAULT_RUNS / f"{slug}-{stamp}"
    k = 1
    while folder.exists():  # two runs started in the same second get their own folders
        k += 1
        folder = DEFAULT_RUNS / f"{slug}-{stamp}-{k}"
    return folder / f"{slug}.csv"


def run(args: argparse.Namespace) -> int:
    if getattr(args, "static", False):
        from .static import DTYPE_NAMES, spawn  # noqa: PLC0415

        folder = DEFAULT_STATIC if args.out is None else (args.out.parent if args.out.suffix else args.out)
        return spawn(args.ops, args.dtypes or list(DTYPE_NAMES), folder)
    if getattr(args, "host", False):
        from .host import DEFAULT_CSV as host_csv  # noqa: PLC0415
        from .host import spawn as host_spawn  # noqa: PLC0415

        out = host_csv if args.out is None else (args.out if args.out.suffix else args.out / "host_cpu.csv")
        return host_spawn(args.ops, out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        print("segkd bench: no CUDA device; on CPU only --quick runs (a harness check, not a measurement)")
        return 2
    dtypes = [DTYPES[d] for d in (args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"]))]
    env = environment(device)
    out = output_path(args.out, device_slug(env["device"]))
    if out.exists() and out.is_dir():
        print(f"segkd bench: --out {out} is a folder ending in .csv; name a file or another folder")
        return 2
    timer = make_timer(device, args.quick)
    writer = CsvWriter(out)
    log_path = out.with_suffix(".log")
    notes = []
    try:
        with compiler_messages_to(log_path):
            _measure(args, device, dtypes, env, timer, writer, out, notes)
    finally:  # also when a measurement fails: its compiler messages are in the log
        if log_path.exists() and log_path.stat().st_size:
            print(f"compiler and library messages: {log_path}")
    for note in dict.fromkeys(notes):  # each note once, in order
        print("note:", note)
    print(f"wrote {writer.count} rows to {out}")
    return 0


def _measure(args, device, dtypes, env, timer, writer, out: Path, notes: list) -> None:
    try:
        bandwidth = copy_bandwidth(device, timer, nbytes=(1 << 20) if args.quick else (1 << 30))
        writer.write(dict(env, op="copy", shape=f"{(1 << 20) if args.quick else (1 << 30)}B", dtype="float32",
                          mode="forward", provider="torch", gbps=bandwidth / 1e9, roofline_frac=1.0))
        print(f"copy bandwidth: {bandwidth / 1e9:.3g} GB/s")

        from .ops import run_ops  # noqa: PLC0415

        notes += run_ops(args.ops, dtypes, device, timer, env, bandwidth, writer, args.quick)
        if not args.no_scaling and any(op in scaling_ops for op in args.ops):
            rows, scaling_notes = run_scaling(torch.float32, device, timer, env, bandwidth, writer, args.quick,
                                              args.max_p, ops=args.ops)
            notes += scaling_notes
            notes.append(plot_scaling(rows, out.with_name(out.stem + "_scaling.png")))
        if args.e2e:
            from .e2e import run_e2e  # noqa: PLC0415

            notes += run_e2e(device, timer, env, writer, args.quick)
    finally:
        writer.close()


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))
