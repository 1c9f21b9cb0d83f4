#!/usr/bin/env bash
# The test command: lint, then the whole suite. Parity tests run when STEPVIDEO_REFERENCE points at a
# Step-Video-T2V checkout; ComfyUI host tests run when COMFYUI_PATH points at a ComfyUI install.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
