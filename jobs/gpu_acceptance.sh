#!/usr/bin/env bash
# bash jobs/gpu_acceptance.sh [OUT]        (on a GPU machine, from a fresh checkout)
#
# The one-command GPU acceptance: a venv that keeps the machine's own torch (--system-site-packages;
# pyproject.toml declares torch as a range, so pip keeps a site CUDA build that satisfies it), the
# project installed into it from the package registries, then `allcluster bench gpu`: the gpu-marked
# tests and the score / cam / lime / sweep benchmarks on generated images, one JSON with every ratio
# beside its target, written to OUT/gpu.json (default runs/bench-gpu) and printed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench-gpu}
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible to torch"'
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv --system-site-packages .venv-gpu
fi
.venv-gpu/bin/python -m pip install -q -e '.[test]'
mkdir -p "$out"
.venv-gpu/bin/allcluster bench gpu --out "$out/run" | tee "$out/gpu.json"
