"""The `segkd` command line: `segkd info`, `segkd selfcheck`."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segkd", description="segkd_kernels: fused KD losses for segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, backends and why a backend is missing")
    check = sub.add_parser("selfcheck", help="run every loss with every available backend against the reference")
    check.add_argument("--size", choices=("small", "medium"), default="small",
                       help="input sizes (small: seconds on CPU)")
    check.add_argument("--interpret", choices=("auto", "on", "off"), default="auto",
                       help="run the Triton kernels through the interpreter on CPU (auto: when no GPU)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    return _selfcheck(args)


if __name__ == "__main__":
    sys.exit(main())
