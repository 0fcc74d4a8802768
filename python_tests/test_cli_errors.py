"""Mistakes a user can fix end as one line on stderr, `segkd <command>: error: ...`, and exit code 2: no
traceback, and no training started before the mistake is found."""

import os
import subprocess
import sys

import pytest
import torch

from segkd_kernels import cli
from segkd_kernels.train import engine

TINY = ["data.options.image_size=16", "data.options.train={num_images: 8}", "data.options.val={num_images: 2}",
        "data.batch_size=4", "data.crop_size=16", "student.width=0.0625", "teacher.width=0.0625",
        "log_every=1", "progress=false", "ckpt_every=0", "data.eval_batch_size=2", "device=cpu"]


def sets(*extra):
    return [a for s in (*TINY, *extra) for a in ("--set", s)]


# tiny models and tensors: see conftest.one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished two-step run (student alone)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(["train", "--iters", "2", "--out", str(out), *sets()]) == 0
    return out


def one_line_error(capsys, command: str, argv: list[str]) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"segkd {command}: error: "), err
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Any model built means work started before the mistake was reported."""
    def no_work(*a, **k):
        raise AssertionError("a model was built before the error was reported")

    monkeypatch.setattr(engine, "build_from_spec", no_work)
    monkeypatch.setattr(engine, "build_datasets", no_work)


def test_out_pointing_at_a_file(tmp_path, capsys, no_training):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    line = one_line_error(capsys, "train", ["train", "--iters", "1", "--out", str(f), *sets()])
    assert "is a file" in line
    assert f.read_text() == "mine"


def test_unknown_dataset_option(tmp_path, capsys, no_training):
    line = one_line_error(capsys, "train", ["train", "--iters", "1", "--out", str(tmp_path / "o"),
                                            *sets("data.options.bogus_opt=1")])
    assert "data.options: unknown option(s) ['bogus_opt'] for dataset 'synthetic'" in line
    assert "num_images" in line  # the options it does take
    line = one_line_error(capsys, "train", ["train", "--iters", "1", "--out", str(tmp_path / "o"),
                                            *sets("data.options.val={bogus_opt: 1}")])
    assert "data.options.val: unknown option(s) ['bogus_opt']" in line


def test_bad_dataset_option_value(tmp_path, capsys):
    # accepted by name, refused by the dataset when it is built: still one line
    line = one_line_error(capsys, "train", ["train", "--iters", "1", "--out", str(tmp_path / "o"),
                                            *sets("data.options.image_size=8")])
    assert "data: image_size must be >= 16" in line


def test_yaml_whose_top_level_is_a_list(tmp_path, capsys, no_training):
    bad = tmp_path / "list.yaml"
    bad.write_text("- optim:\n    lr: 0.1\n")
    line = one_line_error(capsys, "train", ["train", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert "list.yaml: expected a mapping of settings at the top level" in line and "got a list" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_unavailable_backend_is_refused_before_models_are_built(tmp_path, capsys, no_training):
    line = one_line_error(capsys, "train", ["train", "--iters", "1", "--out", str(tmp_path / "o"), "--method", "kd",
                                            *sets("backend=cuda")])
    assert "backend: 'cuda' cannot run here" in line or "backend: 'cuda' runs on CUDA tensors only" in line
    line = one_line_error(capsys, "train", ["train", "--iters", "1", "--out", str(tmp_path / "o"),
                                            *sets("backend=cuda")])  # the model alone: still refused
    assert "backend: 'cuda'" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_triton_backend_on_cpu_without_interpreter(tmp_path):
    # the interpreter is decided when segkd_kernels is imported: a fresh process without it
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "segkd_kernels.cli", "train", "--iters", "1", "--method", "kd",
                          "--out", str(tmp_path / "o"), *sets("backend=triton")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("segkd train: error: backend: 'triton'"), out.stderr
    assert not (tmp_path / "o").exists()


def test_eval_on_another_dataset_without_its_folder(run_dir, capsys):
    line = one_line_error(capsys, "eval", ["eval", str(run_dir / "last.pt"), "--dataset", "cityscapes"])
    assert "data.root: dataset 'cityscapes' needs its folder (--set data.root=PATH)" in line
    line = one_line_error(capsys, "eval", ["eval", str(run_dir / "last.pt"), "--dataset", "nope"])
    assert "unknown dataset 'nope'" in line


def test_eval_on_a_folder_suggests_its_checkpoint(run_dir, capsys):
    line = one_line_error(capsys, "eval", ["eval", str(run_dir)])
    assert "is a folder" in line and os.path.join(str(run_dir), "last.pt") in line
    assert "does not exist" not in line


def test_resume_with_another_student_architecture(run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt", "config.json"):
        (out / name).write_bytes((run_dir / name).read_bytes())
    argv = ["train", "--iters", "3", "--out", str(out), "--resume", *sets("student.arch=fcn")]
    line = one_line_error(capsys, "train", argv)
    assert "student.arch 'deeplabv3' -> 'fcn'" in line
    # accepting setting changes does not make another model loadable
    line = one_line_error(capsys, "train", [*argv, "--allow-config-change"])
    assert "the checkpoint holds a deeplabv3-resnet18" in line and "fcn-resnet18" in line
    assert (out / "last.pt").read_bytes() == (run_dir / "last.pt").read_bytes()


@pytest.mark.parametrize("header", [b"SEGKD-CKPT one 00 12\n", b"SEGKD-CKPT 1 " + b"a" * 64 + b" twelve\n",
                                    b"SEGKD-CKPT 1 xyz 12\n"])
def test_checkpoint_header_with_a_non_numeric_field(run_dir, tmp_path, capsys, header):
    data = (run_dir / "last.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(header + data[data.index(b"\n") + 1:])
    line = one_line_error(capsys, "eval", ["eval", str(bad)])
    assert "damaged header" in line


def test_demo_with_an_unknown_method_trains_nothing(tmp_path, capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("trained before the method was checked")

    monkeypatch.setattr(engine, "train", no_training)
    line = one_line_error(capsys, "demo", ["demo", "--method", "bogus", "--out", str(tmp_path / "d")])
    assert "--method: unknown method 'bogus'; choices: " in line and "cwd" in line
    assert not (tmp_path / "d").exists()


def test_demo_checks_every_stage_before_training(tmp_path, capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("trained before the settings were checked")

    monkeypatch.setattr(engine, "train", no_training)
    line = one_line_error(capsys, "demo", ["demo", "--method", "kd", "--out", str(tmp_path / "d"),
                                           "--set", "distill.weights.bogus=1"])
    assert "distill.weights: unknown term(s) ['bogus']" in line


def test_compare_checks_every_run_before_training(tmp_path, capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("trained before the settings were checked")

    monkeypatch.setattr(engine, "train", no_training)
    line = one_line_error(capsys, "compare", ["compare", "--methods", "kd", "--seeds", "1", "--out",
                                              str(tmp_path / "c"), "--set", "data.options.bogus_opt=1"])
    assert "data.options: unknown option(s) ['bogus_opt']" in line
