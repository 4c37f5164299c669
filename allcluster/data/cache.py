"""The decoded-image cache: every distinct image decoded and resized once per node, then memory-mapped.

Layout under the cache root (node-local by default, e.g. ``$TMPDIR``)::

    <key>/images.u8     uint8 (N, S, S, 3), one row per distinct sha256
    <key>/index.parquet sha256 -> row, valid flag, error
    <key>/meta.json     manifest path, fingerprint, preprocessing, build time

``key`` hashes the set of image contents and the preprocessing, so trials and reruns with the same
data share one cache, and a changed manifest gets a new one (older caches built from the same
manifest path are removed). A file lock makes concurrent trials on one node wait for a single
builder instead of decoding in parallel.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from allcluster.console import say
from allcluster.data import decode as dec
from allcluster.data.preprocess import Preprocess

CACHE_VERSION = 1
# Set for sweep trials: the driver builds every node's cache first, so a trial that would decode is a bug.
MUST_EXIST_ENV = "ALLCLUSTER_CACHE_MUST_EXIST"


def default_cache_root() -> Path:
    """``$ALLCLUSTER_CACHE_DIR``, else a per-user folder in the node-local temp dir."""
    if os.environ.get("ALLCLUSTER_CACHE_DIR"):
        return Path(os.environ["ALLCLUSTER_CACHE_DIR"])
    tmp = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(tmp) / f"allcluster-cache-{os.getuid()}"


def cache_key(sha256s: list[str], preprocess: Preprocess) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{preprocess.key()}|".encode())
    for sha in sha256s:
        digest.update(sha.encode())
    return f"{preprocess.key()}-{digest.hexdigest()[:16]}"


@dataclass
class ImageCache:
    """A built cache: ``images[row(sha256)]`` is the preprocessed uint8 (S, S, 3) image."""
    path: Path
    images: np.ndarray
    rows: dict[str, int]
    valid: np.ndarray

    @classmethod
    def open(cls, path: Path) -> "ImageCache":
        index = pq.read_table(path / "index.parquet").to_pandas()
        meta = json.loads((path / "meta.json").read_text())
        n, size = len(index), meta["size"]
        images = np.memmap(path / "images.u8", dtype=np.uint8, mode="r", shape=(n, size, size, 3))
        return cls(path, images, dict(zip(index["sha256"], range(n))), index["valid"].to_numpy())

    def row(self, sha256: str) -> int:
        return self.rows[sha256]


def _decode_rows(args: tuple[str, list[tuple[int, str]], int, Preprocess, int]) -> list[tuple[int, str]]:
    """Decode, preprocess and write some rows into the shared memmap; returns (row, error) failures."""
    images_path, jobs, n, preprocess, max_pixels = args
    images = np.memmap(images_path, dtype=np.uint8, mode="r+",
                       shape=(n, preprocess.size, preprocess.size, 3))
    failures = []
    for row, path in jobs:
        try:
            decoded = dec.load(path, max_pixels=max_pixels, draft=preprocess.size)
            images[row] = preprocess(decoded.array)
        except dec.DecodeError as err:
            failures.append((row, str(err)))
    images.flush()
    return failures


def _build(tmp: Path, unique: pd.DataFrame, preprocess: Preprocess, max_pixels: int, workers: int) -> None:
    n, size = len(unique), preprocess.size
    images_path = tmp / "images.u8"
    np.memmap(images_path, dtype=np.uint8, mode="w+", shape=(max(n, 1), size, size, 3)).flush()
    jobs = list(enumerate(unique["path"]))
    workers = max(1, min(workers or (os.cpu_count() or 1), len(jobs) // 64 or 1))
    chunk = max(1, len(jobs) // (workers * 8) or 1)
    tasks = [(str(images_path), jobs[i:i + chunk], max(n, 1), preprocess, max_pixels)
             for i in range(0, len(jobs), chunk)]
    # Threads, not processes: PIL releases the GIL while decoding and resizing, and threads avoid
    # re-importing __main__ (fragile inside Ray workers and stdin scripts).
    with ThreadPoolExecutor(workers) as pool:
        failures = [f for part in pool.map(_decode_rows, tasks) for f in part]
    valid = np.ones(n, dtype=bool)
    errors = [""] * n
    for row, message in failures:
        valid[row], errors[row] = False, message
    pq.write_table(pa.table({"sha256": unique["sha256"].tolist(), "path": unique["path"].tolist(),
                             "valid": valid, "error": errors}), tmp / "index.parquet")


def ensure_cache(manifest: pd.DataFrame, preprocess: Preprocess, root: str | Path | None = None,
                 manifest_path: str = "", max_pixels: int = dec.DEFAULT_MAX_PIXELS,
                 workers: int = 0, log=None) -> ImageCache:
    """Open the cache for the manifest's decodable images, building it first if needed."""
    log = log or say
    root = Path(root) if root else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    ok = manifest[manifest["status"] == "ok"]
    unique = ok.drop_duplicates("sha256").sort_values("sha256")[["sha256", "path"]]
    key = cache_key(unique["sha256"].tolist(), preprocess)
    final = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # one builder per node; the others wait, then reuse
        if not (final / "meta.json").is_file():
            if os.environ.get(MUST_EXIST_ENV):
                raise RuntimeError(f"decoded-image cache {final} is missing on this node, and {MUST_EXIST_ENV} "
                                   "says it must have been built before this run (sweep trials never decode)")
            start = time.time()
            log(f"[cache] decoding {len(unique)} distinct images at {preprocess.size}px into {final}")
            tmp = root / f"{key}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _build(tmp, unique, preprocess, max_pixels, workers)
            meta = {"manifest": str(Path(manifest_path).resolve()) if manifest_path else "",
                    "size": preprocess.size, "preprocess": preprocess.key(), "count": len(unique),
                    "version": CACHE_VERSION, "build_seconds": round(time.time() - start, 2)}
            (tmp / "meta.json").write_text(json.dumps(meta))
            os.replace(tmp, final)
            _remove_stale(root, key, meta)
            log(f"[cache] built in {meta['build_seconds']} s")
    return ImageCache.open(final)


def _remove_stale(root: Path, key: str, meta: dict) -> None:
    """Drop older caches built from the same manifest file with the same preprocessing."""
    if not meta["manifest"]:
        return
    for other in root.iterdir():
        if other.name == key or not (other / "meta.json").is_file():
            continue
        try:
            other_meta = json.loads((other / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if other_meta.get("manifest") == meta["manifest"] and other_meta.get("preprocess") == meta["preprocess"]:
            shutil.rmtree(other, ignore_errors=True)
