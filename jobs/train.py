#!/usr/bin/env python3
"""Ray driver for one training run (what `allcluster train` runs; usable from Slurm scripts).

    python jobs/train.py --config configs/train/allnet_all.yaml [--set key=value ...]

Exit codes: 0 done, 2 refused (bad config, a folder of another run), 74 disk full or quota, 75
stopped by SIGINT, SIGTERM or SIGUSR1: the epochs done are kept and the same command resumes.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from allcluster.interrupt import run_driver  # noqa: E402  (import-light: the signals are ours at once)

sys.exit(run_driver("train", sys.argv[1:]))
