"""The decoded-image cache: every distinct image decoded and resized once per node, then memory-mapped.

Layout under the cache root (node-local by default, e.g. ``$TMPDIR``)::

    <key>/images.u8     uint8 (N, S, S, 3), one row per distinct sha256
    <key>/index.parquet sha256 -> row, valid flag, error
    <key>/meta.json     manifest path, fingerprint, preprocessing, build time

``key`` hashes the set of image contents and the preprocessing, so trials and reruns with the same
data share one cache, and a changed manifest gets a new one (older caches built from the same
manifest path are removed). A file lock makes concurrent trials on one node wait for a single
builder instead of decoding in parallel.

A cache is built in ``<key>.tmp-<pid>@<host>`` and renamed into place; one is removed by renaming it
to ``<key>.old-<pid>@<host>`` first (:mod:`allcluster.atomic`). What a killed build or removal leaves
there is removed by a later build of any key (:func:`_reap_leftovers`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from allcluster.atomic import LEFTOVER, atomic_folder, atomic_write_parquet, discard_folder, is_storage_full
from allcluster.config import ConfigError
from allcluster.console import say
from allcluster.data import decode as dec
from allcluster.data.paths import clean_text, to_fs
from allcluster.locks import ExclusiveLock, open_lock_file, pid_alive
from allcluster.data.preprocess import Preprocess, decode_preprocessed

# 2: index.parquet records error_type (transient failures are retried); 3: the ROI crop is taken
# from a JPEG draft large enough for it (decode_preprocessed), no longer from one at the input size
CACHE_VERSION = 3
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
    """A built cache: ``images[row(sha256)]`` is the preprocessed uint8 (S, S, 3) image. One that
    :func:`ensure_cache` returned is marked in use (``in_use``) until :meth:`close` or the process
    ends, so that a newer build from the same manifest file does not delete it under a running job."""
    path: Path
    images: np.ndarray
    rows: dict[str, int]
    valid: np.ndarray
    errors: np.ndarray      # why a row is not valid ("" where it is)
    in_use: ExclusiveLock | None = field(default=None, repr=False, compare=False)

    def close(self) -> None:
        """No longer in use by this process (the OS also ends the mark when the process exits)."""
        if self.in_use is not None:
            self.in_use.release()
            self.in_use = None

    @classmethod
    def open(cls, path: Path) -> "ImageCache":
        index = pq.read_table(path / "index.parquet").to_pandas()
        meta = json.loads((path / "meta.json").read_text())
        n, size = len(index), meta["size"]
        images = np.memmap(path / "images.u8", dtype=np.uint8, mode="r", shape=(n, size, size, 3))
        return cls(path, images, dict(zip(index["sha256"], range(n))), index["valid"].to_numpy(),
                   index["error"].to_numpy())

    def row(self, sha256: str) -> int:
        return self.rows[sha256]


def _read_indexed(path: str, sha256: str) -> bytes:
    """The bytes of ``path``, refused (``changed_since_index``) unless they are the ones the manifest
    hashed: the pixels are stored under that sha256, and a later manifest with the same set of hashes
    (a corrected re-index) reuses them without decoding again."""
    data, found = dec.read_any(to_fs(path))
    if found != sha256:
        raise dec.DecodeError("changed_since_index", f"{path}: file changed since it was indexed (sha256 "
                              f"{found[:12]}..., the manifest says {sha256[:12]}...); re-index with `allcluster index`")
    return data


def _decode_rows(args: tuple[str, list[tuple[int, str, str]], int, Preprocess, int]) -> list[tuple[int, str, str]]:
    """Decode, preprocess and write some (row, path, sha256) jobs into the shared memmap; returns
    (row, error type, error) failures. Any exception for one file is that file's failure, never the build's."""
    images_path, jobs, n, preprocess, max_pixels = args
    images = np.memmap(images_path, dtype=np.uint8, mode="r+",
                       shape=(n, preprocess.size, preprocess.size, 3))
    failures = []
    for row, path, sha256 in jobs:
        try:
            images[row] = decode_preprocessed(_read_indexed(path, sha256), path, preprocess, max_pixels)[1]
        except dec.DecodeError as err:
            failures.append((row, err.kind, clean_text(str(err))))
    images.flush()
    return failures


def _decode_parallel(images_path: Path, jobs: list[tuple[int, str, str]], n: int, preprocess: Preprocess,
                     max_pixels: int, workers: int) -> list[tuple[int, str, str]]:
    workers = max(1, min(workers or (os.cpu_count() or 1), len(jobs) // 64 or 1))
    chunk = max(1, len(jobs) // (workers * 8) or 1)
    tasks = [(str(images_path), jobs[i:i + chunk], n, preprocess, max_pixels) for i in range(0, len(jobs), chunk)]
    # Threads, not processes: PIL releases the GIL while decoding and resizing, and threads avoid
    # re-importing __main__ (fragile inside Ray workers and stdin scripts).
    with ThreadPoolExecutor(workers) as pool:
        return [f for part in pool.map(_decode_rows, tasks) for f in part]


def _write_index(folder: Path, shas: list[str], paths: list[str], failures: list[tuple[int, str, str]]) -> None:
    n = len(shas)
    valid, kinds, errors = np.ones(n, dtype=bool), [""] * n, [""] * n
    for row, kind, message in failures:
        valid[row], kinds[row], errors[row] = False, kind, message
    atomic_write_parquet(folder / "index.parquet", pa.table({"sha256": shas, "path": paths, "valid": valid,
                                                             "error_type": kinds, "error": errors}))


def _build(tmp: Path, unique: pd.DataFrame, preprocess: Preprocess, max_pixels: int, workers: int) -> None:
    n, size = len(unique), preprocess.size
    images_path = tmp / "images.u8"
    _allocate(images_path, max(n, 1) * size * size * 3)
    jobs = list(zip(range(n), unique["path"], unique["sha256"]))
    failures = _decode_parallel(images_path, jobs, max(n, 1), preprocess, max_pixels, workers)
    _write_index(tmp, unique["sha256"].tolist(), unique["path"].tolist(), failures)


def _allocate(path: Path, nbytes: int) -> None:
    """Create ``path`` with all its ``nbytes`` on disk. The build writes through a memory map, and a
    write into a sparse file that finds the disk full (or a tmpfs at its size) is a SIGBUS that kills
    the process with nothing to report; allocated first, a full disk is an ENOSPC here instead."""
    with open(path, "wb") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, nbytes)
        except OSError as err:
            if is_storage_full(err):
                raise
            handle.truncate(nbytes)           # a filesystem without fallocate (glibc could not emulate it)


def _retry_transient(final: Path, unique: pd.DataFrame, preprocess: Preprocess, max_pixels: int, workers: int,
                     log) -> None:
    """Decode again the images whose failure was not their own (missing, unreadable, I/O error...)
    when the cache was built, from the manifest's current paths; content failures are kept."""
    index = pq.read_table(final / "index.parquet").to_pandas()
    kinds = index["error_type"] if "error_type" in index else pd.Series([""] * len(index))
    retry = index.index[~index["valid"] & kinds.isin(sorted(dec.TRANSIENT_ERRORS))].tolist()
    if not retry:
        return
    paths = dict(zip(unique["sha256"], unique["path"]))
    jobs = [(row, paths.get(sha, index.at[row, "path"]), sha) for row, sha in zip(retry, index.loc[retry, "sha256"])]
    log(f"[cache] retrying {len(jobs)} image(s) that could not be read when {final.name} was built")
    n = len(index)
    failures = {row: (kind, msg) for row, kind, msg in
                _decode_parallel(final / "images.u8", jobs, max(n, 1), preprocess, max_pixels, workers)}
    kept = [(row, kinds.iat[row], index.at[row, "error"]) for row in index.index[~index["valid"]] if row not in retry]
    fresh = [(row, *failures[row]) for row, *_ in jobs if row in failures]
    path_list = index["path"].tolist()
    for row, path, _ in jobs:
        path_list[row] = path
    _write_index(final, index["sha256"].tolist(), path_list, kept + fresh)


def check_private_root(root: Path) -> None:
    """A cache root must be ours and not writable by anyone else: another user on a shared node who
    could write there could swap the decoded training images."""
    info = root.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"cache root {root} is not a folder (a symlink or a file); set data.cache_dir "
                          "(or ALLCLUSTER_CACHE_DIR) to a private folder")
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise ConfigError(f"cache root {root} is owned by uid {info.st_uid} with mode {stat.filemode(info.st_mode)}; "
                          f"it must be owned by you (uid {os.getuid()}) and not writable by group or others. "
                          "Remove it, or set data.cache_dir (or ALLCLUSTER_CACHE_DIR) to a private folder")


def ensure_cache(manifest: pd.DataFrame, preprocess: Preprocess, root: str | Path | None = None,
                 manifest_path: str = "", max_pixels: int = dec.DEFAULT_MAX_PIXELS,
                 workers: int = 0, log=None) -> ImageCache:
    """Open the cache for the manifest's decodable images, building it first if needed (images that
    could not be read last time, for reasons not their own, are retried)."""
    log = log or say
    root = Path(root) if root else default_cache_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_root(root)
    ok = manifest[manifest["status"] == "ok"]
    unique = ok.drop_duplicates("sha256").sort_values("sha256")[["sha256", "path"]]
    key = cache_key(unique["sha256"].tolist(), preprocess)
    final = root / key
    lock = open_lock_file(_build_lock_path(root, key))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)      # one builder per node; the others wait, then reuse
        if not (final / "meta.json").is_file():
            _build_new(root, key, unique, preprocess, manifest_path, max_pixels, workers, log)
        elif not os.environ.get(MUST_EXIST_ENV):
            _retry_transient(final, unique, preprocess, max_pixels, workers, log)
        in_use = _in_use_lock(root, key).acquire()      # marked before another build may look
    finally:
        os.close(lock)
    cache = ImageCache.open(final)
    cache.in_use = in_use
    return cache


def _in_use_lock(root: Path, key: str) -> ExclusiveLock:
    """Shared by every process using cache ``key``; :func:`_remove_stale` deletes only a cache it can
    take exclusively."""
    return ExclusiveLock(root / f"{key}.use", f"decoded-image cache {root / key}", shared=True)


def _build_new(root: Path, key: str, unique: pd.DataFrame, preprocess: Preprocess, manifest_path: str,
               max_pixels: int, workers: int, log) -> None:
    final = root / key
    if os.environ.get(MUST_EXIST_ENV):
        raise RuntimeError(f"decoded-image cache {final} is missing on this node, and {MUST_EXIST_ENV} "
                           "says it must have been built before this run (sweep trials never decode)")
    _reap_leftovers(root)                 # before decoding: a killed build's leftover is full-size
    start = time.time()
    log(f"[cache] decoding {len(unique)} distinct images at {preprocess.size}px into {final}")
    # Under this key's build lock no other builder of it runs (on any node sharing the root): a
    # folder of an earlier builder killed half way (SIGKILL, preemption) is a full-size leftover,
    # which atomic_folder removes first.
    with atomic_folder(final) as tmp:
        _build(tmp, unique, preprocess, max_pixels, workers)
        meta = {"manifest": str(Path(manifest_path).resolve()) if manifest_path else "",
                "size": preprocess.size, "preprocess": preprocess.key(), "count": len(unique),
                "version": CACHE_VERSION, "build_seconds": round(time.time() - start, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta))
    _remove_stale(root, key, meta)
    log(f"[cache] built in {meta['build_seconds']} s")


LEFTOVER_MAX_AGE_S = 2 * 86400        # days: far longer than a build takes


def _build_lock_path(root: Path, key: str) -> Path:
    """The lock every builder and remover of cache ``key`` holds, on every node sharing ``root``."""
    return root / f"{key}.lock"


def _reap_leftovers(root: Path) -> None:
    """Remove the folders that killed builds and removals of other keys left in ``root`` (full-size,
    and found by nothing else) whose maker is gone (:func:`_abandoned`); the key being built has its
    own removed by :func:`~allcluster.atomic.atomic_folder` (its builder holds the key's lock)."""
    for entry in root.iterdir():
        match = LEFTOVER.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and _abandoned(entry, match):
            shutil.rmtree(entry, ignore_errors=True)


def _abandoned(folder: Path, match: re.Match) -> bool:
    """Whether the process that made leftover ``folder`` is gone. Its pid tells only on its own
    host: a cache root may be shared between nodes (NFS), and another node's pid means nothing here.
    So a folder of this host goes once its pid is dead; one of another host, of an older version
    that wrote no host, or whose pid lives (reused since), only once older than LEFTOVER_MAX_AGE_S.
    Either only while no process holds its key's build lock, which every builder and remover of
    that key holds while its folder exists, on every node (a process in another PID namespace of
    this host, whose pid looks dead from here, included)."""
    pid, host = int(match["pid"]), match["host"]
    if host == socket.gethostname() and pid == os.getpid():
        return False                              # this process's own: another thread building
    try:
        old = time.time() - folder.lstat().st_mtime > LEFTOVER_MAX_AGE_S
    except OSError:
        return False
    dead = host == socket.gethostname() and not pid_alive(pid)
    return (dead or old) and _build_lock_free(folder.parent, match["name"])


def _build_lock_free(root: Path, key: str) -> bool:
    """No process holds ``key``'s build lock (checked without creating or writing the lock file)."""
    try:
        ExclusiveLock(_build_lock_path(root, key), "cache build").probe()
    except (ConfigError, OSError):
        return False
    return True


def _remove_stale(root: Path, key: str, meta: dict) -> None:
    """Drop older caches built from the same manifest file with the same preprocessing."""
    if not meta["manifest"]:
        return
    for other in root.iterdir():
        # not a leftover: a build's folder holds meta.json until renamed into place (and they are the reaper's)
        if other.name == key or LEFTOVER.match(other.name) or not (other / "meta.json").is_file():
            continue
        try:
            other_meta = json.loads((other / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if other_meta.get("manifest") == meta["manifest"] and other_meta.get("preprocess") == meta["preprocess"]:
            _remove_if_unused(root, other.name)


def _remove_if_unused(root: Path, key: str) -> None:
    """Delete cache ``key`` unless a process uses it (or is building or opening it): a running job
    whose manifest file was re-indexed keeps reading its own cache; a later build removes it."""
    locks = [ExclusiveLock(_build_lock_path(root, key), "cache build"), ExclusiveLock(root / f"{key}.use", "cache use")]
    held = []
    try:
        for lock in locks:
            held.append(lock.acquire())
        discard_folder(root / key)
    except (ConfigError, OSError):          # in use, or not removable now: left for a later build to remove
        pass
    finally:
        for lock in held:
            lock.release()
