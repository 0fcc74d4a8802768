#!/usr/bin/env bash
# The main job: set up .venv, then check every loss with every available backend against the
# reference on synthetic tensors and print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/segkd info
.venv/bin/segkd selfcheck "$@"
