#!/usr/bin/env bash
# The main job: set up .venv, print versions and backends, then run the trainer demo on the built-in
# synthetic data (CPU, a few minutes): a teacher, a student alone and a distilled student, with a
# table of mIoU and time and a PNG of their predictions (runs/demo/).
# Extra arguments go to `segkd demo`, e.g. `bash scripts/main.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/segkd info
.venv/bin/segkd demo "$@"
