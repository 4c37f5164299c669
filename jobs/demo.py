#!/usr/bin/env python3
"""Quick start 1: the synthetic demo. Creates ./.venv on first run, then runs `allcluster demo`.

    python3 jobs/demo.py [--out runs/demo] [--set fit.epochs=20]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from allcluster._bootstrap import ensure_venv  # noqa: E402  (stdlib only)

ensure_venv()   # re-executes this script inside ./.venv when needed

from allcluster.interrupt import run_driver  # noqa: E402  (a stop signal ends it with 75, as every driver)

sys.exit(run_driver("demo", sys.argv[1:]))
