"""``allcluster bench ...``: measured figures, printed as JSON (benchmarks, never timed tests).

Each benchmark says what it ran on (``device``) and what every number means (``meaning``). One
module per family: ``train`` (accuracy, training throughput), ``xai`` (explainers against their
reference packages), ``score`` (scoring throughput, planning memory), ``heatmaps`` (reading stored maps back),
``gpu`` (the one-command GPU acceptance over the others).
"""
from __future__ import annotations

import argparse
import importlib

from allcluster.data.real import all_data_dir

# name -> (module, function): modules load on use (the benchmarks import torch, Ray, lime...)
BENCHMARKS = {"train": ("train", "bench_train"), "sweep": ("train", "bench_sweep"), "cam": ("xai", "bench_cam"),
              "lime": ("xai", "bench_lime"), "score": ("score", "bench_score"), "plan": ("score", "bench_plan"),
              "heatmaps": ("heatmaps", "bench_heatmaps"), "gpu": ("gpu", "bench_gpu")}


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run the benchmark ``args.which`` and return its JSON-able result."""
    module, function = BENCHMARKS[args.which]
    return getattr(importlib.import_module(f"allcluster.bench.{module}"), function)(args)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="which", required=True)
    p = sub.add_parser("train", help="a backbone on the real ALL images, CPU, per seed: test accuracy/F1, ECE, "
                                     "Grad-CAM on the cell; JSON")
    p.add_argument("--data", default=str(all_data_dir()))
    p.add_argument("--out", default="runs/bench-train")
    p.add_argument("--backbone", default="allnet")
    p.add_argument("--pretrained", action="store_true", help="two-stage fine-tuning from the ImageNet weights")
    p.add_argument("--head-epochs", type=int, default=3, help="stage 1 (head only) epochs with --pretrained")
    p.add_argument("--epochs", type=int, default=40, help="stage 2 (or from-scratch) epochs, at most")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2 (mean and spread)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the 80/10/10 split, the same for every training seed (the README's figures: 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the benchmarked recipe, e.g. --set data.roi_crop=true (repeatable)")
    p = sub.add_parser("sweep", help="training img/s through the sweep's data path vs the bare step; JSON")
    p.add_argument("--data", default=str(all_data_dir()))
    p.add_argument("--out", default="runs/bench-sweep")
    p.add_argument("--backbone", default="allnet")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--augment", default="classic", help="none, classic, randaug, augmix, mixup, cutmix")
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p = sub.add_parser("cam", help="our Grad-CAM vs pytorch-grad-cam, same model and device; JSON")
    p.add_argument("--backbone", default="densenet121")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p = sub.add_parser("lime", help="our batched LIME vs the lime package, same model and device; JSON")
    p.add_argument("--data", default=str(all_data_dir()))
    p.add_argument("--backbone", default="densenet121")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-samples", type=int, default=1000)
    p = sub.add_parser("plan", help="driver memory per input row when listing and planning an archive-sized "
                       "scoring job (synthetic manifest, files need not exist); JSON")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--out", default="runs/bench-plan")
    p = sub.add_parser("heatmaps", help="ms to read one stored map back from a packed scoring output of "
                       "--images images (synthetic rows and CAM-like maps, no model); JSON")
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--rows-per-shard", type=int, default=5000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lookups", type=int, default=50)
    p.add_argument("--out", default="runs/bench-heatmaps")
    p = sub.add_parser("score", help="whole-command wall clock of `allcluster score` (default config, predictions "
                       "only) vs a bare loop and a pytorch-grad-cam + PNG loop, and --dry-run's error; JSON")
    p.add_argument("--data", default=str(all_data_dir()))
    p.add_argument("--out", default="runs/bench-score")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--model", default="", help="an exported model folder (default: an untrained --backbone export)")
    p.add_argument("--backbone", default="allnet")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32, help="batch of the in-process ceilings")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the timed commands, interleaved; each "
                   "pipeline's median counts (shared VMs: one round can be 10-15%% off)")
    p = sub.add_parser("gpu", help="the one-command GPU acceptance: gpu tests, bench score/cam/lime/sweep on "
                       "generated images, every ratio beside its target; JSON (jobs/gpu_acceptance.sh)")
    p.add_argument("--out", default="runs/bench-gpu")
    p.add_argument("--images", type=int, default=2000, help="generated images for bench score")
    p.add_argument("--backbone", default="densenet121")
    p.add_argument("--quick", action="store_true", help="every part tiny: checks the command runs (CPU)")
