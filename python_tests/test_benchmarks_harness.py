"""The benchmark harness runs end to end on tiny CPU shapes and writes the agreed CSV columns.

CPU timings here only check the plumbing; measurements come from GPU runs (benchmarks/README.md).
"""

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_ops  # noqa: E402

from segkd_kernels.bench import cases, table  # noqa: E402
from segkd_kernels.bench.harness import floors  # noqa: E402

import torch  # noqa: E402

EXPECTED_COLUMNS = ("op,shape,dtype,mode,provider,ms_p50,ms_p20,ms_p80,peak_mem_mb,gbps,roofline_frac,pass3_frac,"
                    "device,torch,triton,cuda,commit,date").split(",")


def test_quick_benchmark_writes_csv_and_table(tmp_path):
    out = tmp_path / "cpu.csv"
    assert bench_ops.main(["--quick", "--ops", "channel_wise_kd,spatial_pool,pairwise_kd", "--max-p", "20",
                           "--out", str(out)]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert bench_ops.COLUMNS == EXPECTED_COLUMNS and list(rows[0]) == EXPECTED_COLUMNS
    assert rows[0]["op"] == "copy" and float(rows[0]["gbps"]) > 0
    kernel_rows = [r for r in rows if r["op"] != "copy"]
    assert {r["mode"] for r in kernel_rows} == {"forward", "backward", "full"}
    assert {"eager", "compile"} <= {r["provider"] for r in kernel_rows}
    assert {r["op"] for r in kernel_rows} == {"channel_wise_kd", "spatial_pool", "pairwise_kd"}
    assert all(float(r["ms_p50"]) > 0 for r in kernel_rows)
    # the resolution sweep ran (capped at P = 20) for the pairwise loss
    assert any(r["shape"] == "2x8x4x5/2x16x4x5" for r in kernel_rows)
    md = table.markdown(out)
    assert "| channel_wise_kd | 2x5x9x13 | float32 |" in md

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.START}\nold\n{table.END}\nend\n")
    table.update_readme(readme, [out])
    text = readme.read_text()
    assert "old" not in text and "| spatial_pool |" in text and text.endswith("end\n")


@pytest.mark.parametrize("op", sorted(cases.CASES))
def test_eager_baseline_computes_the_same_loss(op):
    """The eager baselines are the toolboxes' code shapes with docs/losses.md's normalisations."""
    case = cases.CASES[op]
    inputs = case.make(case.quick_shapes[0], torch.float64, "cpu")
    got = case.eager(*inputs.tensors)
    want = case.api(*inputs.tensors, backend="reference")
    if isinstance(want, tuple):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    else:
        torch.testing.assert_close(got, want)


def test_floors():
    # 1 GB moved in 10 ms at a 200 GB/s ceiling: 100 GB/s achieved, half of the floor.
    f = floors(1e9, None, 10.0, 200e9, None)
    assert f["gbps"] == pytest.approx(100.0) and f["roofline_frac"] == pytest.approx(0.5)
    # compute-bound: 1e12 FLOPs at a 1e14 peak take 10 ms at best
    assert floors(1.0, 1e12, 20.0, 1e12, 1e14)["roofline_frac"] == pytest.approx(0.5)
    assert floors(1e9, None, "oom", 1e9, None) == {"gbps": "", "roofline_frac": ""}


def test_unknown_op_is_rejected():
    with pytest.raises(SystemExit):
        bench_ops.main(["--quick", "--ops", "nope"])


def test_e2e_step_rows(tmp_path):
    """One distillation step per provider on tiny models (CPU: plumbing only)."""
    from segkd_kernels.bench.e2e import run_e2e
    import time

    from segkd_kernels.bench.harness import CsvWriter, environment

    def run_once(fn):  # one timed step is enough to check the rows
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return ms, ms, ms

    writer = CsvWriter(tmp_path / "e2e.csv")
    notes = run_e2e("cpu", run_once, environment("cpu"), writer, True, methods=["kd"], log=lambda *_: None)
    writer.close()
    with (tmp_path / "e2e.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert notes == []
    assert [(r["op"], r["provider"]) for r in rows] == [("step:none", "ce-only"), ("step:kd", "reference"),
                                                        ("step:kd", "fused")]
    assert all(r["shape"] == "2x3x64x64" and float(r["ms_p50"]) > 0 for r in rows)


def test_segkd_bench_command(tmp_path, capsys):
    from segkd_kernels.cli import main as segkd

    out = tmp_path / "cpu.csv"
    assert segkd(["bench", "--quick", "--ops", "spatial_pool", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and out.exists()
    # full-size runs need a GPU: on CPU the command says so and exits non-zero
    if not torch.cuda.is_available():
        assert segkd(["bench", "--ops", "spatial_pool", "--out", str(out)]) == 2


def test_default_output_is_a_run_folder_not_the_checkout(tmp_path, monkeypatch, capsys):
    """Without --out a run writes into its own folder under ./runs/bench, never into the
    package's checkout (benchmarks/results/ holds only results committed on purpose)."""
    from segkd_kernels.cli import main as segkd

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    before = sorted(results.rglob("*")) if results.exists() else []
    monkeypatch.chdir(tmp_path)
    assert segkd(["bench", "--quick", "--ops", "spatial_pool"]) == 0
    printed = capsys.readouterr().out
    (folder,) = (tmp_path / "runs" / "bench").iterdir()
    assert folder.name.startswith("cpu-") and (folder / "cpu.csv").exists()
    assert f"rows to {Path('runs') / 'bench' / folder.name / 'cpu.csv'}" in printed
    after = sorted(results.rglob("*")) if results.exists() else []
    assert after == before
    # a second run gets its own folder; --out FOLDER and --out FILE.csv are honoured
    assert segkd(["bench", "--quick", "--ops", "spatial_pool", "--no-scaling"]) == 0
    assert len(list((tmp_path / "runs" / "bench").iterdir())) == 2
    from segkd_kernels.bench import output_path

    assert output_path(Path("x/y.csv"), "NVIDIA_H200") == Path("x/y.csv")
    assert output_path(Path("x"), "NVIDIA_H200") == Path("x/NVIDIA_H200.csv")


def test_compiler_messages_go_to_the_log_not_the_table(tmp_path, capfd):
    """torch's compiler loggers and Python warnings are written to the run's log file while a
    benchmark runs, and the recompile limit is raised for the duration."""
    import logging
    import warnings

    import torch._dynamo

    from segkd_kernels.bench.harness import RECOMPILE_LIMIT, compiler_messages_to

    limit = torch._dynamo.config.recompile_limit
    log = tmp_path / "cpu.log"
    with compiler_messages_to(log):
        logging.getLogger("torch._dynamo.convert_frame").warning("hit config.recompile_limit (8)")
        warnings.warn("a library warning")
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    assert torch._dynamo.config.recompile_limit == limit
    captured = capfd.readouterr()
    assert "recompile_limit" not in captured.out + captured.err
    assert "a library warning" not in captured.out + captured.err
    text = log.read_text()
    assert "hit config.recompile_limit (8)" in text and "a library warning" in text
    # after the block torch's handlers are back
    assert logging.getLogger("torch._dynamo").handlers != [] and not any(
        isinstance(h, logging.FileHandler) for h in logging.getLogger("torch._dynamo").handlers)


def test_compile_provider_never_falls_back_to_eager(capfd):
    """Every case's `compile` provider is the same lambda (one code object); more cases than
    dynamo's default recompile limit (8) must each compile, not print the limit warning and run
    eager code under the `compile` label."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from segkd_kernels.bench.ops import providers

    assert len(cases.CASES) > 8
    counters.clear()
    for name, case in cases.CASES.items():
        inputs = case.make(case.quick_shapes[0], torch.float32, "cpu")
        fn = providers(case, "cpu")[0]["compile"]
        fn(*inputs.tensors, **inputs.kwargs)
    captured = capfd.readouterr()
    assert "recompile_limit" not in captured.out + captured.err
    assert counters["stats"]["unique_graphs"] >= len(cases.CASES)


def test_host_benchmark_rows(tmp_path):
    """`segkd bench --host` writes one triton and one eager row per op and plan, counts launches and
    torch ops, and sees the host reads it exists to find."""
    import subprocess
    import sys as _sys

    from segkd_kernels.bench import host

    out = tmp_path / "host.csv"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([_sys.executable, "-m", "segkd_kernels.bench.host", "--ops", "channel_wise_kd,spatial_pool",
                          "--out", str(out), "--repeats", "5", "--warmup", "1"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == host.COLUMNS
    keys = {(r["op"], r["plan"], r["provider"]) for r in rows}
    from segkd_kernels._backends import host_library

    # cuda rows: the same glue through the host build of the kernels, launches stubbed (default plans)
    cuda = [("cuda", "default")] if host_library()[0] is not None else []
    assert keys == {(op, plan, prov) for op, plan in [("channel_wise_kd", "default"), ("channel_wise_kd", "split"),
                                                     ("spatial_pool", "default")]
                    for prov, only in [("triton", None), ("eager", None), *cuda] if only in (None, plan)}
    for r in rows:
        assert float(r["us_per_call"]) > 0
        assert (int(r["launches"]) > 0) == (r["provider"] != "eager")
    split = next(r for r in rows if r["plan"] == "split" and r["provider"] == "triton")
    one = next(r for r in rows if r["plan"] == "default" and r["op"] == "channel_wise_kd" and r["provider"] == "triton")
    # long rows with a gradient: one persistent launch, as the one-tile forward (plus the torch ops
    # that zero its ticket counters and sum its KL parts)
    assert int(split["launches"]) == int(one["launches"]) >= 1
    assert "| channel_wise_kd | split |" in host.markdown_table(rows)


def test_host_read_guard_sees_every_kind_of_read():
    import torch

    from segkd_kernels.bench.host import host_read_guard

    x = torch.ones(3)
    sites: list = []
    with host_read_guard(sites):
        x.sum().item()
        bool(x[0] > 0)
        float(x[1])
        int(x[2])
        x.tolist()
        torch.equal(x, x)
    assert [s.rsplit(":", 1)[1] for s in sites] == ["item", "__bool__", "__float__", "__int__", "tolist", "equal"]
    assert torch.Tensor.item is not None and not sites[0].startswith("host.py")
    n = len(sites)
    x.sum().item()  # outside: not recorded, and the patch is gone
    assert len(sites) == n


def test_inherent_floors_count_the_reads_the_math_needs():
    """Inherent floor vs single-pass floor (bench/cases.py, docs/performance.md), in tensor passes."""
    f32 = torch.float32
    logits = ((2, 5, 8, 8),) * 2
    one = 2 * 5 * 8 * 8 * 4
    for op in ("channel_wise_kd", "pixel_kd"):   # a row's statistics stay on chip: 3 passes
        assert cases.CASES[op].bytes(logits, f32, "full") == 3 * one and cases.CASES[op].pass3_bytes is None
    for op in ("pfs_pixel_kd", "attnfd_loss"):   # a global statistic before any gradient element
        case = cases.CASES[op]
        assert case.bytes(logits, f32, "full") == 5 * one
        assert case.bytes(logits, f32, "forward") == 2 * one
        assert case.pass3_bytes(logits, f32, "full") == 3 * one
    n, c, h, w = 2, 16, 8, 8
    x, out, gate = n * c * h * w, n * 2 * h * w, n * c
    # cbam_gate: forward x -> product, backward reads the product's gradient and x, writes dx
    cbam = cases.CASES["cbam_gate"]
    assert cbam.bytes(((n, c, h, w),), f32, "full") == (5 * x + 3 * (gate + n * h * w)) * 4
    assert cbam.pass3_bytes(((n, c, h, w),), f32, "full") == 3 * x * 4
    # channel_pool: d gate needs x again in the backward
    pool = cases.CASES["channel_pool"]
    assert pool.bytes(((n, c, h, w),), f32, "full") == (3 * x + 2 * out + 3 * gate) * 4
    assert pool.pass3_bytes(((n, c, h, w),), f32, "full") == (2 * x + out) * 4


def test_host_table_in_the_readme_is_the_committed_csv():
    """The README's host table is what `markdown_table` makes of benchmarks/results/host_cpu.csv, and
    that CSV covers every benchmarked op."""
    from segkd_kernels.bench import cases, host

    with open(host.DEFAULT_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == host.COLUMNS
    assert {r["op"] for r in rows} == set(cases.CASES)
    readme = host.README.read_text()
    assert f"{host.BEGIN}\n\n{host.markdown_table(rows)}\n\n{host.END}" in readme
