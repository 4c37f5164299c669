"""Assembles the report folder: tables (CSV, Markdown, HTML), figures, overlays, ``index.html``."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv

from allcluster import metrics
from allcluster.atomic import atomic_write, atomic_write_text, is_storage_full
from allcluster.config import ConfigError, bounds, write_resolved
from allcluster.console import say
from allcluster.data.decode import DecodeError
from allcluster.locks import check_folder_free, check_writable_folder, holding
from allcluster.models.card import ModelInfo
from allcluster.report import html, plots, tables
from allcluster.report.inputs import Inputs, collect_inputs, model_info
from allcluster.score.rows import class_columns


@dataclass(frozen=True)
class ReportOptions:
    """``allcluster report`` options (written, resolved, to ``report.yaml``)."""
    metric: str = "test_macro_f1"                    # trials.parquet column shown in the pivots
    group_by: list[str] = field(default_factory=lambda: ["folder"])   # scoring roll-ups, one table each
    malignant: list[str] = field(default_factory=list)  # [] = every class except Benign/benign
    gallery_per_class: int = field(default=4, metadata=bounds(ge=0))  # most confident + most uncertain, each
    curves: int = field(default=3, metadata=bounds(ge=1))            # training curves of the best N trials
    morning_rows: int = field(default=50, metadata=bounds(ge=0))     # morning-list rows shown in the HTML


def safe_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", text).strip("_") or "x"


class Report:
    """The report folder being written: every table and figure also becomes an HTML part."""

    def __init__(self, out: Path):
        self.out = out
        self.files: dict[str, str] = {}
        self.notes: list[str] = []
        self.models: dict[str, ModelInfo] = {}             # scoring OUT -> its model (the overlays' ROI crop)
        self.missing: dict[str, str] = {}                  # image path -> why its overlay could not be made

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def table(self, name: str, df: pd.DataFrame, title: str, image_columns: tuple[str, ...] = ()) -> list[str]:
        """Write ``tables/<name>.csv|.md|.html``; return the heading and the table as HTML parts."""
        base = self.out / "tables" / name
        base.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(base.with_suffix(".csv"), lambda tmp: df.to_csv(tmp, index=False))
        atomic_write_text(base.with_suffix(".md"), html.markdown_table(df))    # UTF-8 whatever the node's locale
        table = html.table_html(df, name.replace("_", "-"), image_columns)
        atomic_write_text(base.with_suffix(".html"), table + "\n")
        self.files[name] = self.rel(base.with_suffix(".csv"))
        return [html.heading(title), table]

    def figure(self, name: str, caption: str, draw: Callable[[Path], Path]) -> list[str]:
        path = draw(self.out / "plots" / f"{name}.png")
        self.files[f"plot:{name}"] = self.rel(path)
        return [html.figure_html(self.rel(path), caption, f"plot-{name}")]

    def note(self, text: str) -> list[str]:
        self.notes.append(text)
        return [html.note_html(text)]

    def overlay(self, row, target: Path) -> str:
        """An overlay of the row's map (``heatmap``, ``heatmap_method``) in the report folder (its
        relative path), or "" with a note if it cannot be made."""
        from allcluster.score.heatmaps import load_heatmap

        try:
            heat = load_heatmap(row.heatmap, row.sha256, row.heatmap_method)
            model = self.models.get(row.scoring_out, ModelInfo())
            return self.rel(plots.overlay(row.path, heat, target, model.roi_crop, model.roi_margin))
        except (OSError, DecodeError, ValueError) as err:
            if is_storage_full(err):           # writing the overlay: the report stops (exit 74), not the image
                raise
            self.missing.setdefault(row.path, str(err))      # an image tried again is still one image
            return ""

    def finish_notes(self) -> None:
        """One note for the images whose overlay could not be made (image or heatmap gone), counted once each."""
        if self.missing:
            path, why = next(iter(self.missing.items()))
            self.notes.append(f"no overlay for {len(self.missing)} image(s) (image or heatmap not readable from "
                              f"here), e.g. {path}: {why}")


# ---- sweeps ---------------------------------------------------------------------------------------------
def sweep_parts(report: Report, inputs: Inputs, trials: pd.DataFrame, options: ReportOptions) -> list[str]:
    """Leaderboard, pivots, best per backbone, metric heatmap, training curves."""
    finished = int((trials["status"] == "finished").sum()) if len(trials) else 0
    if not finished:
        return report.note(f"no finished trial in {len(trials)} trials: no sweep tables")
    parts = [html.paragraph(f"{len(trials)} trials, {finished} finished. Every cell shows its best trial, chosen "
                            "by validation macro-F1 (then validation loss); the test split never chooses.")]
    parts += report.table("leaderboard", tables.leaderboard(trials), "Leaderboard (backbone x augmentation x optimizer)")
    by_aug = tables.pivot(trials, "augmentation", options.metric)
    parts += report.table("pivot_backbone_x_augmentation", by_aug, f"{options.metric}: backbone x augmentation")
    parts += report.table("pivot_backbone_x_optimizer", tables.pivot(trials, "optimizer", options.metric),
                          f"{options.metric}: backbone x optimizer")
    parts += report.figure("metric_heatmap", f"{options.metric}, backbone x augmentation",
                           lambda p: plots.metric_heatmap(by_aug, options.metric, p))
    parts += report.table("best_per_backbone", tables.best_per_backbone(trials, options.metric),
                          "Best configuration per backbone")
    best = tables.ranked(trials)[["experiment", "trial_id"]].head(options.curves)  # trial ids are per sweep
    epochs = tables.load_epochs(inputs.sweeps, best)
    if len(epochs):
        parts += [html.heading(f"Training curves of the best {len(best)} trials")]
        parts += report.figure("training_curves", "loss and validation macro-F1 per epoch",
                               lambda p: plots.training_curves(epochs, best, p))
    else:
        parts += report.note("no epochs.parquet rows for the best trials: no training curves")
    return parts


# ---- scoring --------------------------------------------------------------------------------------------
def morning_parts(report: Report, data: tables.ScoreData, options: ReportOptions) -> tuple[list[str], int]:
    """``morning_list.csv`` (every flagged row) and its first rows in the HTML with overlays."""
    malignant = options.malignant
    morning = tables.morning_list(data, malignant)
    atomic_write(report.out / "morning_list.csv", lambda tmp: pacsv.write_csv(morning, str(tmp)))
    report.files["morning_list"] = "morning_list.csv"
    parts = [html.heading("Morning list"),
             html.paragraph(f"{morning.num_rows} flagged images (predicted {', '.join(malignant) or 'no class'} as "
                            "malignant, or uncertain), most urgent first: 1 malignant and uncertain, 2 malignant, "
                            "3 uncertain. All of them, with heatmap paths: morning_list.csv.")]
    shown = morning.slice(0, options.morning_rows).to_pandas()
    if len(shown):
        shown.insert(2, "overlay", [report.overlay(row, report.out / "morning" / f"{row.priority:05d}.jpg")
                                    if row.heatmap else "" for row in shown.itertuples(index=False)])
        columns = ["priority", "reason", "overlay", "path", "predicted_class", "confidence", "malignant_probability",
                   "label", "patient"]
        parts += report.table("morning_list_top", shown[[c for c in columns if c in shown]],
                              f"First {len(shown)} of the morning list", image_columns=("overlay",))
    return parts, morning.num_rows


def labelled_parts(report: Report, data: tables.ScoreData) -> tuple[list[str], dict]:
    """Confusion matrix, ROC, reliability before/after calibration, per-class F1 from labelled rows
    (each against its own model's classes); the rows whose label their model lacks, counted."""
    labelled = tables.labelled_rows(data)
    rows, counts = labelled.rows, {"labelled_rows": int(len(labelled.rows)),
                                   "unknown_label_rows": int(labelled.unknown["rows"].sum())}
    if not len(rows):
        why = ("no labelled row has a label its model knows" if len(labelled.unknown)
               else f"{n} labelled ok rows, but without the probability columns (prob_<class>, cal_prob_<class>) "
                    "the metrics need" if (n := tables.labelled_count(data, ok_only=True))
               else f"{n} labelled rows, none of them ok" if (n := tables.labelled_count(data))
               else "no labelled rows (score a manifest to get a label column)")
        return report.note(f"{why}: no confusion matrix, ROC, reliability or per-class F1") \
            + unknown_label_parts(report, labelled.unknown), counts
    raw_cols, cal_cols = class_columns(data.classes)
    groups = _split_groups(rows)
    shown_as, shown = groups[0]
    found_per_group = [_labelled_metrics(part, data.classes) for _, part in groups]
    summary = pd.DataFrame([{"split": name} | {k: found[k] for k in LABELLED_METRICS}
                            for (name, _), found in zip(groups, found_per_group)])
    y, raw, cal = shown["y"].to_numpy(), shown[raw_cols].to_numpy(np.float64), shown[cal_cols].to_numpy(np.float64)
    found = found_per_group[0]
    per_class = pd.DataFrame([{"class": c, **v} for c, v in found["per_class"].items()])
    cm = np.asarray(found["confusion"])
    parts = [html.heading("Against the labels"),
             html.paragraph(f"{len(rows)} ok rows with a label among the classes of the model that scored them "
                            "(calibrated probabilities; 0 for a class that model lacks). "
                            + _split_caveat(shown_as, groups))]
    if shown_as != "test" and any(name in ("train", "val") for name, _ in groups):
        parts += report.note("no test-split row among the labelled rows: the metrics include images the model was "
                    "trained on or selected and calibrated by (train, val), and read better than it is")
    parts += unknown_label_parts(report, labelled.unknown)
    parts += report.table("labelled_metrics", summary, "Metrics on labelled rows")
    parts += report.table("per_class", per_class, "Per class")
    parts += report.figure("confusion", "confusion matrix (rows: true class)",
                           lambda p: plots.confusion_plot(cm, data.classes, p))
    parts += report.figure("roc", "ROC per class", lambda p: plots.roc_plot(y, cal, data.classes, p))
    parts += report.figure("reliability", "reliability before and after calibration",
                           lambda p: plots.reliability_plot(y, raw, cal, p))
    parts += report.figure("f1_per_class", "F1 per class",
                           lambda p: plots.f1_bars({c: v["f1"] for c, v in found["per_class"].items()}, p))
    return parts, {**counts, "confusion": found["confusion"], "confusion_split": shown_as}


SPLIT_ORDER = ("test", "val", "train")


def _split_groups(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(name, rows) of the labelled rows, the one the figures and per-class table show first: the test
    split when the rows hold several splits (a whole manifest scored: train and val images were seen
    in training, model selection and calibration), else all rows; then each split, then all."""
    named = [s for s in SPLIT_ORDER if (rows["split"] == s).any()]
    named += sorted(set(rows["split"]) - set(SPLIT_ORDER) - {""})
    if len(named) < 2 and (rows["split"] == (named[0] if named else "")).all():
        return [(named[0] if named else "all", rows)]
    groups = [(name, rows[rows["split"] == name]) for name in named] + [("all", rows)]
    return groups if "test" in named else [groups[-1], *groups[:-1]]


# the columns of ``labelled_metrics`` after ``split`` (README "Report" documents each)
LABELLED_METRICS = ("n", "accuracy", "macro_f1", "macro_precision", "macro_recall", "macro_specificity", "auc", "map",
                    "nll", "ece_before", "ece_after")


def _labelled_metrics(rows: pd.DataFrame, classes: list[str]) -> dict:
    """:func:`~allcluster.metrics.classification_metrics` of ``rows`` (calibrated probabilities), with
    ``ece_after`` and the ECE of the raw probabilities, ``ece_before``."""
    raw_cols, cal_cols = class_columns(classes)
    y = rows["y"].to_numpy()
    found = metrics.classification_metrics(y, rows[cal_cols].to_numpy(np.float64), classes)
    return found | {"ece_before": metrics.expected_calibration_error(rows[raw_cols].to_numpy(np.float64), y),
                    "ece_after": found["ece"]}


def _split_caveat(shown_as: str, groups: list[tuple[str, pd.DataFrame]]) -> str:
    if len(groups) == 1:
        return f"Split: {shown_as}." if shown_as != "all" else ""
    return (f"Per class and the figures: the {shown_as} rows ({len(groups[0][1])}); labelled_metrics has one row "
            "per split. Train and val images were seen in training, model selection and calibration: only the "
            "test split's figures estimate new images.")


def unknown_label_parts(report: Report, unknown: pd.DataFrame) -> list[str]:
    """A note and the ``unknown_labels`` table: labelled rows left out, their label not a class of their model."""
    if not len(unknown):
        return []
    labels = ", ".join(sorted(set(unknown["label"])))
    note = report.note(f"{int(unknown['rows'].sum())} labelled ok row(s) left out of the metrics: their label is "
                       f"not a class of the model that scored them ({labels}); see the table unknown_labels")
    return note + report.table("unknown_labels", unknown, "Labels unknown to the model that scored them")


def gallery_parts(report: Report, data: tables.ScoreData, options: ReportOptions) -> list[str]:
    """The most confident and most uncertain images of each predicted class with their heatmap."""
    picks = tables.gallery_rows(data, options.gallery_per_class)
    if not len(picks):
        return [html.heading("Heatmap gallery")] + report.note("no ok rows with a heatmap: no gallery")
    picks["image"] = [report.overlay(row, report.out / "gallery" / f"{i:03d}-{safe_name(row.predicted_class)}.jpg")
                      for i, row in enumerate(picks.itertuples(index=False))]
    picks = picks[picks["image"] != ""]
    (report.out / "gallery").mkdir(exist_ok=True)
    atomic_write(report.out / "gallery" / "gallery.csv", lambda tmp: picks.to_csv(tmp, index=False))
    report.files["gallery"] = "gallery/gallery.csv"
    methods = ", ".join(dict.fromkeys(picks["heatmap_method"])) or "no overlay could be made"
    return [html.heading(f"Heatmap gallery ({methods}, {options.gallery_per_class} per class and kind)"),
            html.gallery_html(picks)]


def scoring_parts(report: Report, inputs: Inputs, data: tables.ScoreData, options: ReportOptions) -> tuple[list[str], dict]:
    """Overview, counts per class, errors by type, roll-ups, morning list, labelled plots, gallery."""
    from allcluster.score.output import unfinished

    parts = []
    for source in inputs.scorings:        # said first: every count below is partial for such a job
        if why := unfinished(source.root):
            parts += report.note(f"scoring job {source.root} is unfinished ({why}): its counts here are partial; "
                                 "rerun its scoring command to finish it")
        if source.damaged:
            parts += report.note(f"scoring job {source.root}: {len(source.damaged)} row shard(s) left out, no readable "
                                 f"Parquet file (e.g. {source.damaged[0].name}): their rows are not counted here; "
                                 "rerun its scoring command, which sets them aside and scores their files again")
    keys = list(dict.fromkeys(["predicted_class", "error_type", *options.group_by]))
    counts = tables.aggregate(data, keys, options.malignant)
    report.models = {str(s.root): model_info(s.root) for s in inputs.scorings}
    morning, n_morning = morning_parts(report, data, options)
    overview = tables.overview(counts["predicted_class"], n_morning)
    parts += report.table("overview", overview, "Overview")
    parts += report.table("class_counts", tables.class_counts(counts["predicted_class"]), "Predicted classes (ok rows)")
    quality = tables.explanation_quality(data)
    if len(quality):
        parts += report.table("explanation_quality", quality,
                              "Explanations: share of each map on the stained cell, faithfulness")
    errors = tables.errors_by_type(counts["error_type"])
    shown = report.table("errors_by_type", errors, "Errors by type")    # its files also when empty: scripts read them
    parts += shown if len(errors) else [html.heading("Errors by type"), html.paragraph("no error rows")]
    for key in options.group_by:
        parts += report.table(f"rollup_{safe_name(key)}", counts[key], f"By {key}")
    parts += morning
    labelled, found = labelled_parts(report, data)
    parts += labelled + gallery_parts(report, data, options)
    return parts, {**{k: int(v) for k, v in overview.iloc[0].items()}, **found}


# ---- the whole report -------------------------------------------------------------------------------------
GENERATED = ("tables", "plots", "gallery", "morning")       # folders
GENERATED_FILES = ("morning_list.csv", "index.html", "report.json")
STARTED, FINISHED = "report.yaml", "report.json"   # written first and last: a report folder, a finished one
FOLDER_LOCK = ".lock"


def _holds_another_kind_of_file(out: Path) -> bool:
    if not out.is_dir() or (out / STARTED).is_file() or (out / FINISHED).is_file():
        return False
    return any(not entry.name.startswith(FOLDER_LOCK) for entry in out.iterdir())


@contextlib.contextmanager
def writing_out(out: Path):
    """Hold ``out`` as this run's (one report writes a folder at a time; a second is refused naming
    the first) and empty it of an earlier report's files, none of which stays to be taken for this
    one's. A folder holding neither ``report.yaml`` (written first) nor ``report.json`` (written
    last) nor nothing is refused before anything is written. So a report killed half-way (Slurm's
    time limit, preemption) is rebuilt by its rerun, and only a folder with ``report.json`` is a
    finished report."""
    check_folder_free(out, f"report folder {out}")
    if _holds_another_kind_of_file(out):
        raise ConfigError(f"{out}: exists, is not empty and holds no earlier report; choose a new --out")
    for folder in (out / name for name in GENERATED):      # an earlier report's folder this user cannot replace
        if os.path.lexists(folder):
            check_writable_folder(folder)
    with holding(out, f"report folder {out}"):
        for name in GENERATED:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in GENERATED_FILES:
            (out / name).unlink(missing_ok=True)
        yield


def resolve(options: ReportOptions, inputs: Inputs, trials: pd.DataFrame,
            data: tables.ScoreData | None) -> ReportOptions:
    """Check the options against what the inputs hold (before anything is written); fill defaults."""
    if len(trials):
        tables.check_metric(trials, options.metric)
    if data is None:
        return options
    tables.check_columns(data, options.group_by, "--group-by")
    tables.check_group_keys(options.group_by)
    tables.check_classes(data, options.malignant)
    return replace(options, malignant=list(options.malignant) or tables.default_malignant(data.classes))


def write_report(report: Report, found: Inputs, trials: pd.DataFrame, data: tables.ScoreData | None,
                 options: ReportOptions) -> dict:
    """Every table and figure, then ``index.html``; return what ``report.json`` holds (but the time)."""
    out = report.out
    sections = [("inputs", "Inputs", [html.table_html(pd.DataFrame(found.describe()), "inputs")])]
    result: dict = {"out": str(out.resolve()), "index": str((out / "index.html").resolve()),
                    "inputs": found.describe(), "trials": int(len(trials))}
    if found.sweeps:
        sections.append(("sweep", "Sweep", sweep_parts(report, found, trials, options)))
    if data is not None:
        parts, result["scoring"] = scoring_parts(report, found, data, options)
        sections.append(("scoring", "Scoring", parts))
    report.finish_notes()
    if report.notes:
        sections.append(("notes", "Notes", [html.paragraph(n) for n in report.notes]))
    subtitle = f"allcluster report, {time.strftime('%Y-%m-%d %H:%M %Z')}, from {len(found.sweeps)} sweep(s) " \
               f"and {len(found.scorings)} scoring job(s)"
    atomic_write_text(out / "index.html", html.page("allcluster report", subtitle, sections))
    return {**result, "files": report.files, "notes": report.notes}


def build_report(inputs: list[str | Path], out: str | Path, options: ReportOptions = ReportOptions()) -> dict:
    """Read sweep and scoring INPUTs, write the report folder ``out``; return what ``report.json`` holds."""
    start, out = time.monotonic(), Path(out)
    found = collect_inputs(list(inputs))
    trials = tables.load_trials(found.sweeps)
    data = tables.open_scoring(found.scorings) if found.scorings else None
    options = resolve(options, found, trials, data)
    with writing_out(out):
        write_resolved(options, out / STARTED, "allcluster report " + " ".join(str(i) for i in inputs))
        result = write_report(Report(out), found, trials, data, options)
        result["seconds"] = round(time.monotonic() - start, 1)
        atomic_write_text(out / FINISHED, json.dumps(result, indent=2, default=str))
    say(f"[report] {out.resolve() / 'index.html'} ({result['seconds']} s)")
    return result
