"""``allcluster bench gpu``: the one-command GPU acceptance (``jobs/gpu_acceptance.sh`` runs it from a
fresh checkout). Everything GPU-specific, in one JSON with each ratio beside its target:

- the ``gpu``-marked tests (CUDA scoring in bf16 + channels-last against the CPU in fp32, CUDA training);
- ``bench score`` on generated smear-like images: the job's steady rate against the lower of the
  model-side ceiling (prediction + Grad-CAM in device memory) and the decode ceiling it measures;
- ``bench cam`` and ``bench lime``: our Grad-CAM and LIME against pytorch-grad-cam and lime;
- ``bench sweep``: training img/s through the sweep's data path against the bare step.

The images are generated (``allcluster.data.synthetic``), so nothing but the checkout is needed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from allcluster.bench.common import device_info
from allcluster.data.real import REPO

TARGETS = {"score_vs_ceiling": 0.8, "cam_speedup": 10.0, "lime_speedup": 10.0, "sweep_data_path_ratio": 0.8}


def _gpu_tests() -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return {"returncode": done.returncode, "summary": lines[-1] if lines else done.stderr[-500:]}


def bench_gpu(args: argparse.Namespace) -> dict:
    """Run the acceptance (see the module docstring); ``args.quick`` shrinks every part (CPU check)."""
    import shutil

    from allcluster.bench.score import bench_score
    from allcluster.bench.train import bench_sweep
    from allcluster.bench.xai import bench_cam, bench_lime
    from allcluster.data.synthetic import generate

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    per_class = 8 if args.quick else max(1, args.images // 4)
    images = generate(out / "images", n_per_class=per_class, size=360, seed=0)
    ns = argparse.Namespace
    parts = {"gpu_tests": _gpu_tests()}
    parts["score"] = bench_score(ns(data=str(images), out=str(out / "score"), images=4 * per_class, model="",
                                    backbone=args.backbone, image_size=224, batch_size=8 if args.quick else 64,
                                    repeat=1))
    parts["cam"] = bench_cam(ns(backbone=args.backbone, image_size=224, batch_size=4 if args.quick else 32,
                                repeat=1 if args.quick else 5))
    parts["lime"] = bench_lime(ns(data=str(images), backbone=args.backbone, image_size=224,
                                  num_samples=50 if args.quick else 1000))
    parts["sweep"] = bench_sweep(ns(data=str(images), out=str(out / "sweep"), backbone=args.backbone,
                                    image_size=224, batch_size=8 if args.quick else 64, augment="classic",
                                    loader_workers=2 if args.quick else 4, steps=2 if args.quick else 30))
    score = parts["score"]
    ceiling = min(score["cam_ceiling_img_s"], score["decode_ceiling_img_s"])
    ratios = {"score_vs_ceiling": score["where_time_goes"]["run_images_per_s"] / ceiling,
              "cam_speedup": parts["cam"]["speedup"], "lime_speedup": parts["lime"]["speedup"],
              "sweep_data_path_ratio": parts["sweep"]["ratio"]}
    return {"benchmark": "gpu",
            "meaning": "The GPU acceptance: gpu-marked tests and the score/cam/lime/sweep benches on generated "
                       "images (each part's own meaning is inside it). score_vs_ceiling: the scoring run's "
                       "img/s (summary.json run_images_per_s: actor start included, Ray start not) / min(its "
                       "prediction + Grad-CAM ceiling, its decode ceiling).",
            "quick": bool(args.quick), "seconds": round(time.perf_counter() - start, 1),
            "tests_passed": parts["gpu_tests"]["returncode"] == 0,
            "ratios": {k: round(v, 3) for k, v in ratios.items()}, "targets": TARGETS,
            "meets_targets": {k: ratios[k] >= t for k, t in TARGETS.items()},
            "parts": parts, "device": device_info()}
