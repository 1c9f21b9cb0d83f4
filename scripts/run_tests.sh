#!/usr/bin/env bash
# The test command: lint, then the tests.
#
#   scripts/run_tests.sh            ruff + the fast tests (every test not marked slow; under 2 minutes on 2 cores)
#   scripts/run_tests.sh --all      ruff + every test, the slow ones included (what CI runs, see .ci/run)
#   scripts/run_tests.sh -m slow    ruff + only the slow tests; any other arguments go to pytest as well
#
# Optional inputs:
#   STEPVIDEO_REFERENCE=/path/to/Step-Video-T2V  turns on the numerical parity tests (a checkout of the official code).
#   COMFYUI_PATH=/path/to/ComfyUI                then also runs every test in tests/host, in a real ComfyUI (minutes),
#       with ComfyUI's own Python, which has ComfyUI's requirements: $COMFYUI_PYTHON when set, else the first of
#       $COMFYUI_PATH/.venv/bin/python and $COMFYUI_PATH/venv/bin/python that exists. It needs pytest installed.
set -euo pipefail
cd "$(dirname "$0")/.."

marker=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  marker=()
  shift
fi

comfy_python=""
if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy_python="${COMFYUI_PYTHON:-}"
  if [ -z "$comfy_python" ]; then
    for candidate in "$COMFYUI_PATH/.venv/bin/python" "$COMFYUI_PATH/venv/bin/python"; do
      if [ -x "$candidate" ]; then
        comfy_python="$candidate"
        break
      fi
    done
  fi
  if [ -z "$comfy_python" ] || [ ! -x "$comfy_python" ]; then
    echo "COMFYUI_PATH=$COMFYUI_PATH is set but ComfyUI's Python was not found (${comfy_python:-no .venv/bin/python or" \
         "venv/bin/python there}): set COMFYUI_PYTHON to the Python that runs ComfyUI." >&2
    exit 2
  fi
  if ! "$comfy_python" -c "import pytest" 2>/dev/null; then
    echo "ComfyUI's Python ($comfy_python) has no pytest: run '$comfy_python -m pip install pytest' first." >&2
    exit 2
  fi
fi

bash scripts/setup_env.sh
.venv/bin/ruff check .
# tests/host is skipped here in any case: it needs ComfyUI's Python (below).
.venv/bin/python -m pytest -q --ignore=tests/host "${marker[@]}" "$@"
if [ -n "$comfy_python" ]; then
  echo "Host tests in the ComfyUI at $COMFYUI_PATH, with $comfy_python"
  COMFYUI_PYTHON="$comfy_python" "$comfy_python" -m pytest -q tests/host
fi
