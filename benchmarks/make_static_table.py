"""Regenerate the static-report tables in the README from benchmarks/results/static_sm90.csv and
static_sm80.csv (written by `segkd bench --static`).

    python benchmarks/make_static_table.py
"""

from __future__ import annotations

from pathlib import Path

from segkd_kernels.bench.static_table import update_readme

HERE = Path(__file__).resolve().parent


def main() -> int:
    readme = HERE.parent / "README.md"
    update_readme(readme, HERE / "results" / "static_sm90.csv", HERE / "results" / "static_sm80.csv")
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
