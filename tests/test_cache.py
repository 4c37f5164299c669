"""The decoded-image cache: built once per dataset and input size, reused, invalidated on change."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pandas as pd

from allcluster.data.cache import ImageCache, ensure_cache
from allcluster.data.decode import load
from allcluster.data.manifest import read_manifest
from allcluster.data.preprocess import Preprocess


def _quiet(_message):
    pass


def test_cache_holds_preprocessed_uint8_images_of_every_ok_row(synthetic_manifest, tmp_path):
    manifest = read_manifest(synthetic_manifest)
    prep = Preprocess(size=32)
    cache = ensure_cache(manifest, prep, tmp_path, str(synthetic_manifest), log=_quiet)
    ok = manifest[manifest["status"] == "ok"]
    assert cache.images.dtype == np.uint8 and cache.images.shape[1:] == (32, 32, 3)
    assert set(cache.rows) == set(ok["sha256"])
    row = ok.iloc[3]
    expected = prep(load(row["path"]).array)
    assert np.array_equal(cache.images[cache.row(row["sha256"])], expected)


def test_second_call_reuses_the_cache_without_decoding(synthetic_manifest, tmp_path):
    manifest = read_manifest(synthetic_manifest)
    messages = []
    first = ensure_cache(manifest, Preprocess(size=24), tmp_path, str(synthetic_manifest), log=messages.append)
    second = ensure_cache(manifest, Preprocess(size=24), tmp_path, str(synthetic_manifest), log=messages.append)
    assert first.path == second.path
    assert sum("decoding" in m for m in messages) == 1


def test_another_input_size_gets_its_own_cache(synthetic_manifest, tmp_path):
    manifest = read_manifest(synthetic_manifest)
    small = ensure_cache(manifest, Preprocess(size=24), tmp_path, str(synthetic_manifest), log=_quiet)
    large = ensure_cache(manifest, Preprocess(size=40), tmp_path, str(synthetic_manifest), log=_quiet)
    assert small.path != large.path and small.path.is_dir() and large.path.is_dir()


def test_changed_manifest_invalidates_and_replaces_the_old_cache_once_no_job_uses_it(synthetic_manifest, tmp_path):
    manifest = read_manifest(synthetic_manifest)
    old = ensure_cache(manifest, Preprocess(size=24), tmp_path, str(synthetic_manifest), log=_quiet)
    fewer = manifest.iloc[: len(manifest) // 2]
    # a job still training on the old cache (here: this process holds it) when the manifest file is
    # re-indexed and another job builds the new one: the old one stays readable under it
    new = ensure_cache(fewer, Preprocess(size=24), tmp_path, str(synthetic_manifest), log=_quiet)
    assert new.path != old.path and len(new.rows) == fewer["sha256"].nunique()
    reopened = ImageCache.open(old.path)
    assert np.array_equal(reopened.images[0], old.images[0])
    old.close()
    newest = ensure_cache(manifest.iloc[:3], Preprocess(size=24), tmp_path, str(synthetic_manifest), log=_quiet)
    assert not old.path.exists(), "the stale cache of the same manifest file is removed once unused"
    assert new.path.exists(), "the second one is still in use"
    new.close()
    newest.close()


def test_duplicate_files_are_decoded_once(synthetic_manifest, tmp_path):
    manifest = read_manifest(synthetic_manifest)
    doubled = pd.concat([manifest, manifest.iloc[:5]], ignore_index=True)
    cache = ensure_cache(doubled, Preprocess(size=24), tmp_path, log=_quiet)
    assert cache.images.shape[0] == manifest["sha256"].nunique()


def test_concurrent_builders_on_one_node_build_once(synthetic_manifest, tmp_path):
    manifest = read_manifest(synthetic_manifest)
    messages, results = [], []

    def build():
        results.append(ensure_cache(manifest, Preprocess(size=28), tmp_path, str(synthetic_manifest),
                                    log=messages.append))

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum("decoding" in m for m in messages) == 1
    assert len({r.path for r in results}) == 1


def test_undecodable_rows_are_marked_invalid_not_fatal(synthetic_manifest, tmp_path):
    manifest = read_manifest(synthetic_manifest).copy()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    manifest.loc[0, "path"] = str(broken)          # manifest said ok; the file changed since
    cache = ensure_cache(manifest, Preprocess(size=24), tmp_path / "c", log=_quiet)
    row = cache.row(manifest.loc[0, "sha256"])
    assert not cache.valid[row]
    assert cache.valid.sum() == len(cache.valid) - 1


def test_a_build_killed_half_way_leaves_no_full_size_folder_behind(synthetic_manifest, tmp_path):
    import shutil

    manifest = read_manifest(synthetic_manifest)
    cache = ensure_cache(manifest, Preprocess(size=24), tmp_path, str(synthetic_manifest), log=_quiet)
    cache.close()
    leftover = tmp_path / f"{cache.path.name}.tmp-4194303"        # a builder SIGKILLed mid-way
    shutil.copytree(cache.path, leftover)
    shutil.rmtree(cache.path)
    ensure_cache(manifest, Preprocess(size=24), tmp_path, str(synthetic_manifest), log=_quiet).close()
    assert not leftover.exists() and (cache.path / "meta.json").is_file()


def test_files_swapped_after_indexing_are_not_cached_under_the_indexed_hashes_and_a_reindex_puts_them_right(
        real_data_dir, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from allcluster.config import from_dict
    from allcluster.data.manifest import IndexConfig, build_manifest
    from conftest import real_images

    for image in real_images(real_data_dir, 3)[:6]:           # 3 Benign, 3 Early
        (tmp_path / "src" / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, tmp_path / "src" / image.parent.name / image.name)
    source = {"source": str(tmp_path / "src")}
    stale = build_manifest(from_dict(IndexConfig, source))
    benign, early = sorted((tmp_path / "src" / "Benign").iterdir())[0], sorted((tmp_path / "src" / "Early").iterdir())[0]
    benign_bytes, early_bytes = benign.read_bytes(), early.read_bytes()
    benign.write_bytes(early_bytes)                          # the two files swapped after indexing
    early.write_bytes(benign_bytes)
    cache = ensure_cache(stale, Preprocess(32), tmp_path / "cache", log=_quiet)
    index = pq.read_table(cache.path / "index.parquet").to_pandas().set_index("path")
    for path in (benign, early):
        assert not index.loc[str(path), "valid"] and index.loc[str(path), "error_type"] == "changed_since_index"
        assert str(path) in index.loc[str(path), "error"] and "re-index" in index.loc[str(path), "error"]
    assert index["valid"].sum() == 4
    cache.close()
    fresh = build_manifest(from_dict(IndexConfig, source))    # the same set of hashes: the same cache
    cache = ensure_cache(fresh, Preprocess(32), tmp_path / "cache", log=_quiet)
    assert cache.valid.all()
    for path, sha in zip(fresh["path"], fresh["sha256"]):
        assert np.array_equal(cache.images[cache.row(sha)], Preprocess(32)(load(path, draft=32).array)), path


def test_training_says_how_many_rows_of_each_split_have_no_cached_image_and_why(synthetic_manifest, tmp_path, capsys):
    from allcluster.train.config import DataConfig
    from allcluster.train.data import load_splits

    manifest = read_manifest(synthetic_manifest).copy()
    train = manifest.index[manifest["split"] == "train"][:2]
    for n, row in enumerate(train):
        manifest.loc[row, "path"] = str(tmp_path / f"gone-{n}.png")      # moved away since indexing
    cache = ensure_cache(manifest, Preprocess(size=24), tmp_path / "c", log=_quiet)
    capsys.readouterr()
    _, splits = load_splits(manifest, cache, DataConfig(manifest="m"), 0)
    said = capsys.readouterr().err
    assert f"[data] train: 2 of {len(train) + len(splits['train'])} image(s) left out" in said
    assert str(tmp_path / "gone-0.png") in said and str(tmp_path / "gone-1.png") in said
    assert "[data] val" not in said and "[data] test" not in said


def _child(code: str, *args: str, **popen) -> subprocess.Popen:
    """A real separate Python process running ``code`` (argv: ``args``)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], text=True, **popen)


# A build of one cache in a child process whose decoding, once under way, is (KILL) SIGKILLed, as
# preemption or the OOM killer would, or (PAUSE) waits until the test kills it: a live builder.
_BUILD_THEN = """
import os, signal, sys, time
import allcluster.data.cache as cache
from allcluster.data.manifest import read_manifest
from allcluster.data.preprocess import Preprocess

def decoding(*args):
    if sys.argv[4] == "KILL":
        os.kill(os.getpid(), signal.SIGKILL)
    print("decoding", flush=True)
    time.sleep(600)

cache._decode_parallel = decoding
cache.ensure_cache(read_manifest(sys.argv[1]), Preprocess(int(sys.argv[3])), sys.argv[2], sys.argv[1])
"""


def test_a_later_build_of_any_key_removes_what_a_sigkilled_build_left_but_not_a_live_builders_folder(
        synthetic_manifest, tmp_path):
    import os
    import signal
    import time

    from allcluster.data.cache import cache_key

    killed = _child(_BUILD_THEN, str(synthetic_manifest), str(tmp_path), "24", "KILL")
    assert killed.wait(60) == -signal.SIGKILL
    [leftover] = tmp_path.glob("*.tmp-*")
    assert (leftover / "images.u8").is_file() and f"-{killed.pid}" in leftover.name
    live = _child(_BUILD_THEN, str(synthetic_manifest), str(tmp_path), "28", "PAUSE", stdout=subprocess.PIPE)
    try:
        assert live.stdout.readline() == "decoding\n"
        [building] = [p for p in tmp_path.glob("*.tmp-*") if p != leftover]
        # on a cache root shared with other nodes: a pid of another host tells nothing here
        other_key = cache_key(["x"], Preprocess(36))
        other_node = tmp_path / f"{other_key}.tmp-{killed.pid}@another-node"
        forgotten = tmp_path / f"{other_key}.old-{killed.pid}@another-node"
        for folder in (other_node, forgotten):
            folder.mkdir()
        a_month_ago = time.time() - 30 * 86400
        os.utime(forgotten, (a_month_ago, a_month_ago))
        ensure_cache(read_manifest(synthetic_manifest), Preprocess(size=32), tmp_path, str(synthetic_manifest),
                     log=_quiet).close()                           # another key, in the same root
        assert not leftover.exists(), "the dead builder's folder is removed"
        assert building.is_dir(), "a live builder's folder is left alone"
        assert other_node.is_dir() and not forgotten.exists(), "another host's: only once days old"
    finally:
        live.kill()
        live.wait()


# A build in a child process that replaces an older cache of the same manifest file, SIGKILLed part
# way through deleting the old one (its pixels gone, its meta.json not yet).
_KILLED_WHILE_REMOVING = """
import os, shutil, signal, sys
from pathlib import Path
import allcluster.data.cache as cache
from allcluster.data.manifest import read_manifest
from allcluster.data.preprocess import Preprocess

rmtree = shutil.rmtree

def killed_part_way(path, *args, **kwargs):
    path = Path(path)
    if (path / "meta.json").is_file() and (path / "images.u8").is_file():
        (path / "images.u8").unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    rmtree(path, *args, **kwargs)

shutil.rmtree = killed_part_way
manifest = read_manifest(sys.argv[1])
cache.ensure_cache(manifest.iloc[: len(manifest) // 2], Preprocess(24), sys.argv[2], sys.argv[1])
"""


def test_a_cache_removal_killed_part_way_leaves_no_cache_that_looks_whole(synthetic_manifest, tmp_path):
    import signal

    manifest = read_manifest(synthetic_manifest)
    old = ensure_cache(manifest, Preprocess(size=24), tmp_path, str(synthetic_manifest), log=_quiet)
    old.close()
    child = _child(_KILLED_WHILE_REMOVING, str(synthetic_manifest), str(tmp_path))
    assert child.wait(60) == -signal.SIGKILL
    assert not old.path.exists(), "the old cache's path holds all of it or nothing"
    again = ensure_cache(manifest, Preprocess(size=24), tmp_path, str(synthetic_manifest), log=_quiet)
    row = manifest.iloc[3]
    assert np.array_equal(again.images[again.row(row["sha256"])], Preprocess(24)(load(row["path"], draft=24).array))
    again.close()
    assert not list(tmp_path.glob("*.old-*")), "what the kill left is removed by the next build"


def test_the_cache_crops_the_cell_of_a_large_jpeg_from_a_decode_large_enough_for_it(tmp_path):
    from allcluster.config import from_dict
    from allcluster.data.manifest import IndexConfig, build_manifest
    from test_decode import detail, large_cell_jpeg

    (tmp_path / "src" / "Pro").mkdir(parents=True)
    (tmp_path / "src" / "Pro" / "large.jpg").write_bytes(large_cell_jpeg())
    manifest = build_manifest(from_dict(IndexConfig, {"source": str(tmp_path / "src"), "ratios": [1, 0, 0]}))
    prep = Preprocess(128, roi_crop=True)
    cache = ensure_cache(manifest, prep, tmp_path / "cache", log=_quiet)
    cached = cache.images[cache.row(manifest.loc[0, "sha256"])]
    full = prep(load(manifest.loc[0, "path"]).array)            # cropped from the full resolution
    assert detail(cached) > 0.9 * detail(full), "the cell is cropped from a decode with its detail"
    cache.close()
