"""scripts/gpu_check.sh: its dry run (offline install into a throwaway venv, import from it, the test
suite collected, every benchmark command line parsed) and its argument errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_installs_offline_and_lists_the_commands(tmp_path):
    out = tmp_path / "out"
    res = _run(out, "--budget-s", "300", "--dry-run")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "offline install into a throwaway venv: exit 0" in summary
    assert "import from the venv: exit 0" in summary
    # the package imported from the venv is this checkout (editable install)
    assert str(REPO / "segkd_kernels") in (out / "import.log").read_text()
    assert "test collection: exit 0" in summary
    commands = [line.split("\t") for line in (out / "commands.txt").read_text().splitlines()]
    names = [c[0] for c in commands]
    assert names[0] == "install" and "--no-index --no-build-isolation --no-deps -e ." in commands[0][2]
    # cuda-marked tests first, then the whole suite, then benchmarks, most important first
    assert names.index("pytest_cuda") < names.index("pytest_all") < names.index("bench_channel_wise_kd_float32")
    bench = [c for c in commands if c[0].startswith("bench_")]
    assert bench[0][0] == "bench_channel_wise_kd_float32" and bench[-1][0] == "bench_e2e_all"
    assert all(" bench " in c[2] and "--out" in c[2] for c in bench)
    # each item may use at most what is left of the budget
    assert all(int(c[1]) <= 300 for c in bench)
    assert "-m cuda" in commands[names.index("pytest_cuda")][2]


@pytest.mark.slow
def test_budget_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "out"
    res = _run(out, "--budget-s", "10", "--dry-run")
    assert res.returncode == 0, res.stderr[-3000:]
    names = [line.split("\t")[0] for line in (out / "commands.txt").read_text().splitlines()]
    # under 20 s left: no benchmark item starts
    assert not [n for n in names if n.startswith("bench_")]


@pytest.mark.parametrize("args", [[], ["OUT", "--budget-s"], ["OUT", "--budget-s", "abc"], ["OUT", "--bogus"]])
def test_bad_arguments_fail_with_usage(tmp_path, args):
    args = [str(tmp_path / a) if a == "OUT" else a for a in args]
    res = _run(*args, timeout=60)
    assert res.returncode == 2
    assert "usage:" in res.stderr or "whole seconds" in res.stderr
