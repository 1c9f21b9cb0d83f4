#!/usr/bin/env bash
# Downloads into .wheels/ (git-ignored) the Python packages that scripts/gpu_check.sh needs and the GPU machine
# lacks, as wheels for CPython 3.12 on manylinux x86-64 (that machine has no network; the device tool carries the
# folder: carry [".wheels"]). Run it here, where the package registry is reachable:
#
#   bash scripts/gpu_wheels.sh
#
# The machine already has torch (CUDA), Triton, einops, safetensors, transformers, sentencepiece, tokenizers,
# OpenCV, numpy, PyYAML, requests, tqdm and pytest (docs/gpu-check.md). It lacks:
#   sageattention 1.0.6  the attention back-end checked against SDPA (pure Python on Triton, 20 KB)
#   gguf 0.19.0          GGUF dequantization's reference (needs numpy, PyYAML, requests, tqdm: all there)
# PyAV is not carried (35 MB): nothing the checks import needs it (stepvideo_core imports it only to write videos).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(sageattention==1.0.6 gguf==0.19.0)
max_bytes=$((4 * 1024 * 1024))  # the working tree travels within 64 MiB; the repo is about 32 MB
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi

rm -rf .wheels
mkdir -p .wheels
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .wheels "${packages[@]}"

count=$(find .wheels -name '*.whl' | wc -l)
if [ "$count" -ne "${#packages[@]}" ]; then
  echo "expected ${#packages[@]} wheels in .wheels, found $count" >&2
  exit 1
fi
total=$(find .wheels -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s}')
ls -l .wheels | tail -n +2
echo "$count wheels, $total bytes in .wheels"
if [ "$total" -gt "$max_bytes" ]; then
  echo "the wheels take $total bytes, over the $max_bytes this script allows for the carried folder" >&2
  exit 1
fi
