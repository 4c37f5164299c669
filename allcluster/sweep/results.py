"""Sweep results (pure, no Ray): ``trials.parquet``, ``epochs.parquet``, the best model, a summary.

Every number is read back from the trials' own folders (model card, per-epoch Parquet), so the tables
are rebuilt the same way after any restart.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from allcluster.atomic import atomic_folder
from allcluster.config import config_hash, flatten, to_dict
from allcluster.models.card import CARD_FILE, ModelCard
from allcluster.models.card import versions
from allcluster.sweep.plan import Trial, epochs_recorded, trial_status
from allcluster.sweep.schema import KEY_COLUMNS, METRIC_KEYS, ordered
from allcluster.train.run_folder import RAY_RUN_FOLDER, newest_checkpoint

SUMMARY_COLUMNS = ["backbone", "augmentation", "optimizer", "status", "best_epoch", "train_accuracy", "train_macro_f1",
                   "val_accuracy", "test_accuracy", "train_loss", "val_loss", "test_loss", "val_macro_f1",
                   "test_macro_f1", "test_auc", "wall_seconds", "gpu_hours"]


def _history(trial: Trial) -> pd.DataFrame:
    path = trial.dir / "metrics.parquet"
    return pq.read_table(path).to_pandas() if path.is_file() else pd.DataFrame()


def work_done(trials: list[Trial]) -> int:
    """Epochs recorded in the trials' folders plus one per trial that finished or was stopped (ended
    for good; an error is no progress, and ``--retry-errored`` undoes it): its growth over a run is
    the run's progress (:func:`allcluster.interrupt.report_progress`)."""
    total = 0
    for trial in trials:
        total += epochs_recorded(trial.dir) + (trial_status(trial.dir) in ("finished", "stopped"))
    return total


def _card(trial: Trial) -> ModelCard | None:
    return ModelCard.read(trial.dir / "model") if (trial.dir / "model" / CARD_FILE).is_file() else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _latest_checkpoint(trial: Trial) -> str:
    return str(newest_checkpoint(trial.dir / RAY_RUN_FOLDER) or "")


def _split_metrics(prefix: str, metrics: dict) -> dict:
    if not metrics:
        return {f"{prefix}_{k}": np.nan for k in METRIC_KEYS}
    return {f"{prefix}_{k}": float(metrics["nll"] if k == "loss" else metrics.get(k, np.nan)) for k in METRIC_KEYS}


def trial_row(trial: Trial) -> dict:
    """One row of ``trials.parquet`` for a trial, from whatever its folder holds."""
    cfg, history, card = trial.config, _history(trial), _card(trial)
    values = flatten(to_dict(cfg))
    status = trial_status(trial.dir)
    res = cfg.resources
    gpus = res.gpus
    row = {"trial_id": trial.trial_id, "trial_index": trial.index, **trial.params,
           **{column: values[key] for key, column in KEY_COLUMNS.items()},
           "num_workers": res.num_workers, "gpus_per_trial": gpus,
           "status": status, "error": _read_json(trial.dir / "error.json").get("error", "")}
    best = history.loc[history["val_macro_f1"].idxmax()] if len(history) else None
    row["best_epoch"] = int(best["epoch"]) if best is not None else -1
    row["epochs_trained"] = int(len(history))
    row["train_accuracy"] = float(best["train_accuracy"]) if best is not None else np.nan
    row["train_loss"] = float(best["train_loss"]) if best is not None else np.nan
    row["train_macro_f1"] = float(best.get("train_macro_f1", np.nan)) if best is not None else np.nan
    if card is not None:
        row.update(_split_metrics("val", card.val_metrics))
        row.update(_split_metrics("test", card.test_metrics))
        row["test_ece_calibrated"] = float(card.metrics["test_ece_calibrated"])
        row["temperature"] = float(card.temperature)
    else:
        row.update({f"val_{k}": float(best[f"val_{k}"]) if best is not None else np.nan for k in METRIC_KEYS})
        row.update({f"test_{k}": np.nan for k in METRIC_KEYS})
        row["test_ece_calibrated"], row["temperature"] = np.nan, np.nan
    wall = float(history["epoch_seconds"].sum()) if len(history) else 0.0
    row["wall_seconds"] = wall
    row["images_per_s"] = float(history["train_images_per_s"].median()) if len(history) else np.nan
    row["gpu_hours"] = wall / 3600 * gpus
    row["cpu_hours"] = wall / 3600 * res.cpus
    row["model_dir"] = str(trial.dir / "model") if card is not None else ""
    row["checkpoint_path"] = row["model_dir"] or _latest_checkpoint(trial)
    row["config_hash"] = config_hash(cfg)
    row["run_id"] = _read_json(trial.dir / "run.json").get("run_id", "")
    return row


def trials_table(trials: list[Trial], sweep_name: str) -> pd.DataFrame:
    """``trials.parquet``: one row per trial, the columns of :data:`allcluster.sweep.schema.TRIAL_COLUMNS`."""
    table = pd.DataFrame([trial_row(t) for t in trials])
    found = versions()
    for name in ("allcluster", "torch", "timm", "ray"):
        table[f"{name}_version"] = found[name]
    table["sweep"] = sweep_name
    varied = list(dict.fromkeys(k for t in trials for k in t.params))
    return ordered(table, varied) if len(table) else table


def epochs_table(trials: list[Trial]) -> pd.DataFrame:
    parts = []
    for trial in trials:
        history = _history(trial)
        if len(history):
            parts.append(history.assign(trial_id=trial.trial_id))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"trial_id": pd.Series(dtype=str)})


def export_best(best: pd.Series, experiment_dir: Path, finished: int = 1, planned: int = 1) -> Path:
    """Copy the best trial's model directory to ``<experiment>/best_model`` (replacing an older one);
    its card says of how many finished of how many planned trials it is the best (a start that a
    time limit ended exports the best so far, which a later start may replace)."""
    target = experiment_dir / "best_model"
    with atomic_folder(target) as tmp:
        shutil.copytree(best["model_dir"], tmp, dirs_exist_ok=True)
        ModelCard.read(tmp).replace(sweep={"trial_id": best["trial_id"], "chosen_by": "val_macro_f1",
                                           "val_macro_f1": float(best["val_macro_f1"]),
                                           "finished_trials": finished, "planned_trials": planned}).write(tmp)
    return target


def summary_text(table: pd.DataFrame) -> str:
    """A console table like paper 002's Table 10, best validation macro-F1 first."""
    shown = table.sort_values("val_macro_f1", ascending=False, na_position="last")[SUMMARY_COLUMNS]
    counts = table["status"].value_counts().to_dict()
    head = f"{len(table)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return head + "\n" + shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")
