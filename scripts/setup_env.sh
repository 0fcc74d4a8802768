#!/usr/bin/env bash
# Creates ./.venv if needed and installs segkd_kernels into it (editable) with everything it needs.
# The venv sees system site-packages, so a machine that already has torch (e.g. a CUDA build) uses
# it; otherwise torch==2.13.0 is installed (an unpinned torch would pull several GB of CUDA wheels).
# The CUDA library is built when nvcc and cmake are present (SEGKD_CUDA=auto|1|0, see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  pip_install torch==2.13.0
fi
# Build requirements are installed here and the build runs without isolation, so it uses this
# torch-free environment as is and never downloads anything large.
missing=()
python -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null || missing+=("setuptools>=64")
python -c "import wheel" 2>/dev/null || missing+=("wheel")
python -c "import pybind11" 2>/dev/null || missing+=("pybind11>=2.12")
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing build requirements: ${missing[*]}"
  pip_install "${missing[@]}"
fi
echo "[setup] installing segkd_kernels (editable; builds segkd_kernels._cuda where nvcc and cmake exist)"
pip_install --no-build-isolation -e ".[test]"
