"""The README's examples cannot drift from the code: every `segkd` command line in its shell
blocks parses with the real argument parser, names shipped configs, methods and ops that exist,
and loads into a valid trainer config; the Python snippet runs."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def shell_lines(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    return lines


def segkd_argv(line: str) -> list[str] | None:
    """The arguments given to the `segkd` program by a shell line, or None if it runs something else."""
    words = shlex.split(line, comments=True)
    if words[0] == "segkd":
        return words[1:]
    if words[0] == "torchrun" and "segkd_kernels.cli" in words:
        return words[words.index("segkd_kernels.cli") + 1:]
    if words[0] == "python" and words[1] == "benchmarks/bench_ops.py":
        return ["bench", *words[2:]]
    return None


def segkd_parser() -> argparse.ArgumentParser:
    """The parser `segkd` builds (segkd_kernels.cli.main), failing with an exception, not an exit."""
    from segkd_kernels import cli

    parser = argparse.ArgumentParser(prog="segkd", exit_on_error=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add, _run) in cli.COMMANDS.items():
        p = sub.add_parser(name, help=help_text, exit_on_error=False)
        if add is not None:
            add(p)
    return parser


LINES = shell_lines(README.read_text())
SEGKD_LINES = [line for line in LINES if segkd_argv(line) is not None]


def test_the_readme_has_segkd_examples():
    commands = {segkd_argv(line)[0] for line in SEGKD_LINES}
    assert {"train", "eval", "compare"} <= commands


def test_other_shell_lines_name_files_that_exist():
    for line in LINES:
        if segkd_argv(line) is not None:
            continue
        words = shlex.split(line, comments=True)
        if words[0] == "bash":
            assert (ROOT / words[1]).is_file(), line
        elif words[:3] == ["pip", "install", "-e"]:
            continue
        else:
            pytest.fail(f"README shell line not checked by this test: {line}")


@pytest.mark.parametrize("line", SEGKD_LINES)
def test_segkd_example_parses_and_names_existing_things(line, tmp_path, monkeypatch, capsys):
    from segkd_kernels.train.config import list_configs, load_config, validate
    from segkd_kernels.train.distill import methods

    argv = segkd_argv(line)
    try:
        args = segkd_parser().parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as err:
        pytest.fail(f"`{line}` does not parse: {err} {capsys.readouterr().err}")
    if args.command == "train" and not args.list:
        if args.config and not args.config.endswith((".yaml", ".yml")):
            assert args.config in list_configs(), f"no shipped config {args.config!r}"
        # a dataset folder is needed only to run, not to check the rest of the config
        overrides = [f"data.root={tmp_path}" if o.startswith("data.root=") else o for o in args.overrides]
        cfg = load_config(args.config, overrides, method=args.method, dataset=args.dataset, iters=args.iters,
                          out=args.out, stage=args.stage, seed=args.seed)
        validate(cfg, need_teacher_file=False)
        if cfg.method != "none" and cfg.stage == "student":
            assert cfg.teacher.checkpoint, f"`{line}` distils without a teacher checkpoint"
    if args.command == "compare":
        unknown = set(args.methods.split(",")) - set(methods())
        assert not unknown, f"unknown methods {unknown}"


def test_checkpoints_used_are_written_by_an_earlier_example():
    """The walk-through is a sequence: a checkpoint a line reads was written by a line above it,
    trained with the same config (a teacher with --stage teacher)."""
    parser = segkd_parser()
    outs: dict[str, argparse.Namespace] = {}
    for line in SEGKD_LINES:
        args = parser.parse_args(segkd_argv(line))
        used = []
        if args.command == "train" and not args.list:
            used = [o.split("=", 1)[1] for o in args.overrides if o.startswith("teacher.checkpoint=")]
        if args.command == "eval":
            used = [args.checkpoint]
        for path in used:
            folder = str(Path(path).parent)
            if line.startswith("torchrun"):  # the multi-GPU example trains its teacher on real data
                continue
            assert folder in outs, f"`{line}` reads {path}, which no earlier example writes"
            if args.command == "train":
                writer = outs[folder]
                assert writer.stage == "teacher" and writer.config == args.config, line
        if args.command == "train" and args.out:
            outs[args.out] = args


def test_python_snippet_runs():
    (snippet,) = re.findall(r"## Use\n\n```python\n(.*?)```", README.read_text(), flags=re.S)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 19, (2, 8, 8), generator=g)
    labels[:, 0] = 255
    namespace = {
        "student_logits": torch.randn(2, 19, 8, 8, generator=g, requires_grad=True),
        "teacher_logits": torch.randn(2, 19, 8, 8, generator=g),
        "student_feat": torch.randn(2, 16, 8, 8, generator=g, requires_grad=True),
        "teacher_feat": torch.randn(2, 32, 8, 8, generator=g),
        "labels": labels,
    }
    exec(compile(snippet, "README.md", "exec"), namespace)
    loss = namespace["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
