#!/usr/bin/env python3
"""The Ray driver of a scoring job; slurm/score.sh runs it on the job's first node with RAY_ADDRESS set.

    python jobs/score.py --model MODEL_DIR --input PATH --out OUT_DIR [--config CFG] [--set k=v ...] [--dry-run]

Without RAY_ADDRESS it starts a local Ray (the same as `allcluster score`).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from allcluster.interrupt import run_driver  # noqa: E402  (import-light: the signals are ours at once)

sys.exit(run_driver("score", sys.argv[1:]))
