"""`segkd bench`: kernel benchmarks, resolution scaling and end-to-end steps, written to a CSV.

    segkd bench                          # on a GPU: every op, fp32 and bf16, scaling, end to end
    segkd bench --ops ssim_kd,pixel_kd   # a subset
    segkd bench --quick                  # tiny shapes, few repeats; also runs on CPU (harness check)
    segkd bench --static                 # no GPU: compile every kernel for sm_90/sm_80, registers,
                                         # spills, occupancy, SASS mix -> benchmarks/results/static_sm*.csv

Rows (columns in harness.COLUMNS) are appended to benchmarks/results/<device>.csv as they are
measured, so an interrupted run keeps what it measured. The first row of a run is the device's
measured copy bandwidth (op "copy"), the memory-bound floor that `roofline_frac` uses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import cases
from .hardware import copy_bandwidth
from .harness import CsvWriter, device_slug, environment, make_timer
from .scaling import OPS as scaling_ops
from .scaling import plot_scaling, run_scaling

# Results live in the repository's benchmarks/results when run from a checkout.
DEFAULT_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
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
    parser.add_argument("--out", type=Path, default=None, help="CSV file (default benchmarks/results/<device>.csv)")
    parser.add_argument("--static", action="store_true",
                        help="compile-only report (no GPU, nothing launched): static_sm90.csv / static_sm80.csv in "
                             "the folder of --out (default benchmarks/results)")
    return parser


def run(args: argparse.Namespace) -> int:
    if getattr(args, "static", False):
        from .static import DTYPE_NAMES, spawn  # noqa: PLC0415

        return spawn(args.ops, args.dtypes or list(DTYPE_NAMES), args.out.parent if args.out else DEFAULT_RESULTS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        print("segkd bench: no CUDA device; on CPU only --quick runs (a harness check, not a measurement)")
        return 2
    dtypes = [DTYPES[d] for d in (args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"]))]
    env = environment(device)
    out = args.out or DEFAULT_RESULTS / f"{device_slug(env['device'])}.csv"
    timer = make_timer(device, args.quick)
    writer = CsvWriter(out)
    notes = []
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
    for note in dict.fromkeys(notes):  # each note once, in order
        print("note:", note)
    print(f"wrote {writer.count} rows to {out}")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))
