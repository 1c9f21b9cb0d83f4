#!/usr/bin/env bash
# Creates .venv (once) with a CPU torch and the pack's requirements. Inside ComfyUI none of this is needed:
# ComfyUI's own environment provides torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# The pack's requirements, plus what the tests and the tiny-model lab need (pyproject's dev and lab extras).
if ! .venv/bin/python -c "import torch, einops, safetensors, transformers, sentencepiece, av, tqdm, cv2, tokenizers, pytest, ruff" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0" -r requirements.txt "opencv-python-headless" "tokenizers" "pytest>=7" "ruff>=0.5"
fi
# GGUF checkpoints (pyproject's gguf extra), also into an existing .venv
.venv/bin/python -c "import gguf" 2>/dev/null || .venv/bin/pip install -q "gguf>=0.19"
# Several GPUs / machines in ComfyUI run on Ray (pyproject extra "ray"); its tests fail under CI without it.
.venv/bin/python -c "import ray" 2>/dev/null || .venv/bin/pip install -q "ray>=2.40"
