"""``allcluster sweep``: plan -> (dry run | Tune) -> trials.parquet, epochs.parquet, best model, summary."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from allcluster.config import load, write_resolved
from allcluster.console import say
from allcluster.sweep.config import SweepConfig
from allcluster.sweep.plan import Trial, plan_trials, trial_status, trials_to_run
from allcluster.sweep.results import (epochs_table, export_best, pick_best, trials_table,
                                      write_parquet)


def load_sweep(path: str, overrides: list[str] = ()) -> tuple[SweepConfig, list[Trial]]:
    """Read and validate a sweep YAML and plan its trials (every trial config validated)."""
    sweep = load(SweepConfig, path, overrides)
    source = str(path) + (" (with --set " + " ".join(overrides) + ")" if overrides else "")
    return sweep, plan_trials(sweep, source)


def grid_cells(sweep: SweepConfig) -> int:
    return math.prod(len(v) for v in sweep.grid.values()) if sweep.grid else 1


def collect(sweep: SweepConfig, trials: list[Trial]) -> pd.DataFrame:
    """Rebuild the experiment's tables from the trial folders and export the best model."""
    exp = Path(sweep.experiment_dir)
    table = trials_table(trials, sweep.name)
    write_parquet(table, exp / "trials.parquet")
    write_parquet(epochs_table(trials), exp / "epochs.parquet")
    best = pick_best(table)
    if best is not None:
        target = export_best(best, exp)
        say(f"[sweep] best trial {best['trial_id']} (val macro-F1 {best['val_macro_f1']:.4f}) -> {target}")
    else:
        say("[sweep] no trial finished: no best model exported")
    return table


def run_sweep(sweep: SweepConfig, trials: list[Trial], retry_errored: bool = False,
              address: str | None = None) -> pd.DataFrame:
    """Run what is left of the sweep on the Ray cluster, then write its tables."""
    from allcluster.ray_utils import ensure_ray
    from allcluster.sweep.ray_tune import run_tune
    from allcluster.train.ray_train import preflight

    exp = Path(sweep.experiment_dir)
    exp.mkdir(parents=True, exist_ok=True)
    write_resolved(sweep, exp / "sweep.yaml", f"allcluster sweep {sweep.name}")
    states = pd.Series([trial_status(t.dir) for t in trials]).value_counts().to_dict()
    say(f"[sweep] {sweep.name}: {len(trials)} trials ({grid_cells(sweep)} grid cells) in {exp.resolve()}; "
        + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    to_run = trials_to_run(trials, retry_errored or sweep.retry_errored)
    if to_run:
        for trial in {t.config.model.backbone: t for t in to_run}.values():
            preflight(trial.config)
        ensure_ray(address)
        run_tune(sweep, to_run, exp)
    return collect(sweep, trials)
