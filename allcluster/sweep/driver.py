"""``allcluster sweep``: plan -> (dry run | Tune) -> trials.parquet, epochs.parquet, best model, summary."""
from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

import pandas as pd

from allcluster.atomic import atomic_write_parquet
from allcluster.config import ConfigError, config_source, load, write_resolved
from allcluster.console import say
from allcluster.data.manifest import shared_manifest_reads
from allcluster.interrupt import InterruptionCaught, StopSignals, report_progress
from allcluster.locks import check_folder_free, holding
from allcluster.sweep.config import SweepConfig
from allcluster.sweep.experiment import (BASE_FILE, check_base, record_base, resolved_base, retire_best,
                                         supersede, varied_keys)
from allcluster.sweep.plan import Trial, base_beside, plan_trials, trial_status, trials_to_run
from allcluster.sweep.schema import UNFINISHED, best_trial
from allcluster.sweep.results import epochs_table, export_best, trials_table, work_done

SWEEP_STOPPING = ("[sweep] {signal} received: stopping; running trials keep their last epoch checkpoint, "
                  "the tables are written")


def load_sweep(path: str, overrides: list[str] = ()) -> tuple[SweepConfig, list[Trial]]:
    """Read and validate a sweep YAML and plan its trials (every trial config validated)."""
    sweep = base_beside(load(SweepConfig, path, overrides), path)
    return sweep, plan_trials(sweep, config_source(path, overrides))


def config_changes(sweep: SweepConfig, source: str) -> list[str]:
    """How the resolved base config differs from the one the experiment started with ([]: same/new)."""
    return check_base(Path(sweep.experiment_dir), resolved_base(sweep, source), varied_keys(sweep), source,
                      new_config=True)


def grid_cells(sweep: SweepConfig) -> int:
    return math.prod(len(v) for v in sweep.grid.values()) if sweep.grid else 1


def collect(sweep: SweepConfig, trials: list[Trial]) -> pd.DataFrame:
    """Rebuild the experiment's tables from the trial folders and export the best model."""
    exp = Path(sweep.experiment_dir)
    table = trials_table(trials, sweep.name)
    atomic_write_parquet(exp / "trials.parquet", table)
    atomic_write_parquet(exp / "epochs.parquet", epochs_table(trials))
    best = best_trial(table)
    if best is not None:
        finished = int((table["status"] == "finished").sum())
        target = export_best(best, exp, finished, len(table))
        left = int(table["status"].isin(UNFINISHED).sum())        # stopped (ASHA) and errored trials are final
        say(f"[sweep] best trial {best['trial_id']} (val macro-F1 {best['val_macro_f1']:.4f}) -> {target}"
            + (f" (best of {finished} finished trials so far, {left} still to run: a later run may replace it)"
               if left else ""))
    else:
        stale = retire_best(exp)
        say("[sweep] no trial finished: no best model exported"
            + (f"; the earlier best_model/, a trial of another grid, moved to {stale}" if stale else ""))
    return table


def run_sweep(sweep: SweepConfig, trials: list[Trial], retry_errored: bool = False,
              address: str | None = None, source: str = "sweep config",
              new_config: bool = False) -> tuple[pd.DataFrame, str]:
    """Run what is left of the sweep on the Ray cluster, then write its tables.

    Returns the trials table and the name of the stop signal that ended the run early ("" when none;
    see :mod:`allcluster.interrupt`). A changed base config is refused before anything is
    written unless ``new_config`` (see :mod:`allcluster.sweep.experiment`).
    """
    exp = Path(sweep.experiment_dir)
    base, changes, to_run = check_before_run(sweep, trials, source, retry_errored, new_config)
    caught = InterruptionCaught()         # a signal while no trial was running yet, or a second signal
    with holding(*_experiment_locks(exp, trials)), StopSignals(SWEEP_STOPPING) as stop, ExitStack() as on_ray:
        limit = 0
        if to_run:
            with caught:                  # starting Ray: a signal ends it at once
                limit = _join_ray(sweep, to_run, address, on_ray)
            if caught.signal_name:        # stopped before anything ran: nothing is moved or written
                return trials_table(trials, sweep.name), caught.signal_name
        stop.graceful()                   # moving and writing files: a signal waits until they are done
        _start(exp, sweep, base, trials, changes, new_config)
        before = work_done(to_run)
        if limit and not stop.requested:
            stop.graceful(False)          # building caches: a signal ends it at once
            with caught:
                _run_on_ray(sweep, to_run, exp, stop, limit)
        with caught:                      # Ray is left before the tables are written (a second signal
            on_ray.close()                # while it shuts down still leaves them written)
        stop.hold()                       # writing the tables: no signal cuts them short
        report_progress(work_done(to_run) - before, "epochs or trial endings")
        table = collect(sweep, trials)
    # a SIGTERM while ray.init ran met Ray's handler, not ours (ray_utils._ray_start_guarded)
    return table, stop.signal_name or caught.signal_name


def check_before_run(sweep: SweepConfig, trials: list[Trial], source: str, retry_errored: bool = False,
                     new_config: bool = False, index: int | None = None) -> tuple[dict, list[str], list[Trial]]:
    """What a run refuses before it writes anything or starts Ray; reads only, raises ``ConfigError``:
    the trial index (array mode), an experiment another run holds (a run or the same array task), a base config that differs from the experiment's (unless
    ``new_config``), a missing manifest or missing weights of a backbone left to train. Returns the
    resolved base config, its changed keys and the trials to run. ``--check`` runs exactly this."""
    from allcluster.train.ray_train import preflight

    if index is not None and not 0 <= index < len(trials):
        raise ConfigError(f"--trial-index {index}: {source} plans {len(trials)} trials, indices 0 to "
                          f"{len(trials) - 1} (`allcluster sweep --dry-run` lists them)")
    check_folder_free(*_experiment_locks(Path(sweep.experiment_dir), trials, index))
    with shared_manifest_reads():
        base = resolved_base(sweep, source)
        changes = check_base(Path(sweep.experiment_dir), base, varied_keys(sweep), source, new_config)
        planned = trials if index is None else [trials[index]]
        to_run = planned if changes else trials_to_run(planned, retry_errored or sweep.retry_errored)
        for trial in {t.config.model.backbone: t for t in to_run}.values():
            preflight(trial.config)
    return base, changes, to_run


def _experiment_locks(exp: Path, trials: list[Trial], index: int | None = None) -> tuple:
    """:func:`lock_folder`'s arguments for ``exp``: a whole run (Tune, ``--collect``) or array task ``index``."""
    what = f"sweep experiment {exp}"
    if index is None:
        return exp, what
    trial = trials[index]
    return exp, what, f"trial-{trial.trial_id}", f"trial {index} ({trial.trial_id}) of {exp}"


def _start(exp: Path, sweep: SweepConfig, base: dict, trials: list[Trial], changes: list[str],
           new_config: bool) -> None:
    if changes:
        moved = supersede(exp)
        say(f"[sweep] --new-config: {'; '.join(changes)}; the old outputs moved to {moved}")
    elif new_config:
        say("[sweep] --new-config: the base config is unchanged; continuing the experiment")
    trials_there = (exp / "trials").is_dir()
    if record_base(exp, base) and trials_there:      # True: it had no stored base
        say(f"[sweep] {exp} has no {BASE_FILE} (started by an older allcluster): recording the current "
            "base config; the trials already there are taken to match it")
    exp.mkdir(parents=True, exist_ok=True)
    write_resolved(sweep, exp / "sweep.yaml", f"allcluster sweep {sweep.name}")
    states = pd.Series([trial_status(t.dir) for t in trials]).value_counts().to_dict()
    say(f"[sweep] {sweep.name}: {len(trials)} trials ({grid_cells(sweep)} grid cells) in {exp.resolve()}; "
        + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))


def _join_ray(sweep: SweepConfig, to_run: list[Trial], address: str | None, scope: ExitStack) -> int:
    """Start or join Ray until ``scope`` closes; how many trials run at once. A trial the cluster can
    never hold is refused here, before the run moves or writes anything."""
    from allcluster.ray_utils import ray_connected
    from allcluster.sweep.ray_tune import trial_limit

    scope.enter_context(ray_connected(address))
    return trial_limit(sweep, to_run)


def _run_on_ray(sweep: SweepConfig, to_run: list[Trial], exp: Path, stop: StopSignals, limit: int) -> None:
    from allcluster.sweep.ray_tune import run_tune

    run_tune(sweep, to_run, exp, stop, limit)


def run_array_task(sweep: SweepConfig, trials: list[Trial], index: int, retry_errored: bool = False,
                   address: str | None = None, source: str = "sweep config") -> tuple[str, str]:
    """``--trial-index I``: run planned trial I alone (a Slurm array task), without Tune.

    Returns the trial's status afterwards and the stop signal that ended it ("" when none). A changed
    base config is refused as in :func:`run_sweep`; ``--collect`` then gathers the tables.
    """
    base, _, to_run = check_before_run(sweep, trials, source, retry_errored, index=index)
    exp, trial = Path(sweep.experiment_dir), trials[index]
    if not to_run:
        say(f"[sweep] trial {index} ({trial.trial_id}) is {trial_status(trial.dir)}: nothing to do")
        return trial_status(trial.dir), ""
    if sweep.asha.enabled:
        say("[sweep] array mode runs every trial to its end: asha is a Tune-only feature, ignored here")
    with holding(*_experiment_locks(exp, trials, index)), StopSignals() as stop, InterruptionCaught() as caught:     # never graceful: a signal ends the task at once
        record_base(exp, base)
        say(f"[sweep] trial {index} of {len(trials)}: {trial.trial_id} in {trial.dir}")
        before = work_done([trial])
        try:
            _run_array_on_ray(trial, address)
        finally:
            report_progress(work_done([trial]) - before, "epochs or trial endings")
    return trial_status(trial.dir), stop.signal_name or caught.signal_name   # (see run_sweep)


def _run_array_on_ray(trial: Trial, address: str | None) -> None:
    from allcluster.ray_utils import ray_connected
    from allcluster.sweep.ray_tune import run_array_trial

    # A stop signal leaves the trial's Train run going in call_in_thread's thread; it ends with this
    # process, which the command line then ends at once (interrupt.end_of_process: os._exit, a local
    # Ray killed with it; the run's controller actor is this driver's and dies with it on a joined
    # cluster). No ray.shutdown() beside that thread: it crashed the driver (exit 139, not 75, so
    # the array task was not requeued) in 4 of 5 tries of a review.
    with ray_connected(address), InterruptionCaught():
        run_array_trial(trial)


def collect_only(sweep: SweepConfig, trials: list[Trial], source: str = "sweep config",
                 new_config: bool = False) -> pd.DataFrame:
    """``--collect``: write trials.parquet, epochs.parquet and best_model/ from the trial folders
    (after the array tasks ended); runs nothing, needs no Ray."""
    exp = Path(sweep.experiment_dir)
    base = resolved_base(sweep, source)
    changes = check_base(exp, base, varied_keys(sweep), source, new_config)
    with holding(*_experiment_locks(exp, trials)):        # refused while array tasks still run
        _start(exp, sweep, base, trials, changes, new_config)
        return collect(sweep, trials)
