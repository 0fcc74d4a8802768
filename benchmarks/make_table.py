"""Regenerate the results tables in benchmarks/README.md from benchmarks/results/*.csv.

    python benchmarks/make_table.py                   # every CSV in results/
    python benchmarks/make_table.py results/X.csv     # just these
"""

from __future__ import annotations

import sys
from pathlib import Path

from segkd_kernels.bench.table import update_readme

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    paths = [Path(p) for p in argv] or sorted((HERE / "results").glob("*.csv"))
    paths = [p for p in paths if p.stem != "cpu"]  # CPU rows only check the harness
    paths = [p for p in paths if not p.stem.startswith("static_")]  # compiler facts: make_static_table.py
    update_readme(HERE / "README.md", paths)
    print(f"updated {HERE / 'README.md'} from {len(paths)} result file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
