#!/usr/bin/env bash
# The one-command GPU run (graphprune/bench/gpu.py): SD1.5 at 512x512 and SDXL at 1024x1024 in fp16, per call and
# 50 steps, every timed call paired with an Inductor call; writes results/gpu/gpu.json and gpu.md.
#
#   benchmarks/gpu.sh --wheels wheels/ [graphprune bench gpu flags, e.g. --models sd15:64 -o results/gpu]
#
# The GPU machine has torch + CUDA but no diffusers/tomesd/DeepCache and no internet: --wheels DIR installs them
# from wheels carried along (pip install --no-index: nothing is downloaded there). Make DIR on a machine with
# internet, for the GPU machine's Python (here 3.11) and platform (see benchmarks/README.md, "GPU run"):
#
#   pip download --no-deps -d wheels diffusers==0.42.1 tomesd==0.1.3 DeepCache==0.1.1
#   pip download -d wheels --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#       huggingface_hub safetensors regex importlib_metadata requests Pillow tqdm scikit-image transformers
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--wheels" ]]; then
    wheels="$2"
    shift 2
    python3 -m pip install --no-index --find-links "$wheels" diffusers tomesd DeepCache scikit-image tqdm
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benchmarks/gpu.py "$@"
