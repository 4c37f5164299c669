"""The decoded-image cache: built once per dataset and input size, reused, invalidated on change."""
from __future__ import annotations

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
