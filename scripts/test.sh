#!/usr/bin/env bash
# Set up .venv and run the test suite (CPU: reference + Triton interpreter; CUDA cases skip).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k ssim -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest python_tests -q "$@"
