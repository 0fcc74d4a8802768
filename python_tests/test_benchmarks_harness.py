"""The benchmark harness runs end to end on tiny shapes and writes the agreed CSV columns."""

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_ops  # noqa: E402


def test_quick_benchmark_writes_csv(tmp_path):
    out = tmp_path / "cpu.csv"
    assert bench_ops.main(["--quick", "--out", str(out)]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == bench_ops.COLUMNS
    assert {r["mode"] for r in rows} == {"forward", "backward", "full"}
    assert {"eager", "compile"} <= {r["provider"] for r in rows}
    assert all(float(r["ms_p50"]) > 0 for r in rows)
