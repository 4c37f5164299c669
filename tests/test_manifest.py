"""`allcluster index`: one row per file, error rows instead of crashes, duplicates never leak."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from allcluster.config import ConfigError, from_dict
from allcluster.data.manifest import IndexConfig, build_manifest, read_manifest, run_index
from allcluster.data.splits import splits_for_fold
from imagezoo import EXPECTED_ERROR, bad_files, jpeg_bytes

CLASSES = ("Benign", "Early", "Pre", "Pro")


def make_tree(root: Path, per_class: int = 12) -> Path:
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / cls / f"{cls}-{i:03d}.jpg").write_bytes(jpeg_bytes(seed=100 * c + i))
    return root


def index(source: Path, out: Path, **options) -> tuple[pd.DataFrame, dict]:
    return run_index(from_dict(IndexConfig, {"source": str(source), "out": str(out), **options}))


def test_corrupt_files_become_error_rows_and_the_command_exits_0(tmp_path):
    root = make_tree(tmp_path / "images")
    bad = bad_files(root / "Benign")
    result = subprocess.run([sys.executable, "-m", "allcluster.cli", "index", str(root),
                             "--out", str(tmp_path / "m.parquet")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"errors: {len(bad)}" in result.stdout
    df = read_manifest(tmp_path / "m.parquet")
    assert len(df) == 4 * 12 + len(bad)          # every file is a row: nothing lost
    errors = df[df["status"] == "error"].set_index("path")
    for name, path in bad.items():
        assert errors.loc[str(path), "error_type"] == EXPECTED_ERROR[name]
        assert str(path) in errors.loc[str(path), "error"]
    assert (df.loc[df["status"] == "error", "split"] == "").all()


def test_a_symlinked_class_folder_is_an_error_row_not_a_vanished_class(tmp_path):
    root = make_tree(tmp_path / "images", 4)
    elsewhere = make_tree(tmp_path / "elsewhere", 4)
    shutil.rmtree(root / "Pre")
    (root / "Pre").symlink_to(elsewhere / "Pre", target_is_directory=True)
    df, summary = index(root, tmp_path / "m.parquet")
    linked = df[df["path"] == str(root / "Pre")]
    assert len(linked) == 1 and linked.iloc[0]["status"] == "error" and linked.iloc[0]["error_type"] == "symlinked_folder"
    assert "symlinked folder not descended into" in linked.iloc[0]["error"] and len(df) == 3 * 4 + 1
    assert summary["errors"]["by_type"] == {"symlinked_folder": 1} and "Pre" not in summary["classes"], summary


def test_a_linked_dump_folder_is_resolved_once_as_scoring_resolves_it(tmp_path):
    """`/scratch/dump -> /lustre/...`: indexing the link and scoring it must give a file one path, or
    the manifest's rows and the scored rows of the same image would not join."""
    from allcluster.score.inputs import list_inputs

    root = make_tree(tmp_path / "real" / "images", 2)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    df, _ = index(tmp_path / "link" / "images", tmp_path / "m.parquet")
    assert sorted(df["path"]) == sorted(list_inputs(tmp_path / "link" / "images").paths)
    assert all(p.startswith(str(root.resolve()) + "/") for p in df["path"]) and len(df) == 4 * 2


def test_an_out_that_cannot_take_the_manifest_is_refused_before_any_file_is_read(tmp_path, monkeypatch):
    import allcluster.data.manifest as manifest

    root = make_tree(tmp_path / "images", 1)
    monkeypatch.setattr(manifest, "build_manifest", lambda cfg: pytest.fail("files were read first"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "folder", "is a folder; name the manifest file"),
                         (tmp_path / "afile" / "m.parquet", "afile is a file, not a folder")):
        with pytest.raises(ConfigError, match=message):
            index(root, out)


def test_manifest_has_the_documented_columns_and_real_sizes(tmp_path):
    df, _ = index(make_tree(tmp_path / "images", 4), tmp_path / "m.parquet")
    for column in ("path", "sha256", "label", "patient", "split", "width", "height", "status", "error"):
        assert column in df.columns
    assert (df["width"] == 40).all() and (df["height"] == 40).all() and (df["sha256"].str.len() == 64).all()
    assert (tmp_path / "m.config.yaml").is_file() and (tmp_path / "m.summary.json").is_file()


def test_duplicates_are_reported_and_kept_in_one_split(tmp_path):
    root = make_tree(tmp_path / "images", 20)
    for i in range(6):   # copies of Early images under other names
        shutil.copy(root / "Early" / f"Early-{i:03d}.jpg", root / "Early" / f"copy-{i}.jpg")
    df, summary = index(root, tmp_path / "m.parquet")
    assert summary["duplicates"]["groups"] == 6 and summary["duplicates"]["files"] == 12
    assert df.groupby("sha256")["split"].nunique().max() == 1


def test_duplicates_with_different_labels_are_conflicts_excluded_from_splits(tmp_path):
    root = make_tree(tmp_path / "images", 10)
    shutil.copy(root / "Early" / "Early-000.jpg", root / "Pro" / "looks-like-pro.jpg")
    df, summary = index(root, tmp_path / "m.parquet")
    assert summary["label_conflicts"]["groups"] == 1 and summary["label_conflicts"]["files"] == 2
    conflicted = df[df["label_conflict"]]
    assert len(conflicted) == 2 and (conflicted["split"] == "").all()
    assert "looks-like-pro.jpg (Pro)" in " ".join(summary["label_conflicts"]["groups_list"][0])


def test_split_ratios_are_stratified_per_class(tmp_path):
    df, summary = index(make_tree(tmp_path / "images", 50), tmp_path / "m.parquet", seed=3)
    for cls in CLASSES:
        counts = summary["per_class_per_split"][cls]
        assert counts == {"train": 40, "val": 5, "test": 5}


def test_patient_regex_keeps_each_patient_in_one_split(tmp_path):
    root = tmp_path / "images"
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for patient in range(6):
            for i in range(5):
                (root / cls / f"P{c}{patient:02d}_img{i}.jpg").write_bytes(jpeg_bytes(1000 * c + 10 * patient + i))
    df, _ = index(root, tmp_path / "m.parquet", patient_regex=r"^(P\d+)_")
    assert df["patient"].nunique() == 24
    assert df.groupby("patient")["split"].nunique().max() == 1
    assert set(df["split"]) == {"train", "val", "test"}


def test_a_patient_regex_matching_no_decodable_file_is_refused_before_hashing_and_writes_nothing(
        tmp_path, monkeypatch, capsys):
    import allcluster.data.manifest as manifest
    from allcluster.cli import main

    root = make_tree(tmp_path / "images", 3)
    (root / "Pre" / "P07_cut.jpg").write_bytes(jpeg_bytes(seed=9)[:100])     # its one match does not decode
    out = tmp_path / "m.parquet"
    assert main(["index", str(root), "--out", str(out), "--patient-regex", r"^(P\d+)_"]) == 2
    assert "--patient-regex '^(P\\\\d+)_': matches none of the 12 file names (e.g. Benign-000.jpg" in capsys.readouterr().err
    monkeypatch.setattr(manifest, "inspect_sources", lambda *args: pytest.fail("files were hashed first"))
    assert main(["index", str(root), "--out", str(out), "--patient-regex", "patient-"]) == 2
    assert "--patient-regex 'patient-': matches none of the 13 file names" in capsys.readouterr().err
    assert not list(tmp_path.glob("m.*")), "a refused index writes nothing"


def test_a_patient_regex_missing_some_files_warns_with_examples_and_the_summary_counts_them(tmp_path, capsys):
    from allcluster.cli import main

    root = tmp_path / "images"
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        names = [f"P{c}{p}_{i}.jpg" for p in range(3) for i in range(2)] + ["scan-0.jpg", "scan-1.jpg"]
        for i, name in enumerate(names):
            (root / cls / name).write_bytes(jpeg_bytes(100 * c + i))
    assert main(["index", str(root), "--out", str(tmp_path / "m.parquet"), "--patient-regex", r"^(P\d+)_"]) == 0
    printed = capsys.readouterr()
    assert "gives no patient id to 8 of 32 decodable files (e.g. scan-0.jpg, scan-1.jpg, scan-0.jpg" in printed.err
    assert "patients: 12; --patient-regex matched 24 decodable files, 8 unmatched" in printed.out
    summary = json.loads((tmp_path / "m.summary.json").read_text())
    assert summary["patients"] == {"count": 12, "regex": r"^(P\d+)_", "matched": 24, "unmatched": 8}


def test_csv_source_with_patient_column(tmp_path):
    root = make_tree(tmp_path / "images", 8)
    rows = [{"path": str(p.relative_to(tmp_path)), "label": p.parent.name, "patient": f"pt{i % 10}"}
            for i, p in enumerate(sorted(root.rglob("*.jpg")))]
    rows.append({"path": "images/missing.jpg", "label": "Pro", "patient": "pt0"})
    pd.DataFrame(rows).to_csv(tmp_path / "list.csv", index=False)
    df, summary = index(tmp_path / "list.csv", tmp_path / "m.parquet")
    assert len(df) == 33 and summary["errors"]["by_type"] == {"unreadable": 1}
    assert df[df["status"] == "ok"].groupby("patient")["split"].nunique().max() == 1


def test_csv_without_required_columns_names_the_file(tmp_path):
    (tmp_path / "bad.csv").write_text("file,class\na.jpg,x\n")
    with pytest.raises(ConfigError, match=r"bad\.csv: missing column\(s\) label, path"):
        build_manifest(IndexConfig(source=str(tmp_path / "bad.csv")))


def test_an_excel_csv_utf8_with_a_byte_order_mark_is_read(tmp_path):
    root = make_tree(tmp_path / "images", 2)
    lines = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(root.rglob("*.jpg"))]
    (tmp_path / "excel.csv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8-sig")
    df, summary = index(tmp_path / "excel.csv", tmp_path / "m.parquet")
    assert len(df) == 8 and summary["ok"] == 8 and summary["classes"] == list(CLASSES)


def test_a_csv_line_too_short_for_a_path_is_an_error_row_naming_the_csv_and_line(tmp_path):
    root = make_tree(tmp_path / "images", 2)
    lines = ["label,path"] + [f"{p.parent.name},{p.relative_to(tmp_path)}" for p in sorted(root.rglob("*.jpg"))]
    lines.insert(3, "Early")                                  # line 4: cut short by hand editing
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    df, summary = index(tmp_path / "list.csv", tmp_path / "m.parquet")
    bad = df[df["status"] == "error"]
    assert len(df) == 9 and summary["errors"]["by_type"] == {"bad_csv_row": 1}
    assert bad.iloc[0]["error"] == f"{tmp_path / 'list.csv'}:4: line has no value for column 'path'"


def test_kfold_assigns_grouped_stratified_folds_with_a_held_out_test(tmp_path):
    root = make_tree(tmp_path / "images", 30)
    shutil.copy(root / "Pre" / "Pre-000.jpg", root / "Pre" / "dup.jpg")
    df, _ = index(root, tmp_path / "m.parquet", folds=5)
    ok = df[df["status"] == "ok"]
    assert set(ok.loc[ok["split"] == "test", "fold"]) == {-1}
    assert set(ok.loc[ok["split"] != "test", "fold"]) == {0, 1, 2, 3, 4}
    assert ok.groupby("sha256")["fold"].nunique().max() == 1
    fold3 = splits_for_fold(ok, 3)
    assert set(ok.loc[fold3 == "val", "fold"]) == {3} and (fold3[ok["split"] == "test"] == "test").all()


def test_more_folds_than_groups_is_refused_naming_folds_and_before_hashing_when_the_listing_shows_it(
        tmp_path, monkeypatch, capsys):
    import allcluster.data.manifest as manifest
    from allcluster.cli import main

    root = tmp_path / "images"
    for c, cls in enumerate(CLASSES[:2]):
        (root / cls).mkdir(parents=True)
        for i in range(6):                       # 6 copies of one image per class, of patients P0..P2
            (root / cls / f"P{i % 3}_{c}{i}.jpg").write_bytes(jpeg_bytes(seed=c))
    out = tmp_path / "m.parquet"
    assert main(["index", str(root), "--out", str(out), "--folds", "4"]) == 2       # 2 distinct images: seen once hashed
    assert ("--folds 4: the 12 decodable images outside the test share form only 2 group(s)"
            in capsys.readouterr().err)
    monkeypatch.setattr(manifest, "inspect_sources", lambda *args: pytest.fail("files were hashed first"))
    assert main(["index", str(root), "--out", str(out), "--folds", "4", "--patient-regex", r"^(P\d)_"]) == 2
    assert "--folds 4: the 12 listed files form only 3 group(s)" in capsys.readouterr().err
    assert not list(tmp_path.glob("m.*")), "a refused index writes nothing"


def test_bad_index_options_are_clear_errors(tmp_path, capsys):
    from allcluster.cli import main

    with pytest.raises(ConfigError, match="ratios"):
        from_dict(IndexConfig, {"source": "x", "ratios": [0.5, 0.5, 0.5]})
    with pytest.raises(ConfigError, match="patient_regex"):
        from_dict(IndexConfig, {"source": "x", "patient_regex": "("})
    assert main(["index", str(tmp_path), "--out", str(tmp_path / "m.parquet"), "--min-side", "0"]) == 2
    assert "allcluster index: --min-side: value 0 is out of range" in capsys.readouterr().err, "named as typed"
    assert main(["index", str(tmp_path), "--out", str(tmp_path / "m.parquet"), "--patient-regex", "("]) == 2
    assert "error: --patient-regex: '(' is not a valid regex" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_index_size_limits_from_the_command_line_make_error_rows_and_are_recorded(tmp_path):
    """--min-side and --max-pixels (images here are 40x40): outside the limits a file is a row with
    status=error; the limits are written with the manifest's resolved options."""
    from allcluster.cli import main

    root = make_tree(tmp_path / "images", per_class=3)
    assert main(["index", str(root), "--out", str(tmp_path / "small.parquet"), "--min-side", "41"]) == 0
    assert main(["index", str(root), "--out", str(tmp_path / "large.parquet"), "--max-pixels", "1599"]) == 0
    assert main(["index", str(root), "--out", str(tmp_path / "fits.parquet"), "--min-side", "40",
                 "--max-pixels", "1600"]) == 0
    for name, error_type in (("small", "too_small"), ("large", "too_large"), ("fits", "")):
        rows = read_manifest(tmp_path / f"{name}.parquet")
        assert len(rows) == 12 and set(rows["error_type"]) == {error_type}, name
    assert "min_side: 41" in (tmp_path / "small.config.yaml").read_text()
    assert main(["index", str(root), "--out", str(tmp_path / "bad.parquet"), "--min-side", "0"]) == 2
    assert not (tmp_path / "bad.parquet").exists()


def test_real_data_duplicates_never_straddle_splits(real_manifest):
    df = read_manifest(real_manifest)
    summary = json.loads(real_manifest.with_name("manifest.summary.json").read_text())
    assert len(df) == 3256 and (df["status"] == "ok").all()
    assert summary["duplicates"]["groups"] > 0, "the real ALL set has exact duplicate pairs"
    in_splits = df[df["split"] != ""]
    assert in_splits.groupby("sha256")["split"].nunique().max() == 1, "a sha256 appears in two splits"
    shares = in_splits["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.8) < 0.01 and abs(shares["test"] - 0.1) < 0.01


def test_a_training_manifest_that_is_not_parquet_or_whose_paths_are_not_text_is_refused_naming_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from allcluster.data.manifest import MANIFEST_SCHEMA

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 cut short by a full disk")
    with pytest.raises(ConfigError, match=r"broken.parquet: cannot read this manifest as Parquet"):
        read_manifest(broken)
    row = {name: [None] for name in MANIFEST_SCHEMA.names}
    listy = pa.table({**row, "path": pa.array([["a.jpg"]], pa.list_(pa.string()))})
    pq.write_table(listy, tmp_path / "listy.parquet")
    with pytest.raises(ConfigError, match=r"listy.parquet: column 'path' \(list<.*\) is not text"):
        read_manifest(tmp_path / "listy.parquet")


def test_hidden_files_and_folders_get_no_row_but_the_summary_counts_them(tmp_path, capsys):
    from allcluster.cli import main

    root = make_tree(tmp_path / "images", 2)
    (root / "Pre" / ".DS_Store").write_bytes(b"finder metadata")
    (root / "Pro" / "._Pro-000.jpg").write_bytes(jpeg_bytes(seed=7))       # a macOS copy's resource fork
    (root / ".snapshot" / "Pre").mkdir(parents=True)                         # a NAS snapshot: not entered
    (root / ".snapshot" / "Pre" / "Pre-000.jpg").write_bytes(jpeg_bytes(seed=8))
    df, summary = index(root, tmp_path / "m.parquet")
    assert len(df) == 8 and not df["path"].str.contains("/\\.").any()
    hidden = summary["hidden_skipped"]
    assert (hidden["files"], hidden["folders"]) == (2, 1), hidden
    assert set(hidden["examples"]) == {str(root / ".snapshot") + "/", str(root / "Pre" / ".DS_Store"),
                                       str(root / "Pro" / "._Pro-000.jpg")}
    assert json.loads((tmp_path / "m.summary.json").read_text())["hidden_skipped"] == hidden
    capsys.readouterr()
    assert main(["index", str(root), "--out", str(tmp_path / "m2.parquet")]) == 0
    assert "hidden (names starting with '.'), no row: 2 file(s) skipped, 1 folder(s) not entered" in capsys.readouterr().out


def test_the_summary_counts_patient_regex_matches_without_ever_refusing(tmp_path):
    from allcluster.data.manifest import format_summary, summarize

    df, _ = index(make_tree(tmp_path / "images", 3), tmp_path / "m.parquet")
    summary = summarize(df, r"^(P\d+)_")                     # matches none of these names
    assert summary["patients"] == {"count": 0, "regex": r"^(P\d+)_", "matched": 0, "unmatched": 12}
    assert "--patient-regex matched 0 decodable files, 12 unmatched" in format_summary(summary)


def test_a_fold_the_manifest_does_not_have_is_a_config_error_naming_data_fold_and_the_manifest(tmp_path):
    _, _ = index(make_tree(tmp_path / "k", 30), tmp_path / "folds.parquet", folds=5)
    ok = read_manifest(tmp_path / "folds.parquet").query("status == 'ok'")
    for fold in (5, 12):                      # not a silent run with no validation split
        with pytest.raises(ConfigError, match=rf"data.fold: {fold} is out of range: the manifest has 5 folds, 0 to 4"):
            splits_for_fold(ok, fold)
    with pytest.raises(ConfigError, match=r"data.fold: 5 is out of range: manifest .*folds.parquet has 5 folds"):
        splits_for_fold(ok, 5, str(tmp_path / "folds.parquet"))
    assert (splits_for_fold(ok, 4)[ok["fold"] == 4] == "val").all()
    index(make_tree(tmp_path / "plain", 4), tmp_path / "plain.parquet")
    plain = read_manifest(tmp_path / "plain.parquet")
    with pytest.raises(ConfigError, match=r"data.fold: 0, but the manifest has no folds; set data.fold: -1"):
        splits_for_fold(plain, 0)
    with pytest.raises(ConfigError, match=r"data.fold: 0, but manifest .*plain.parquet has no folds"):
        splits_for_fold(plain, 0, str(tmp_path / "plain.parquet"))
    from allcluster.config import from_dict
    from allcluster.train.config import TrainConfig
    from allcluster.train.ray_train import preflight

    cfg = from_dict(TrainConfig, {"data": {"manifest": str(tmp_path / "folds.parquet"), "fold": 5}}, "t")
    with pytest.raises(ConfigError, match=r"data.fold: 5 is out of range: manifest .*folds.parquet"):
        preflight(cfg)                        # on the driver, before Ray starts a worker
