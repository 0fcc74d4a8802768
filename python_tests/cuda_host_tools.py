"""Builds single kernel files of csrc/ (possibly modified copies) against the host execution layer
into a small shared library, and wraps its launchers like segkd_kernels._cuda_host.

Used by the mutation and AddressSanitizer tests: each builds one .cu file with g++ (seconds) instead
of the whole module, and runs the normal suite against it (SEGKD_TEST_HOST_LIBRARY, read by
test_cuda_host.py). The launchers are C++ functions; a generated C shim catches their exceptions
and returns them as error codes, so a failing launch raises in Python (ValueError for argument
checks, RuntimeError otherwise), as with the pybind11 module.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HOST_INCLUDE = CSRC / "host"

_CTYPES = {"std::uintptr_t": ctypes.c_uint64, "int64_t": ctypes.c_int64, "double": ctypes.c_double,
           "bool": ctypes.c_bool, "DType": ctypes.c_int, "int": ctypes.c_int}


def launcher_declarations(launchers_h: Path = CSRC / "launchers.h") -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """name -> (return type, [(type, name), ...]) of every launcher declared in launchers.h."""
    text = launchers_h.read_text()
    decls = {}
    for ret, name, params in re.findall(r"^(void|int64_t) (\w+)\(([^;]*?)\);", text, flags=re.M | re.S):
        args = []
        for p in params.split(","):
            p = " ".join(p.split())
            typ, _, arg = p.rpartition(" ")
            args.append((typ, arg))
        decls[name] = (ret, args)
    return decls


def defined_launchers(cu_file: Path) -> list[str]:
    declared = launcher_declarations()
    return [n for n in re.findall(r"^(?:void|int64_t) (\w+)\(", cu_file.read_text(), flags=re.M) if n in declared]


def _shim_source(names: list[str]) -> str:
    decls = launcher_declarations()
    out = ['#include <cstdio>', '#include <stdexcept>', '#include "launchers.h"', "using segkd::DType;"]
    for name in names:
        ret, args = decls[name]
        params = ", ".join(f"{t} {a}" for t, a in args)
        call = f"segkd::{name}({', '.join(a for _, a in args)})"
        body = f"*result = {call};" if ret != "void" else f"{call}; *result = 0;"
        out.append(
            f'extern "C" int segkd_shim_{name}({params}, int64_t* result, char* error) {{\n'
            f"  try {{ {body} return 0; }}\n"
            f"  catch (const std::invalid_argument& e) {{ std::snprintf(error, 512, \"%s\", e.what()); return 1; }}\n"
            f"  catch (const std::exception& e) {{ std::snprintf(error, 512, \"%s\", e.what()); return 2; }}\n"
            f"}}")
    return "\n".join(out) + "\n"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def build_library(src_dir: Path, unit: str, out: Path, flags: tuple[str, ...] = ("-O1",), timeout: float = 300) -> Path:
    """Compiles src_dir/<unit>.cu (with src_dir's headers, then csrc/host/) and a shim into out."""
    cu = src_dir / f"{unit}.cu"
    shim = out.with_suffix(".shim.cpp")
    shim.write_text(_shim_source(defined_launchers(cu)))
    cmd = [compiler(), "-std=c++17", "-fPIC", "-shared", "-fno-strict-aliasing", *flags, f"-I{HOST_INCLUDE}",
           f"-I{src_dir}", "-x", "c++", str(cu), str(shim), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"building {cu.name} failed:\n{done.stderr[-3000:]}")
    return out


class ShimLibrary:
    """The launchers of one built kernel file; everything else from `fallback` (the full host module)."""

    def __init__(self, path: str | Path, fallback):
        self._lib = ctypes.CDLL(str(path))
        self._fallback = fallback
        self._funcs = {}
        for name, (ret, args) in launcher_declarations().items():
            fn = getattr(self._lib, f"segkd_shim_{name}", None)
            if fn is None:
                continue
            fn.argtypes = [_CTYPES[t] for t, _ in args] + [ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p]
            fn.restype = ctypes.c_int
            self._funcs[name] = (fn, [a for _, a in args], ret)

    def __getattr__(self, name):
        if name.startswith("_") or name not in self._funcs:
            return getattr(self._fallback, name)
        fn, arg_names, ret = self._funcs[name]

        def call(*args, **kwargs):
            values = list(args) + [kwargs.pop(a) for a in arg_names[len(args):]]
            if kwargs:
                raise TypeError(f"{name}: unexpected arguments {sorted(kwargs)}")
            result, error = ctypes.c_int64(0), ctypes.create_string_buffer(512)
            rc = fn(*[int(v) if isinstance(v, bool) is False and isinstance(v, int) else v for v in values],
                    ctypes.byref(result), error)
            if rc:
                raise (ValueError if rc == 1 else RuntimeError)(error.value.decode())
            return result.value if ret != "void" else None

        return call


def copy_sources(dest: Path) -> Path:
    """csrc/*.cu, *.cuh and *.h copied into dest (to be modified there)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in CSRC.iterdir():
        if f.suffix in (".cu", ".cuh", ".h"):
            shutil.copy(f, dest / f.name)
    return dest
