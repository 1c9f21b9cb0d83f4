#!/usr/bin/env bash
# The pack on a CUDA GPU in one command, under 8 minutes: the CUDA checks (tests/gpu, pytest -m gpu), then the GPU
# figures (bench/gpu_figures.py) in the time left, then one JSON of both. See docs/gpu-check.md.
#
#   bash scripts/gpu_check.sh OUT_DIR              on the GPU machine (with .wheels/ from scripts/gpu_wheels.sh)
#   bash scripts/gpu_check.sh --dry-run OUT_DIR    on a CPU: the checks skip, the figures run at small sizes
#   bash scripts/gpu_check.sh --checks-only OUT_DIR -- -k "vae or fp8"   a rerun: some checks, no figures
#
# Writes into OUT_DIR: gpu_check.json (the report), gpu_check.log (everything printed), gpu_tests.json (the checks'
# own report) and gpu_figures.json (the bench's). Time limits, in seconds (environment, all optional):
#   GPU_CHECK_BUDGET (450: the whole run, leaving a 30 s margin under 8 minutes), GPU_CHECK_TESTS_BUDGET (240: the
#   checks), GPU_CHECK_TEST_TIMEOUT (150: one check, where pytest-timeout is installed). The figures get what is
#   left, minus 20 s for the report. PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

out="" dry_run=0 checks_only=0 pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --checks-only) checks_only=1 ;;
    --) shift; pytest_args=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
if [ -z "$out" ]; then
  echo "give the folder to write into (on the GPU machine: \$OUT)" >&2
  usage >&2
  exit 2
fi
mkdir -p "$out" && out="$(cd "$out" && pwd)" || exit 2

budget=${GPU_CHECK_BUDGET:-450}
tests_budget=${GPU_CHECK_TESTS_BUDGET:-240}
test_timeout=${GPU_CHECK_TEST_TIMEOUT:-150}
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $((start + budget - $(date +%s))); }

run() {
  local parts=()
  local t0 rc

  echo "== gpu_check: $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git'), budget ${budget} s" \
       "$([ $dry_run = 1 ] && echo '(dry run)')"
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  fi

  echo "== wheels"
  t0=$(date +%s) rc=0
  local wheels=(.wheels/*.whl)
  if [ ! -e "${wheels[0]}" ]; then
    echo "no .wheels/*.whl (make them with scripts/gpu_wheels.sh): the sageattention and GGUF checks will skip"
  elif [ $dry_run = 1 ]; then
    ls -l .wheels/ | tail -n +2
    echo "dry run: not installed"
  else
    local site="${TMPDIR:-/tmp}/stepvideo-gpu-site"
    timeout 120 "$py" -m pip install -q --no-index --find-links .wheels --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$site" "${wheels[@]}"
    rc=$?
    if [ $rc = 0 ]; then export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"; fi
  fi
  parts+=(--part "wheels=$rc:$(($(date +%s) - t0))")

  echo "== checks (pytest -m gpu tests/gpu, at most ${tests_budget} s)"
  local limit=$tests_budget
  [ "$(left)" -lt $((limit + 60)) ] && limit=$(($(left) - 60))
  [ "$limit" -lt 30 ] && limit=30
  local per_test=()
  if "$py" -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout "$test_timeout"); fi
  t0=$(date +%s)
  STEPVIDEO_GPU_REPORT="$out/gpu_tests.json" timeout -k 10 "$limit" \
    "$py" -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider --continue-on-collection-errors "${per_test[@]}" "${pytest_args[@]}"
  rc=$?
  parts+=(--part "tests=$rc:$(($(date +%s) - t0))")

  local figures_args=(--out "$out/gpu_figures.json")
  [ $dry_run = 1 ] && figures_args+=(--dry-run)
  limit=$(($(left) - 20))
  t0=$(date +%s) rc=0
  if [ $checks_only = 1 ]; then
    echo "== figures: not run (--checks-only)"
  elif [ "$limit" -ge 30 ]; then
    echo "== figures (bench/gpu_figures.py, ${limit} s left)"
    # The script stops starting measurements when its budget is spent; the hard limit catches one that hangs.
    timeout -k 10 "$limit" "$py" bench/gpu_figures.py "${figures_args[@]}" --budget $((limit - 15))
    rc=$?
  else
    echo "== figures: no time left (${limit} s)"
    rc=124
  fi
  local report_args=(--tests "$out/gpu_tests.json" --log "$out/gpu_check.log" --out "$out/gpu_check.json")
  if [ $checks_only = 0 ]; then
    parts+=(--part "figures=$rc:$(($(date +%s) - t0))")
    report_args+=(--figures "$out/gpu_figures.json")
  fi

  echo "== report"
  report_args+=("${parts[@]}")
  [ $dry_run = 1 ] && report_args+=(--dry-run)
  "$py" scripts/gpu_report.py "${report_args[@]}"
}

rm -f "$out/gpu_tests.json" "$out/gpu_figures.json" "$out/gpu_check.json"
run 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
if [ ! -f "$out/gpu_check.json" ]; then
  echo "gpu_check: no report was written (see $out/gpu_check.log)" >&2
  exit 1
fi
exit "$status"
