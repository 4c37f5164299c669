"""The sweep-results contract, one place for every reader and writer of ``trials.parquet``: the
configuration columns, the per-split metric names and the best-trial rule (the sweep's
``best_model`` and the report's leaderboard use the same one)."""
from __future__ import annotations

import pandas as pd

from allcluster.metrics import EVAL_METRICS

SPLITS = ("train", "val", "test")
METRIC_KEYS = EVAL_METRICS                  # <split>_<metric> columns (val_/test_ for every one)
CELL = ["backbone", "augmentation", "optimizer"]          # one grid cell of the papers' tables
CONFIG_COLUMNS = ["augmentation", "optimizer", "lr", "image_size", "head_epochs", "unfreeze_blocks", "batch_size"]
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
