"""Build driver for segkd_kernels.

The Python package is pure Python + Triton. The hand-written CUDA kernels in csrc/ are compiled by
CMake (nvcc + pybind11 + static cudart, no libtorch) into the optional module segkd_kernels._cuda.

SEGKD_CUDA controls that build:
  auto (default)  build when nvcc and cmake are found; on failure warn and install without it
  1               build, and fail the install if it cannot be built
  0               never build it
SEGKD_CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES for the build (default "80;90").

The same kernels are also compiled by the host C++ compiler against the host execution layer
(csrc/host/) into segkd_kernels._cuda_host, which runs them on the CPU for the tests (never picked
by backend="cuda" on its own: see segkd_kernels._backends.host_execution). It needs cmake and g++,
no nvcc. SEGKD_CUDA_HOST controls it like SEGKD_CUDA (auto, 1, 0).
"""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path, host: bool = False):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)
        self.host = host  # the host-execution build (g++), not the nvcc one


def _find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    return None


# Written beside the package when _cuda is not built, so that `segkd info` and
# segkd_kernels.available_backends() can say why (pip hides the output of a successful install).
STATUS_FILE = "_cuda_build_status.txt"
HOST_STATUS_FILE = "_cuda_host_build_status.txt"


class CMakeBuild(build_ext):
    def run(self):
        for ext in self.extensions:
            self._build_or_explain(ext)

    def _build_or_explain(self, ext: CMakeExtension) -> None:
        status = Path(self.get_ext_fullpath(ext.name)).resolve().parent / (HOST_STATUS_FILE if ext.host else STATUS_FILE)
        status.parent.mkdir(parents=True, exist_ok=True)
        status.unlink(missing_ok=True)
        var = "SEGKD_CUDA_HOST" if ext.host else "SEGKD_CUDA"
        what = "the host-execution build of the CUDA kernels" if ext.host else "the CUDA library"
        mode = os.environ.get(var, "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise SystemExit(f"{var} must be auto, 0 or 1, got {mode!r}")
        if mode == "0":
            print(f"segkd_kernels: {var}=0, skipping {what}")
            status.write_text(f"not built: {var}=0 at install\n")
            return
        nvcc, cmake = (None if ext.host else _find_nvcc()), shutil.which("cmake")
        needed = (("cmake", cmake),) if ext.host else (("nvcc", nvcc), ("cmake", cmake))
        missing = " and ".join(n for n, p in needed if not p)
        if missing:
            msg = f"{missing} not found at install"
            if mode == "1":
                raise SystemExit(f"segkd_kernels: {msg} ({var}=1)")
            warnings.warn(f"segkd_kernels: {msg}, {what} will not be built")
            status.write_text(f"not built: {msg}\n")
            return
        try:
            self._build_cmake(ext, nvcc, cmake)
        except (subprocess.CalledProcessError, OSError) as err:
            output = getattr(err, "output", None) or ""
            tail = "\n".join(output.strip().splitlines()[-25:])
            if mode == "1":
                raise SystemExit(f"segkd_kernels: building {what} failed: {err}\n{output}")
            warnings.warn(f"segkd_kernels: building {what} failed ({err}); installing without it. "
                          f"Set {var}=1 to make this an error.\n" + tail)
            status.write_text(f"the build failed at install: {err}\nlast lines of the build log:\n{tail}\n")

    def _run_logged(self, cmd: list[str]) -> None:
        """Runs a build step, echoing its output; on failure the output travels with the error."""
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(done.stdout)
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, cmd[:4] + ["..."], output=done.stdout)

    def _build_cmake(self, ext: CMakeExtension, nvcc: str | None, cmake: str) -> None:
        import pybind11

        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_file.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / ("cmake-host" if ext.host else "cmake")
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("SEGKD_CUDA_ARCHS", "80;90")
        config = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSEGKD_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if ext.host:
            config += ["-DSEGKD_BUILD_CUDA=OFF", "-DSEGKD_BUILD_HOST=ON", f"-DSEGKD_HOST_OUTPUT_NAME={out_file.name}"]
            print("segkd_kernels: building the host-execution test module of the CUDA kernels")
        else:
            config += ["-DSEGKD_BUILD_CUDA=ON", "-DSEGKD_BUILD_HOST=OFF", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                       f"-DSEGKD_CUDA_ARCHS={archs}", f"-DSEGKD_OUTPUT_NAME={out_file.name}"]
            print(f"segkd_kernels: building the CUDA library for sm {archs} with {nvcc}")
        if shutil.which("ninja"):
            config.append("-GNinja")
        self._run_logged([cmake, "-S", ext.source_dir, "-B", str(build_dir), *config])
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        self._run_logged([cmake, "--build", str(build_dir), "--parallel", jobs])
        if not out_file.exists():
            raise OSError(f"CMake finished but {out_file} is missing")


setup(
    ext_modules=[CMakeExtension("segkd_kernels._cuda", ROOT),
                 CMakeExtension("segkd_kernels._cuda_host", ROOT, host=True)],
    cmdclass={"build_ext": CMakeBuild},
)
