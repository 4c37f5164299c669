"""``allcluster bench ...``: measured figures, printed as JSON (benchmarks, never timed tests).

Each benchmark says what it ran on (``device``) and what every number means (``meaning``).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ALL_DATA = REPO.parent / "shared" / "data" / "all_aria_2021" / "Original"


def all_data_dir() -> Path:
    """The real ALL images (Aria et al. 2021): ``$ALLCLUSTER_ALL_DATA`` or ``../shared/...``."""
    return Path(os.environ.get("ALLCLUSTER_ALL_DATA", DEFAULT_ALL_DATA))


def device_info() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_train(args: argparse.Namespace) -> dict:
    """ALL-Net from scratch on the real ALL images (CPU, Ray Train), deduplicated 80/10/10 splits."""
    from allcluster.config import from_dict
    from allcluster.data.manifest import IndexConfig, run_index
    from allcluster.ray_utils import ensure_ray
    from allcluster.train.config import TrainConfig, resolve
    from allcluster.train.ray_train import run_training

    data = Path(args.data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: real ALL images not found (set --data or $ALLCLUSTER_ALL_DATA)")
    out = Path(args.out).resolve()
    start = time.time()
    _, summary = run_index(from_dict(IndexConfig, {"source": str(data), "out": str(out / "manifest.parquet"),
                                                   "seed": args.seed}))
    cfg = resolve(from_dict(TrainConfig, {
        "name": "bench-train", "output_dir": str(out / "train"),
        "data": {"manifest": str(out / "manifest.parquet"), "image_size": args.image_size,
                 "loader_workers": 0},
        "model": {"backbone": "allnet"},
        "augment": {"name": "classic"},
        "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"name": "plateau", "factor": 0.1, "patience": 3},
        "finetune": {"head_epochs": 0, "unfreeze_blocks": -1},
        "fit": {"epochs": args.epochs, "batch_size": 32, "early_stopping_patience": 10, "seed": args.seed},
        "resources": {"num_workers": 1, "cpus_per_worker": float(os.cpu_count() or 1)},
    }, "bench train"))
    ensure_ray()
    final = run_training(cfg)
    card = final.get("model_card", {})
    test = card.get("metrics", {}).get("test", {})
    return {
        "benchmark": "train",
        "meaning": "ALL-Net (paper 000) trained from scratch on the real ALL images (Aria et al. 2021, "
                   "DOI 10.34740/KAGGLE/DSV/2175623), exact duplicates kept inside one split, stratified "
                   "80/10/10; test split evaluated once with the best-validation-macro-F1 weights.",
        "image_size": args.image_size, "epochs_trained": card.get("epochs_trained"),
        "best_epoch": card.get("best_epoch"), "split_sizes": card.get("split_sizes"),
        "duplicates": summary["duplicates"]["groups"],
        "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
        "test_auc": test.get("auc"), "test_ece": test.get("ece"),
        "test_ece_calibrated": card.get("metrics", {}).get("test_ece_calibrated"),
        "val_macro_f1": card.get("metrics", {}).get("val", {}).get("macro_f1"),
        "train_images_per_s": final.get("train_images_per_s"),
        "wall_seconds": round(time.time() - start, 1), "device": device_info(),
        "model_dir": str(out / "train" / "model"),
    }


BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict]] = {"train": bench_train}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="which", required=True)
    p = sub.add_parser("train", help="ALL-Net from scratch on the real ALL images, CPU; test accuracy/F1 as JSON")
    p.add_argument("--data", default=str(all_data_dir()))
    p.add_argument("--out", default="runs/bench-train")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
