"""``allcluster bench heatmaps``: reading one stored map back from an archive-sized scoring output.

Builds an output the way a packed scoring job lays it out (row shards of ``rows_per_shard`` rows,
each with its heatmap pack; maps are smooth 8-bit CAM-like PNGs at the model's size), then times the
lookups a user makes: by sha256 alone (:func:`find_heatmap`), from a row's ``heatmap_<m>`` value
(:func:`load_heatmap`), and the README's pandas recipe. No model runs: only the store is measured.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

TARGET_MS = 50.0


def cam_like_pngs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """PNGs of 8-bit maps upsampled from 7x7 noise, the shape (and so the size) of real Grad-CAM maps."""
    import cv2

    rng = np.random.default_rng(seed)
    maps = [cv2.resize(rng.random((7, 7), np.float32), (size, size), interpolation=cv2.INTER_CUBIC) for _ in range(count)]
    return [cv2.imencode(".png", np.clip(m * 255, 0, 255).astype(np.uint8))[1].tobytes() for m in maps]


def build_output(out: Path, images: int, rows_per_shard: int, size: int, seed: int = 0) -> list[str]:
    """A packed scoring output's ``rows/`` and ``heatmaps/`` for ``images`` images; their sha256s."""
    import pyarrow as pa

    from allcluster.atomic import atomic_write_parquet
    from allcluster.score.heatmaps import write_pack

    rng = np.random.default_rng(seed)
    payloads = cam_like_pngs(64, size, seed)
    shas = [rng.bytes(32).hex() for _ in range(images)]
    for shard, start in enumerate(range(0, images, rows_per_shard)):
        name = f"part-bench-{shard:05d}.parquet"
        part = shas[start:start + rows_per_shard]
        pngs = [payloads[i % len(payloads)] for i in range(start, start + len(part))]
        write_pack(out / "heatmaps" / name, pa.table({
            "sha256": part, "method": ["gradcam"] * len(part), "png": pa.array(pngs, pa.binary()),
            "overlay_jpg": pa.nulls(len(part), pa.binary())}))
        atomic_write_parquet(out / "rows" / name, pa.table({
            "path": [f"/archive/{s[:2]}/{s}.jpg" for s in part], "sha256": part, "status": ["ok"] * len(part),
            "heatmap_gradcam": [f"heatmaps/{name}"] * len(part)}))
    return shas


def _times_ms(fn, keys: list) -> dict:
    took = []
    for key in keys:
        start = time.perf_counter()
        fn(key)
        took.append((time.perf_counter() - start) * 1e3)
    took.sort()
    return {"median_ms": round(statistics.median(took), 2), "p95_ms": round(took[int(0.95 * (len(took) - 1))], 2),
            "max_ms": round(took[-1], 2)}


def bench_heatmaps(args: argparse.Namespace) -> dict:
    import pandas as pd

    from allcluster.score.heatmaps import find_heatmap, load_heatmap

    out = Path(args.out)
    start = time.perf_counter()
    shas = build_output(out, args.images, args.rows_per_shard, args.image_size)
    built = time.perf_counter() - start
    picks = [shas[i] for i in np.random.default_rng(1).choice(len(shas), args.lookups, replace=False)]
    rows = pd.read_parquet(out / "rows", columns=["sha256", "heatmap_gradcam"]).set_index("sha256")
    by_sha = _times_ms(lambda sha: find_heatmap(out, sha, "gradcam"), picks)
    by_row = _times_ms(lambda sha: load_heatmap(out / rows.at[sha, "heatmap_gradcam"], sha, "gradcam"), picks)
    recipe = _times_ms(lambda sha: pd.read_parquet(out / rows.at[sha, "heatmap_gradcam"],
                                                   filters=[("sha256", "==", sha), ("method", "==", "gradcam")]), picks)
    files = sum(1 for p in out.rglob("*") if p.is_file())
    pack_bytes = sum(p.stat().st_size for p in (out / "heatmaps").glob("*.parquet"))
    return {"benchmark": "heatmaps", "images": args.images, "rows_per_shard": args.rows_per_shard,
            "image_size": args.image_size, "files_written": files, "pack_mb": round(pack_bytes / 2**20, 1),
            "build_seconds": round(built, 1), "lookups": args.lookups,
            "find_by_sha256": by_sha, "load_from_row": by_row, "pandas_recipe": recipe, "target_ms": TARGET_MS,
            "meets_target": by_sha["p95_ms"] < TARGET_MS,
            "meaning": "ms to read one map's PNG from a packed scoring output of `images` images (warm page "
                       "cache): find_by_sha256 scans every pack's row-group statistics for the sha256 alone "
                       "(allcluster.score.heatmaps.find_heatmap); load_from_row and pandas_recipe read the "
                       "one pack a row's heatmap_<m> names; files_written counts rows/ and heatmaps/ files"}
