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

from allcluster.device import pick_device

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


def _bench_train_config(args: argparse.Namespace, out: Path, seed: int):
    """The benchmarked recipe: from scratch (one stage, Adam 1e-3, classic augmentation) or, with
    ``--pretrained``, the papers' two-stage fine-tuning from the ImageNet weights."""
    from allcluster.config import from_dict
    from allcluster.train.config import TrainConfig, resolve

    pretrained = bool(args.pretrained)
    return resolve(from_dict(TrainConfig, {
        "name": f"bench-train-{args.backbone}-seed{seed}", "output_dir": str(out / f"seed{seed}"),
        "data": {"manifest": str(out / "manifest.parquet"), "image_size": args.image_size, "loader_workers": 0},
        "model": {"backbone": args.backbone, "pretrained": pretrained},
        "augment": {"name": "classic"},
        "optim": {"name": "adam", "weight_decay": 0.0},          # rates: the optimiser table's defaults
        "schedule": {"name": "plateau", "factor": 0.1, "patience": 3},
        "finetune": ({"head_epochs": args.head_epochs, "unfreeze_blocks": 2} if pretrained
                     else {"head_epochs": 0, "unfreeze_blocks": -1}),
        "fit": {"epochs": args.epochs, "batch_size": 32, "early_stopping_patience": 10, "seed": seed},
        "resources": {"num_workers": 1, "cpus_per_worker": float(os.cpu_count() or 1)},
    }, "bench train"))


def on_cell_mean(model_dir: Path, paths: list[str], method: str = "gradcam", batch_size: int = 32) -> float:
    """Mean share of ``method``'s maps on the stained cell over ``paths``, through the scoring code
    (same preprocessing, same maps, the row column ``on_cell_<method>``)."""
    import tempfile

    import numpy as np

    from allcluster.config import from_dict
    from allcluster.score import core
    from allcluster.score.config import ScoreConfig
    from allcluster.score.rows import method_columns

    with tempfile.TemporaryDirectory() as out:
        cfg = from_dict(ScoreConfig, {"model": str(model_dir), "input": "-", "out": out,
                                      "explain": {"methods": [method], "faithfulness_fraction": 0}})
        scorer = core.Scorer(cfg, out, "bench", lambda n: 0, device="cpu")
        card, values = scorer.card, []
        for start in range(0, len(paths), batch_size):
            batch = {"path": np.array(paths[start:start + batch_size], dtype=object)}
            decoded = core.read_decode(batch, card.input_size, card.roi_crop, card.roi_margin, 50_000_000, lambda shas, _: [""] * len(shas))
            values += scorer(decoded).column(method_columns(method)["on_cell"]).to_pylist()
    found = [v for v in values if v is not None and v == v]
    return float(np.mean(found)) if found else float("nan")


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
    from allcluster.train.ray_train import run_training

    data = Path(args.data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: real ALL images not found (set --data or $ALLCLUSTER_ALL_DATA)")
    out = Path(args.out).resolve()
    start = time.time()
    seeds = [int(s) for s in str(args.seeds).split(",")]
    _, summary = run_index(from_dict(IndexConfig, {"source": str(data), "out": str(out / "manifest.parquet"),
                                                   "seed": seeds[0]}))
    manifest = pd.read_parquet(out / "manifest.parquet")
    test_paths = manifest.loc[manifest["split"] == "test", "path"].tolist()
    runs = []
    for seed in seeds:
        seed_start = time.time()
        cfg = _bench_train_config(args, out, seed)
        final = run_training(cfg)
        card = final["model_card"]
        metrics = card.metrics
        test = metrics.get("test", {})
        runs.append({
            "seed": seed, "epochs_trained": card.epochs_trained, "best_epoch": card.best_epoch,
            "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
            "test_auc": test.get("auc"), "test_ece": test.get("ece"),
            "test_ece_calibrated": metrics.get("test_ece_calibrated"),
            "test_f1_per_class": {k: v["f1"] for k, v in test.get("per_class", {}).items()},
            "val_macro_f1": metrics.get("val", {}).get("macro_f1"),
            "gradcam_on_cell_mean": on_cell_mean(Path(cfg.output_dir) / "model", test_paths),
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
                   "cell over the test images.",
        "backbone": args.backbone, "pretrained": bool(args.pretrained), "image_size": args.image_size,
        "split_sizes": card.split_sizes, "duplicates": summary["duplicates"]["groups"],
        "seeds": seeds, "runs": runs,
        "summary": {key: _spread(runs, key) for key in ("test_accuracy", "test_macro_f1", "test_ece",
                                                        "test_ece_calibrated", "gradcam_on_cell_mean")},
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
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: real ALL images not found (set --data or $ALLCLUSTER_ALL_DATA)")
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


def _bench_model(backbone: str):
    from allcluster.models import build_model, get_spec

    device = pick_device()
    model = build_model(backbone, 4).to(device).eval()
    return model, get_spec(backbone).cam_layer, device


def _rate(fn, images: int, repeat: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):                                 # allocator and oneDNN/cuDNN kernel caches
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images * repeat / (time.perf_counter() - start)


def _interleaved_rates(fns: dict[str, Callable[[], object]], images: int, repeat: int) -> dict[str, float]:
    """Median images/s of each function, timed in alternating rounds after a warm-up of each, so a
    slow phase of a shared or throttled machine does not land on one side only."""
    import statistics

    import torch

    for fn in list(fns.values()) * 2:
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: images / statistics.median(seconds) for name, seconds in times.items()}


def bench_cam(args: argparse.Namespace) -> dict:
    """Our Grad-CAM (prediction + map in one pass, on the device) vs pytorch-grad-cam's GradCAM."""
    import torch
    from pytorch_grad_cam import GradCAM as TheirGradCAM

    from allcluster.models import resolve_module
    from allcluster.xai import make_explainer

    model, layer, device = _bench_model(args.backbone)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    ours = make_explainer("gradcam", model, layer)
    theirs = TheirGradCAM(model=model, target_layers=[resolve_module(model, layer)])

    def forward():
        with torch.no_grad():
            model(images)
    result = _interleaved_rates({
        "forward_images_per_s": forward, "ours_images_per_s": lambda: ours.explain(images),
        "pytorch_grad_cam_images_per_s": lambda: theirs(input_tensor=images, targets=None)},
        len(images), args.repeat)
    return {"benchmark": "cam",
            "meaning": "Images/s (median of alternating rounds) of Grad-CAM heatmaps with the prediction for "
                       "random inputs: ours (one forward + a backward that stops at the CAM layer, maps kept on "
                       "the device) vs pytorch-grad-cam's GradCAM (fp32), "
                       "and the bare forward pass; speedup = ours / pytorch-grad-cam, target >= 10 on a GPU.",
            "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
            **{k: round(v, 1) for k, v in result.items()},
            "speedup": round(result["ours_images_per_s"] / result["pytorch_grad_cam_images_per_s"], 2),
            "device": device_info()}


def bench_lime(args: argparse.Namespace) -> dict:
    """Our batched LIME vs the lime package, same model, device, image and num_samples."""
    import numpy as np
    import torch
    from lime import lime_image

    from allcluster.data.decode import load
    from allcluster.data.preprocess import Normalize, resize
    from allcluster.models import get_spec
    from allcluster.xai import ExplainSettings, make_explainer

    model, layer, device = _bench_model(args.backbone)
    spec = get_spec(args.backbone)
    norm = Normalize(spec.mean, spec.std).to(device)
    path = sorted(Path(args.data).rglob("*.jpg"))[0]
    rgb = resize(load(path).array, args.image_size)

    def classify(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(batch * 255.0, dtype=torch.float32, device=device).permute(0, 3, 1, 2)
            return torch.softmax(model(norm(x)), dim=1).cpu().numpy()

    image = norm(torch.as_tensor(rgb, device=device).permute(2, 0, 1)[None])
    ours = make_explainer("lime", model, layer, ExplainSettings(lime_samples=args.num_samples))
    start = time.perf_counter()
    ours.explain(image)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    lime_image.LimeImageExplainer(random_state=0).explain_instance(
        rgb.astype(np.float64) / 255.0, classify, top_labels=1, num_samples=args.num_samples,
        batch_size=100, random_seed=0)
    theirs_s = time.perf_counter() - start
    return {"benchmark": "lime",
            "meaning": "Seconds per image of a LIME explanation with the same model, device, image, "
                       "segmentation and num_samples: ours (perturbations built and scored in batches on "
                       "the device) vs the lime package; speedup = lime / ours, target >= 10.",
            "backbone": args.backbone, "image_size": args.image_size, "num_samples": args.num_samples,
            "image": str(path), "ours_seconds": round(ours_s, 3), "lime_package_seconds": round(theirs_s, 3),
            "speedup": round(theirs_s / ours_s, 2), "device": device_info()}


def _bare_forward_rate(model_dir: Path, batch_size: int, repeat: int = 5) -> float:
    """Images/s of the model's bare forward pass (uint8 batch -> normalise -> logits), no files."""
    import torch

    from allcluster.models.model_dir import load_model_dir

    device = pick_device("auto")
    loaded = load_model_dir(model_dir, device)
    size = loaded.card.input_size
    norm = loaded.card.normalize().to(device)
    batch = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, device=device)

    def forward():
        with torch.inference_mode():
            loaded.model(norm(batch.permute(0, 3, 1, 2))).cpu()
    return _rate(forward, batch_size, repeat)


def _timed_score(model_dir: Path, inputs: Path, out: Path, batch_size: int, methods: list[str],
                 faithfulness: float) -> dict:
    """One real scoring job (local Ray, already started); its rows/s and error count."""
    from allcluster.config import from_dict
    from allcluster.score.config import ScoreConfig, check
    from allcluster.score.ray_data import run_score

    cfg = check(from_dict(ScoreConfig, {
        "model": str(model_dir), "input": str(inputs), "out": str(out), "batch_size": batch_size,
        "progress_seconds": 30, "explain": {"methods": methods, "faithfulness_fraction": faithfulness}},
        "bench score"), "bench score")
    start = time.perf_counter()
    summary = run_score(cfg)
    seconds = time.perf_counter() - start
    return {"images": summary["rows"], "errors": summary["errors"], "seconds": round(seconds, 2),
            "img_s": round(summary["rows"] / seconds, 2)}


def bench_score(args: argparse.Namespace) -> dict:
    """End-to-end scoring img/s (files -> Parquet rows + heatmaps) vs the bare forward img/s."""
    import shutil

    from allcluster.models.model_dir import export_untrained
    from allcluster.ray_utils import ensure_ray

    files = sorted(Path(args.data).rglob("*.jpg"))[: args.images]
    if not files:
        raise FileNotFoundError(f"{args.data}: no JPEG images (set --data or $ALLCLUSTER_ALL_DATA)")
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    model_dir = export_untrained(out / "model", args.backbone, ["Benign", "Early", "Pre", "Pro"], args.image_size)
    inputs = out / "inputs.txt"
    inputs.write_text("\n".join(map(str, files)) + "\n")
    methods = [m for m in args.methods.split(",") if m]
    bare = _bare_forward_rate(model_dir, args.batch_size)
    ensure_ray()                       # cluster start is per job, not per image: not timed
    cam = _timed_score(model_dir, inputs, out / "scored", args.batch_size, methods, 0.0)
    result = {"benchmark": "score",
              "meaning": "end_to_end_img_s: files listed, read, hashed, decoded, predicted and explained "
                         "(methods, Grad-CAM from the prediction's own pass), heatmap PNGs and Parquet rows "
                         "written, by the real Ray Data job (actor start and model load included, Ray start "
                         "not); bare_forward_img_s: the same model's forward pass alone, same device and "
                         "batch size; ratio = end_to_end / bare_forward (target >= 0.5 on a CPU machine). "
                         "with_faithfulness: the same job also scoring every heatmap (two more forward passes "
                         "per image by definition: deletion and preservation).",
              "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
              "methods": methods, "images": cam["images"], "errors": cam["errors"], "seconds": cam["seconds"],
              "end_to_end_img_s": cam["img_s"], "bare_forward_img_s": round(bare, 2),
              "ratio": round(cam["img_s"] / bare, 3)}
    if args.faithfulness > 0:
        faithful = _timed_score(model_dir, inputs, out / "scored-faithful", args.batch_size, methods,
                                args.faithfulness)
        result["with_faithfulness"] = {**faithful, "fraction": args.faithfulness,
                                       "ratio": round(faithful["img_s"] / bare, 3)}
    return {**result, "device": device_info()}


def synthetic_manifest_table(rows: int, seed: int = 0):
    """An ``allcluster index``-shaped table of ``rows`` archive-like paths (the files need not exist)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    wards, patients = rng.integers(0, 40, rows), rng.integers(0, 200_000, rows)
    paths = [f"/archive/hospital/2026/ward-{w:02d}/patient-{p:06d}/cell-{i:08d}.jpg"
             for i, (w, p) in enumerate(zip(wards, patients))]
    shas = [f"{i:064x}" for i in rng.integers(0, 1 << 62, rows)]
    labels = np.array(["Benign", "Early", "Pre", "Pro"])[rng.integers(0, 4, rows)]
    return pa.table({
        "path": paths, "sha256": shas, "label": labels.tolist(), "patient": [f"P{p:06d}" for p in patients],
        "split": ["test"] * rows, "fold": np.full(rows, -1), "width": np.full(rows, 360), "height": np.full(rows, 360),
        "size_bytes": rng.integers(20_000, 60_000, rows), "status": ["ok"] * rows, "error_type": [""] * rows,
        "error": [""] * rows, "n_copies": np.ones(rows, np.int64), "label_conflict": np.zeros(rows, bool)})


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def plan_probe(model: str, manifest: str, out: str) -> None:
    """Run in a fresh process by ``bench plan``: list and plan a job, print the driver's memory (JSON).

    The peak is reset after the imports and a 100-row warm-up (``/proc/self/clear_refs`` 5), so the
    figure is what the listing and the plan add, not what Python, torch, Ray and the first page-in of
    Arrow's code cost before any file is seen."""
    import json

    from allcluster.config import from_dict
    from allcluster.score.config import ScoreConfig
    from allcluster.score.output import compact
    from allcluster.score.ray_data import plan_job, write_todo

    import tempfile

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:       # warm-up: page in the Arrow/Parquet code first
        pq.write_table(synthetic_manifest_table(100), Path(tmp) / "m.parquet")
        warm = from_dict(ScoreConfig, {"model": model, "input": str(Path(tmp) / "m.parquet"), "out": tmp}, "warm-up")
        write_todo(Path(tmp), plan_job(warm, Path(tmp)).todo, "warm-up")
    cfg = from_dict(ScoreConfig, {"model": model, "input": manifest, "out": out}, "bench plan")
    Path("/proc/self/clear_refs").write_text("5")
    base, start = _rss_kib("VmRSS"), time.perf_counter()
    compact(Path(out))                  # what a run does first (a no-op here: no path has two rows)
    job = plan_job(cfg, Path(out))
    write_todo(Path(out), job.todo, "bench")
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    print(json.dumps({"inputs": job.inputs, "already_scored": job.done, "to_do": len(job.todo),
                      "seconds": round(seconds, 2), "baseline_mib": round(base / 1024, 1),
                      "peak_mib": round(peak / 1024, 1), "bytes_per_row": round((peak - base) * 1024 / max(1, job.inputs), 1)}))


def bench_plan(args: argparse.Namespace) -> dict:
    """Driver memory of listing + planning a scoring job over a synthetic archive-sized manifest,
    fresh and resumed (half the files already have rows), each in a fresh process."""
    import json
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from allcluster.models.model_dir import export_untrained
    from allcluster.models.registry import HeadSpec
    from allcluster.score.rows import row_schema

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "model_card.json").is_file():
        export_untrained(model, "allnet", ["Benign", "Early", "Pre", "Pro"], input_size=64, head=HeadSpec((16,), 0, 0))
    table = synthetic_manifest_table(args.rows)
    manifest = out / "manifest.parquet"
    pq.write_table(table, manifest)
    resumed = out / "resumed"
    half = table.slice(0, args.rows // 2)
    schema = row_schema(["Benign", "Early", "Pre", "Pro"], ["gradcam"])
    rows = pa.table({name: (half["path"] if name == "path" else pa.nulls(half.num_rows, schema.field(name).type))
                     for name in schema.names}, schema=schema)
    rows = rows.set_column(schema.names.index("status"), "status", pa.array(["ok"] * half.num_rows))
    (resumed / "rows").mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, half.num_rows, 5000)):
        pq.write_table(rows.slice(start, 5000), resumed / "rows" / f"part-bench-{i:05d}.parquet")
    del table, half, rows
    results = {}
    for name, target in (("fresh", out / "fresh"), ("resumed", resumed)):
        code = f"from allcluster.bench import plan_probe; plan_probe({str(model)!r}, {str(manifest)!r}, {str(target)!r})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        if done.returncode:
            raise RuntimeError(f"bench plan ({name}) failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    worst = max(r["bytes_per_row"] for r in results.values())
    return {"benchmark": "plan", "rows": args.rows, **results, "worst_bytes_per_row": worst,
            "target_bytes_per_row": 600, "meets_target": worst < 600,
            "meaning": "driver peak RSS added by listing a manifest, subtracting rows already scored (resumed: "
                       "half of them) and writing the to-do list, per input row (baseline after imports)",
            "device": device_info()}


BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "train": bench_train, "sweep": bench_sweep, "cam": bench_cam, "lime": bench_lime, "score": bench_score,
    "plan": bench_plan}


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
    p = sub.add_parser("score", help="end-to-end scoring img/s (files -> Parquet + heatmaps) vs bare forward; JSON")
    p.add_argument("--data", default=str(all_data_dir()))
    p.add_argument("--out", default="runs/bench-score")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--backbone", default="allnet")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--methods", default="gradcam", help="every-image explainers, comma-separated ('' for none)")
    p.add_argument("--faithfulness", type=float, default=0.2, help="also time the job with faithfulness at this fraction (0: skip)")
