#!/usr/bin/env python3
"""Quick start 2: the whole test suite, exactly what CI runs. Creates ./.venv on first run.

    python3 tests/run.py [extra pytest arguments]
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from allcluster._bootstrap import ensure_venv  # noqa: E402  (stdlib only)

ensure_venv()   # re-executes this script inside ./.venv when needed

os.chdir(ROOT)
os.execv(sys.executable, [sys.executable, "-m", "pytest", "tests", *sys.argv[1:]])
