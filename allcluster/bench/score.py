"""``allcluster bench score`` (end-to-end scoring against the bare forward) and ``bench plan``
(driver memory per input row when planning an archive-sized job)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from allcluster.bench.common import rate, device_info
from allcluster.data.real import REPO
from allcluster.device import pick_device


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
    return rate(forward, batch_size, repeat)


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
                         "(methods, Grad-CAM from the prediction's own pass), heatmaps (packed) and Parquet rows "
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


def rss_kib(field: str) -> int:
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
    from allcluster.score.output import RowsState, compact
    from allcluster.score.ray_data import plan_job, todo_blocks

    import tempfile

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:       # warm-up: page in the Arrow/Parquet code first
        pq.write_table(synthetic_manifest_table(100), Path(tmp) / "m.parquet")
        warm = from_dict(ScoreConfig, {"model": model, "input": str(Path(tmp) / "m.parquet"), "out": tmp}, "warm-up")
        todo_blocks(plan_job(warm, Path(tmp)).todo, warm.batch_size)
    cfg = from_dict(ScoreConfig, {"model": model, "input": manifest, "out": out}, "bench plan")
    Path("/proc/self/clear_refs").write_text("5")
    base, start = rss_kib("VmRSS"), time.perf_counter()
    state = RowsState.read(Path(out))   # what a run does first: one read of the rows already there,
    compact(Path(out), state=state)     # compaction (a no-op here: no path has two rows)
    job = plan_job(cfg, Path(out), state=state)
    blocks = todo_blocks(job.todo, cfg.batch_size)      # the pipeline's input slices (views of the list)
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    print(json.dumps({"inputs": job.inputs, "already_scored": job.done, "to_do": len(job.todo), "blocks": len(blocks),
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
        code = f"from allcluster.bench.score import plan_probe; plan_probe({str(model)!r}, {str(manifest)!r}, {str(target)!r})"
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
