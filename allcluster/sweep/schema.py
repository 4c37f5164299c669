"""The sweep-results contract, one place for every reader and writer of ``trials.parquet``: the
configuration columns, the per-split metric names and the best-trial rule (the sweep's
``best_model`` and the report's leaderboard use the same one)."""
from __future__ import annotations

import pandas as pd

from allcluster.metrics import EVAL_METRICS

SPLITS = ("train", "val", "test")
METRIC_KEYS = EVAL_METRICS                  # <split>_<metric> columns (val_/test_ for every one)
CELL = ["backbone", "augmentation", "optimizer"]          # one grid cell of the papers' tables
# the trial columns that show a config key's value (the report gives a varied key shown here no column of its own)
KEY_COLUMNS = {"model.backbone": "backbone", "augment.name": "augmentation", "optim.name": "optimizer",
               "optim.lr": "lr", "data.image_size": "image_size", "finetune.head_epochs": "head_epochs",
               "finetune.unfreeze_blocks": "unfreeze_blocks", "fit.batch_size": "batch_size"}
CONFIG_COLUMNS = [c for c in KEY_COLUMNS.values() if c != "backbone"]
# trials.parquet: these columns in this order, with one column per varied key (its dotted name, e.g.
# ``optim.lr``) after ``trial_index`` (README "Sweeps" documents each)
TRIAL_COLUMNS = [
    "trial_id", "trial_index", "backbone", *CONFIG_COLUMNS, "num_workers", "gpus_per_trial",
    "status", "error", "best_epoch", "epochs_trained", "train_accuracy", "train_loss", "train_macro_f1",
    *(f"{split}_{m}" for split in ("val", "test") for m in METRIC_KEYS), "test_ece_calibrated", "temperature",
    "wall_seconds", "images_per_s", "gpu_hours", "cpu_hours", "model_dir", "checkpoint_path", "config_hash",
    "run_id", "allcluster_version", "torch_version", "timm_version", "ray_version", "sweep"]
STATUSES = ("finished", "stopped", "errored", "interrupted", "pending")
UNFINISHED = ("interrupted", "pending")        # what a rerun resumes or starts


def ordered(table: pd.DataFrame, varied: list[str]) -> pd.DataFrame:
    """``table`` with exactly the trial columns, in the documented order (varied keys after the index)."""
    missing = [c for c in TRIAL_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"trial table lacks {', '.join(missing)}")
    return table[TRIAL_COLUMNS[:2] + list(varied) + TRIAL_COLUMNS[2:]]


# Best trial: highest validation macro-F1, then lowest validation loss, then trial_id (stable); test
# metrics never choose.
RANK_BY, RANK_ASCENDING = ["val_macro_f1", "val_loss", "trial_id"], [False, True, True]


def ranked(trials: pd.DataFrame) -> pd.DataFrame:
    """Finished trials, best first, by the best-trial rule."""
    done = trials[trials["status"] == "finished"]
    return done.sort_values(RANK_BY, ascending=RANK_ASCENDING, kind="mergesort")


def best_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The best finished trial (None when none finished)."""
    done = ranked(trials)
    return done.iloc[0] if len(done) else None
