#!/usr/bin/env python3
"""The Ray driver of a sweep; slurm/sweep.sh runs it on the job's first node with RAY_ADDRESS set.

    python jobs/sweep.py --config configs/sweep/ci_tiny.yaml [--set k=v ...] [--dry-run] [--retry-errored]
                         [--new-config] [--trial-index I | --collect]

Without RAY_ADDRESS it starts a local Ray (the same as `allcluster sweep`). Exit codes: 0 done,
1 no trial finished (or, with --trial-index, the trial errored), 2 refused (bad config, a changed
base config without --new-config), 75 stopped by SIGINT, SIGTERM or SIGUSR1: running trials keep
their last epoch checkpoint and rerunning the same command resumes them.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from allcluster.interrupt import run_driver  # noqa: E402  (import-light: the signals are ours at once)

sys.exit(run_driver("sweep", sys.argv[1:]))
