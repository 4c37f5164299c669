"""``allcluster bench train`` (accuracy on the real ALL images) and ``bench sweep`` (training img/s
through the sweep's data path against the bare step)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from allcluster.bench.common import device_info, real_images
from allcluster.device import pick_device


def _bench_train_config(args: argparse.Namespace, out: Path, seed: int):
    """The benchmarked recipe: from scratch (one stage, Adam 1e-3, classic augmentation) or, with
    ``--pretrained``, the papers' two-stage fine-tuning from the ImageNet weights; ``--set KEY=VALUE``
    overrides laid over it (validated as ``allcluster train --set`` is)."""
    from allcluster.config import load
    from allcluster.train.config import TrainConfig, resolve

    pretrained = bool(args.pretrained)
    return resolve(load(TrainConfig, overrides=getattr(args, "overrides", None) or (), base={
        "name": f"bench-train-{args.backbone}-seed{seed}", "output_dir": str(out / f"seed{seed}"),
        "data": {"manifest": str(out / "manifest.parquet"), "image_size": args.image_size, "loader_workers": 0},
        "model": {"backbone": args.backbone, "pretrained": pretrained},
        "augment": {"name": "classic"},
        "optim": {"name": "adam", "weight_decay": 0.0},          # rates: the optimiser table's defaults
        "schedule": {"name": "plateau", "factor": 0.1, "patience": 3},
        "finetune": ({"head_epochs": args.head_epochs, "unfreeze_blocks": 2} if pretrained
                     else {"head_epochs": 0, "unfreeze_blocks": -1}),
        "fit": {"epochs": args.epochs, "batch_size": 32, "seed": seed},   # early stopping: the default
        "resources": {"num_workers": 1, "cpus_per_worker": float(os.cpu_count() or 1)},
    }), "bench train")


def on_cell_mean(model_dir: Path, paths: list[str], method: str = "gradcam", batch_size: int = 32) -> tuple[float, float]:
    """Mean share of ``method``'s maps on the stained cell over ``paths``, through the scoring code
    (same preprocessing, same maps, the row column ``on_cell_<method>``), and the mean share of the
    image the cell mask covers: what a map spread evenly would score, the figure's chance level."""
    import tempfile

    import numpy as np

    from allcluster.config import from_dict
    from allcluster.data.preprocess import cell_mask
    from allcluster.score import core
    from allcluster.score.reading import read_decode
    from allcluster.score.config import ScoreConfig
    from allcluster.score.rows import method_columns

    with tempfile.TemporaryDirectory() as out:
        cfg = from_dict(ScoreConfig, {"model": str(model_dir), "input": "-", "out": out,
                                      "explain": {"methods": [method], "faithfulness_fraction": 0}})
        scorer = core.Scorer(cfg, out, "bench", lambda n, batch: 0, device="cpu")
        card, values, areas = scorer.card, [], []
        for start in range(0, len(paths), batch_size):
            batch = {"path": np.array(paths[start:start + batch_size], dtype=object)}
            decoded = read_decode(batch, card.input_size, card.roi_crop, card.roi_margin, 50_000_000, lambda shas, _: [""] * len(shas))
            values += scorer(decoded).column(method_columns(method)["on_cell"]).to_pylist()
            areas += [float(cell_mask(image).mean()) for image in decoded["pixels"]]
    found = [v for v in values if v is not None and v == v]
    return (float(np.mean(found)) if found else float("nan")), float(np.mean(areas))


def _spread(runs: list[dict], key: str) -> dict:
    import numpy as np

    values = np.array([r[key] for r in runs if r.get(key) is not None], float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max())} if len(values) else {}


def bench_train(args: argparse.Namespace) -> dict:
    """A backbone on the real ALL images (CPU, Ray Train), deduplicated 80/10/10 splits, one run per
    seed: test metrics of the best-validation weights, calibration, Grad-CAM's share on the cell."""
    import pandas as pd

    from allcluster.config import from_dict
    from allcluster.data.manifest import IndexConfig, run_index
    from allcluster.ray_utils import ensure_ray
    from allcluster.train.ray_train import run_training

    data = Path(args.data)
    real_images(data, 1)
    out = Path(args.out).resolve()
    start = time.time()
    seeds = [int(s) for s in str(args.seeds).split(",")]
    _, summary = run_index(from_dict(IndexConfig, {"source": str(data), "out": str(out / "manifest.parquet"),
                                                   "seed": args.split_seed}))
    manifest = pd.read_parquet(out / "manifest.parquet")
    test_paths = manifest.loc[manifest["split"] == "test", "path"].tolist()
    runs = []
    ensure_ray()                     # one Ray for every seed (run_training leaves only a Ray it started)
    for seed in seeds:
        seed_start = time.time()
        cfg = _bench_train_config(args, out, seed)
        final = run_training(cfg)
        card = final["model_card"]
        metrics = card.metrics
        on_cell, cell_area = on_cell_mean(Path(cfg.output_dir) / "model", test_paths)
        test = metrics.get("test", {})
        runs.append({
            "seed": seed, "epochs_trained": card.epochs_trained, "best_epoch": card.best_epoch,
            "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
            "test_auc": test.get("auc"), "test_ece": test.get("ece"),
            "test_ece_calibrated": metrics.get("test_ece_calibrated"),
            "test_f1_per_class": {k: v["f1"] for k, v in test.get("per_class", {}).items()},
            "val_macro_f1": metrics.get("val", {}).get("macro_f1"),
            "gradcam_on_cell_mean": on_cell, "cell_area_share_mean": cell_area,
            "train_images_per_s": final.get("train_images_per_s"),
            "wall_seconds": round(time.time() - seed_start, 1), "model_dir": str(Path(cfg.output_dir) / "model"),
        })
    return {
        "benchmark": "train",
        "meaning": f"{args.backbone} ({'ImageNet weights, two-stage fine-tuning' if args.pretrained else 'from scratch'}) "
                   "on the real ALL images (Aria et al. 2021, DOI 10.34740/KAGGLE/DSV/2175623), exact duplicates "
                   "kept inside one split, stratified 80/10/10; the test split evaluated once per seed with the "
                   "best-validation-macro-F1 weights; ECE before and after temperature scaling (fitted on "
                   "validation); gradcam_on_cell_mean: mean share of the Grad-CAM map's mass on the stained "
                   "cell over the test images; cell_area_share_mean: the share of the image the cell mask covers (what "
                   "an evenly spread map would score).",
        "backbone": args.backbone, "pretrained": bool(args.pretrained), "image_size": args.image_size,
        "overrides": list(getattr(args, "overrides", None) or []),
        "split_sizes": card.split_sizes, "duplicates": summary["duplicates"]["groups"],
        "split_seed": args.split_seed, "seeds": seeds, "runs": runs,
        "summary": {key: _spread(runs, key) for key in ("test_accuracy", "test_macro_f1", "test_ece",
                                                        "test_ece_calibrated", "gradcam_on_cell_mean",
                                                        "cell_area_share_mean")},
        "wall_seconds": round(time.time() - start, 1), "device": device_info(),
    }


def _timed_steps(run, batches, steps: int) -> float:
    """Images/s of ``steps`` optimiser steps of ``run``'s model over ``batches`` (after 2 warm-up steps)."""
    import torch

    from allcluster.train.augment import soft_cross_entropy
    from allcluster.train.optim import build_optimizer

    optimizer = build_optimizer(run.cfg.optim, run.model.parameters(), run.cfg.optim.lr)
    run.model.train()
    seen, start = 0, 0.0
    for i, (images_u8, labels) in enumerate(batches):
        if i == 2:
            start, seen = time.perf_counter(), 0
        images, targets = run.mixer(run.to_device(images_u8), labels.to(run.device))
        loss = soft_cross_entropy(run.model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
        if i + 1 == steps + 2:
            break
    if run.on_gpu:
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def bench_sweep(args: argparse.Namespace) -> dict:
    """Training img/s through the sweep's data path (cache -> loader -> augment) vs the bare step."""
    import itertools

    from allcluster.config import from_dict
    from allcluster.data.manifest import IndexConfig, run_index
    from allcluster.train.config import TrainConfig, resolve
    from allcluster.train.loop import WorkerRun
    from allcluster.train.session import LocalSession

    data, out = Path(args.data), Path(args.out).resolve()
    real_images(data, 1)
    run_index(from_dict(IndexConfig, {"source": str(data), "out": str(out / "manifest.parquet")}))
    device = str(pick_device())
    cfg = resolve(from_dict(TrainConfig, {
        "output_dir": str(out / "run"),
        "data": {"manifest": str(out / "manifest.parquet"), "image_size": args.image_size,
                 "loader_workers": args.loader_workers},
        "model": {"backbone": args.backbone}, "augment": {"name": args.augment},
        "fit": {"batch_size": args.batch_size}, "resources": {"use_gpu": device == "cuda"}}, "bench sweep"))
    run = WorkerRun(cfg, LocalSession(out / "run", device))
    run.setup()
    loader = ((x, y) for x, y, _ in itertools.chain.from_iterable(itertools.repeat(run.train_loader)))
    with_data = _timed_steps(run, loader, args.steps)
    fixed = next(iter(run.train_loader))
    bare = _timed_steps(run, itertools.repeat((fixed[0], fixed[1])), args.steps)
    return {
        "benchmark": "sweep",
        "meaning": "Training images/s of one worker through the sweep's data path (decoded-image cache "
                   "memmap -> DataLoader -> augmentation -> device normalisation) vs the bare training "
                   "step on one fixed batch already in memory, same model, device and batch size. "
                   "ratio = data_path / bare; target >= 0.8 (the data path must not starve the model).",
        "backbone": args.backbone, "image_size": cfg.data.image_size, "batch_size": args.batch_size,
        "augment": args.augment, "loader_workers": args.loader_workers, "steps": args.steps,
        "data_path_images_per_s": round(with_data, 1), "bare_step_images_per_s": round(bare, 1),
        "ratio": round(with_data / bare, 3), "device": device_info(),
    }
