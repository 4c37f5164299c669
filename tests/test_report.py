"""``allcluster report`` from a real small sweep and a real scoring run on the real ALL images: every
number in the tables is checked against the Parquet rows it comes from, and the HTML is opened in
headless Chromium (tables, plots and gallery must render offline)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from allcluster.cli import main
from allcluster.config import ConfigError
from allcluster.report import ReportOptions, build_report, tables
from allcluster.report.inputs import SweepSource, collect_inputs
from allcluster.score.heatmaps import PACK_COLUMNS, load_heatmap
from conftest import REPO, tmpfs

CI_TINY_SCORE = REPO / "configs" / "score" / "ci_tiny.yaml"
PER_CLASS = 6            # scored test-split images per class
GALLERY = 2              # --gallery-per-class
MORNING_ROWS = 3         # --morning-rows
CLASSES = ["Benign", "Early", "Pre", "Pro"]
MALIGNANT = ["Early", "Pre", "Pro"]         # the default: every class but Benign

def readme_recipe(language: str = "python") -> str:
    """The README's "without allcluster" recipe in ``language`` (python: pandas, sql: DuckDB), read
    from the README itself (so they agree)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### The same tables without allcluster"):]
    start = section.index(f"```{language}\n") + len(f"```{language}\n")
    return section[start:section.index("```", start)]


# ---- pure parts ----------------------------------------------------------------------------------------------
def test_the_report_reads_the_columns_the_writers_write():
    """The report names columns of trials.parquet and of the row shards: each must be one the sweep or the
    scorer writes (a renamed column would otherwise vanish from the report without a word)."""
    from allcluster.report import inputs
    from allcluster.score.rows import row_schema
    from allcluster.sweep.schema import TRIAL_COLUMNS
    from allcluster.train.config import TrainConfig
    from allcluster.config import flatten, to_dict

    assert inputs.TRIALS_COLUMNS <= set(TRIAL_COLUMNS)        # EPOCHS_COLUMNS: against a real sweep's, below
    assert set(tables.LEADERBOARD_COLUMNS) - set(TRIAL_COLUMNS) == {"trials"}     # the count the report adds
    assert tables.SHOWN_KEYS <= set(flatten(to_dict(TrainConfig())))
    written = row_schema(["A", "B"], ["gradcam"])
    assert inputs.ROWS_COLUMNS <= set(written.names)
    assert all(written.field(column.name).type == column.type for column in tables.OPTIONAL_ROW_COLUMNS)


def test_inputs_are_told_apart_by_their_files_and_columns(tmp_path):
    (tmp_path / "exp").mkdir()
    pq.write_table(pa.table({"trial_id": ["t"], "status": ["finished"], "val_macro_f1": [0.5], "backbone": ["a"]}),
                   tmp_path / "exp" / "trials.parquet")
    (tmp_path / "out" / "rows").mkdir(parents=True)
    shard = tmp_path / "out" / "rows" / "part-0.parquet"
    pq.write_table(pa.table({"path": ["x.jpg"], "status": ["ok"], "predicted_class": ["A"], "confidence": [0.9]}), shard)
    (tmp_path / "out" / "rows" / ".part-1.parquet.tmp").write_bytes(b"half a shard")
    found = collect_inputs([tmp_path / "exp", tmp_path / "out", shard])
    assert found.sweeps == [SweepSource((tmp_path / "exp").resolve(), (tmp_path / "exp" / "trials.parquet").resolve())]
    assert [(s.root, s.files, s.damaged) for s in found.scorings] == [((tmp_path / "out").resolve(), [shard.resolve()], [])]
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    (tmp_path / "notes.txt").write_text("x")
    for path, message in [(tmp_path / "other.parquet", "neither sweep columns"), (tmp_path / "notes.txt", "expected a folder"),
                          (tmp_path, "not a sweep experiment folder")]:
        with pytest.raises(ConfigError, match=message):
            collect_inputs([path])
    with pytest.raises(FileNotFoundError, match="gone"):
        collect_inputs([tmp_path / "gone"])


def test_explanation_quality_means_skip_rows_without_a_map_and_duplicates_across_shards(tmp_path):
    from allcluster.score.rows import row_schema

    schema = row_schema(["A", "B"], ["gradcam", "lime"])
    rows = tmp_path / "out" / "rows"
    rows.mkdir(parents=True)
    shards = [  # shard 1: two gradcam maps, one with LIME; shard 2: one gradcam map, an error row and a
        # duplicate of c, which carries c's map and scores (counted once, with c)
        {"path": ["a", "b"], "status": ["ok", "ok"], "heatmap_gradcam": ["h/a", "h/b"], "on_cell_gradcam": [0.9, 0.5],
         "faith_drop_gradcam": [0.2, 0.4], "heatmap_lime": ["h/a2", None], "on_cell_lime": [0.3, None]},
        {"path": ["c", "d", "e"], "status": ["ok", "error", "ok"], "heatmap_gradcam": ["h/c", None, "h/c"],
         "on_cell_gradcam": [0.7, None, 0.7], "faith_drop_gradcam": [float("nan"), None, float("nan")],
         "duplicate_of": ["", "", "c"]},
    ]
    for k, columns in enumerate(shards):
        n = len(columns["path"])
        table = pa.table({name: columns.get(name, [None] * n) for name in schema.names}, schema=schema)
        pq.write_table(table, rows / f"part-{k}.parquet")
    quality = tables.explanation_quality(tables.open_scoring(collect_inputs([tmp_path / "out"]).scorings))
    got = quality.set_index("method")
    assert list(quality["method"]) == ["gradcam", "lime"] and got.loc["gradcam", "maps"] == 3
    assert got.loc["gradcam", "on_cell_mean"] == pytest.approx((0.9 + 0.5 + 0.7) / 3)
    assert got.loc["gradcam", "faith_drop_mean"] == pytest.approx(0.3), "NaN and null are skipped, not zeros"
    assert got.loc["lime", "maps"] == 1 and got.loc["lime", "on_cell_mean"] == pytest.approx(0.3)
    assert np.isnan(got.loc["lime", "faith_kept_mean"])


def _hand_trials() -> pd.DataFrame:
    """Six trials in three cells, written by hand: ties, an errored trial, a test-best that is not val-best."""
    return pd.DataFrame({
        "trial_id": ["a1", "a2", "b1", "b2", "c1", "c2"], "backbone": ["r18"] * 4 + ["allnet"] * 2,
        "augmentation": ["mixup", "mixup", "cutmix", "cutmix", "mixup", "mixup"],
        "optimizer": ["adam"] * 6, "status": ["finished", "finished", "finished", "errored", "finished", "finished"],
        "val_macro_f1": [0.80, 0.80, 0.70, 0.99, 0.60, 0.65], "val_loss": [0.5, 0.4, 0.3, 0.0, 0.9, 0.8],
        "test_macro_f1": [0.95, 0.70, 0.72, 0.99, 0.55, 0.64], "gpu_hours": [1.0] * 6})


def test_leaderboard_and_pivots_from_hand_written_trials():
    trials = _hand_trials()
    board = tables.leaderboard(trials)
    assert board["trial_id"].tolist() == ["a2", "b1", "c2"], "best by val F1, ties by val loss; errored never"
    assert board.set_index("trial_id").loc["a2", "trials"] == 2 and board.set_index("trial_id").loc["b1", "trials"] == 2
    pivot = tables.pivot(trials, "augmentation", "test_macro_f1").set_index("backbone")
    assert pivot.loc["r18", "mixup"] == 0.70 and pivot.loc["r18", "cutmix"] == 0.72
    assert np.isnan(pivot.loc["allnet", "cutmix"]) and pivot.loc["allnet", "mixup"] == 0.64
    best = tables.best_per_backbone(trials, "test_macro_f1").set_index("backbone")
    assert best.loc["r18", "trial_id"] == "a2" and best.loc["allnet", "trial_id"] == "c2"


def test_two_sweeps_of_one_grid_each_draw_their_own_training_curve(tmp_path):
    """A trial id names the varied values, so two experiments of one grid (two seeds, two datasets)
    share them: each sweep's best trial is drawn from its own epochs, never a mix of both."""
    for name, f1 in (("seed0", 0.9), ("seed1", 0.8)):
        (tmp_path / name).mkdir()
        pq.write_table(pa.table({"trial_id": ["r18-adam"], "status": ["finished"], "val_macro_f1": [f1],
                                 "val_loss": [0.1], "backbone": ["r18"], "augmentation": ["mixup"],
                                 "optimizer": ["adam"]}), tmp_path / name / "trials.parquet")
        pq.write_table(pa.table({"trial_id": ["r18-adam"] * 3, "epoch": [0, 1, 2], "train_loss": [f1] * 3,
                                 "val_loss": [f1] * 3, "val_macro_f1": [f1] * 3}), tmp_path / name / "epochs.parquet")
    found = collect_inputs([tmp_path / "seed0", tmp_path / "seed1"])
    best = tables.ranked(tables.load_trials(found.sweeps))[["experiment", "trial_id"]]
    epochs = tables.load_epochs(found.sweeps, best)
    assert len(epochs) == 6
    for experiment, f1 in zip(best["experiment"], (0.9, 0.8)):
        mine = epochs[epochs["experiment"] == experiment]
        assert mine["epoch"].tolist() == [0, 1, 2] and set(mine["val_macro_f1"]) == {f1}, experiment
    result = build_report([tmp_path / "seed0", tmp_path / "seed1"], tmp_path / "r", ReportOptions(metric="val_macro_f1", curves=2))
    assert Image.open(tmp_path / "r" / result["files"]["plot:training_curves"]).size[0] > 100


def test_counts_from_hand_written_rows(tmp_path):
    from allcluster.score.rows import row_schema

    schema = row_schema(["Benign", "Pre"], ["gradcam"])
    columns = {"path": ["a", "b", "c", "d", "e"], "folder": ["x", "x", "y", "y", None],
               "status": ["ok", "ok", "ok", "error", "ok"], "error_type": ["", "", "", "truncated", ""],
               "predicted_class": ["Pre", "Pre", "Benign", None, "Pre"], "uncertain": [True, False, False, None, False],
               "confidence": [0.5, 0.9, 0.8, None, 0.7], "duplicate_of": ["", "", "", "", "b"]}
    (tmp_path / "out" / "rows").mkdir(parents=True)
    pq.write_table(pa.table({n: columns.get(n, [None] * 5) for n in schema.names}, schema=schema),
                   tmp_path / "out" / "rows" / "part-0.parquet")
    data = tables.open_scoring(collect_inputs([tmp_path / "out"]).scorings)
    counts = tables.aggregate(data, ["predicted_class", "error_type", "folder"], ["Pre"])
    classes = tables.class_counts(counts["predicted_class"]).set_index("predicted_class")
    assert classes["images"].to_dict() == {"Benign": 1, "Pre": 3} and classes.loc["Pre", "uncertain"] == 1
    assert classes.loc["Pre", "confidence_mean"] == pytest.approx((0.5 + 0.9 + 0.7) / 3)
    assert tables.errors_by_type(counts["error_type"]).to_dict("records") == [{"error_type": "truncated", "errors": 1}]
    folders = counts["folder"].set_index("folder")
    assert folders["rows"].to_dict() == {"(none)": 1, "x": 2, "y": 2} and folders.loc["y", "errors"] == 1
    overview = tables.overview(counts["predicted_class"], morning_rows=2).iloc[0]
    assert (overview["rows"], overview["ok"], overview["errors"], overview["duplicates"]) == (5, 4, 1, 1)


def hand_rows(out: Path, classes: list[str], columns: dict[str, list], methods: list[str] = (),
              extra: list[str] = ()) -> Path:
    """One shard of a scoring job ``out`` written by hand in the real row schema (other columns null)."""
    from allcluster.score.rows import row_schema

    schema = row_schema(classes, list(methods), list(extra))
    n = len(columns["path"])
    (out / "rows").mkdir(parents=True)
    pq.write_table(pa.table({c: columns.get(c, [None] * n) for c in schema.names}, schema=schema),
                   out / "rows" / "part-0.parquet")
    return out


def test_classes_named_like_counters_get_their_own_columns_and_leave_the_counters_alone(tmp_path):
    """A model may call its classes ok, uncertain, errors or rows: the counters keep counting rows and
    each class gets its own ``predicted:<class>`` column."""
    hand_rows(tmp_path / "out", ["ok", "uncertain", "errors", "rows"], {
        "path": list("abcdefg"), "folder": ["x"] * 7, "status": ["ok"] * 6 + ["error"],
        "error_type": [""] * 6 + ["truncated"], "duplicate_of": [""] * 7,
        "predicted_class": ["ok", "uncertain", "uncertain", "errors", "errors", "rows", None],
        "uncertain": [True, False, False, True, False, True, None], "confidence": [0.5, 0.9, 0.8, 0.4, 0.7, 0.6, None]})
    data = tables.open_scoring(collect_inputs([tmp_path / "out"]).scorings)
    counts = tables.aggregate(data, ["predicted_class", "folder"], ["uncertain"])
    overview = tables.overview(counts["predicted_class"], morning_rows=0).iloc[0]
    assert overview.to_dict() == {"rows": 7, "ok": 6, "errors": 1, "uncertain": 3, "malignant": 2, "duplicates": 0,
                                  "morning_list": 0}
    classes = tables.class_counts(counts["predicted_class"]).set_index("predicted_class")
    assert classes["images"].to_dict() == {"errors": 2, "ok": 1, "rows": 1, "uncertain": 2}
    assert classes["uncertain"].to_dict() == {"errors": 1, "ok": 1, "rows": 1, "uncertain": 0}
    assert classes.loc["uncertain", "confidence_mean"] == pytest.approx(0.85)
    folder = counts["folder"]
    assert list(folder.columns) == ["folder", *tables.COUNTERS, "predicted:ok", "predicted:uncertain",
                                    "predicted:errors", "predicted:rows", "confidence_mean"]
    assert folder.iloc[0][["ok", "predicted:ok", "errors", "predicted:errors"]].tolist() == [6, 1, 1, 2]


def test_jobs_of_models_with_other_classes_are_each_scored_against_their_own(tmp_path):
    """Two jobs, one model with Pro and one without: both jobs' labelled rows are scored (the second
    model's rows have probability 0 for Pro), and its row labelled Pro is counted and reported."""
    three, two = ["Benign", "Pre", "Pro"], ["Benign", "Pre"]
    hand_rows(tmp_path / "a", three, {
        "path": ["a1", "a2"], "status": ["ok", "ok"], "label": ["Pro", "Benign"], "predicted_class": ["Pro", "Benign"],
        "confidence": [0.7, 0.6], "prob_Benign": [0.1, 0.6], "prob_Pre": [0.2, 0.3], "prob_Pro": [0.7, 0.1],
        "cal_prob_Benign": [0.1, 0.6], "cal_prob_Pre": [0.2, 0.3], "cal_prob_Pro": [0.7, 0.1]}, extra=["label"])
    hand_rows(tmp_path / "b", two, {
        "path": ["b1", "b2", "b3", "b4"], "status": ["ok", "ok", "ok", "error"],
        "label": ["Pre", "Benign", "Pro", "Pre"], "predicted_class": ["Pre", "Benign", "Pre", None],
        "confidence": [0.7, 0.8, 0.6, None],
        "prob_Benign": [0.3, 0.8, 0.4, None], "prob_Pre": [0.7, 0.2, 0.6, None],
        "cal_prob_Benign": [0.3, 0.8, 0.4, None], "cal_prob_Pre": [0.7, 0.2, 0.6, None]}, extra=["label"])
    result = build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "r", ReportOptions(group_by=[]))
    assert result["scoring"]["labelled_rows"] == 4 and result["scoring"]["unknown_label_rows"] == 1
    assert result["scoring"]["confusion"] == [[2, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert any("1 labelled ok row(s) left out" in n and "(Pro)" in n for n in result["notes"]), result["notes"]
    unknown = read_table(tmp_path / "r", "unknown_labels")
    assert unknown.to_dict("records") == [{"scoring_out": str((tmp_path / "b").resolve()), "label": "Pro", "rows": 1}]
    assert read_table(tmp_path / "r", "labelled_metrics").iloc[0]["accuracy"] == 1.0
    labelled = tables.labelled_rows(tables.open_scoring(collect_inputs([tmp_path / "a", tmp_path / "b"]).scorings))
    rows = labelled.rows.set_index("label")
    assert sorted(labelled.rows["y"]) == [0, 0, 1, 2] and not labelled.rows.isna().any().any()
    assert rows.loc["Pre", ["prob_Pro", "cal_prob_Pro"]].tolist() == [0, 0], "the second model has no Pro"
    assert rows.loc["Pro", "cal_prob_Pro"] == pytest.approx(0.7)
    only_b = build_report([tmp_path / "b"], tmp_path / "rb", ReportOptions(group_by=[]))
    assert (only_b["scoring"]["labelled_rows"], only_b["scoring"]["unknown_label_rows"]) == (2, 1)
    hand_rows(tmp_path / "c", two, {"path": ["c1"], "status": ["ok"], "label": ["Pro"], "predicted_class": ["Pre"],
                                    "confidence": [0.6], "prob_Benign": [0.4], "prob_Pre": [0.6],
                                    "cal_prob_Benign": [0.4], "cal_prob_Pre": [0.6]}, extra=["label"])
    notes = build_report([tmp_path / "c"], tmp_path / "rc", ReportOptions(group_by=[]))["notes"]
    assert any(n.startswith("no labelled row has a label its model knows") for n in notes), notes


def test_labelled_rows_of_a_whole_manifest_are_measured_per_split_and_the_figures_on_test(tmp_path):
    """Scoring the whole manifest (the quick start's way) put train and val images, which chose the
    model and fitted its temperature, into one accuracy: the test figure hid under an optimistic one."""
    classes = ["Benign", "Pre"]
    right, wrong = [0.9, 0.1], [0.2, 0.8]            # prob_Benign, prob_Pre of a Benign image
    probs = [right, right, right, right, wrong, right]   # train x2, val x2 right; test: 1 wrong of 2
    hand_rows(tmp_path / "job", classes, {
        "path": list("abcdef"), "status": ["ok"] * 6, "label": ["Benign"] * 6,
        "split": ["train", "train", "val", "val", "test", "test"],
        "predicted_class": ["Pre" if p == wrong else "Benign" for p in probs], "confidence": [max(p) for p in probs],
        **{f"{kind}prob_{c}": [p[k] for p in probs] for kind in ("", "cal_") for k, c in enumerate(classes)}},
        extra=["label", "split"])
    result = build_report([tmp_path / "job"], tmp_path / "r", ReportOptions(group_by=[]))
    summary = read_table(tmp_path / "r", "labelled_metrics").set_index("split")
    assert list(summary.index) == ["test", "val", "train", "all"]
    assert summary.loc["test", "accuracy"] == 0.5 and summary.loc["train", "accuracy"] == 1.0
    assert summary.loc["all", "n"] == 6 and summary.loc["all", "accuracy"] == pytest.approx(5 / 6)
    assert result["scoring"]["confusion"] == [[1, 1], [0, 0]], "the figures show the test split"
    assert result["scoring"]["confusion_split"] == "test" and result["scoring"]["labelled_rows"] == 6
    assert read_table(tmp_path / "r", "per_class").set_index("class").loc["Benign", "support"] == 2
    shutil.rmtree(tmp_path / "job")
    hand_rows(tmp_path / "job", classes, {"path": ["a"], "status": ["ok"], "label": ["Benign"], "split": ["val"],
                                          "predicted_class": ["Benign"], "confidence": [0.9], "prob_Benign": [0.9],
                                          "prob_Pre": [0.1], "cal_prob_Benign": [0.9], "cal_prob_Pre": [0.1]},
              extra=["label", "split"])
    notes = build_report([tmp_path / "job"], tmp_path / "r2", ReportOptions(group_by=[]))["notes"]
    assert any(n.startswith("no test-split row among the labelled rows") for n in notes), notes


def test_an_image_whose_overlay_fails_twice_is_one_image_in_the_note(tmp_path):
    """Each image is on the morning list and in the gallery, so its overlay is tried twice; the note
    counts images."""
    hand_rows(tmp_path / "out", ["Benign", "Pre"], {
        "path": [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")], "status": ["ok", "ok"], "duplicate_of": ["", ""],
        "predicted_class": ["Pre", "Pre"], "confidence": [0.9, 0.8], "sha256": ["0" * 64, "1" * 64],
        "heatmap_gradcam": ["heatmaps/gone-a.png", "heatmaps/gone-b.png"]}, methods=["gradcam"])
    result = build_report([tmp_path / "out"], tmp_path / "r", ReportOptions(group_by=[], gallery_per_class=2))
    morning = pd.read_csv(tmp_path / "r" / "morning_list.csv")
    assert len(morning) == 2, "both images are tried for the morning list and for the gallery"
    notes = [n for n in result["notes"] if n.startswith("no overlay")]
    assert len(notes) == 1 and notes[0].startswith("no overlay for 2 image(s)"), notes
    assert "/heatmaps/gone-" in notes[0], "the note names a map it could not read"


def test_jobs_with_other_explain_methods_each_show_their_own_maps(real_data_dir, tmp_path):
    """Two nights scored with different `explain.methods` (LIME only; then HiResCAM, LIME on a budget):
    the morning list and the gallery show each row's first map in its own job's method order, named by
    `heatmap_method`, whatever the order of the report's inputs (not only the first job's methods, nor
    the first job's order: job b's row has a LIME map too, but HiResCAM is b's first method)."""
    from allcluster.score.heatmaps import encode_maps, write_pack
    from allcluster.score.rows import method_columns

    image_a, image_b = sorted((real_data_dir / "Pre").glob("*.jpg"))[:2]
    png = encode_maps(np.full((1, 32, 32), 200, np.uint8))[0][0]
    for job, methods, image, sha in (("a", ["lime"], image_a, "a" * 64), ("b", ["hirescam", "lime"], image_b, "b" * 64)):
        write_pack(tmp_path / job / "heatmaps" / "part-0.parquet",
                   pa.table({"sha256": [sha] * len(methods), "method": methods, "png": [png] * len(methods),
                             "overlay_jpg": [None] * len(methods)}, schema=pa.schema(PACK_COLUMNS)))
        hand_rows(tmp_path / job, ["Benign", "Pre"], {
            "path": [str(image)], "status": ["ok"], "duplicate_of": [""], "predicted_class": ["Pre"],
            "confidence": [0.9], "sha256": [sha], **{method_columns(m)["heatmap"]: ["heatmaps/part-0.parquet"]
                                                     for m in methods}}, methods=methods)
    for order in ([tmp_path / "a", tmp_path / "b"], [tmp_path / "b", tmp_path / "a"]):
        result = build_report(order, tmp_path / "r", ReportOptions(group_by=[], gallery_per_class=1))
        morning = pd.read_csv(tmp_path / "r" / "morning_list.csv").set_index("path")
        assert morning.loc[str(image_b), "heatmap"] == str((tmp_path / "b" / "heatmaps" / "part-0.parquet").resolve())
        assert morning["heatmap_method"].to_dict() == {str(image_a): "lime", str(image_b): "hirescam"}, order
        gallery = pd.read_csv(tmp_path / "r" / "gallery" / "gallery.csv")
        assert sorted(gallery["heatmap_method"]) == ["hirescam", "lime"] and gallery["image"].notna().all()
        assert all((tmp_path / "r" / image).is_file() for image in gallery["image"])
        assert not [n for n in result["notes"] if n.startswith("no overlay")], result["notes"]
        page = (tmp_path / "r" / "index.html").read_text()
        assert "Heatmap gallery (" in page and "(hirescam)</figcaption>" in page, "captions name each map's method"


def _job_with_maps(tmp_path: Path, images: list[Path]) -> Path:
    """A scoring output of ``images``, all predicted Pre (malignant: on the morning list), each with a
    packed Grad-CAM map."""
    from allcluster.score.heatmaps import encode_maps, write_pack

    shas = [f"{i:064x}" for i in range(len(images))]
    pngs = encode_maps(np.full((len(images), 32, 32), 200, np.uint8))[0]
    write_pack(tmp_path / "job" / "heatmaps" / "part-0.parquet",
               pa.table({"sha256": shas, "method": ["gradcam"] * len(images), "png": pngs,
                         "overlay_jpg": [None] * len(images)}, schema=pa.schema(PACK_COLUMNS)))
    return hand_rows(tmp_path / "job", ["Benign", "Pre"], {
        "path": [str(p) for p in images], "status": ["ok"] * len(images), "duplicate_of": [""] * len(images),
        "predicted_class": ["Pre"] * len(images), "confidence": [0.9] * len(images), "sha256": shas,
        "heatmap_gradcam": ["heatmaps/part-0.parquet"] * len(images)}, methods=["gradcam"])


def test_a_report_meeting_a_full_disk_ends_with_74_naming_the_file_and_leaves_no_empty_file(real_data_dir, tmp_path,
                                                                                            capsys):
    """A full disk while writing the overlays was taken for "image or heatmap not readable" (a note and
    the overlays gone); a CSV written in place named no file ("writing") and left an empty one."""
    job = _job_with_maps(tmp_path, sorted((real_data_dir / "Pre").glob("*.jpg"))[:30])
    with tmpfs(tmp_path / "small", "size=48k") as mount:
        assert main(["report", str(job), "--out", str(mount / "r")]) == 74
        err = capsys.readouterr().err
        assert f"error: {mount / 'r'}/" in err and "No space left on device" in err, err
        left = [p for p in (mount / "r").rglob("*") if p.is_file() and p.name != ".lock"]
        assert not [p for p in left if not p.stat().st_size], "no empty file left behind"
        assert not (mount / "r" / "report.json").exists(), "not a finished report"


def test_an_earlier_reports_folder_this_user_cannot_replace_is_refused_before_anything_is_removed(tmp_path, capsys):
    hand_rows(tmp_path / "job", ["Benign", "Pre"], {"path": ["a"], "status": ["ok"], "predicted_class": ["Pre"],
                                                    "confidence": [0.9]})
    assert main(["report", str(tmp_path / "job"), "--out", str(tmp_path / "r")]) == 0
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    shutil.rmtree(tmp_path / "r" / "tables")
    with tmpfs(tmp_path / "r" / "tables", "ro,size=64k"):          # a read-only mount where tables/ goes
        assert main(["report", str(tmp_path / "job"), "--out", str(tmp_path / "r")]) == 2
        assert f"{tmp_path / 'r' / 'tables'}: cannot write into this folder" in capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before, "the earlier report stays whole"


def test_a_retried_files_old_row_is_not_counted_until_compaction_and_other_jobs_rows_stay(tmp_path):
    def write(out: Path, run: str, rows: list[tuple]) -> None:
        keys = ["path", "status", "error_type", "predicted_class", "confidence"]
        table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(keys)}).append_column("run_id", pa.array([run] * len(rows)))
        (out / "rows").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "rows" / f"part-{run}.parquet")

    write(tmp_path / "job", "r1", [("a", "ok", "", "Pre", 0.9), ("b", "error", "unreadable", None, None)])
    write(tmp_path / "job", "r2", [("b", "ok", "", "Pre", 0.8)])       # the retry, killed before it compacted
    write(tmp_path / "other", "r0", [("b", "error", "unreadable", None, None)])   # another job's row for b
    data = tables.open_scoring(collect_inputs([tmp_path / "job", tmp_path / "other"]).scorings)
    counts = tables.aggregate(data, ["predicted_class", "error_type"], ["Pre"])
    overview = tables.overview(counts["predicted_class"], morning_rows=0).iloc[0]
    assert (overview["rows"], overview["ok"], overview["errors"]) == (3, 2, 1)
    assert tables.errors_by_type(counts["error_type"]).to_dict("records") == [{"error_type": "unreadable", "errors": 1}]


def four_column_rows(folder: Path) -> Path:
    """A scoring output of someone else's tool: two rows with only the four required columns."""
    (folder / "rows").mkdir(parents=True)
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "status": ["ok", "ok"], "predicted_class": ["Pre", "Benign"],
                             "confidence": [0.9, 0.6]}), folder / "rows" / "part-0.parquet")
    return folder


def test_grouping_by_a_column_named_like_a_counter_is_refused_before_anything_is_written(tmp_path):
    """``--group-by uncertain`` (a real row column) made the roll-up's key and its counter one pandas
    label: a ValueError traceback ("not unique") after half the report was written."""
    rows = four_column_rows(tmp_path / "mine")
    pq.write_table(pq.read_table(rows / "rows" / "part-0.parquet").append_column("uncertain", pa.array([True, False])),
                   rows / "rows" / "part-0.parquet")
    with pytest.raises(ConfigError, match="--group-by uncertain: a roll-up table counts this itself"):
        build_report([rows], tmp_path / "r", ReportOptions(group_by=["uncertain"]))
    assert not (tmp_path / "r").exists()


def test_rows_with_only_the_four_required_columns_report_and_a_rerun_leaves_no_stale_file(tmp_path):
    rows = four_column_rows(tmp_path / "mine")
    report = tmp_path / "r"
    (report / "morning").mkdir(parents=True)
    for name in ("report.json", "morning_list.csv", "index.html"):     # an earlier report's files
        (report / name).write_text("old")
    result = build_report([rows], report, ReportOptions(group_by=[]))   # no classes known: none malignant
    assert result["scoring"]["rows"] == 2 and result["scoring"]["uncertain"] == 0
    assert (report / "morning_list.csv").read_text() != "old" and not len(pd.read_csv(report / "morning_list.csv"))
    (report / "morning_list.csv").write_text("old")
    from allcluster.report.build import writing_out

    with writing_out(report):
        assert not (report / "morning_list.csv").exists(), "an earlier report's file stays for the new one"
        assert not (report / "report.json").exists(), "an unfinished report looks finished"
        assert (report / "report.yaml").is_file()


def test_a_damaged_row_shard_is_left_out_and_named_while_the_others_report(tmp_path):
    """A zero-byte or torn shard (a copy cut short) is what a scoring run sets aside and rescores; the
    report used to die on it with pyarrow's traceback. Its rows are left out and a note names it."""
    job = four_column_rows(tmp_path / "job")
    good = (job / "rows" / "part-0.parquet").read_bytes()
    (job / "rows" / "part-1.parquet").write_bytes(b"")
    (job / "rows" / "part-2.parquet").write_bytes(good[: len(good) // 2])
    result = build_report([job], tmp_path / "r", ReportOptions(group_by=[]))
    assert result["scoring"]["rows"] == 2 and "2 damaged, left out" in result["inputs"][0]["read"]
    assert any("2 row shard(s) left out" in n and "part-1.parquet" in n for n in result["notes"])
    (job / "rows" / "part-0.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match="none of its 3 row shard"):
        build_report([job], tmp_path / "r2", ReportOptions(group_by=[]))
    assert not (tmp_path / "r2").exists()


def test_a_folder_of_row_files_holding_another_parquet_is_refused_naming_it(tmp_path):
    """A manifest beside exported rows was counted as rows of status null (or the folder refused,
    by name order): every file is classified, and the odd one named."""
    rows = four_column_rows(tmp_path / "job") / "rows"
    shutil.copytree(rows, tmp_path / "mine")
    pq.write_table(pa.table({"path": ["a.jpg"], "label": ["Pre"], "split": ["test"]}), tmp_path / "mine" / "z-manifest.parquet")
    with pytest.raises(ConfigError, match="z-manifest.parquet, which is no rows file"):
        collect_inputs([tmp_path / "mine"])
    (tmp_path / "mine" / "z-manifest.parquet").unlink()
    (tmp_path / "mine" / "a-torn.parquet").write_bytes(b"PAR1 cut short")      # sorts first: a torn row file
    found = collect_inputs([tmp_path / "mine"]).scorings[0]
    assert found.files == [(tmp_path / "mine" / "part-0.parquet").resolve()]
    assert found.damaged == [(tmp_path / "mine" / "a-torn.parquet").resolve()], "left out and named, as in OUT/rows"
    assert collect_inputs([rows]).scorings[0].root == (tmp_path / "job").resolve(), "OUT/rows keeps OUT as its root"


def test_flagged_rows_without_sha256_make_a_morning_list_and_missing_labels_no_nan_caption(tmp_path):
    from allcluster.report.html import gallery_html

    rows = four_column_rows(tmp_path / "mine")
    pq.write_table(pq.read_table(rows / "rows" / "part-0.parquet").append_column("uncertain", pa.array([True, False])),
                   rows / "rows" / "part-0.parquet")
    result = build_report([rows], tmp_path / "r", ReportOptions(group_by=[]))
    morning = pd.read_csv(tmp_path / "r" / "morning_list.csv")
    assert result["scoring"]["uncertain"] == 1 and morning["path"].tolist() == ["a.jpg"]
    items = pd.DataFrame({"predicted_class": ["Pre", "Pre"], "kind": ["most confident"] * 2, "image": ["a.png", "b.png"],
                          "confidence": [0.9, 0.8], "path": ["a.jpg", "b.jpg"],
                          "label": pd.array(["Pre", None], dtype="string")})
    page = gallery_html(items)
    assert "true Pre" in page and "nan" not in page and "<NA>" not in page


def test_labelled_rows_that_are_all_errors_are_said_so(tmp_path):
    job = hand_rows(tmp_path / "job", ["Benign", "Pre"], {"path": ["a", "b"], "status": ["error", "error"],
                                                           "error_type": ["truncated"] * 2, "label": ["Pre", "Benign"]},
                    extra=["label"])
    notes = build_report([job], tmp_path / "r", ReportOptions(group_by=[]))["notes"]
    assert any("2 labelled rows, none of them ok" in n for n in notes), notes
    rows = four_column_rows(tmp_path / "mine")                 # ok and labelled, but no probabilities
    pq.write_table(pq.read_table(rows / "rows" / "part-0.parquet").append_column("label", pa.array(["Pre", "Pre"])),
                   rows / "rows" / "part-0.parquet")
    notes = build_report([rows], tmp_path / "r2", ReportOptions(group_by=[]))["notes"]
    assert any("2 labelled ok rows, but without the probability columns" in n for n in notes), notes


def test_a_scoring_job_that_is_unfinished_is_said_so_above_its_counts_and_one_with_no_rows_reports_zeros(tmp_path):
    """The morning after, a job killed (rows still in its journal), interrupted or still running must
    not read as complete; an output with no row at all (all compacted away) reports zeros."""
    from allcluster.score.output import lock_output

    def unfinished_notes(out: Path) -> list[str]:
        shutil.rmtree(tmp_path / "r", ignore_errors=True)
        return [n for n in build_report([out], tmp_path / "r", ReportOptions(group_by=[]))["notes"] if "unfinished" in n]

    job = four_column_rows(tmp_path / "job")
    assert unfinished_notes(job) == [], "rows some other tool wrote: nothing says they are unfinished"
    (job / "job.json").write_text("{}")
    assert "no run into it has finished" in unfinished_notes(job)[0]
    (job / "summary.json").write_text(json.dumps({"rows": 2, "interrupted": "SIGTERM"}))
    assert "its last run was interrupted by SIGTERM" in unfinished_notes(job)[0]
    (job / "rows" / ".journal-0-of-1").mkdir()
    (job / "rows" / ".journal-0-of-1" / "part-r-00001.rows.arrows").write_bytes(b"rows held")
    assert "wait in its journal" in unfinished_notes(job)[0]
    held = lock_output(job)
    try:
        assert "a run is writing it now" in unfinished_notes(job)[0]
    finally:
        for lock in held:
            lock.release()
    shutil.rmtree(job / "rows" / ".journal-0-of-1")
    (job / "summary.json").write_text(json.dumps({"rows": 2}))
    assert unfinished_notes(job) == []

    # an array job: the part that ends last writes summary.json, and must not hide another's interruption
    from allcluster.score.inputs import Shard
    from allcluster.score.output import mark_run_started, write_summary

    mark_run_started(job, Shard())                          # a run killed on its way (SIGKILL, a full disk)
    assert "its last run (started 20" in unfinished_notes(job)[0] and "ended without finishing" in unfinished_notes(job)[0]
    write_summary(job, Shard(), {"rows": 2, "run_rows": 0})
    assert unfinished_notes(job) == []
    (job / "summary.json").unlink()
    write_summary(job, Shard(0, 3), {"rows": 1, "run_rows": 1, "interrupted": "SIGTERM"})
    write_summary(job, Shard(2, 3), {"rows": 2, "run_rows": 1})
    assert "the last run of part 0/3 of its array job was interrupted (by SIGTERM)" in unfinished_notes(job)[0]
    write_summary(job, Shard(0, 3), {"rows": 2, "run_rows": 0})           # part 0 rerun, to its end
    assert "part 1/3 of its array job has no finished run recorded" in unfinished_notes(job)[0]
    mark_run_started(job, Shard(1, 3))
    assert "the last run of part 1/3 of its array job ended without finishing" in unfinished_notes(job)[0]
    write_summary(job, Shard(1, 3), {"rows": 2, "run_rows": 0})
    assert unfinished_notes(job) == []
    assert list(json.loads((job / "summary.json").read_text())["parts"]) == ["0-of-3", "1-of-3", "2-of-3"]
    write_summary(job, Shard(1, 2), {"rows": 2, "run_rows": 0})           # another split starts afresh
    assert "part 0/2 of its array job has no finished run recorded" in unfinished_notes(job)[0]
    write_summary(job, Shard(), {"rows": 2, "run_rows": 0})               # a whole run covers every part
    assert unfinished_notes(job) == [] and "parts" not in json.loads((job / "summary.json").read_text())

    only_journal = tmp_path / "killed-early"          # SIGKILL before the first shard: no rows/*.parquet
    (only_journal / "rows" / ".journal-0-of-1").mkdir(parents=True)
    (only_journal / "rows" / ".journal-0-of-1" / "part-r-00000.rows.arrows").write_bytes(b"rows held")
    with pytest.raises(ConfigError, match=r"killed-early: a scoring output with no row shard in rows/ yet \(a "
                                          r"killed run's last rows wait in its journal.*rerun its `allcluster score`"):
        build_report([only_journal], tmp_path / "r1", ReportOptions(group_by=[]))
    assert not (tmp_path / "r1").exists() and sorted(p.name for p in only_journal.rglob("*")) == [
        ".journal-0-of-1", "part-r-00000.rows.arrows", "rows"], "the report writes nothing into the output"

    empty = tmp_path / "empty" / "rows"
    empty.mkdir(parents=True)
    pq.write_table(pq.read_table(job / "rows" / "part-0.parquet").slice(0, 0), empty / "part-0.parquet")
    result = build_report([empty.parent], tmp_path / "r0", ReportOptions(group_by=[]))
    assert result["scoring"]["rows"] == 0 and result["scoring"]["ok"] == 0
    assert (tmp_path / "r0" / "tables" / "errors_by_type.csv").read_text().split() == ["error_type,errors"], \
        "a table the README lists is written also when it has no row"


def test_a_report_is_one_writers_and_a_killed_one_is_rebuilt_by_its_rerun(tmp_path):
    """A real SIGKILL of a report paused after its first table (the pause is injected), as Slurm's time
    limit would leave it: while it runs a second report into its folder is refused naming it and
    removes nothing; after the kill the folder is an unfinished report, which the rerun rebuilds."""
    rows, out = four_column_rows(tmp_path / "mine"), tmp_path / "r"
    paused = f"""
import time
from allcluster.report import build
first_table = build.Report.table
def table_then_pause(self, *args, **kwargs):
    parts = first_table(self, *args, **kwargs)
    print("PAUSED", flush=True)
    time.sleep(600)
build.Report.table = table_then_pause
build.build_report([{str(rows)!r}], {str(out)!r}, build.ReportOptions(group_by=[]))
"""
    run = subprocess.Popen([sys.executable, "-c", paused], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert run.stdout.readline().strip() == "PAUSED"
        with pytest.raises(ConfigError, match=f"report folder {out} is in use by another run \\(host .*, pid {run.pid}"):
            build_report([rows], out, ReportOptions(group_by=[]))
        assert (out / "tables" / "overview.csv").is_file(), "the refused report removed the running one's table"
    finally:
        run.kill()
        run.wait()
    assert (out / "report.yaml").is_file() and not (out / "report.json").exists()
    result = build_report([rows], out, ReportOptions(group_by=[]))
    assert json.loads((out / "report.json").read_text())["scoring"] == result["scoring"]
    assert result["scoring"]["rows"] == 2 and "Overview" in (out / "index.html").read_text()


def test_an_overlay_opens_an_odd_file_name_from_its_table_path(tmp_path):
    import os

    from allcluster.data.paths import to_text
    from allcluster.report import plots

    image = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    for name in (b"caf\xe9.jpg", b"back\\slash.jpg"):        # Latin-1 bytes; a backslash
        path = os.path.join(os.fsencode(tmp_path), name)
        Image.fromarray(image).save(path.decode("utf-8", "surrogateescape"), format="JPEG")
        row_path = to_text(os.fsdecode(path))
        assert row_path != os.fsdecode(path), "the table form differs from the file-system name"
        out = plots.overlay(row_path, np.full((32, 32), 128, np.uint8), tmp_path / f"{len(name)}.jpg")
        assert Image.open(out).size == (32, 32)


def test_markdown_and_html_tables_escape_their_cells():
    from allcluster.report import html

    df = pd.DataFrame({"name": ["a|b", "<script>x</script>"], "value": [0.123456, float("nan")], "n": [3, 4]})
    assert html.markdown_table(df).splitlines() == ["| name | value | n |", "|---|---|---|", "| a\\|b | 0.1235 | 3 |",
                                                    "| <script>x</script> |  | 4 |"]
    fragment = html.table_html(df, "t")
    assert "<script>" not in fragment and "&lt;script&gt;" in fragment and DomSummary.of(fragment).tables == {"t": 2}


def test_roc_points_equal_scikit_learns():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    positive = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + positive * 0.3, 2)          # rounded: ties
    fpr, tpr, _ = roc_curve(positive, scores, drop_intermediate=False)
    ours = tables.roc_curve(positive, scores)
    np.testing.assert_allclose(ours[0], fpr)
    np.testing.assert_allclose(ours[1], tpr)


# ---- the real runs -----------------------------------------------------------------------------------------
def scoring_manifest(real_manifest: Path, base: Path) -> Path:
    """Test-split images (PER_CLASS per class) plus a byte-identical copy, a truncated file and a
    missing one, with labels: the rows get duplicates, two error types and a label column."""
    manifest = pd.read_parquet(real_manifest)
    picked = manifest[manifest["split"] == "test"].groupby("label").head(PER_CLASS)
    extra = base / "extra"
    extra.mkdir()
    first = Path(picked.iloc[0]["path"])
    shutil.copy(first, extra / "copy.jpg")
    (extra / "cut.jpg").write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    added = pd.DataFrame({"path": [str(extra / n) for n in ("copy.jpg", "cut.jpg", "gone.jpg")],
                          "label": [picked.iloc[0]["label"], "Pre", "Pro"], "patient": "", "split": "test"})
    out = base / "score-input.parquet"
    pd.concat([picked[["path", "label", "patient", "split"]], added], ignore_index=True).to_parquet(out)
    return out


@pytest.fixture(scope="module")
def runs(ray_local, real_sweep, real_manifest, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("report")
    experiment, scored, report = real_sweep["experiment"], base / "scored", base / "report"
    assert main(["score", "--config", str(CI_TINY_SCORE), "--model", str(experiment / "best_model"),
                 "--input", str(scoring_manifest(real_manifest, base)), "--out", str(scored),
                 "--set", "explain.budget.max_images=2"]) == 0
    assert ray_local.is_initialized()      # a score command leaves only a Ray it connected to itself
    assert main(["report", str(experiment), str(scored), "--out", str(report), "--group-by", "folder",
                 "--group-by", "label", "--gallery-per-class", str(GALLERY), "--curves", "1",
                 "--morning-rows", str(MORNING_ROWS)]) == 0
    return {"base": base, "experiment": experiment, "scored": scored, "report": report,
            "trials": pd.read_parquet(experiment / "trials.parquet"), "rows": pd.read_parquet(scored / "rows"),
            "result": json.loads((report / "report.json").read_text())}


def read_table(report: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(report / "tables" / f"{name}.csv", keep_default_na=False, na_values=[""])


def table(runs: dict, name: str) -> pd.DataFrame:
    return read_table(runs["report"], name)


def best_of(trials: pd.DataFrame, **cell) -> pd.Series:
    """The validation-best finished trial of a cell, computed here independently of the report."""
    mask = trials["status"] == "finished"
    for key, value in cell.items():
        mask &= trials[key] == value
    return trials[mask].sort_values(["val_macro_f1", "val_loss", "trial_id"], ascending=[False, True, True]).iloc[0]


# ---- sweep tables ----------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_leaderboard_rows_are_the_validation_best_trial_of_each_cell(runs):
    trials, board = runs["trials"], table(runs, "leaderboard")
    finished = trials[trials["status"] == "finished"]
    assert len(finished) == 2
    assert len(board) == finished.groupby(["backbone", "augmentation", "optimizer"]).ngroups
    for row in board.itertuples(index=False):
        best = best_of(trials, backbone=row.backbone, augmentation=row.augmentation, optimizer=row.optimizer)
        assert row.trial_id == best["trial_id"]
        for column in ("train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss", "test_loss",
                       "train_macro_f1", "val_macro_f1", "test_macro_f1", "test_auc", "test_macro_specificity", "test_ece",
                       "wall_seconds", "gpu_hours"):
            assert getattr(row, column) == pytest.approx(best[column], rel=1e-12, abs=1e-15), column
    assert board["val_macro_f1"].is_monotonic_decreasing
    card = json.loads((runs["experiment"] / "best_model" / "model_card.json").read_text())
    assert board.iloc[0]["trial_id"] == card["sweep"]["trial_id"], "the top row is the sweep's exported best model"


@pytest.mark.ray
@pytest.mark.slow
def test_pivots_and_best_per_backbone_show_the_validation_best_trial_of_each_cell(runs):
    trials = runs["trials"]
    for across in ("augmentation", "optimizer"):
        pivot = table(runs, f"pivot_backbone_x_{across}").set_index("backbone")
        cells = trials[trials["status"] == "finished"].groupby(["backbone", across]).size()
        assert pivot.notna().to_numpy().sum() == len(cells)
        for (backbone, value), _ in cells.items():
            expected = best_of(trials, backbone=backbone, **{across: value})["test_macro_f1"]
            assert pivot.loc[backbone, str(value)] == pytest.approx(expected, rel=1e-12)
    per_backbone = table(runs, "best_per_backbone").set_index("backbone")
    assert sorted(per_backbone.index) == ["allnet", "test_efficientnet"]
    for backbone, row in per_backbone.iterrows():
        assert row["trial_id"] == best_of(trials, backbone=backbone)["trial_id"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_cell_with_several_trials_shows_the_validation_best_not_the_test_best(runs):
    trials = runs["trials"]
    top = best_of(trials)
    worse_on_val = top.copy()
    worse_on_val[["trial_id", "val_macro_f1", "test_macro_f1"]] = ["z-worse-val", top["val_macro_f1"] - 0.01, 1.0]
    board = tables.leaderboard(pd.concat([trials, worse_on_val.to_frame().T], ignore_index=True))
    row = board[board["trial_id"].isin([top["trial_id"], "z-worse-val"])]
    assert row["trial_id"].tolist() == [top["trial_id"]] and int(row["trials"].iloc[0]) == 2
    better_on_val = worse_on_val.copy()
    better_on_val[["trial_id", "val_macro_f1"]] = ["a-better-val", top["val_macro_f1"] + 0.01]
    board = tables.leaderboard(pd.concat([trials, better_on_val.to_frame().T], ignore_index=True))
    assert board.iloc[0]["trial_id"] == "a-better-val"


# ---- scoring tables --------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_counts_errors_and_rollups_equal_counts_over_the_rows(runs):
    rows = runs["rows"]
    ok = rows[rows["status"] == "ok"]
    assert len(rows) == 4 * PER_CLASS + 3
    counts = table(runs, "class_counts").set_index("predicted_class")
    assert counts["images"].to_dict() == ok["predicted_class"].value_counts().to_dict()
    assert counts["uncertain"].to_dict() == ok.groupby("predicted_class")["uncertain"].sum().to_dict()
    assert np.allclose(counts["confidence_mean"], ok.groupby("predicted_class")["confidence"].mean()[counts.index])
    overview = table(runs, "overview").iloc[0]
    assert overview["rows"] == len(rows) and overview["ok"] == len(ok) and overview["errors"] == 2
    assert overview["uncertain"] == ok["uncertain"].sum() and overview["duplicates"] >= 1
    assert overview["duplicates"] == (rows["duplicate_of"] != "").sum()
    errors = table(runs, "errors_by_type").set_index("error_type")["errors"].to_dict()
    assert errors == rows.loc[rows["status"] == "error", "error_type"].value_counts().to_dict()
    assert set(errors) == {"truncated", "unreadable"}
    quality = table(runs, "explanation_quality").set_index("method").loc["gradcam"]
    first_copies = rows[rows["duplicate_of"] == ""]          # a duplicate carries its first copy's map
    assert quality["maps"] == first_copies["heatmap_gradcam"].notna().sum() < rows["heatmap_gradcam"].notna().sum()
    assert quality["on_cell_mean"] == pytest.approx(first_copies["on_cell_gradcam"].mean(), abs=1e-4)
    for key in ("folder", "label"):
        rollup = table(runs, f"rollup_{key}").set_index(key)
        assert rollup["rows"].to_dict() == rows[key].value_counts().to_dict()
        assert rollup["errors"].to_dict() == (rows["status"] == "error").groupby(rows[key]).sum().to_dict()
        for name in CLASSES:
            expected = (ok["predicted_class"] == name).groupby(ok[key]).sum().reindex(rollup.index, fill_value=0)
            assert rollup[tables.class_count_column(name)].tolist() == expected.tolist(), (key, name)


@pytest.mark.ray
@pytest.mark.slow
def test_morning_list_is_exactly_the_flagged_rows_in_priority_order(runs):
    rows = runs["rows"]
    ok = rows[rows["status"] == "ok"]
    flagged = ok[ok["uncertain"] | ok["predicted_class"].isin(MALIGNANT)]
    morning = pd.read_csv(runs["report"] / "morning_list.csv", keep_default_na=False)
    assert len(morning) == len(flagged) and sorted(morning["path"]) == sorted(flagged["path"])
    assert morning["priority"].tolist() == list(range(1, len(morning) + 1))
    check_priority_order(morning, rows.set_index("path"), MALIGNANT)
    assert all(load_heatmap(p, sha, "gradcam").ndim == 2 for p, sha in zip(morning["heatmap"], morning["sha256"])), \
        "heatmap links must point at the job's maps"


def check_priority_order(morning: pd.DataFrame, rows: pd.DataFrame, malignant: list[str]) -> None:
    """Tiers 1 (malignant and uncertain), 2 (malignant), 3 (uncertain) in order; inside a tier the
    calibrated malignant probability (recomputed from the rows) never increases."""
    source = rows.loc[morning["path"]]
    is_malignant = source["predicted_class"].isin(malignant).to_numpy()
    uncertain = source["uncertain"].astype(bool).to_numpy()
    tier = np.where(is_malignant & uncertain, 1, np.where(is_malignant, 2, 3))
    assert (np.diff(tier) >= 0).all(), tier
    probability = source[[f"cal_prob_{c}" for c in malignant]].sum(axis=1).to_numpy()
    assert np.allclose(morning["malignant_probability"], probability, atol=1e-6)
    for t in (1, 2, 3):
        assert (np.diff(probability[tier == t]) <= 1e-7).all()
    assert morning["reason"].tolist() == [tables.TIERS[t] for t in tier]


@pytest.mark.ray
@pytest.mark.slow
def test_every_priority_tier_on_the_real_rows_with_other_flags(runs, tmp_path):
    """The real rows with other flags, so that all three tiers occur: ``uncertain`` redrawn (below the
    median confidence), every ok row predicted as its label, and only Pre malignant."""
    rows = pq.read_table(runs["scored"] / "rows")
    confidence = rows["confidence"].to_numpy(zero_copy_only=False)
    ok = pc.equal(rows["status"], "ok")
    changes = {"uncertain": pa.array(confidence < np.nanmedian(confidence)),
               "predicted_class": pc.if_else(ok, rows["label"], rows["predicted_class"])}
    for name, column in changes.items():
        rows = rows.set_column(rows.schema.get_field_index(name), name, column)
    (tmp_path / "rows").mkdir()
    pq.write_table(rows, tmp_path / "rows" / "part-0.parquet")
    data = tables.open_scoring(collect_inputs([tmp_path]).scorings)
    morning = tables.morning_list(data, ["Pre"]).to_pandas()
    df = rows.to_pandas()
    assert data.classes == CLASSES and data.heatmap_columns[0] == "heatmap_gradcam"
    expected = df[(df["status"] == "ok") & (df["uncertain"] | (df["predicted_class"] == "Pre"))]
    assert sorted(morning["path"]) == sorted(expected["path"])
    assert set(morning["reason"]) == set(tables.TIERS.values()), morning["reason"].value_counts()
    check_priority_order(morning, df.set_index("path"), ["Pre"])


# ---- labelled rows, plots, gallery -----------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_confusion_matrix_and_metrics_equal_the_labelled_rows(runs):
    from sklearn.metrics import f1_score

    rows = runs["rows"]
    labelled = rows[(rows["status"] == "ok") & (rows["label"] != "")]
    confusion = np.asarray(runs["result"]["scoring"]["confusion"])
    expected = pd.crosstab(labelled["label"], labelled["predicted_class"]).reindex(
        index=CLASSES, columns=CLASSES, fill_value=0)
    assert confusion.sum() == len(labelled) == runs["result"]["scoring"]["labelled_rows"]
    assert (confusion == expected.to_numpy()).all()
    found = table(runs, "labelled_metrics").iloc[0]
    assert found["n"] == len(labelled)
    assert found["accuracy"] == pytest.approx((labelled["label"] == labelled["predicted_class"]).mean())
    assert found["macro_f1"] == pytest.approx(f1_score(labelled["label"], labelled["predicted_class"],
                                                       labels=CLASSES, average="macro", zero_division=0))
    per_class = table(runs, "per_class").set_index("class")
    assert per_class["support"].to_dict() == labelled["label"].value_counts().reindex(CLASSES, fill_value=0).to_dict()


@pytest.mark.ray
@pytest.mark.slow
def test_plots_are_real_images(runs):
    plots = runs["report"] / "plots"
    names = {"confusion", "roc", "reliability", "f1_per_class", "metric_heatmap", "training_curves"}
    assert {p.stem for p in plots.glob("*.png")} == names
    for name in names:
        image = np.asarray(Image.open(plots / f"{name}.png").convert("RGB"))
        assert image.shape[0] > 200 and image.shape[1] > 200, name
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20, f"{name} looks blank"


@pytest.mark.ray
@pytest.mark.slow
def test_gallery_shows_the_most_confident_and_most_uncertain_rows_of_each_class(runs):
    rows = runs["rows"]
    own = rows[(rows["status"] == "ok") & (rows["duplicate_of"] == "")]
    gallery = pd.read_csv(runs["report"] / "gallery" / "gallery.csv", keep_default_na=False)
    assert set(gallery["predicted_class"]) == set(own["predicted_class"])
    for name, group in own.groupby("predicted_class"):
        ranked = group.sort_values(["confidence", "path"], ascending=[False, True])
        confident = ranked["path"].head(GALLERY).tolist()
        rest = ranked[~ranked["path"].isin(confident)].sort_values(["confidence", "path"])
        shown = gallery[gallery["predicted_class"] == name]
        assert shown.loc[shown["kind"] == "most confident", "path"].tolist() == confident
        assert shown.loc[shown["kind"] == "most uncertain", "path"].tolist() == rest["path"].head(GALLERY).tolist()
    check_overlay(runs, gallery.iloc[0])


def check_overlay(runs: dict, pick: pd.Series) -> None:
    """The overlay is the row's Grad-CAM map in jet at alpha 0.5 over the image resized to the map."""
    import matplotlib

    heat = load_heatmap(pick["heatmap"], pick["sha256"], "gradcam").astype(np.float64) / 255
    image = np.asarray(Image.open(pick["path"]).convert("RGB").resize(heat.shape[::-1], Image.BILINEAR), np.float64)
    expected = 0.5 * image + 0.5 * 255 * matplotlib.colormaps["jet"](heat)[..., :3]
    overlay = np.asarray(Image.open(runs["report"] / pick["image"]), dtype=np.float64)
    assert overlay.shape == expected.shape
    assert np.abs(overlay - expected).mean() < 8, "JPEG error only"
    assert np.abs(overlay - image).mean() > 2 * np.abs(overlay - expected).mean(), "the map must show"


# ---- files, inputs, errors -------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_every_table_is_written_as_csv_markdown_and_html(runs):
    for name, rel in runs["result"]["files"].items():
        if name.startswith("plot:") or not rel.startswith("tables/"):
            continue
        csv = pd.read_csv(runs["report"] / rel)
        markdown = (runs["report"] / rel).with_suffix(".md").read_text().splitlines()
        assert markdown[0].count("|") == len(csv.columns) + 1 and set(markdown[1]) <= {"|", "-"}
        assert len(markdown) == len(csv) + 2, name
        fragment = DomSummary.of((runs["report"] / rel).with_suffix(".html").read_text())
        assert list(fragment.tables.values()) == [len(csv)], name
    options = (runs["report"] / "report.yaml").read_text()
    assert "metric: test_macro_f1" in options and "- Early" in options and "- label" in options


@pytest.mark.ray
@pytest.mark.slow
def test_parquet_files_as_inputs_give_the_same_tables(runs, tmp_path):
    shards = sorted((runs["scored"] / "rows").glob("*.parquet"))
    found = collect_inputs([runs["experiment"] / "trials.parquet", runs["experiment"] / "epochs.parquet", *shards])
    from allcluster.report.inputs import EPOCHS_COLUMNS
    assert EPOCHS_COLUMNS <= set(pq.read_schema(runs["experiment"] / "epochs.parquet").names), "what a sweep writes"
    exp, scored = runs["experiment"].resolve(), runs["scored"].resolve()
    assert found.sweeps == [SweepSource(exp, exp / "trials.parquet", exp / "epochs.parquet")]
    assert [(s.root, s.files) for s in found.scorings] == [(scored, [p.resolve() for p in shards])]
    result = build_report([runs["experiment"] / "trials.parquet", *shards], tmp_path / "r",
                          ReportOptions(gallery_per_class=1, group_by=["label"]))
    for name in ("leaderboard", "class_counts", "rollup_label"):
        assert read_table(tmp_path / "r", name).equals(table(runs, name)), name
    assert result["scoring"]["confusion"] == runs["result"]["scoring"]["confusion"]


@pytest.mark.ray
@pytest.mark.slow
def test_rows_without_labels_or_heatmaps_skip_those_parts_and_say_so(runs, tmp_path):
    rows = pq.read_table(runs["scored"] / "rows")
    rows = rows.drop_columns(["label"])
    (tmp_path / "out" / "rows").mkdir(parents=True)
    pq.write_table(rows, tmp_path / "out" / "rows" / "part-0.parquet")      # no heatmaps/ folder next to it
    result = build_report([tmp_path / "out"], tmp_path / "r", ReportOptions(morning_rows=2))
    page = (tmp_path / "r" / "index.html").read_text()
    assert "no labelled rows" in page and not (tmp_path / "r" / "plots").exists()
    assert "Sweep" not in DomSummary.of(page).headings
    assert any("no overlay" in n for n in result["notes"]), result["notes"]
    assert result["scoring"]["rows"] == rows.num_rows


@pytest.mark.ray
@pytest.mark.slow
def test_bad_options_and_inputs_are_one_clear_error(runs, tmp_path, capsys):
    cases = [([str(runs["experiment"]), "--metric", "nope"], "--metric 'nope': not a numeric column"),
             ([str(runs["scored"]), "--group-by", "ward"], "--group-by ward: not a column of the scoring rows"),
             ([str(runs["scored"]), "--malignant", "Blast"], "--malignant Blast: not a class of the model; classes: Benign"),
             ([str(tmp_path / "missing")], "report input not found"),
             ([str(runs["base"] / "extra")], "not a sweep experiment folder"),
             ([str(runs["scored"]), "--curves", "0"], "--curves: value 0 is out of range; allowed: >= 1")]
    for args, message in cases:
        assert main(["report", *args, "--out", str(tmp_path / "r")]) == 2
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "r").exists(), "nothing is written before the inputs and options are checked"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("not a report")
    with pytest.raises(ConfigError, match="holds no earlier report"):
        build_report([runs["experiment"]], tmp_path / "busy")


@pytest.mark.ray
@pytest.mark.slow
def test_the_readme_recipe_gives_the_reports_headline_tables(runs):
    scope = {"EXP": str(runs["experiment"]), "OUT": str(runs["scored"])}
    exec(readme_recipe(), scope)
    board = table(runs, "leaderboard")
    assert scope["leaderboard"]["trial_id"].tolist() == board["trial_id"].tolist()
    assert np.allclose(scope["leaderboard"]["test_macro_f1"], board["test_macro_f1"])
    counts = table(runs, "class_counts").set_index("predicted_class")
    assert scope["per_class"]["images"].to_dict() == counts["images"].to_dict()
    assert scope["errors"].to_dict() == table(runs, "errors_by_type").set_index("error_type")["errors"].to_dict()


@pytest.mark.ray
@pytest.mark.slow
def test_the_readme_duckdb_queries_give_the_reports_tables(runs):
    import duckdb

    sql = readme_recipe("sql").replace("'EXP/", f"'{runs['experiment']}/").replace("'OUT/", f"'{runs['scored']}/")
    sql = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))   # (a ; in a comment)
    board, _pivot, per_class, errors, by_folder, morning, confusion = [
        duckdb.sql(statement).df() for statement in sql.split(";") if statement.strip()]
    assert board["trial_id"].tolist() == table(runs, "leaderboard")["trial_id"].tolist()
    counts = table(runs, "class_counts").set_index("predicted_class")
    assert per_class.set_index("predicted_class")["images"].to_dict() == counts["images"].to_dict()
    assert errors.set_index("error_type")["errors"].to_dict() == \
        table(runs, "errors_by_type").set_index("error_type")["errors"].to_dict()
    rollup = table(runs, "rollup_folder").set_index("folder")[["rows", "ok", "errors", "uncertain"]]
    assert by_folder.set_index("folder")[["rows", "ok", "errors", "uncertain"]].to_dict() == rollup.to_dict()
    listed = pd.read_csv(runs["report"] / "morning_list.csv", keep_default_na=False)
    assert len(listed) > MORNING_ROWS and morning["path"].tolist() == listed["path"].tolist()
    assert confusion["n"].sum() == (runs["rows"]["status"].eq("ok") & runs["rows"]["label"].ne("")).sum()


# ---- the HTML in a real browser --------------------------------------------------------------------------
class DomSummary(HTMLParser):
    """Tables (id -> body rows), image sources, headings and the harness result of an HTML text."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, int] = {}
        self.images: list[str] = []
        self.headings: list[str] = []
        self.result = ""
        self._table, self._in_body, self._heading, self._pre = None, False, False, False

    @classmethod
    def of(cls, text: str) -> "DomSummary":
        parser = cls()
        parser.feed(text)
        return parser

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id", f"table-{len(self.tables)}")
            self.tables[self._table] = 0
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table:
            self.tables[self._table] += 1
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        self._heading = tag in ("h2", "h3") or self._heading
        self._pre = (tag == "pre" and attrs.get("id") == "result") or self._pre

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None
        self._heading = self._heading and tag not in ("h2", "h3")
        self._pre = self._pre and tag != "pre"

    def handle_data(self, data):
        if self._heading:
            self.headings.append(data)
        if self._pre:
            self.result += data


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary; a loud skip without one (session-scoped and requested before ``runs``, so a
    missing browser skips before the sweep and scoring run)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        reason = ("CHROMIUM ABSENT: no chromium binary on PATH; the browser test of the HTML report is SKIPPED. "
                  "Install Debian's `chromium` package (.ci/run does) to run it.")
        warnings.warn(reason)
        print(f"\n*** {reason} ***\n", file=sys.stderr)
        pytest.skip(reason)
    return found


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--allow-file-access-from-files", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


HARNESS = """<!DOCTYPE html><html><body><iframe id="f" src="{src}" width="1280" height="4000"></iframe><script>
document.getElementById("f").onload = function () {{
  var d = this.contentDocument, broken = [], images = d.images;
  for (var i = 0; i < images.length; i++)
    if (!images[i].complete || images[i].naturalWidth === 0) broken.push(images[i].getAttribute("src"));
  var out = document.createElement("pre"); out.id = "result";
  out.textContent = JSON.stringify({{images: images.length, broken: broken, tables: d.querySelectorAll("table").length,
    width: d.getElementById("leaderboard").offsetWidth}});
  document.body.appendChild(out);
}};
</script></body></html>"""


@pytest.mark.ray
@pytest.mark.slow
def test_index_html_renders_offline_in_headless_chromium(chromium, runs, tmp_path):
    binary, report = chromium, runs["report"]
    page = (report / "index.html").read_text()
    assert "http://" not in page.lower() and "https://" not in page.lower() and "<script" not in page.lower()
    source = DomSummary.of(page)
    assert source.images and all(not s.startswith(("/", "file:")) and (report / s).is_file() for s in source.images)

    dom = DomSummary.of(run_chromium(binary, tmp_path / "p1", "--dump-dom", (report / "index.html").as_uri()).stdout)
    assert dom.tables["leaderboard"] == len(table(runs, "leaderboard"))
    assert dom.tables["class-counts"] == len(table(runs, "class_counts"))
    assert len(pd.read_csv(report / "morning_list.csv")) > MORNING_ROWS, "the CSV keeps every flagged row"
    assert dom.tables["morning-list-top"] == MORNING_ROWS
    assert "Training curves of the best 1 trials" in page        # --curves 1
    assert sorted(dom.images) == sorted(source.images)
    gallery = pd.read_csv(report / "gallery" / "gallery.csv")
    assert set(gallery["image"]) <= set(dom.images) and {"plots/confusion.png", "plots/roc.png"} <= set(dom.images)

    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS.format(src=(report / "index.html").as_uri()))
    loaded = DomSummary.of(run_chromium(binary, tmp_path / "p2", "--virtual-time-budget=30000", "--dump-dom",
                                        harness.as_uri()).stdout)
    state = json.loads(loaded.result)
    assert state["images"] == len(source.images) and state["broken"] == [], state
    assert state["tables"] == len(source.tables) and state["width"] > 400

    shot = tmp_path / "shot.png"
    run_chromium(binary, tmp_path / "p3", f"--screenshot={shot}", "--window-size=1280,4000",
                 (report / "index.html").as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (4000, 1280, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500, "the screenshot is (nearly) one colour"
    assert (pixels.reshape(-1, 3) != 255).any(axis=1).mean() > 0.05, "the page is mostly empty"
