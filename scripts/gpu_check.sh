#!/usr/bin/env bash
# The one command for a GPU machine without network access that ships its own torch and triton:
#
#   bash scripts/gpu_check.sh OUTDIR [--budget-s S] [--tests-timeout-s S] [--dry-run]
#
#  1. installs this checkout offline into the current Python (pip --no-index --no-build-isolation
#     --no-deps -e .), building segkd_kernels._cuda with every core for the GPU's architecture;
#  2. runs the cuda-marked tests, then the whole suite;
#  3. runs `segkd bench` rows in order of importance until --budget-s seconds (default 540) are
#     spent; an item that would not fit in what is left is skipped and listed;
#  4. writes every log, the benchmark CSV and summary.md to OUTDIR.
# Peers (pytorch-msssim, kornia, fussim) that are not installed are skipped by the benchmark itself.
#
# --dry-run (any machine, no GPU needed): installs offline into a throwaway venv that sees this
# Python's packages, with the CUDA build off, imports the package from it, and writes the command
# lines a real run would execute to OUTDIR/commands.txt; nothing is benchmarked or tested.
set -uo pipefail

usage() { echo "usage: bash scripts/gpu_check.sh OUTDIR [--budget-s S] [--tests-timeout-s S] [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
BUDGET=540
TESTS_TIMEOUT=1200
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) [ $# -ge 2 ] || usage; BUDGET=$2; shift 2 ;;
    --tests-timeout-s) [ $# -ge 2 ] || usage; TESTS_TIMEOUT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "gpu_check: unknown option $1" >&2; usage ;;
  esac
done
case "$BUDGET$TESTS_TIMEOUT" in *[!0-9]*) echo "gpu_check: --budget-s and --tests-timeout-s take whole seconds" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
START=$(date +%s)
SUMMARY=$OUT/summary.md
COMMANDS=$OUT/commands.txt
: > "$COMMANDS"
rm -f "$OUT/bench_args.txt"

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$OUT/gpu_check.log"; }
# run NAME TIMEOUT CMD...: logs to OUTDIR/NAME.log, records the command, returns its status
run() {
  local name=$1 limit=$2; shift 2
  printf '%s\t%s\t%s\n' "$name" "$limit" "$*" >> "$COMMANDS"
  if [ "$DRY" = 1 ]; then return 0; fi
  log "$name: $*"
  (cd "$ROOT" && timeout --signal=INT --kill-after=30 "$limit" "$@") > "$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc"
  return $rc
}

{
  echo "# gpu_check summary"
  echo
  echo "- started: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), checkout $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- python: $("$PYTHON" --version 2>&1)"
  echo "- torch / triton: $("$PYTHON" -c 'import torch, triton; print(torch.__version__, "/", triton.__version__)' 2>&1 | tail -1)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo none)"
  echo "- nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo missing)"
} > "$SUMMARY"

# 1. offline install -------------------------------------------------------------------------------
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
export SEGKD_CUDA_ARCHS=${SEGKD_CUDA_ARCHS:-${CC:-80;90}}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CMAKE_BUILD_PARALLEL_LEVEL=$MAX_JOBS
INSTALL=(pip install --no-index --no-build-isolation --no-deps -e .)
if [ "$DRY" = 1 ]; then
  # A throwaway venv that sees this Python's packages (as the GPU machine's system packages are
  # seen there); the CUDA build is off so the check takes seconds.
  VENV=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_venv.XXXXXX")
  trap 'rm -rf "$VENV"' EXIT
  "$PYTHON" -m venv --system-site-packages "$VENV" || { echo "gpu_check: cannot create a venv" >&2; exit 1; }
  PARENT_SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  VENV_SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  [ "$PARENT_SITE" = "$VENV_SITE" ] || echo "$PARENT_SITE" > "$VENV_SITE/_gpu_check_parent.pth"
  printf '%s\t%s\t%s\n' install 900 "$PYTHON -m ${INSTALL[*]}" >> "$COMMANDS"
  (cd "$ROOT" && SEGKD_CUDA=0 "$VENV/bin/python" -m "${INSTALL[@]}") > "$OUT/install.log" 2>&1
  rc=$?
  echo "- dry run: offline install into a throwaway venv: exit $rc (log install.log)" >> "$SUMMARY"
  [ $rc = 0 ] || { cat "$OUT/install.log" >&2; exit 1; }
  # the import must come from this checkout, through the editable install
  (cd / && "$VENV/bin/python" -c "import segkd_kernels, sys; print(segkd_kernels.__file__)") > "$OUT/import.log" 2>&1
  rc=$?
  echo "- dry run: import from the venv: exit $rc ($(tail -1 "$OUT/import.log"))" >> "$SUMMARY"
  [ $rc = 0 ] || { cat "$OUT/import.log" >&2; exit 1; }
  PYTHON="$VENV/bin/python"
else
  run install 900 "$PYTHON" -m "${INSTALL[@]}"
  rc=$?
  echo "- install (offline, SEGKD_CUDA_ARCHS=$SEGKD_CUDA_ARCHS, $MAX_JOBS jobs): exit $rc" >> "$SUMMARY"
  [ $rc = 0 ] || { log "install failed, see $OUT/install.log"; exit 1; }
fi
run info 120 "$PYTHON" -m segkd_kernels.cli info
if [ "$DRY" = 1 ]; then
  DRY=0 run info 120 "$PYTHON" -m segkd_kernels.cli info
  echo "- dry run: segkd info from the venv: exit $? (info.log)" >> "$SUMMARY"
fi
if [ "$DRY" = 0 ]; then
  "$PYTHON" -c "import segkd_kernels._cuda" > "$OUT/cuda_import.log" 2>&1 \
    && echo "- segkd_kernels._cuda: built and imports" >> "$SUMMARY" \
    || echo "- segkd_kernels._cuda: DOES NOT IMPORT (cuda_import.log)" >> "$SUMMARY"
fi

# 2. tests -----------------------------------------------------------------------------------------
pytest_line() { grep -E "(passed|failed|error|skipped|no tests ran|collected)" "$OUT/$1.log" 2>/dev/null | tail -1; }
run pytest_cuda "$TESTS_TIMEOUT" "$PYTHON" -m pytest python_tests -m cuda -q -p no:cacheprovider
[ "$DRY" = 1 ] || echo "- cuda-marked tests: $(pytest_line pytest_cuda)" >> "$SUMMARY"
run pytest_all "$TESTS_TIMEOUT" "$PYTHON" -m pytest python_tests -q -p no:cacheprovider
[ "$DRY" = 1 ] || echo "- whole suite: $(pytest_line pytest_all)" >> "$SUMMARY"
if [ "$DRY" = 1 ]; then
  # the suite must at least be collected from the installed package
  DRY=0 run pytest_collect 300 "$PYTHON" -m pytest python_tests --collect-only -q -p no:cacheprovider
  echo "- dry run: test collection: exit $? ($(pytest_line pytest_collect))" >> "$SUMMARY"
fi

# 3. benchmarks, most important first, until the budget is spent -----------------------------------
# The losses the issues single out first (fp32, then bf16), then the CBAM pieces, then the
# resolution sweep and the end-to-end step. Each item appends rows to one CSV.
CSV=$OUT/bench.csv
ITEMS=(
  "channel_wise_kd float32" "pixel_kd float32" "pfs_pixel_kd float32" "ssim_kd float32"
  "attnfd_loss float32" "pairwise_kd float32" "cross_image_kd float32"
  "channel_wise_kd bfloat16" "pixel_kd bfloat16" "pfs_pixel_kd bfloat16" "ssim_kd bfloat16"
  "attnfd_loss bfloat16" "pairwise_kd bfloat16" "cross_image_kd bfloat16"
  "spatial_pool float32,bfloat16" "channel_pool float32,bfloat16" "cbam_gate float32,bfloat16"
  "scaling" "e2e"
)
BENCH_START=$(date +%s)
skipped=()
ran=0
for item in "${ITEMS[@]}"; do
  left=$((BUDGET - ($(date +%s) - BENCH_START)))
  if [ "$left" -lt 20 ]; then skipped+=("$item"); continue; fi
  set -- $item
  case "$1" in
    scaling) args=(--ops pairwise_kd,cross_image_kd --dtypes float32) ;;
    e2e) args=(--ops channel_wise_kd --dtypes float32 --no-scaling --e2e) ;;
    *) args=(--ops "$1" --dtypes "$2" --no-scaling) ;;
  esac
  name="bench_${1}_${2:-all}"
  name=${name//,/_}
  if [ "$DRY" = 1 ]; then printf '%q ' "${args[@]}" --out "$CSV" >> "$OUT/bench_args.txt"; echo >> "$OUT/bench_args.txt"; fi
  if run "$name" "$left" "$PYTHON" -m segkd_kernels.cli bench "${args[@]}" --out "$CSV"; then
    ran=$((ran + 1))
  else
    echo "- $item: stopped or failed (log $name.log)" >> "$SUMMARY"
  fi
done
if [ "$DRY" = 1 ] && [ -s "$OUT/bench_args.txt" ]; then
  # every benchmark command line must parse (one process: importing torch once)
  "$PYTHON" - "$OUT/bench_args.txt" <<'PY' || { echo "gpu_check: a benchmark command line does not parse" >&2; exit 1; }
import shlex, sys
from segkd_kernels.bench import build_parser
for line in open(sys.argv[1]):
    build_parser().parse_args(shlex.split(line))
PY
  echo "- dry run: every benchmark command line parses" >> "$SUMMARY"
fi
if [ "$DRY" = 1 ]; then
  echo "- dry run: $(wc -l < "$COMMANDS") command lines in commands.txt; nothing tested or benchmarked" >> "$SUMMARY"
else
  rows=$(($(wc -l < "$CSV" 2>/dev/null || echo 1) - 1))
  echo "- benchmarks: $ran items run, $rows CSV rows in bench.csv, budget ${BUDGET}s" >> "$SUMMARY"
  [ ${#skipped[@]} = 0 ] || echo "- not run (budget spent): ${skipped[*]}" >> "$SUMMARY"
fi
echo "- elapsed: $(($(date +%s) - START)) s" >> "$SUMMARY"
cat "$SUMMARY"
