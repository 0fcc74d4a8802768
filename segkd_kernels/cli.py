"""The `segkd` command line: `info`, `selfcheck`, and the trainer's `train`, `eval`, `demo`, `compare`.

Each subcommand is a pair (add its arguments, run it); the trainer's modules are imported only when
one of its subcommands runs, so `segkd info` stays fast."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys


def _info(_args) -> int:
    import numpy
    import torch

    import segkd_kernels as sk
    from segkd_kernels import _backends
    from segkd_kernels.ops import implemented_backends

    print(f"segkd_kernels {sk.__version__}  ({os.path.dirname(sk.__file__)})")
    print(f"python {platform.python_version()}  torch {torch.__version__}  numpy {numpy.__version__}")
    triton_ok, triton_reason = _backends.triton_installed()
    print(f"triton: {triton_reason}")
    print(f"torch CUDA build: {torch.version.cuda or 'none (CPU build)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i} {props.name}  sm_{props.major}{props.minor}  {props.total_memory / 2**30:.1f} GiB")
    else:
        print("CUDA devices: none")
    lib, lib_reason = _backends.cuda_library()
    print(f"_cuda library: {'built, ' + lib.__file__ if lib else lib_reason}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s:<3} SEGKD_BACKEND={os.environ.get('SEGKD_BACKEND', '')}")
    print("\nbackends:")
    report = sk.available_backends()
    for name, ok in report.items():
        print(f"  {name:<10} {'yes' if ok else 'no ':<4} {report.reasons[name]}")
    print("\nops (implemented backends):")
    for op, impls in implemented_backends().items():
        print(f"  {op:<16} {', '.join(impls)}")
    return 0


def _selfcheck(args) -> int:
    import torch

    wants_interpreter = args.interpret == "on" or (args.interpret == "auto" and not torch.cuda.is_available())
    if wants_interpreter and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when the kernels are defined (package import), so the check
        # runs in a fresh interpreter with it set.
        try:
            import triton  # noqa: F401
        except ImportError:
            pass
        else:
            env = dict(os.environ, TRITON_INTERPRET="1")
            cmd = [sys.executable, "-m", "segkd_kernels.cli", "selfcheck", "--size", args.size]
            return subprocess.run(cmd, env=env).returncode
    from segkd_kernels.selfcheck import run_selfcheck

    return run_selfcheck(size=args.size)


def _trainer_errors():
    """The errors a user can fix (bad config, missing folder, unusable checkpoint): one line, exit 2."""
    from segkd_kernels.train.checkpoint import CheckpointError
    from segkd_kernels.train.config import ConfigError

    return (ConfigError, CheckpointError, FileNotFoundError)


def _interrupted(command: str, e) -> int:
    print(f"segkd {command}: {e}", file=sys.stderr)
    return 128 + int(e.result.get("signal") or 2)


def _run_trainer(command: str, run, **kwargs) -> int:
    """run(**kwargs) for a command that trains several runs (demo, compare): a user's error in one
    line (exit 2), an interruption as its signal's exit code."""
    from segkd_kernels.train.engine import Interrupted

    try:
        return run(**kwargs)
    except _trainer_errors() as e:
        print(f"segkd {command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        return _interrupted(command, e)


def _add_runs_options(p, unit: str) -> None:
    """--device, --set and --overwrite of the commands that train several runs; `unit`: what
    --overwrite trains again (stage, run)."""
    p.add_argument("--device", default="auto")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of every run, e.g. --set threads=1")
    p.add_argument("--overwrite", action="store_true",
                   help=f"train every {unit} again (by default finished {unit}s are reused and interrupted ones "
                        "continue)")


def _add_train(p) -> None:
    p.add_argument("--method", help="distillation method (none: the model alone); see `segkd train --list`")
    p.add_argument("--dataset", help="synthetic, voc, cityscapes, ade20k, camvid")
    p.add_argument("--config", help="a YAML file or the name of a shipped config (see --list)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set optim.lr=0.02 --set distill.weights.kd=0.5")
    p.add_argument("--iters", type=int)
    p.add_argument("--out", help="output folder (checkpoints, log.jsonl, metrics.json)")
    p.add_argument("--stage", choices=("student", "teacher"))
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--resume-from", metavar="PATH", help="continue from this checkpoint file")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that holds a run (deletes its checkpoints, logs and metrics)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept settings that differ from the run's (not an exact continuation; "
                        "the change is recorded in log.jsonl and config.json)")
    p.add_argument("--list", action="store_true", help="list methods and shipped configs, then exit")


def _train(args) -> int:
    from segkd_kernels.train.config import list_configs, load_config
    from segkd_kernels.train.distill import methods
    from segkd_kernels.train.engine import train

    if args.list:
        print("methods:", ", ".join(methods()))
        print("configs:", ", ".join(list_configs()))
        return 0
    from segkd_kernels.train.engine import describe_stop

    if args.allow_config_change and not (args.resume or args.resume_from):
        print("segkd train: error: --allow-config-change applies to --resume or --resume-from", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides, method=args.method, dataset=args.dataset, iters=args.iters,
                          out=args.out, stage=args.stage, seed=args.seed)
        result = train(cfg, resume=args.resume_from or args.resume, overwrite=args.overwrite,
                       allow_config_change=args.allow_config_change)
    except _trainer_errors() as e:
        print(f"segkd train: error: {e}", file=sys.stderr)
        return 2
    rc = 0 if result["status"] == "done" else 128 + int(result["signal"] or 2)
    if not result.get("main", True):  # under torchrun only the main process reports
        return rc
    if result["status"] == "interrupted":
        print(describe_stop(result, "continue with the same command and --resume"), file=sys.stderr)
        return rc
    m = result["metrics"]
    spi = result["sec_per_iter"]
    timing = f"{result['train_seconds']:.0f} s" + (f", {spi:.3f} s/iter" if spi == spi else "")
    head = f"already finished at step {result['step']}" if result.get("already_done") else f"step {result['step']}"
    print(f"{head}: mIoU {m['miou']:.2f}  pixel acc {m['pixel_acc']:.2f}  ({timing})  -> {result['out']}")
    if "no_label" in m:  # a label-assisted teacher: the same model with its label channel zeroed
        print(f"  without the label channel: mIoU {m['no_label']['miou']:.2f}  pixel acc "
              f"{m['no_label']['pixel_acc']:.2f}")
    return 0


def _add_eval(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint written by `segkd train` (e.g. OUT/last.pt)")
    p.add_argument("--dataset", help="evaluate on another dataset than the one trained on")
    p.add_argument("--split", help="dataset split (default: the run's val split)")
    p.add_argument("--mode", choices=("whole", "slide"), help="whole-image or sliding-window inference")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _eval(args) -> int:
    import json

    try:
        from segkd_kernels.train.evaluate import evaluate_checkpoint

        m = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, split=args.split, mode=args.mode,
                                overrides=args.overrides)
    except _trainer_errors() as e:
        print(f"segkd eval: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    print(f"mIoU {m['miou']:.2f}  pixel acc {m['pixel_acc']:.2f}  ({m['pixels']} pixels)")
    if "no_label" in m:
        print(f"without the label channel: mIoU {m['no_label']['miou']:.2f}  pixel acc {m['no_label']['pixel_acc']:.2f}")
    for name, iou in m["per_class_iou"].items():
        print(f"  {name:<24} {'-' if iou is None else f'{iou:.2f}'}")
    return 0


def _add_demo(p) -> None:
    p.add_argument("--quick", action="store_true", help="a smaller budget (a few minutes on 2 CPU cores)")
    p.add_argument("--method", help="the distillation method to show (default: the one that helps most here)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--iters", type=int, help="override the iteration budget of every run")
    _add_runs_options(p, "stage")


def _demo(args) -> int:
    from segkd_kernels.train.demo import run_demo

    return _run_trainer("demo", run_demo, quick=args.quick, method=args.method, out=args.out, iters=args.iters,
                        device=args.device, overrides=args.overrides, overwrite=args.overwrite)


def _add_compare(p) -> None:
    from segkd_kernels.train.compare import DEFAULT_CONTROLS, DEFAULT_METHODS

    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods (default: all)")
    p.add_argument("--controls", default=",".join(DEFAULT_CONTROLS),
                   help="comma-separated controls: balanced_ce (class-balanced CE student), kd:onehot / cwd:onehot "
                        "(the method with a one-hot ground-truth teacher); empty for none")
    p.add_argument("--seeds", type=int, default=5, help="paired seeds (default 5)")
    p.add_argument("--iters", type=int, help="iterations per student run (default: each config's; --iters leaves "
                                              "the teachers' budget as it is)")
    p.add_argument("--teacher-iters", type=int,
                   help="iterations for the (cached) teachers (default: the preset's, 1500 in full; smoke: the "
                        "config's)")
    p.add_argument("--seed-start", type=int, default=0,
                   help="run only seeds from this one on (split the seeds over processes; earlier seeds' finished "
                        "runs are collected into the tables)")
    p.add_argument("--quick", action="store_true", help="the quick budget (48 px, 150 iterations, 600 for teachers)")
    p.add_argument("--out", default="runs/compare", help="output folder for runs and the result tables")
    p.add_argument("--teacher-cache", help="folder of cached teachers, shared by comparisons (default: OUT/teachers)")
    p.add_argument("--sweep", action="store_true",
                   help="also sweep each method's loss weights x0.3, x1, x3 on the holdout split (sweep.md)")
    p.add_argument("--sweep-seeds", type=int, default=2, help="seeds per sweep point (default 2)")
    _add_runs_options(p, "run")
    p.add_argument("--workers", type=int, default=1,
                   help="runs trained at once, each in its own process (default 1: in this process)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run (default: torch's choice; 1 in worker processes)")


def _compare(args) -> int:
    from segkd_kernels.train.compare import run_compare

    return _run_trainer("compare", run_compare, methods=[m for m in args.methods.split(",") if m], seeds=args.seeds,
                        iters=args.iters, quick=args.quick, out=args.out, device=args.device,
                        overrides=args.overrides, seed_start=args.seed_start, overwrite=args.overwrite,
                        controls=[c for c in args.controls.split(",") if c], teacher_cache=args.teacher_cache,
                        sweep=args.sweep, sweep_seeds=args.sweep_seeds, teacher_iters=args.teacher_iters,
                        workers=args.workers, threads=args.threads)


def _add_bench(p) -> None:
    from segkd_kernels.bench import build_parser

    build_parser(p)


def _bench(args) -> int:
    from segkd_kernels.bench import run

    return run(args)


# name -> (help, add_arguments, run). More subcommands register here.
COMMANDS = {
    "info": ("versions, devices, backends and why a backend is missing", lambda p: None, _info),
    "selfcheck": ("run every loss with every available backend against the reference", None, _selfcheck),
    "train": ("train a model, a teacher (--stage teacher) or a distilled student (--method)", _add_train, _train),
    "eval": ("evaluate a checkpoint: mIoU, per-class IoU, pixel accuracy", _add_eval, _eval),
    "demo": ("train teacher, student and distilled student on synthetic data; print the table", _add_demo, _demo),
    "compare": ("every method x seeds on the synthetic benchmark; tables and plot", _add_compare, _compare),
    "bench": ("kernel, scaling and end-to-end benchmarks into runs/bench/<device>-<time>/ (GPU; --quick on CPU)",
              _add_bench, _bench),
}


def _add_selfcheck(check) -> None:
    check.add_argument("--size", choices=("small", "medium"), default="small",
                       help="input sizes (small: seconds on CPU)")
    check.add_argument("--interpret", choices=("auto", "on", "off"), default="auto",
                       help="run the Triton kernels through the interpreter on CPU (auto: when no GPU)")


COMMANDS["selfcheck"] = (COMMANDS["selfcheck"][0], _add_selfcheck, _selfcheck)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segkd", description="segkd_kernels: fused KD losses for segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add, _run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if add is not None:
            add(p)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except KeyboardInterrupt:  # outside a training loop (which saves and reports on its own)
        print(f"segkd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
