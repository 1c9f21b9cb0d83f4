#!/usr/bin/env bash
# Creates .venv (once) with torch and the pack's requirements, for the tests and the command line. Inside ComfyUI
# none of this is needed: ComfyUI's own environment provides torch.
#
# torch 2.13.0 (what CI runs): the CUDA build from PyPI where an NVIDIA GPU answers nvidia-smi, else the CPU build
# from download.pytorch.org (a few hundred MB instead of several GB of CUDA libraries). STEPVIDEO_TORCH=cpu or
# STEPVIDEO_TORCH=cuda chooses instead; STEPVIDEO_TORCH=keep leaves an installed torch alone. It says what it does.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="2.13.0"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi

choice="${STEPVIDEO_TORCH:-}"
if [ -z "$choice" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    choice=cuda
  else
    choice=cpu
  fi
fi
installed="$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
case "$choice" in
  keep)
    echo "setup_env: keeping the installed torch ${installed:-(none: install one, or unset STEPVIDEO_TORCH)}"
    ;;
  cpu)
    want="${TORCH_VERSION}+cpu"
    [ "$(uname -s)" = "Darwin" ] && want="${TORCH_VERSION}"  # macOS wheels (PyPI) have no CUDA and no +cpu tag
    if [ "$installed" = "$want" ]; then
      echo "setup_env: torch $installed (CPU build) is installed"
    else
      echo "setup_env: no NVIDIA GPU found (or STEPVIDEO_TORCH=cpu): installing the CPU build of torch ${TORCH_VERSION}" \
           "(STEPVIDEO_TORCH=cuda for the CUDA build)"
      .venv/bin/pip install -q --upgrade pip
      if [ "$(uname -s)" = "Darwin" ]; then
        .venv/bin/pip install -q "torch==${TORCH_VERSION}"
      else
        .venv/bin/pip install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
      fi
    fi
    ;;
  cuda)
    if [ "$installed" != "${TORCH_VERSION}" ] || ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.version.cuda is None)'; then
      echo "setup_env: NVIDIA GPU found (or STEPVIDEO_TORCH=cuda): installing torch ${TORCH_VERSION} with CUDA from" \
           "PyPI (STEPVIDEO_TORCH=cpu for the CPU build)"
      .venv/bin/pip install -q --upgrade pip
      .venv/bin/pip install -q "torch==${TORCH_VERSION}"
    else
      echo "setup_env: torch $installed with CUDA is installed"
    fi
    ;;
  *)
    echo "setup_env: STEPVIDEO_TORCH must be cpu, cuda or keep, not '$choice'" >&2
    exit 2
    ;;
esac

# The pack's requirements, plus what the tests and the tiny-model lab need (pyproject's dev and lab extras).
if ! .venv/bin/python -c "import einops, safetensors, transformers, sentencepiece, av, tqdm, cv2, tokenizers, pytest, ruff" 2>/dev/null; then
  .venv/bin/pip install -q -r requirements.txt "opencv-python-headless" "tokenizers" "pytest>=7" "ruff>=0.5"
fi
# GGUF checkpoints (pyproject's gguf extra), also into an existing .venv
.venv/bin/python -c "import gguf" 2>/dev/null || .venv/bin/pip install -q "gguf>=0.19"
# Several GPUs / machines in ComfyUI run on Ray (pyproject extra "ray"); its tests fail under CI without it.
.venv/bin/python -c "import ray" 2>/dev/null || .venv/bin/pip install -q "ray>=2.40"
