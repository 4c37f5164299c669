#!/usr/bin/env python3
"""Ray driver for one training run (what `allcluster train` runs; usable from Slurm scripts).

    python jobs/train.py --config configs/train/allnet_all.yaml [--set key=value ...]
"""
import sys

from allcluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
