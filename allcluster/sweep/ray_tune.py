"""Thin Ray wrapper: run a planned sweep with Ray Tune, each trial a Ray Train ``TorchTrainer``.

Uses the Train V2 + Tune integration of Ray 2.60: a Tune *function* trainable that builds and fits a
``TorchTrainer`` with ``TuneReportCallback`` (passing a Trainer to ``Tuner`` is deprecated).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from allcluster.atomic import storage_full_error
from allcluster.config import ConfigError, from_dict, to_dict, write_resolved
from allcluster.console import say
from allcluster.data.cache import MUST_EXIST_ENV
from allcluster.data.preprocess import Preprocess
from allcluster.sweep.config import SweepConfig
from allcluster.interrupt import STOP_REQUESTED, StopSignals, behind, call_in_thread, storage_full_at
from allcluster.sweep.plan import (LOST_RUNS_ALLOWED, Trial, clear_error, mark_errored, mark_lost, mark_stopped,
                                   trial_status)
from allcluster.train.config import TrainConfig

# The Tune trial actor only waits on its TorchTrainer, whose workers hold the real resources.
TRIAL_DRIVER_CPU = 0.01


def trial_trainer(trial_id: str, train: dict, callbacks: list | None = None):
    """The ``TorchTrainer`` of one trial, in the trial's own folder (fitting it again resumes from
    the folder's checkpoints); it only reads the decoded-image cache the driver built."""
    from allcluster.train.ray_train import build_trainer, run_id_for

    cfg = from_dict(TrainConfig, train, f"trial {trial_id}")
    out = Path(cfg.output_dir)
    run_id = run_id_for(out)
    write_resolved(cfg, out / "config.yaml", f"allcluster sweep trial {trial_id}, run {run_id}")
    return build_trainer(cfg, run_id, callbacks=callbacks, env={MUST_EXIST_ENV: "1"})


# Tune's metric (``TuneConfig``), and the keys of the one result a trial reports when it met a full disk
# or quota: the sweep's stopper takes them into STORAGE_FULL_MET (in the driver) and ends the run.
METRIC = "val_macro_f1"
STORAGE_FULL_ERRNO = "storage_full_errno"
STORAGE_FULL_FILE = "storage_full_file"
STORAGE_FULL_MET: list[tuple[int, str]] = []


def tune_trial(config: dict) -> None:
    """Tune function trainable: one trial = one Ray Train run in the trial's own folder.

    A full disk or quota (ENOSPC, EDQUOT) is reported, not raised: Tune would write the trial's error
    into the full experiment folder and read it back broken (an ``EOFError`` from ``error.pkl``), and
    no trial is at fault. The report carries the metric (NaN) beside the errno and file, since Tune
    refuses a trial's last result without its metric; the sweep's stopper then ends the run
    (:func:`_stop_on_signal`), the trial is left to resume and the driver exits 74."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = config["trial"]
    try:
        err = trial_trainer(trial["trial_id"], trial["train"], [TuneReportCallback()]).fit().error
    except Exception as raised:               # noqa: BLE001 - Train V2 raises a failed run (TrainingFailedError)
        err = raised
    if err is None:
        return
    full = storage_full_at(err, trial["train"]["output_dir"])
    if full is None:
        raise err
    say(f"[sweep] {trial['trial_id']}: {full.filename}: {full.strerror}: left to resume, the sweep stops")
    tune.report({METRIC: math.nan, STORAGE_FULL_ERRNO: full.errno, STORAGE_FULL_FILE: full.filename})


def run_array_trial(trial: Trial) -> None:
    """Array mode (``--trial-index``): one planned trial as a plain Ray Train run, no Tune (so no
    ASHA). Its outcome lands in its folder as in a Tune run (model/ or error.json). Called with the
    stop signals armed: a signal raises ``Interrupted`` here and the trial keeps its last
    epoch checkpoint."""
    import ray

    from allcluster.train.ray_train import node_resources

    concurrency([trial], ray.cluster_resources(), 1, node_resources())    # refuses a trial the cluster cannot fit
    clear_error(trial.dir)
    prebuild_caches([trial])
    trainer = trial_trainer(trial.trial_id, to_dict(trial.config))
    try:
        result = call_in_thread(trainer.fit)
        err = result.error
    except Exception as raised:               # Train V2 raises a failed run (TrainingFailedError)
        err = raised
    if err and (full := storage_full_at(err, trial.dir)):  # no trial at fault: exit 74, the rerun resumes it
        raise full from err
    if err:
        record_error(trial, err, "a stop signal" if STOP_REQUESTED.is_set() else "")


def trial_resources(cfg: TrainConfig) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds while it trains."""
    return cfg.resources.cpus + TRIAL_DRIVER_CPU, cfg.resources.gpus


def concurrency(trials: list[Trial], cluster: dict, cap: int, nodes: list[dict] = ()) -> int:
    """How many trials run at once: what the cluster fits (so one config fills 1 GPU or 32). A trial
    that can never run (see :func:`allcluster.train.ray_train.check_fits`; ``nodes``: each node's
    resources) is refused, naming the trial."""
    from allcluster.train.ray_train import check_fits

    for trial in trials:
        try:
            check_fits(trial.config.resources, cluster, list(nodes))
        except ConfigError as err:
            raise ConfigError(f"trial {trial.trial_id}: train.{err}") from None
    cpus = max(trial_resources(t.config)[0] for t in trials)
    gpus = max(trial_resources(t.config)[1] for t in trials)
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if cpus > have_cpu + 1e-9 or gpus > have_gpu + 1e-9:
        raise ConfigError(f"train.resources: one trial needs {cpus:g} CPUs ({cpus - TRIAL_DRIVER_CPU:g} for its "
                          f"workers, {TRIAL_DRIVER_CPU:g} for the Tune actor that drives them) and {gpus:g} GPUs, but "
                          f"the Ray cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs; lower "
                          "resources.num_workers, cpus_per_worker (e.g. 0.9 of a whole CPU) or gpus_per_worker")
    fits = math.floor(have_cpu / cpus + 1e-9)
    if gpus:
        fits = min(fits, math.floor(have_gpu / gpus + 1e-9))
    return max(1, min(fits, cap or fits, len(trials)))


def _build_node_caches(manifest: str, keys: list[tuple[int, bool, float, str]]) -> str:
    """Runs on one node: build (or find) that node's decoded-image caches."""
    import socket

    from allcluster.data.cache import ensure_cache
    from allcluster.data.manifest import read_manifest

    frame = read_manifest(manifest)
    for size, roi, margin, root in keys:
        ensure_cache(frame, Preprocess(size=size, roi_crop=roi, roi_margin=margin), root or None,
                     manifest_path=manifest, log=lambda m: say(f"[sweep] {socket.gethostname()}: {m}")).close()
    return socket.gethostname()


def prebuild_caches(trials: list[Trial]) -> None:
    """Decode every image once per node and input size before any trial starts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    wanted: dict[str, set] = {}
    for t in trials:
        d = t.config.data
        wanted.setdefault(d.manifest, set()).add((d.image_size, d.roi_crop, d.roi_margin, d.cache_dir))
    build = ray.remote(num_cpus=1)(_build_node_caches)
    pending = []
    for node in (n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1):
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        for manifest, keys in wanted.items():
            pending.append(build.options(scheduling_strategy=strategy).remote(manifest, sorted(keys)))
    say(f"[sweep] decoded-image caches ready on: {', '.join(sorted(set(ray.get(pending))))}")


def progress_callback(total: int):
    """A Tune callback printing one line per trial event (Tune's own tables print whole configs)."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.done = 0
            self.start = time.time()

        def _name(self, trial) -> str:
            return trial.config["trial"]["trial_id"]

        def on_trial_start(self, iteration, trials, trial, **info):
            say(f"[sweep] start {self._name(trial)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "epoch" in result and "train_loss" in result:
                say(f"[sweep] {self._name(trial)} epoch {result['epoch'] + 1}: val macro-F1 "
                    f"{result['val_macro_f1']:.3f} (best {result['best_val_macro_f1']:.3f})")

        def _ended(self, trial, how: str):
            self.done += 1
            say(f"[sweep] {how} {self._name(trial)} ({self.done}/{total} done, "
                f"{time.time() - self.start:.0f} s elapsed)")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended(trial, "ended")

        def on_trial_error(self, iteration, trials, trial, **info):
            # not yet "errored": a trial whose Ray processes died (a node lost, a stop signal) is resumed
            # by the rerun; record_errors decides, after the run, and says which
            self._ended(trial, "raised")

    return Progress()


def record_errors(result_grid, trials: dict[str, Trial], stopped_by: str = "") -> None:
    """Write ``error.json`` for every trial that raised. Trials a scheduler stopped were marked when
    it decided (:class:`RecordsStops`); trials a stop signal cut short are left to be resumed.

    A trial whose Ray processes died is not errored in a run a stop signal ended (``stopped_by``):
    Slurm's SIGTERM at ``scontrol requeue``, preemption or ``scancel`` reaches every node of the job,
    and the Ray node it stops takes the trial actors on it down with it (``ActorDiedError``: "its
    node was terminated") before the driver has stopped those trials. Recorded, such a trial would
    never resume; left unmarked, the rerun resumes it. With no signal (a node lost: Ray notices in
    seconds, Slurm only after SlurmdTimeout, then requeues the job; or a worker the kernel's OOM
    killer ended) it is not errored either for ``LOST_RUNS_ALLOWED`` such runs in a row without a
    new epoch (``lost.json`` counts them). Its own exceptions are recorded as always. A trial whose model is
    exported is finished whatever its last report met.
    """
    for result in result_grid:
        if result.error is not None:
            record_error(trials[result.config["trial"]["trial_id"]], result.error, stopped_by)


def record_error(trial: Trial, err: BaseException, stopped_by: str = "") -> None:
    """One trial's error, by the rule of :func:`record_errors`."""
    if trial_status(trial.dir) == "finished":
        return
    died = ray_processes_died(err)
    if died and stopped_by:
        say(f"[sweep] {trial.trial_id} ended with {type(err).__name__} while {stopped_by} stopped "
            "the run: not recorded as errored, the rerun resumes it")
    elif died and (runs := mark_lost(trial.dir, err)) <= LOST_RUNS_ALLOWED:
        say(f"[sweep] {trial.trial_id}: its Ray processes died ({type(err).__name__}) with no stop signal "
            f"(a node lost, or a worker killed for memory): not recorded as errored, the rerun resumes it "
            f"({runs} of {LOST_RUNS_ALLOWED} such runs in a row allowed)")
    else:
        mark_errored(trial.dir, err, f"its Ray processes died in {runs} runs in a row: " if died else "")


def _worker_unresponsive() -> type:
    """Ray Train's error for a worker that stopped answering its health checks (a node cut off)."""
    try:
        from ray.train.v2._internal.exceptions import WorkerHealthCheckTimeoutError
    except ImportError:                       # an internal module: absent in another Ray, never matched
        return type("NoSuchError", (Exception,), {})
    return WorkerHealthCheckTimeoutError


def ray_processes_died(err: BaseException) -> bool:
    """Whether ``err`` says a Ray process (actor, worker, raylet, node) died rather than the trial's
    code raised; looks inside Ray Train's and Ray's wrappers (:func:`allcluster.interrupt.behind`)."""
    from ray import exceptions as rx

    died = (rx.RayActorError, rx.NodeDiedError, rx.WorkerCrashedError, rx.RaySystemError, rx.LocalRayletDiedError,
            _worker_unresponsive())
    return any(isinstance(found, died) and not getattr(found, "actor_init_failed", False) for found in behind(err))


class RecordsStops:
    """Mixin for a Tune scheduler: when it decides STOP for a trial that has not ended, the trial's
    folder gets ``stopped.json`` naming the scheduler (``stopped_by``) at once, so the record survives
    an interruption right after. Tune passes each reported result to ``on_trial_result`` and stops
    the trial when it returns ``TrialScheduler.STOP``."""
    stopped_by = "scheduler"

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        from ray.tune.schedulers import TrialScheduler

        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and not result.get("run_complete"):
            mark_stopped(Path(trial.config["trial"]["train"]["output_dir"]), self.stopped_by, result.get("epoch"))
        return decision


def _asha_class():
    from ray.tune.schedulers import ASHAScheduler

    class RecordingASHA(RecordsStops, ASHAScheduler):
        stopped_by = "asha"
    return RecordingASHA


def build_scheduler(sweep: SweepConfig, trials: list[Trial]):
    """ASHA on validation macro-F1 per epoch when ``asha.enabled``; else Tune's default (FIFO)."""
    from allcluster.train.session import EPOCHS_DONE

    if not sweep.asha.enabled:
        return None
    return _asha_class()(time_attr=EPOCHS_DONE, grace_period=sweep.asha.grace_period,
                         reduction_factor=sweep.asha.reduction_factor,
                         max_t=max(_max_epochs(t.config) for t in trials))


def _stop_on_signal():
    from ray.tune import Stopper

    class StopOnSignal(Stopper):
        """Ends the whole Tune run once a stop signal arrived or a trial reported a full disk or quota
        (every later trial would meet it too). Tune then stops every trial; the stopper runs in the
        driver, so what it learns stays in :data:`STORAGE_FULL_MET`."""

        def __call__(self, trial_id: str, result: dict) -> bool:
            from allcluster.sweep.ray_tune import (STORAGE_FULL_ERRNO, STORAGE_FULL_FILE,  # Tune pickles stoppers
                                                   STORAGE_FULL_MET)

            if STORAGE_FULL_ERRNO not in result:
                return False
            if not STORAGE_FULL_MET:
                STORAGE_FULL_MET.append((int(result[STORAGE_FULL_ERRNO]), str(result[STORAGE_FULL_FILE])))
            return True

        def stop_all(self) -> bool:
            from allcluster.interrupt import STOP_REQUESTED
            from allcluster.sweep.ray_tune import STORAGE_FULL_MET

            return STOP_REQUESTED.is_set() or bool(STORAGE_FULL_MET)
    return StopOnSignal()


def raise_if_storage_full(experiment_dir: Path, cause: BaseException | None = None) -> None:
    """Raise the full disk or quota the sweep met: the first one a trial reported, else one behind
    ``cause`` (Tune's own writes into the full experiment folder, named by it where they name no file)."""
    if STORAGE_FULL_MET:
        raise storage_full_error(*STORAGE_FULL_MET[0]) from cause
    if cause is not None and (full := storage_full_at(cause, experiment_dir)):
        raise full from cause


def trial_limit(sweep: SweepConfig, to_run: list[Trial]) -> int:
    """:func:`concurrency` on the connected Ray cluster."""
    import ray

    from allcluster.train.ray_train import node_resources

    return concurrency(to_run, ray.cluster_resources(), sweep.max_concurrent, node_resources())


def run_tune(sweep: SweepConfig, to_run: list[Trial], experiment_dir: Path, stop: StopSignals, limit: int) -> None:
    """Fit the given trials with Tune, ``limit`` at a time (:func:`trial_limit`); outcomes are written
    into each trial's folder.

    A stop signal (see :mod:`allcluster.interrupt`) ends the run early: running trials are
    stopped (their last epoch checkpoint stays), pending ones never start, Tune saves its state.
    """
    from ray import tune

    for trial in to_run:
        clear_error(trial.dir)                                   # a retried trial starts clean
    say(f"[sweep] {len(to_run)} trials to run, {limit} at a time")
    prebuild_caches(to_run)
    scheduler = build_scheduler(sweep, to_run)
    STORAGE_FULL_MET.clear()
    tuner = tune.Tuner(
        tune.with_resources(tune_trial, {"cpu": TRIAL_DRIVER_CPU}),
        # Trials were expanded (and validated) by the planner; Tune schedules that list.
        param_space={"trial": tune.grid_search([{"trial_id": t.trial_id, "train": to_dict(t.config)}
                                                for t in to_run])},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                    max_concurrent_trials=limit,
                                    trial_dirname_creator=lambda t: t.config["trial"]["trial_id"]),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(experiment_dir.resolve()), stop=_stop_on_signal(),
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                  callbacks=[progress_callback(len(to_run))],
                                  verbose=0))
    stop.graceful()
    try:
        grid = call_in_thread(tuner.fit)
    except Exception as err:
        raise_if_storage_full(experiment_dir, err)
        raise
    record_errors(grid, {t.trial_id: t for t in to_run}, stop.signal_name)
    raise_if_storage_full(experiment_dir)


def _max_epochs(cfg: TrainConfig) -> int:
    # Beyond the last report (epochs + the final one): ASHA must never stop a trial for reaching max_t,
    # which would kill it before it exports its model.
    return cfg.finetune.head_epochs + cfg.fit.epochs + 2
