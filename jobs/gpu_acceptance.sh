#!/usr/bin/env bash
# bash jobs/gpu_acceptance.sh [OUT] [WHEELS] [BENCH_OPTIONS...]   (on a GPU machine, from a fresh checkout)
#
# The one-command GPU acceptance: the project installed beside the machine's own torch, then
# `allcluster bench gpu`: the gpu-marked tests and the score / cam / lime / sweep benchmarks on
# generated images, one JSON with every ratio beside its target, written to OUT/gpu.json (default
# runs/bench-gpu) and printed.
#   - no WHEELS: a venv that keeps the site packages (--system-site-packages; pyproject.toml declares
#     torch as a range, so pip keeps a site CUDA build that satisfies it), filled from the registries;
#   - WHEELS, a folder made by `python3 jobs/offline_wheels.py` on a machine with internet, for a node
#     with none: its wheels go into .site-gpu/ (no resolution, no index) and run on the site Python;
#   - BENCH_OPTIONS go to `allcluster bench gpu` (e.g. --quick; WHEELS "" for none).
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
from_caller() { case $1 in /*) echo "$1" ;; *) echo "$caller/$1" ;; esac; }   # OUT, WHEELS: as the caller meant them
out=$PWD/runs/bench-gpu
[ -z "${1:-}" ] || out=$(from_caller "$1")
wheels=
[ -z "${2:-}" ] || wheels=$(from_caller "$2")
if [ -n "$wheels" ] && ! compgen -G "$wheels/*.whl" >/dev/null; then
  echo "gpu_acceptance.sh: no wheels in $wheels (make them with: python3 jobs/offline_wheels.py $wheels ...)" >&2
  exit 2
fi
python3 - <<'EOF' || exit 2
import sys
try:
    import torch
except ImportError:
    sys.exit(f"gpu_acceptance.sh: {sys.executable} has no torch: install the machine's CUDA build first (it is kept)")
if not torch.cuda.is_available():
    sys.exit(f"gpu_acceptance.sh: torch {torch.__version__} sees no CUDA device: run this on a GPU machine")
EOF
if [ -n "$wheels" ]; then
  rm -rf .site-gpu      # only this run's wheels: a package left from an earlier set would shadow the machine's
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site-gpu "$wheels"/*.whl
  export PYTHONPATH="$PWD/.site-gpu:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  python=python3
else
  if [ ! -x .venv-gpu/bin/python ]; then
    python3 -m venv --system-site-packages .venv-gpu
  fi
  # GPU images often keep torch in a venv of their own (python3 is /opt/.../.venv/bin/python3): its
  # packages are not the "system site" of a venv made from it, so a .pth file adds python3's site
  # folders (their own .pth files too) and its user site where it uses one, after ours; on every run
  python3 - "$(.venv-gpu/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" <<'EOF'
import site, sys
folders = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
with open(f"{sys.argv[1]}/machine-site.pth", "w") as pth:
    pth.write("import site; " + "; ".join(f"site.addsitedir({f!r})" for f in folders) + "\n")
EOF
  .venv-gpu/bin/python -m pip install -q -e '.[test]'
  python=.venv-gpu/bin/python
fi
mkdir -p "$out"
"$python" -m allcluster.cli bench gpu --out "$out/run" "${@:3}" | tee "$out/gpu.json"
