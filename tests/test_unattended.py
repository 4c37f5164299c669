"""Unattended overnight runs (issue 10): every input gets exactly one row whatever the dump holds, any
file name, absolute paths, one writer per output, outputs never read back as inputs, transient errors
retried, bounded memory per file, and a cache that never keeps a failure that is not the file's own."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from allcluster.config import ConfigError, from_dict
from allcluster.data import decode as dec
from allcluster.data.paths import table_path, to_fs, to_text
from allcluster.score import heatmaps, reading
from allcluster.score.heatmaps import find_heatmap
from allcluster.score.ledger import Ledger
from allcluster.score.reading import read_decode
from conftest import REPO, STUCK, LoggedProcess, real_images, run_then_sigkill, tmpfs

CI_TINY = REPO / "configs" / "score" / "ci_tiny.yaml"
ODD_NAMES = [b"latin1-caf\xe9.jpg", b"new\nline.jpg", b"tab\there.jpg", b"-leading-dash.jpg", b"back\\slash.jpg"]


def score_args(model: Path, source: Path | str, out: Path, *extra: str) -> list[str]:
    return ["score", "--config", str(CI_TINY), "--model", str(model), "--input", str(source), "--out", str(out),
            "--set", "explain.budget.methods=[]", *extra]


def rows_of(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "rows")


# ---- names and paths (pure) ------------------------------------------------------------------------------
def test_any_file_name_has_a_reversible_utf8_text_form():
    for raw in [*ODD_NAMES, b"plain/cell 1.jpg", "zellé ünïcode.jpg".encode(), b"\\x41 is not an escape"]:
        name = os.fsdecode(raw)
        text = to_text(name)
        text.encode("utf-8")                             # valid UTF-8: Parquet can store it
        assert to_fs(text) == name and os.fsencode(to_fs(text)) == raw
    assert to_text(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"
    assert to_text("back\\slash") == "back\\\\slash" and to_text("zellé.jpg") == "zellé.jpg"


def test_paths_are_absolute_and_normalised_wherever_they_come_from(tmp_path, monkeypatch):
    from allcluster.score.inputs import list_inputs

    monkeypatch.chdir(tmp_path)
    assert table_path("a/./b/../c.jpg") == str(tmp_path / "a" / "c.jpg")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "rel.txt").write_text("../imgs/./x.jpg\n")
    (tmp_path / "abs.txt").write_text(f"{tmp_path}//imgs/x.jpg\n")
    pd.DataFrame({"path": ["imgs/x.jpg"]}).to_parquet(tmp_path / "m.parquet")
    expected = [str(tmp_path / "imgs" / "x.jpg")]
    assert list_inputs("lists/rel.txt").paths == expected
    assert list_inputs(tmp_path / "abs.txt").paths == expected
    monkeypatch.chdir("/")
    assert list_inputs(tmp_path / "m.parquet").paths == expected, "manifest paths are relative to the manifest"


# ---- one row per input, whatever the exception (injected) ---------------------------------------------
class _Weird(Exception):
    pass


def _faulty(original, faults: dict):
    """Wrap ``original`` so it raises the exception mapped to a file (matched in its first two string
    arguments: a path, or decode's name); a real call otherwise."""
    def wrapper(*args, **kwargs):
        names = [a for a in args[:2] if isinstance(a, str)]
        for key, error in faults.items():
            if any(key in n for n in names):
                raise error
        return original(*args, **kwargs)
    return wrapper


def test_any_exception_reading_decoding_or_preprocessing_one_file_becomes_its_error_row(tmp_path, monkeypatch,
                                                                                          real_data_dir):
    from allcluster.data.preprocess import Preprocess

    paths = []
    for i, image in enumerate(real_images(real_data_dir, 2)[:6]):
        paths.append(tmp_path / f"{['read', 'decode', 'prep', 'ok', 'ok', 'ok'][i]}-{i}.jpg")
        shutil.copy(image, paths[-1])
    monkeypatch.setattr(dec, "read_hashed", _faulty(dec.read_hashed, {"read-0": struct.error("bad header")}))
    monkeypatch.setattr(dec, "decode", _faulty(dec.decode, {"decode-1": TypeError("EXIF orientation is None")}))

    class FirstCallFails(Preprocess):          # files 0 and 1 never reach preprocessing: file 2 is first
        calls = 0

        def __call__(self, array):
            FirstCallFails.calls += 1
            if FirstCallFails.calls == 1:
                raise _Weird("cv2 error in the ROI crop")
            return super().__call__(array)
    monkeypatch.setattr(reading, "Preprocess", FirstCallFails)
    out = read_decode({"path": np.array([table_path(p) for p in paths], dtype=object)}, 32, False, 0.1,
                           10_000_000, Ledger(0).claim)
    assert list(out["status"]) == ["error"] * 3 + ["ok"] * 3
    assert list(out["error_type"][:3]) == ["read_error", "decode_error", "decode_error"]
    for i, kind in enumerate(["error: bad header", "TypeError: EXIF orientation is None",
                              "_Weird: cv2 error in the ROI crop"]):
        assert str(paths[i]) in out["error"][i] and kind in out["error"][i], out["error"][i]
    assert out["pixels"][3:].std() > 0


def test_a_retried_batch_decodes_in_a_child_so_a_file_that_kills_its_decoder_gets_a_row(
        tmp_path, monkeypatch, real_data_dir, segfaulting_decoder):
    """A native decoder's crash (here a real SIGSEGV) is no exception: it ends the process, and Ray
    runs the task again, without limit. A batch's second try decodes each file in a child process:
    the file that kills it gets a ``reader_crashed`` row naming the signal, the others their pixels
    as a first try gives them. A batch whose tries keep dying gets its rows without being read."""
    from allcluster.data.preprocess import Preprocess

    site, poisoned_copy = segfaulting_decoder
    monkeypatch.setenv("PYTHONPATH", str(site))         # the children find allcluster on our own sys.path
    clean = [shutil.copy(image, tmp_path / image.name) for image in real_images(real_data_dir, 1)[:3]]
    poison = poisoned_copy(clean[0], tmp_path / "poison.jpg")
    paths = [Path(clean[0]), poison, *map(Path, clean[1:])]
    batch = {"path": np.array([table_path(p) for p in paths], dtype=object)}

    first_try = read_decode({"path": batch["path"][[0, 2, 3]]}, 32, False, 0.1, 10_000_000, Ledger(0).claim)
    second = read_decode(batch, 32, False, 0.1, 10_000_000, Ledger(0).claim, attempt=2)   # in children
    assert list(second["status"]) == ["ok", "error", "ok", "ok"]
    assert second["error_type"][1] == "reader_crashed" and "reader_crashed" in dec.TRANSIENT_ERRORS
    assert second["error"][1] == f"{poison}: the process decoding it died (killed by SIGSEGV)", second["error"][1]
    np.testing.assert_array_equal(second["pixels"][[0, 2, 3]], first_try["pixels"])
    assert list(second["width"][[0, 2, 3]]) == list(first_try["width"]) and second["sha256"][1]

    stuck = poisoned_copy(clean[1], tmp_path / "stuck.jpg", STUCK)      # a decoder in an endless loop
    with reading.IsolatedDecoder(timeout_s=2) as decode_one:
        out = {"width": np.zeros(2, np.int32), "height": np.zeros(2, np.int32), "pixels": np.zeros((2, 32, 32, 3), np.uint8)}
        with pytest.raises(dec.DecodeError, match=r"stuck\.jpg: the process decoding it died \(stuck: no answer in 2 s\)"):
            decode_one(out, 0, stuck.read_bytes(), str(stuck), Preprocess(32), 10_000_000)
        decode_one(out, 1, Path(clean[1]).read_bytes(), str(clean[1]), Preprocess(32), 10_000_000)
        np.testing.assert_array_equal(out["pixels"][1], first_try["pixels"][1])

    last = read_decode(batch, 32, False, 0.1, 10_000_000, Ledger(0).claim, attempt=2 + reading.ISOLATED_TRIES)
    assert set(last["error_type"]) == {"reader_crashed"} and not last["t_read_ms"].any(), "not read again"
    assert "the process reading its batch died 3 times" in last["error"][0]


@pytest.mark.ray
@pytest.mark.slow
def test_a_file_that_crashes_the_decoder_in_a_real_job_gets_one_row_and_the_job_finishes(
        tiny_model_dir, real_data_dir, tmp_path, segfaulting_decoder):
    """The whole path: a scoring job (its own local Ray, whose workers die by SIGSEGV on the poisoned
    file) ends with exit 0 and one row per file: Ray retries the task, whose second try isolates
    the file. Before, Ray retried the batch forever and the job never ended."""
    site, poisoned_copy = segfaulting_decoder
    dump = tmp_path / "dump"
    dump.mkdir()
    images = [Path(shutil.copy(image, dump / image.name)) for image in real_images(real_data_dir, 2)]
    poison = poisoned_copy(images[0], dump / "poison.jpg")
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "allcluster.cli", *score_args(tiny_model_dir, dump, out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rows_of(out).set_index("path")
    assert sorted(rows.index) == sorted(map(str, [*images, poison]))
    assert rows.loc[str(poison), "error_type"] == "reader_crashed", rows.loc[str(poison)].to_dict()
    assert (rows.drop(index=str(poison))["status"] == "ok").all()


def test_an_exception_while_listing_one_entry_becomes_its_row_and_listing_goes_on(tmp_path, monkeypatch):
    from allcluster.score import inputs

    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    original = inputs._entry_problem
    monkeypatch.setattr(inputs, "_entry_problem", lambda path, root: (_ for _ in ()).throw(
        UnicodeError("odd inode")) if path.name == "b.jpg" else original(path, root))
    listing = inputs.list_inputs(tmp_path)
    assert [Path(p).name for p in listing.paths] == ["a.jpg", "c.jpg"]
    assert [(Path(e["path"]).name, e["error_type"]) for e in listing.errors] == [("b.jpg", "list_error")]
    assert "UnicodeError: odd inode" in listing.errors[0]["error"]


def test_a_folder_without_execute_permission_gets_an_unlistable_row_and_listing_goes_on():
    """A folder with read but not execute permission lists its names, but none of its entries can be
    stat-ed (EACCES). Root ignores permissions, so the listing runs in a real non-root process."""
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
    if as_nobody and not shutil.which("setpriv"):
        pytest.skip("NOT TESTED: running as root and setpriv (util-linux) is missing to drop to nobody")
    top = Path(tempfile.mkdtemp(prefix="allcluster-noexec-", dir="/tmp"))   # pytest's folders (and the
    try:                                                  # one above them) are 0700: nobody cannot get in
        top.chmod(0o755)
        root = top / "dump"
        (root / "locked" / "sub").mkdir(parents=True)
        for name in ("a.jpg", "locked/b.jpg", "z.jpg"):
            (root / name).write_bytes(b"x")
        os.chmod(root / "locked", 0o744)
        script = ("import json, sys; from allcluster.score.inputs import list_inputs; "
                  "listing = list_inputs(sys.argv[1]); print(json.dumps([listing.paths, listing.errors]))")
        done = subprocess.run([*as_nobody, sys.executable, "-c", script, str(root)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    paths, errors = json.loads(done.stdout.splitlines()[-1])
    assert paths == [str(root / "a.jpg"), str(root / "z.jpg")]
    assert {e["path"]: e["error_type"] for e in errors} == {str(root / "locked" / "sub"): "unlistable",
                                                            str(root / "locked" / "b.jpg"): "unreadable"}
    assert all("Permission denied" in e["error"] and e["path"] in e["error"] for e in errors), errors


def test_an_array_part_says_which_folders_it_could_not_list_whose_row_another_part_keeps(capsys):
    """Every array task lists the whole input. A folder's ``unlistable`` row falls in one part (by the
    folder's path), but its files fall in every part: the others get no row for their files this run,
    so each of them says so in its log, naming the folder."""
    from allcluster.score.inputs import Listing, Shard
    from allcluster.score.ray_data import _say_folders_left_to_other_parts

    whole = Listing(pa.table({"path": ["/d/a.jpg", "/d/b.jpg"]}),
                    [{"path": "/d/locked", "error_type": "unlistable", "error": "/d/locked: Input/output error"},
                     {"path": "/d/c.jpg", "error_type": "unreadable", "error": "/d/c.jpg: Permission denied"}])
    owner = next(Shard(k, 3) for k in range(3) if Shard(k, 3).holds(["/d/locked"])[0])
    for part in (Shard(k, 3) for k in range(3)):
        _say_folders_left_to_other_parts(whole, whole.part(part))
        said = capsys.readouterr().err
        if part == owner:
            assert "could not be listed" not in said, "the owner writes the folder's row"
        else:
            assert "1 folder(s) could not be listed here (/d/locked); this part's files in them are not " \
                   "scored this run" in said, said


def test_an_input_on_a_failing_mount_is_refused_naming_it_not_a_traceback(tmp_path, monkeypatch):
    """A stale NFS handle (injected) at a job's start: one line naming the input, exit 2 from the CLI."""
    from allcluster.score.inputs import check_input

    stale = tmp_path / "dump"
    is_dir = Path.is_dir

    def failing(path):
        if path == stale:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(path))
        return is_dir(path)
    monkeypatch.setattr(Path, "is_dir", failing)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(stale))}: input cannot be reached \(Stale file handle\)"):
        check_input(stale)


def test_an_input_file_is_a_manifest_by_its_bytes_and_a_csv_or_binary_file_is_refused_by_the_check(tmp_path):
    from allcluster.score.inputs import check_input, list_inputs

    pd.DataFrame({"path": ["imgs/x.jpg"], "ward": ["W1"]}).to_parquet(tmp_path / "m.pq")
    listing = list_inputs(tmp_path / "m.pq")
    assert listing.paths == [str(tmp_path / "imgs" / "x.jpg")] and listing.extra == {"ward": ["W1"]}
    (tmp_path / "list.csv").write_text("path,label\nimgs/x.jpg,ALL\n")
    (tmp_path / "cell.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01")
    for name, hint in (("list.csv", "allcluster index"), ("cell.jpg", "not a text file of paths")):
        for call in (check_input, list_inputs):           # check_input is what --check runs
            with pytest.raises(ConfigError, match=re.escape(str(tmp_path / name))) as refused:
                call(tmp_path / name)
            assert hint in str(refused.value)


def test_a_manifest_column_without_a_text_form_is_refused_by_the_check_naming_the_file_and_column(tmp_path):
    from allcluster.score.inputs import check_input, list_inputs

    bad = {"tags.parquet": pa.table({"path": ["/d/a.jpg"], "tags": pa.array([[1, 2]], pa.list_(pa.int64()))}),
           "meta.parquet": pa.table({"path": ["/d/a.jpg"], "meta": pa.array([{"w": 1}])}),
           "latin1.parquet": pa.table({"path": pa.array([b"/d/caf\xe9.jpg"], pa.binary())})}
    for name, table in bad.items():
        pq.write_table(table, tmp_path / name)
        column = table.column_names[-1]
        for call in (check_input, list_inputs):
            with pytest.raises(ConfigError, match=re.escape(str(tmp_path / name))) as refused:
                call(tmp_path / name)
            assert f"column '{column}'" in str(refused.value), str(refused.value)
    pq.write_table(pa.table({"path": pa.array([b"/d/a.jpg"], pa.binary()), "n": [3]}), tmp_path / "ok.parquet")
    assert list_inputs(check_input(tmp_path / "ok.parquet").args[0]).extra == {"n": ["3"]}


def test_a_list_file_with_a_byte_order_mark_and_crlf_lines_lists_the_paths_it_names(tmp_path):
    from allcluster.score.inputs import list_inputs

    (tmp_path / "notepad.txt").write_bytes("\ufeffa.jpg\r\nsub/b c .jpg\r\n".encode())
    assert list_inputs(tmp_path / "notepad.txt").paths == [str(tmp_path / "a.jpg"), str(tmp_path / "sub" / "b c .jpg")]


def test_index_and_cache_build_turn_injected_exceptions_into_rows(tmp_path, monkeypatch, real_data_dir):
    from allcluster.data.cache import ensure_cache
    from allcluster.data.manifest import IndexConfig, build_manifest
    from allcluster.data.preprocess import Preprocess

    for i, image in enumerate(real_images(real_data_dir, 3)):
        (tmp_path / "src" / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, tmp_path / "src" / image.parent.name / f"{'boom' if i == 0 else 'cell'}{i:02d}.jpg")
    monkeypatch.setattr(dec, "decode", _faulty(dec.decode, {"boom00": KeyError("missing Huffman table")}))
    manifest = build_manifest(from_dict(IndexConfig, {"source": str(tmp_path / "src")}))
    boom = manifest[manifest["path"].str.contains("boom00")].iloc[0]
    assert (boom["status"], boom["error_type"]) == ("error", "decode_error") and "KeyError" in boom["error"]
    assert (manifest["status"] == "ok").sum() == len(manifest) - 1

    monkeypatch.setattr(dec, "decode", _faulty(dec.decode, {"cell01": OverflowError("int too large")}))
    root = tmp_path / "cache"
    cache = ensure_cache(manifest, Preprocess(32, False, 0.1), root, log=lambda *_: None)
    index = pq.read_table(cache.path / "index.parquet").to_pandas().set_index("path")
    bad = index.loc[[p for p in index.index if "cell01" in p][0]]
    assert not bad["valid"] and bad["error_type"] == "decode_error" and "OverflowError" in bad["error"]
    assert index["valid"].sum() == len(index) - 1


# ---- bounded memory per file -----------------------------------------------------------------------------
def test_a_sparse_4gb_file_is_too_large_without_being_read_and_memory_stays_small(tmp_path, real_data_dir):
    sparse = tmp_path / "whole-slide.svs"
    subprocess.run(["truncate", "-s", "4G", str(sparse)], check=True)
    image = real_images(real_data_dir, 1)[0]
    code = ("import sys, json, numpy as np; from pathlib import Path; "
            "from allcluster.score.reading import read_decode; from allcluster.score.ledger import Ledger; from allcluster.bench.score import rss_kib; "
            "Path('/proc/self/clear_refs').write_text('5'); base = rss_kib('VmRSS'); "
            "o = read_decode({'path': np.array(sys.argv[1:], dtype=object)}, 64, False, 0.1, 50_000_000, "
            "Ledger(0).claim); "
            "print(json.dumps([list(o['error_type']), [float(t) for t in o['t_read_ms']], base, rss_kib('VmHWM')]))")
    done = subprocess.run([sys.executable, "-c", code, str(sparse), str(image)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    kinds, read_ms, base_kib, peak_kib = json.loads(done.stdout)
    print(f"\n[bounded memory] decode worker: {base_kib / 1024:.0f} MiB after imports, peak {peak_kib / 1024:.0f} MiB "
          "while reading a batch with a 4 GiB sparse file")
    assert kinds == ["too_large", ""] and read_ms[0] < 100, "refused from its size alone, not read"
    assert peak_kib - base_kib < 512 * 1024, "reading the 4 GiB file would have added 4 GiB"


# ---- the cache never keeps a failure that is not the file's own ----------------------------------------
def test_a_file_missing_when_the_cache_was_built_is_retried_and_used_once_restored(tmp_path, real_data_dir):
    from allcluster.data.cache import ensure_cache
    from allcluster.data.manifest import IndexConfig, build_manifest
    from allcluster.data.preprocess import Preprocess
    from allcluster.train.config import DataConfig
    from allcluster.train.data import load_splits

    for image in real_images(real_data_dir, 6):
        (tmp_path / "src" / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, tmp_path / "src" / image.parent.name / image.name)
    manifest = build_manifest(from_dict(IndexConfig, {"source": str(tmp_path / "src"), "ratios": [0.5, 0.25, 0.25]}))
    victim = Path(manifest[manifest["split"] == "train"]["path"].iloc[0])
    kept = victim.read_bytes()
    victim.unlink()
    root, pre = tmp_path / "cache", Preprocess(32, False, 0.1)
    cache = ensure_cache(manifest, pre, root, log=lambda *_: None)
    sha = manifest.set_index("path").loc[str(victim), "sha256"]
    assert not cache.valid[cache.row(sha)]
    _, splits = load_splits(manifest, cache, DataConfig(manifest="m"), 0)
    assert str(victim) not in splits["train"].paths
    victim.write_bytes(kept)
    cache = ensure_cache(manifest, pre, root, log=lambda *_: None)
    assert cache.valid[cache.row(sha)] and np.asarray(cache.images[cache.row(sha)]).std() > 0
    _, splits = load_splits(manifest, cache, DataConfig(manifest="m"), 0)
    assert str(victim) in splits["train"].paths, "the restored image is used for training"


def test_a_cache_root_that_is_not_private_is_refused_and_lock_symlinks_are_not_followed(tmp_path):
    from allcluster.data.cache import ensure_cache
    from allcluster.data.preprocess import Preprocess

    manifest = pd.DataFrame({"path": ["/x.jpg"], "sha256": ["aa" * 32], "status": ["ok"]})
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match=r"shared-cache.*not writable by group or others"):
        ensure_cache(manifest, Preprocess(32, False, 0.1), shared)
    assert list(shared.iterdir()) == [], "refused before writing anything"
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    from allcluster.data.cache import cache_key
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    (private / f"{cache_key(['aa' * 32], Preprocess(32, False, 0.1))}.lock").symlink_to(target)
    with pytest.raises(ConfigError, match="symlink"):
        ensure_cache(manifest, Preprocess(32, False, 0.1), private)
    assert target.read_text() == "keep me"


def test_an_output_on_a_filesystem_without_flock_is_refused_naming_its_lock_file(tiny_model_dir, real_data_dir,
                                                                                 tmp_path, monkeypatch, capsys):
    """Lustre mounted without the flock option answers flock(2) with ENOSYS: one writer per output cannot
    be kept there, so the run (and its --check) refuses with the lock file named, not a traceback.
    Injected: every local filesystem here has flock."""
    import errno

    from allcluster import locks
    from allcluster.cli import main

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    out = tmp_path / "out"
    args = score_args(tiny_model_dir, real_data_dir, out)
    assert main(args + ["--check"]) == 0 and not out.exists()   # no lock file yet: nothing to probe
    capsys.readouterr()
    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{out / '.lock'}: cannot lock it (Function not implemented)" in err and "flock mount option" in err, err
    assert [p.name for p in out.iterdir()] == [".lock"], "refused before writing anything else"
    assert main(args + ["--check"]) == 2 and f"{out / '.lock'}: cannot lock it" in capsys.readouterr().err


def test_an_output_on_a_filesystem_out_of_inodes_ends_with_74_naming_the_file(tiny_model_dir, real_data_dir,
                                                                              tmp_path, capsys):
    """No inode left for OUT/.lock, or for OUT itself, or no room for the lock's holder record, is a full
    disk (free space, rerun: 74) naming the file, not a refusal of the command (exit 2) nor "writing"."""
    from allcluster.cli import main

    with tmpfs(tmp_path / "small", "size=1M,nr_inodes=3") as mount:
        (mount / "out").mkdir()
        for n in range(8):                                           # use up every inode left
            try:
                (mount / "out" / f"f{n}").touch()
            except OSError as err:
                assert err.errno == errno.ENOSPC
                break
        assert main(score_args(tiny_model_dir, real_data_dir, mount / "out")) == 74
        err = capsys.readouterr().err
        assert f"error: {mount / 'out' / '.lock'}: No space left on device" in err, err
        assert main(score_args(tiny_model_dir, real_data_dir, mount / "new-out")) == 74     # no inode for OUT itself
        err = capsys.readouterr().err
        assert f"error: {mount / 'new-out'}: No space left on device" in err, err
    with tmpfs(tmp_path / "full", "size=4k") as mount:                 # an inode, but no page for the holder record
        (mount / "filler").write_bytes(b"x" * 4096)
        (mount / "out").mkdir()
        assert main(score_args(tiny_model_dir, real_data_dir, mount / "out")) == 74
        err = capsys.readouterr().err
        assert f"error: {mount / 'out' / '.lock'}: No space left on device" in err, err


def test_an_output_on_a_read_only_filesystem_is_refused_by_the_run_and_its_check_naming_it(tiny_model_dir,
                                                                                            real_data_dir, tmp_path,
                                                                                            capsys):
    """A real read-only mount: an --out there cannot be made; the run and --check both exit 2 with one
    line naming it, before Ray starts (a Slurm job then ends in its batch shell)."""
    from allcluster.cli import main

    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        for out in (mount / "scored", mount):       # to be made there; there already, not writable
            args = score_args(tiny_model_dir, real_data_dir, out)
            for extra in ([], ["--check"]):
                assert main(args + extra) == 2, (out, extra)
                err = capsys.readouterr().err
                assert f"{out}: cannot write into this folder (" in err and "Traceback" not in err, err
        assert list(mount.iterdir()) == []


@pytest.mark.ray
def test_a_replicas_full_quota_reaches_the_driver_as_the_error_it_was():
    """Ray Data re-raises a replica's exception without its cause, so the replica's batch carries it."""
    from allcluster.score.rows import STORAGE_FULL_ROWS, storage_full_in, storage_full_text

    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/out/heatmaps/ab/cd.gradcam.png")
    batch = pa.table({"error_type": ["", STORAGE_FULL_ROWS], "error": ["", storage_full_text(quota)]})
    again = storage_full_in(batch)
    assert (again.errno, again.filename, again.strerror) == (errno.EDQUOT, quota.filename, "Disk quota exceeded")
    assert storage_full_in(batch.slice(0, 1)) is None


@pytest.mark.parametrize("store", ["packed", "files"])
def test_a_full_output_disk_ends_the_run_with_74_naming_the_file_and_the_rerun_resumes_exactly_once(
        ray_local, tiny_model_dir, real_data_dir, tmp_path, capsys, store):
    """A real full disk (a small tmpfs; a quota's EDQUOT takes the same path): no file of the dump is at
    fault, so no error rows. The run stops at the first write that fails, names it, keeps what it
    wrote (its batch in hand is in the journal) and exits 74 (EX_IOERR: not 75, a requeue would
    fail the same way). Once there is room, the same command resumes: one row per file. The
    ``files`` store's maps are written by the model replicas, not the driver: only its heatmaps
    folder is full there, so that the replicas' writes are the ones that fail."""
    from allcluster.cli import main

    files = real_images(real_data_dir, 15)                    # 60: their maps need ~500 KiB (packed), 240 (files)
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(map(str, files)) + "\n")
    out = tmp_path / "small" / "scored" if store == "packed" else tmp_path / "scored"
    full = out.parent if store == "packed" else out / "heatmaps"
    named = r"(rows|heatmaps)/part-\S+" if store == "packed" else r"heatmaps/[0-9a-f]{2}/[0-9a-f]{64}\.gradcam\.png"
    args = [*score_args(tiny_model_dir, listing, out), "--set", f"explain.heatmaps={store}"]
    with tmpfs(full, "size=300k" if store == "packed" else "size=100k") as mount:
        assert main(args) == os.EX_IOERR
        err = capsys.readouterr().err
        assert re.search(rf"error: {re.escape(str(out))}/{named}: No space left on device; what was "
                         "written before is kept", err), err
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "no half-written file left"
        written = rows_of(out) if list((out / "rows").glob("*.parquet")) else pd.DataFrame({"status": []})
        assert len(written) < len(files) and (written["status"] == "ok").all(), written
        subprocess.run(["mount", "-o", "remount,size=50m", str(mount)], check=True)    # room again
        assert main(args) == 0
        rows = rows_of(out)
        assert sorted(rows["path"]) == sorted(map(str, files)) and (rows["status"] == "ok").all()
        assert all(find_heatmap(out, sha, "gradcam") for sha in rows["sha256"])
        if store == "packed":
            assert len(written) and "recovered from its journal" in capsys.readouterr().err


# ---- a real Ray Data job: odd names, an output folder inside the input, a sparse file ------------------
@pytest.fixture(scope="module")
def odd_job(ray_local, tiny_model_dir, real_data_dir, tmp_path_factory):
    """``--input D --out D/scored``, run twice, over real images under odd names and a 4 GiB sparse file."""
    from allcluster.cli import main

    dump = tmp_path_factory.mktemp("odd") / "D"
    dump.mkdir()
    images = real_images(real_data_dir, 2)
    names = [os.fsdecode(n) for n in ODD_NAMES]
    for name, image in zip(names, images):
        shutil.copy(image, os.path.join(dump, name))
    shutil.copy(images[-1], dump / "plain.jpg")
    subprocess.run(["truncate", "-s", "4G", str(dump / "stray.svs")], check=True)
    out = dump / "scored"
    first = main(score_args(tiny_model_dir, dump, out))
    shards = sorted((out / "rows").glob("*.parquet"))
    second = main(score_args(tiny_model_dir, dump, out))
    return {"rc": (first, second), "dump": dump, "out": out, "names": names, "shards": shards,
            "summary": json.loads((out / "summary.json").read_text())}


@pytest.mark.ray
def test_odd_file_names_get_rows_with_escaped_paths_and_reruns_know_them(odd_job):
    rows, dump = rows_of(odd_job["out"]), odd_job["dump"]
    assert odd_job["rc"] == (0, 0)
    expected = {table_path(os.path.join(dump, n)) for n in [*odd_job["names"], "plain.jpg", "stray.svs"]}
    assert set(rows["path"]) == expected and rows["path"].is_unique
    for name in odd_job["names"]:
        row = rows.set_index("path").loc[table_path(os.path.join(dump, name))]
        assert row["status"] == "ok", name
        assert Path(to_fs(row.name)).is_file()
        assert row["heatmap_gradcam"].startswith("heatmaps/part-"), "a pack named by run and shard, never the raw name"
        assert find_heatmap(odd_job["out"], row["sha256"], "gradcam"), name
    assert "latin1-caf\\xe9.jpg" in {Path(p).name for p in rows["path"]}
    assert sorted((odd_job["out"] / "rows").glob("*.parquet")) == odd_job["shards"], "the rerun scored nothing"
    assert odd_job["summary"]["run_rows"] == 0 and odd_job["summary"]["seconds_to_first_row"] is None


@pytest.mark.ray
def test_the_output_folder_inside_the_input_is_never_scored(odd_job):
    rows = rows_of(odd_job["out"])
    assert not rows["path"].str.startswith(str(odd_job["out"])).any()
    assert list((odd_job["out"] / "heatmaps").glob("part-*.parquet")), "heatmaps were written inside the input tree"


@pytest.mark.ray
def test_a_file_over_the_byte_cap_is_too_large_without_being_read(odd_job):
    row = rows_of(odd_job["out"]).set_index("path").loc[table_path(odd_job["dump"] / "stray.svs")]
    assert (row["status"], row["error_type"]) == ("error", "too_large")
    assert "not read" in row["error"] and row["t_read_ms"] < 100


@pytest.mark.ray
def test_rows_with_odd_names_read_in_pandas_and_duckdb(odd_job):
    import duckdb

    shards = str(odd_job["out"] / "rows" / "*.parquet")
    found = duckdb.sql(f"SELECT path, status FROM read_parquet('{shards}') WHERE path LIKE '%caf\\xe9%'").fetchall()
    assert found == [(table_path(os.path.join(odd_job["dump"], os.fsdecode(ODD_NAMES[0]))), "ok")]
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{shards}')").fetchall()[0][0]
    assert count == len(pd.read_parquet(odd_job["out"] / "rows")) == len(odd_job["names"]) + 2


# ---- transient errors are retried, deterministic ones are not ------------------------------------------
@pytest.mark.ray
def test_transient_errors_are_scored_again_and_replace_their_rows(ray_local, tiny_model_dir, real_data_dir,
                                                                  tmp_path, monkeypatch):
    from allcluster.cli import main

    images = real_images(real_data_dir, 2)[:5]
    files = tmp_path / "files"
    files.mkdir()
    for image in images:
        shutil.copy(image, files / image.name)
    whole = images[0].read_bytes()
    copying = files / "still-copying.jpg"
    copying.write_bytes(whole[: len(whole) // 2])                  # a copy in progress: truncated
    (files / "notes.jpg").write_text("not an image")                # deterministic: not_an_image
    partial = files / "renamed.jpg.part"                             # a copy tool's name until it renames it
    partial.write_bytes(images[2].read_bytes()[:3000])
    later = files / "arrives-later.jpg"                              # listed, not there yet: unreadable
    listing = tmp_path / "lists" / "files.txt"
    listing.parent.mkdir()
    listing.write_text("".join(f"../files/{p.name}\n" for p in sorted(files.iterdir())) + "../files/arrives-later.jpg\n")
    out = tmp_path / "out"
    from allcluster.score import output

    def folder_gone(path, pack):            # heatmaps/ stops taking files after the run's start-up checks
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(output, "write_pack", folder_gone)       # injected: the driver writes the packs
    monkeypatch.chdir(tmp_path)
    assert main(score_args(tiny_model_dir, "lists/files.txt", out)) == 0
    first = rows_of(out).set_index("path")
    assert len(first) == len(images) + 4
    assert first.loc[table_path(partial), "error_type"] == "truncated"
    assert (first.loc[[table_path(files / p.name) for p in images], "error_type"] == "write_error").all()
    assert first.loc[table_path(copying), "error_type"] == "truncated"
    assert first.loc[table_path(later), "error_type"] == "unreadable"
    assert first.loc[table_path(files / "notes.jpg"), "error_type"] == "not_an_image"

    monkeypatch.setattr(output, "write_pack", heatmaps.write_pack)  # the folder is fine again
    copying.write_bytes(whole)                                       # the copy finished
    shutil.copy(images[1], later)                                    # the late file arrived
    partial.unlink()
    shutil.copy(images[2], files / "renamed.jpg")                    # ...and renamed its finished copy
    absolute_list = tmp_path / "other.txt"                           # same files, other spelling, other cwd
    absolute_list.write_text("".join(f"{files}/./{p.name}\n" for p in sorted(files.iterdir())))
    monkeypatch.chdir("/")
    assert main(score_args(tiny_model_dir, absolute_list, out)) == 0
    second = rows_of(out)
    assert second["path"].is_unique and len(second) == len(images) + 4, "exactly one row per file"
    assert table_path(partial) not in set(second["path"]), "a transient row of a file gone from the input goes"
    second = second.set_index("path")
    assert (second.drop(index=table_path(files / "notes.jpg"))["status"] == "ok").all()
    notes = second.loc[table_path(files / "notes.jpg")]
    assert notes["error_type"] == "not_an_image" and notes["run_id"] == first.loc[notes.name, "run_id"]

    assert main(score_args(tiny_model_dir, absolute_list, out, "--retry-errors")) == 0
    third = rows_of(out)
    assert third["path"].is_unique and len(third) == len(images) + 4
    assert third.set_index("path").loc[notes.name, "run_id"] not in set(second["run_id"]), "--retry-errors rescored it"


# ---- one writer per output folder; a signal stops a run cleanly ----------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_a_job_killed_then_stopped_by_sigterm_resumes_to_exactly_one_row_per_file_and_a_busy_output_is_refused(
        ray_local, tiny_model_dir, real_data_dir, tmp_path, capsys):
    """One archive, three runs (one Ray start each, shared so CI stays short): A is SIGKILLed part way (a
    lost node, or a driver that Ray ends when its raylet stops) before it wrote any shard: B recovers the
    rows A held in memory from A's journal and resumes after them; a second run into the busy OUT is
    refused while B holds the lock, then B is stopped by SIGTERM (scancel, a time limit) with exit 75
    and its rows written; C finishes the job."""
    from allcluster.cli import main
    from allcluster.score.heatmaps import load_heatmap

    files = real_images(real_data_dir, 10)               # 40 files, Score-CAM on each: slow enough to stop twice
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(map(str, files)) + "\n")
    out = tmp_path / "out"
    args = score_args(tiny_model_dir, listing, out, "--set", "explain.methods=[gradcam,scorecam]",
                      "--set", "flush_seconds=1")
    command = [sys.executable, "-m", "allcluster.cli", *args]
    no_shard_yet = ["--set", "flush_seconds=3600", "--set", "rows_per_shard=1000"]
    run_then_sigkill([*command, *no_shard_yet], lambda: _journaled_rows(out) > 0, 300, "rows journaled")  # A: kill -9
    assert _rows_written(out) == 0, "A never reached a shard: its rows are in the journal alone"
    killed_at = _journaled_rows(out)
    assert 0 < killed_at < len(files), "the kill should land part way"

    progress = tmp_path / "progress"        # what slurm/ray-cluster.sh reads to tell progress from a loop
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO), "ALLCLUSTER_PROGRESS_FILE": str(progress)}
    with LoggedProcess(command, env) as second:                                             # B
        second.wait_until(lambda: f'"pid": {second.pid}' in _text(out / ".lock"), 600, "the resumed run took the lock")
        # B's journal and B's atomic writes in flight (`.NAME.PID-RANDOM.tmp`, renamed a moment later) are B's
        # own and transient: not compared. os.walk, not rglob: B removes A's journal folder meanwhile,
        # and rglob fails on a folder gone between its listing and its scan
        before = sorted(name for folder, subfolders, names in os.walk(out) for name in subfolders + names
                        if not Path(folder, name).relative_to(out).as_posix().startswith("rows/.journal-")
                        and not name.endswith(".tmp"))
        assert main(score_args(tiny_model_dir, listing, out)) == 2
        refusal = capsys.readouterr().err
        assert f"pid {second.pid}" in refusal and "in use by another run" in refusal, refusal
        second.wait_until(lambda: _rows_written(out) > killed_at, 600, "the resumed run wrote rows")
        second.send_signal(signal.SIGTERM)
        text = second.printed_by_exit(120)
        # before the with block's end kills B's session: Ray 2.60's agents outlived a driver's os._exit
        # (a worker the raylet forked during B's last moment ends by itself once it finds no raylet)
        deadline = time.time() + 20
        while _alive_in_session(second.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive_in_session(second.pid), "B's local Ray ended with B"
    assert second.returncode == 75, text[-3000:]
    assert f"{killed_at} rows a killed run had not written yet recovered from its journal" in text, text[-3000:]
    assert f"{killed_at} already scored" in text and "interrupted by SIGTERM" in text, text[-3000:]
    recovered = rows_of(out).groupby("run_id").size().sort_index()
    assert recovered.iloc[0] == killed_at, "A's rows keep A's run"
    assert not list((out / "rows").glob(".journal-*")), "a recovered or flushed journal is removed"
    for row in rows_of(out).itertuples():
        assert load_heatmap(out / row.heatmap_scorecam, row.sha256, "scorecam").size, row.path
    written = _rows_written(out)
    assert killed_at < written < len(files)
    assert f'"run_rows": {written - killed_at}' in text, "an interrupted run counts the rows it wrote"
    assert json.loads((out / "summary.json").read_text())["seconds_to_first_row"] > 0, "kept when a signal ends the run"
    assert progress.read_text() == f"{written - killed_at} final rows\n"
    assert "Starting execution of Dataset" not in text and "Execution plan of Dataset" not in text, \
        "Ray Data's INFO lines stay in its log file unless --log-level debug"
    assert "Progress bars disabled" not in text
    assert "core_worker.cc" not in text and "Token authentication" not in text, "Ray's own notices stay off the screen"
    assert set(before) <= set(p.name for p in out.rglob("*")), "the refused run removed nothing"

    assert main(args) == 0                                                                  # C
    rows = rows_of(out)
    assert sorted(rows["path"]) == sorted(map(str, files)) and (rows["status"] == "ok").all()
    assert rows["run_id"].nunique() == 3, "the killed run, the stopped run and the one that finished"


def _alive_in_session(sid: int) -> list[str]:
    """Live (not zombie) processes of session ``sid``, as "pid (command)"."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:        # "pid (comm) state ppid pgrp session ...": comm may hold spaces
            name, fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue        # ended meanwhile
        state, session = fields.split()[0], int(fields.split()[3])
        if session == sid and state != "Z":
            found.append(f"{name})")
    return found


def _catches(pid: int, signum: int) -> bool:
    """The process has a handler of its own for ``signum`` (``SigCgt`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.parametrize("driver", ["jobs/score.py", "jobs/sweep.py"])
def test_a_warning_while_the_driver_still_starts_ends_it_with_75_not_killed(driver, tmp_path):
    """Slurm's time-limit warning (SIGUSR1, forwarded by slurm/ray-cluster.sh as soon as the driver
    runs) can come while Python still imports: the driver must end with the contract's 75, not die
    of the signal (138). Sent as soon as the driver has a handler, long before any run starts."""
    args = ["--model", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "out")] \
        if driver.endswith("score.py") else ["--config", str(tmp_path / "sweep.yaml")]
    process = subprocess.Popen([sys.executable, driver, *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not _catches(process.pid, signal.SIGUSR1) and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGUSR1)
    text, _ = process.communicate(timeout=60)
    assert process.returncode == 75, text[-2000:]
    assert "interrupted by SIGUSR1 outside a graceful stop" in text and "rerun the same command" in text, text
    assert not (tmp_path / "out").exists()


def test_a_run_that_a_stop_signal_reached_on_its_way_out_keeps_its_code_and_ends_at_once(tmp_path):
    """A SIGTERM that lands while a finished run writes its outputs (Slurm's requeue or time limit just as
    the last trial ended) leaves the run's code as it is (0), but the process must end at once: Python's own
    shutdown would join the threads Ray and Tune leave (stood in for by a thread that waits 120 s) and wait
    on a Ray that the same SIGTERM is stopping, past Slurm's KillWait. A real signal, a real process."""
    done = _run_script(tmp_path / "finished_run.py",
                       "import os, signal, sys, threading, time\nimport ray  # noqa: F401 - a process that used Ray\n"
                       "from allcluster.interrupt import StopSignals, end_of_process\n"
                       "threading.Thread(target=time.sleep, args=(120,)).start()\n"
                       "with StopSignals('{signal}: stopping') as stop:\n"
                       "    stop.hold()                      # writing what it has\n"
                       "    os.kill(os.getpid(), signal.SIGTERM)\n"
                       "    print('outputs written', flush=True)\n"
                       "sys.exit(end_of_process(0))\n")
    assert done.returncode == 0 and "outputs written" in done.stdout, done.stdout + done.stderr


def _run_script(path: Path, text: str) -> subprocess.CompletedProcess:
    path.write_text(text)
    return subprocess.run([sys.executable, str(path)], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_a_stop_signal_after_a_finished_run_decided_its_code_changes_nothing(tmp_path):
    """Seen on Slurm: the time-limit warning came 0.1 s after a finished array task's last line; in
    Python's shutdown it met the driver's handler inside an atexit callback (a traceback) or the default
    action (exit 138, and Slurm requeued the finished task). Real processes: one that used Ray ends at
    once with its code, leaving no shutdown for a signal to land in (not after the 120 s thread Ray would
    leave); one that did not ignores a real SIGUSR1 sent during its shutdown."""
    done = _run_script(tmp_path / "used_ray.py",
                       "import sys, threading, time\nimport ray  # noqa: F401 - a process that used Ray\n"
                       "from allcluster.interrupt import end_of_process, stop_at_once\n"
                       "stop_at_once()\nthreading.Thread(target=time.sleep, args=(120,)).start()\n"
                       "print('work done', flush=True)\nsys.exit(end_of_process(0))\n")
    assert done.returncode == 0 and "work done" in done.stdout, done.stdout + done.stderr
    done = _run_script(tmp_path / "plain.py",
                       "import atexit, os, signal, sys, time\nfrom allcluster.interrupt import end_of_process, stop_at_once\n"
                       "stop_at_once()\n"
                       "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGUSR1), time.sleep(0.2)))   # in the shutdown\n"
                       "sys.exit(end_of_process(0))\n")
    assert done.returncode == 0 and "Interrupted" not in done.stderr and "Exception" not in done.stderr, done.stderr


def test_an_interrupted_command_kills_what_its_children_start_while_it_kills_them(tmp_path):
    """An interrupted command ends its local Ray's processes (kill_descendants) while the raylet may be
    starting workers: one started between the look at /proc and the kill must not be left orphaned. Stood
    in for by a child that starts a grandchild every 5 ms; afterwards none of them runs. Real processes."""
    marker = f"61.{os.getpid()}"       # the grandchildren's `sleep` argument: theirs alone
    script = tmp_path / "interrupted.py"
    script.write_text(
        "import subprocess, time\nfrom allcluster.interrupt import kill_descendants\n"
        f"subprocess.Popen(['bash', '-c', 'while :; do sleep {marker} & sleep 0.005; done'])\n"
        "time.sleep(1)\nkill_descendants()\n")
    try:
        subprocess.run([sys.executable, str(script)], cwd=REPO, check=True, timeout=60)
        time.sleep(0.5)
        left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout.split()
        assert not left, f"{len(left)} grandchildren outlived kill_descendants: {left}"
    finally:
        subprocess.run(["pkill", "-f", f"sleep {marker}"])


@pytest.mark.ray
def test_a_stop_signal_inside_ray_get_still_ends_the_command_with_75(ray_local, monkeypatch):
    """Raised by a handler while the main thread waits in ``ray.get`` (Ray's compiled code), the
    Interrupted comes out as a SystemError (seen: a Slurm warning during the sweep's cache build,
    exit 1 with a traceback); the command line still sees the stop and exits 75."""
    import threading

    from allcluster import cli
    from allcluster.interrupt import STOP_SIGNALS, interrupted_cause, stop_at_once

    @ray_local.remote
    def slow() -> int:
        time.sleep(5)
        return 1

    def waits_in_ray_get(args) -> int:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        return ray_local.get(slow.remote())

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop_at_once()
    try:
        with pytest.raises(BaseException) as raised:
            waits_in_ray_get(None)
        assert interrupted_cause(raised.value) is not None, repr(raised.value)
        monkeypatch.setattr(cli, "cmd_report", waits_in_ray_get)
        assert cli.main(["report", "nowhere", "--out", "nowhere"]) == 75
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _journaled_rows(out: Path) -> int:
    """Rows that the runs writing into ``out`` hold in memory, as their journals show them."""
    from allcluster.score.journal import read_journal

    streams = (out / "rows").glob(".journal-*/*.rows.arrows")
    return sum(t.num_rows for t in map(read_journal, streams) if t is not None)


def _rows_written(out: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "rows").glob("*.parquet")) if (out / "rows").is_dir() else 0


# ---- array tasks: shards of one job into one shared output --------------------------------------------
def test_shards_split_every_input_exactly_once_and_are_stable():
    from allcluster.score.inputs import Shard

    paths = [f"/archive/cell-{i}.jpg" for i in range(1000)]
    owners = [[k for k in range(4) if Shard(k, 4).holds([p])[0]] for p in paths]
    assert all(len(o) == 1 for o in owners), "every path in exactly one shard"
    sizes = [sum(o == [k] for o in owners) for k in range(4)]
    assert min(sizes) > 200 and Shard(2, 4).holds(paths) == Shard(2, 4).holds(list(paths))
    for bad in ("4/4", "a/2", "1", "-1/3"):
        with pytest.raises(ConfigError, match="--shard"):
            Shard.parse(bad)
    part = Shard.parse("3/8")            # one spelling each: K/N in messages, K-of-N in file names
    assert (part.text, part.name) == ("3/8", "3-of-8") and Shard.from_name(part.name) == part
    assert Shard.from_name(".lock-3-of-8") is None and Shard.from_name("3-of-8.tmp") is None


@pytest.mark.ray
def test_array_tasks_share_one_output_and_report_like_one_whole_job(ray_local, tiny_model_dir, real_data_dir,
                                                                    tmp_path, capsys):
    from allcluster.cli import main
    from allcluster.locks import ExclusiveLock

    dump = tmp_path / "dump"
    for image in real_images(real_data_dir, 3):
        (dump / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, dump / image.parent.name / image.name)
    (dump / "notes.jpg").write_text("not an image")
    whole, shared = tmp_path / "whole", tmp_path / "shared"
    assert main(score_args(tiny_model_dir, dump, whole)) == 0

    shared.mkdir()
    running = ExclusiveLock(shared / ".lock-0-of-2", "shard 0").acquire()    # task 0 is already running
    assert main(score_args(tiny_model_dir, dump, shared, "--shard", "0/2")) == 2
    assert "shard 0/2" in capsys.readouterr().err
    assert main(score_args(tiny_model_dir, dump, shared, "--shard", "1/2")) == 0, "other tasks are not blocked"
    running.release()
    task = ExclusiveLock(shared / ".lock", "a task", shared=True).acquire()  # while any task runs...
    assert main(score_args(tiny_model_dir, dump, shared)) == 2, "...a whole job into the same output is refused"
    task.release()
    assert main(score_args(tiny_model_dir, dump, shared, "--shard", "0/2")) == 0

    one, parts = rows_of(whole), rows_of(shared)
    assert parts["path"].is_unique and sorted(parts["path"]) == sorted(one["path"])
    assert parts["run_id"].nunique() == 2
    for out in (whole, shared):
        assert main(["report", str(out), "--out", str(out / "report")]) == 0
    for table in ("class_counts", "errors_by_type"):
        assert (pd.read_csv(shared / "report" / "tables" / f"{table}.csv")
                .equals(pd.read_csv(whole / "report" / "tables" / f"{table}.csv"))), table


# ---- archive scale: more path text than one Arrow string array holds ---------------------------------
def _paths_past_2_gib(chunks: int = 4, per_chunk: int = 560_000) -> pa.ChunkedArray:
    """Distinct ~1 KB paths, 2.25 GB in all (a 24-million-image archive's paths at ~90 bytes each)."""
    folder = pa.scalar("/archive/" + "d" * 990 + "/")
    return pa.chunked_array([
        pc.binary_join_element_wise(folder, pc.cast(pa.array(np.arange(k * per_chunk, (k + 1) * per_chunk)), pa.string()), "")
        for k in range(chunks)])


def _dictionary(value: str | None, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value], pa.string()))


def test_a_path_named_twice_is_found_in_any_chunk_and_at_any_window_edge(monkeypatch):
    """The listing's and the output's dedupe check compares sorted neighbours a window at a time
    (a hash set of an archive's paths cost the planning driver ~200 MiB per million): a repeat must be
    found wherever its two entries fall, in one chunk or two, inside a window or across its edge."""
    from allcluster.score import inputs

    monkeypatch.setattr(inputs, "_DISTINCT_WINDOW", 3)       # windows of 3 pairs: sorted pairs 2-3, 5-6 straddle
    unique = [f"/archive/ward-{i % 4}/cell-{i:03d}.jpg" for i in range(20)]
    assert inputs.all_distinct(pa.chunked_array([unique[:7], unique[7:]]))
    assert inputs.all_distinct(pa.array([], pa.string())) and inputs.all_distinct(pa.array(unique[:1]))
    ordered = sorted(unique)
    for twice in (ordered[0], ordered[2], ordered[3], ordered[-1]):
        assert not inputs.all_distinct(pa.chunked_array([unique[:7], unique[7:] + [twice]])), twice
        assert not inputs.all_distinct(pa.array([twice] + unique)), twice


@pytest.mark.slow
def test_a_listing_and_an_output_past_2_gib_of_paths_dedupe_resume_and_compact_without_offset_overflow():
    """One Arrow ``string`` array holds at most 2 GiB of text: gathering every path into one (a hash
    table's keys, a concatenation) failed with "offset overflow" once an archive's paths passed it,
    at the listing's dedupe, the resume's done set and the start's compaction check; grouping by
    the paths aborted the process. About 50 s and 12 GB of memory."""
    from allcluster.score.inputs import Listing
    from allcluster.score.output import STATE_COLUMNS, RowsState

    paths = _paths_past_2_gib()
    n, retried = len(paths), paths.chunk(0).slice(0, 1)        # a second run's row for the first path
    assert paths.nbytes > 2**31
    rows = {"path": pa.chunked_array(paths.chunks + [retried])}
    for column, value in (("status", "ok"), ("error_type", None), ("duplicate_of", ""), ("budget_reason", "")):
        rows[column] = pa.chunked_array([_dictionary(value, n), _dictionary(value, 1)])
    rows["run_id"] = pa.chunked_array([_dictionary("20261202-010000-0000-aaaaaaaa", n),
                                       _dictionary("20261202-020000-0000-bbbbbbbb", 1)])
    state = RowsState(pa.table({c: rows.pop(c) for c in STATE_COLUMNS}))
    repeated, newest = state.superseded()
    assert repeated.to_pylist() == retried.to_pylist()
    assert newest.to_pylist() == [retried[0].as_py() + "\x0020261202-020000-0000-bbbbbbbb"]
    done = state.done_paths()
    assert len(done) == n
    del state

    listing = Listing(pa.table({"path": pa.chunked_array(paths.chunks + [retried])}))
    del paths
    listing = listing.first_of_each_path()                      # the repeated first path: one entry
    assert len(listing) == n
    assert len(listing.without(done)) == 0                       # every file already has its row
