"""Kernel benchmarks from a checkout: `python benchmarks/bench_ops.py [--ops ...] [--quick]`.

The same as `segkd bench`; the harness lives in segkd_kernels/bench/ so the installed command
works too. Rows go to runs/bench/<device>-<time>/<device>.csv (columns: COLUMNS); pass
`--out benchmarks/results/<device>.csv` for results meant to be committed.
"""

from __future__ import annotations

from segkd_kernels.bench import main
from segkd_kernels.bench.harness import COLUMNS

__all__ = ["COLUMNS", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
