"""The Ray Data wrapper: ``allcluster score`` as a streaming pipeline over the cluster.

    listing (driver) -> read + hash + decode (CPU tasks) -> predict + explain (actor pool, GPUs when
    present) -> rows back to the driver, which writes Parquet shards and shows progress

Memory is bounded by Ray Data's streaming backpressure: only a few batches of pixels are in flight,
whatever the archive size. Rows (and, by default, their shard's heatmap pack) are written by the
driver; with ``explain.heatmaps: files`` the actors write one PNG per map.
"""
from __future__ import annotations

import logging
import math
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from allcluster.config import ConfigError
from allcluster.console import process_age_s, say
from allcluster.data.paths import to_fs
from allcluster.interrupt import InterruptionCaught, StopSignals, report_progress
from allcluster.models.card import ModelCard
from allcluster.ray_utils import ensure_ray, leave_ray, stopping_joined_cluster
from allcluster.score.ledger import Ledger
from allcluster.score.reading import read_decode
from allcluster.score.rows import error_rows, provenance, storage_full_in
from allcluster.score.config import ScoreConfig, row_settings
from allcluster.score.inputs import Listing, Shard, check_input, list_inputs
from allcluster.score.output import (Progress, RowsState, ShardWriter, check_job_settings, check_output_free, compact,
                                     lock_output, mark_run_started, new_run_id, recover_journals, split_duplicates,
                                     summarize, summary_text, write_resolved_duplicates, write_summary)
from allcluster.score.rows import row_schema


def actor_plan(cfg: ScoreConfig, resources: dict) -> dict:
    """How many model replicas, with which resources: one per GPU (share) when the cluster has
    GPUs, otherwise CPU actors leaving room for the decode tasks."""
    w = cfg.workers
    gpus = resources.get("GPU", 0) if w.device != "cpu" else 0
    if w.device == "cuda" and not gpus:       # not a night on CPU at a tenth of the speed, unasked
        raise ConfigError(f"workers.device: 'cuda', but the Ray cluster has no GPU ({resources.get('CPU', 0):g} "
                          "CPUs); on Slurm request GPUs (--gres=gpu:N), or set workers.device to auto or cpu")
    if gpus:
        size = w.actors or max(1, int(gpus // w.gpus_per_actor))
        return {"size": size, "num_gpus": w.gpus_per_actor, "num_cpus": w.cpus_per_actor, "device": "cuda"}
    cpus = resources.get("CPU", 1)
    size = w.actors or max(1, int((cpus - w.decode_cpus) // w.cpus_per_actor) // 2)
    # The replicas hold their CPUs for the whole job: on a small allocation (1-2 CPUs) they must
    # leave room for one read/decode task, or Ray Data waits forever for a CPU to read the file list.
    per_actor = min(w.cpus_per_actor, max(0.01, (cpus - w.decode_cpus) / size))
    return {"size": size, "num_gpus": 0, "num_cpus": per_actor, "device": "cpu",
            "threads": w.torch_threads or max(1, math.ceil(per_actor), int(cpus // size))}


class ScoreActor:
    """One model replica in the actor pool (Ray Data constructs it once per actor): a
    :class:`allcluster.score.core.Scorer` built inside the actor, so the driver never imports torch."""

    def __init__(self, cfg, out_dir, run_id, ledger, extra, device, threads=0):
        import ray
        import torch

        from allcluster.score.core import Scorer

        if threads:
            torch.set_num_threads(threads)
        self.ledger = ledger
        self.scorer = Scorer(cfg, out_dir, run_id, lambda n, batch: ray.get(ledger.reserve.remote(n, batch)), extra, device)

    def __call__(self, batch):
        import ray

        from allcluster.score.core import DeviceBroken

        try:
            return self.scorer(batch)
        except DeviceBroken as err:
            # Ray restarts a dead replica and runs its batch again (max_restarts=-1, max_task_retries=-1):
            # a fresh process mends a broken context; an error that comes back every time (a faulty GPU,
            # a kernel this batch always breaks) becomes the batch's model_error rows after a few tries
            tries = ray.get(self.ledger.attempt.remote(f"model: {batch['path'][0]}"))
            if tries >= DEVICE_TRIES:
                return self.scorer(batch, device_may_be_broken=True)
            say(f"[score] {err}: the replica's GPU context is unusable; ending its process for a fresh one "
                f"(try {tries} of {DEVICE_TRIES} of this batch)", logging.WARNING)
            os._exit(1)


DEVICE_TRIES = 3


def _read_decode(batch, ledger, **kwargs):
    import ray
    attempt = ray.get(ledger.attempt.remote(str(batch["path"][0]))) if len(batch["path"]) else 1
    return read_decode(batch, claim=lambda shas, paths: ray.get(ledger.claim.remote(shas, paths)),
                       attempt=attempt, **kwargs)


def todo_blocks(todo: Listing, batch_size: int, max_blocks: int = 4096) -> list:
    """The files still to score as Arrow slices (views, no copy) of about ``batch_size`` rows, at
    most ``max_blocks`` of them: the Ray Dataset's input blocks."""
    rows = todo.files.num_rows
    size = max(batch_size, math.ceil(rows / max_blocks))
    return [todo.files.slice(start, size) for start in range(0, rows, size)]


def build_dataset(cfg: ScoreConfig, card: ModelCard, todo: Listing, ledger, run_id: str, plan: dict):
    """The lazy Ray Dataset of result rows for the files in ``todo``."""
    import ray

    # The to-do list goes in as Arrow slices of about one batch each (zero-copy views of the listing's
    # table, put in the object store): no read task, so nothing waits for a whole free CPU that the
    # model replicas may hold on a small node, and results stream back about one batch at a time.
    # from_blocks, not from_arrow: from_arrow computes each block's metadata in a remote task (a worker
    # process to start before the pipeline does); from_blocks computes it here, in microseconds.
    ds = ray.data.from_blocks(todo_blocks(todo, cfg.batch_size))
    ds = ds.map_batches(_read_decode, batch_size=cfg.batch_size, num_cpus=cfg.workers.decode_cpus,
                        fn_kwargs={"ledger": ledger, "size": card.input_size, "roi_crop": card.roi_crop,
                                   "roi_margin": card.roi_margin, "max_pixels": cfg.max_pixels,
                                   "max_bytes": cfg.max_bytes})
    return ds.map_batches(
        ScoreActor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan["size"]), num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"],
        fn_constructor_args=(cfg, str(Path(cfg.out).resolve()), run_id, ledger,
                             todo.input_columns, plan["device"],
                             plan.get("threads", 0)))


SCORE_STOPPING = "[score] {signal} received: stopping after the batch in hand; its rows are written"


@dataclass
class JobPlan:
    """What a run will do: the inputs still to score, out of ``inputs``, ``done`` having a final row;
    ``gone``: paths whose transient error row no retry can replace (the file has left the input)."""
    todo: Listing
    inputs: int
    done: int
    gone: list[str] = field(default_factory=list)


def plan_job(cfg: ScoreConfig, out: Path, retry_errors: bool = False, shard: Shard = Shard(),
             state: RowsState | None = None) -> JobPlan:
    """List the inputs (of ``shard``) and drop those with a final row in ``out`` (``state``: its rows
    already read). The job's own output is never listed as input, even when ``out`` lies inside
    ``input``; the full listing is not kept."""
    whole = list_inputs(cfg.input, exclude=(out,))
    listing = whole.part(shard)
    _say_folders_left_to_other_parts(whole, listing)
    inputs = len(listing)
    state = state or RowsState.read(out)
    todo = listing.without(state.done_paths(retry_errors))
    return JobPlan(todo, inputs, inputs - len(todo), _gone(state.retried_paths(shard), listing))


def _gone(retried: pa.Array, listing: Listing) -> list[str]:
    """Of the paths ``retried`` (transient error rows), those this listing lacks and that no longer
    exist: a file deleted or renamed (``x.jpg.part`` to ``x.jpg``) after its row. The hash set is of
    the few retried paths, not of the listing."""
    if not len(retried):
        return []
    paths = listing.files.column("path")
    listed = pc.unique(paths.filter(pc.is_in(paths, value_set=retried.cast(paths.type))))
    listed = pa.concat_arrays([listed.cast(retried.type), pa.array([e["path"] for e in listing.errors], retried.type)])
    unlisted = retried.filter(pc.invert(pc.is_in(retried, value_set=listed))).to_pylist()
    return [path for path in unlisted if _missing(path)]


def _missing(path: str) -> bool:
    """Whether the file ``path`` is gone: deleted, or a folder now (whose files get rows of their own);
    not a mount that fails to answer (EIO, ESTALE, EACCES keep its row)."""
    try:
        return stat.S_ISDIR(os.lstat(to_fs(path)).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False


def _say_folders_left_to_other_parts(whole: Listing, mine: Listing) -> None:
    """An array task lists the whole input; a folder it could not list has its row in the part its
    path falls in, but its files fall in every part: this part's files in it get no row this run."""
    own = {e["path"] for e in mine.errors}
    others = [e["path"] for e in whole.errors if e["error_type"] == "unlistable" and e["path"] not in own]
    if others:
        say(f"[score] warning: {len(others)} folder(s) could not be listed here ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); this part's files in them are not scored this run (the "
            "folder's unlistable row is another part's); a rerun of this part scores them once listed",
            logging.WARNING)


def check_before_run(cfg: ScoreConfig, shard: Shard = Shard()) -> ModelCard:
    """What a run refuses before it writes anything or starts Ray; reads only, raises ``ConfigError``:
    the model (its card), the input (missing, a manifest without paths), an ``out`` that another run
    holds (a whole job, or the same array task), an ``out`` that holds rows scored with another model
    or other row-shaping settings. ``--check`` runs exactly this."""
    card = ModelCard.read(cfg.model)
    check_explain_fits_model(cfg, card)
    check_input(cfg.input)
    out = Path(cfg.out).resolve()
    check_output_free(out, shard)
    check_job_settings(out, job_settings(card, cfg), record=False)
    return card


def check_explain_fits_model(cfg: ScoreConfig, card: ModelCard) -> None:
    """Refuse, naming the key, what only the model can rule out: CAM on a head with hidden layers, and
    budget classes the model does not have. Found while scoring, the first would make every image a
    (transient, so retried every night) ``model_error``; the second would explain nothing in depth."""
    from allcluster.xai.cams import CAM_NEEDS_A_PLAIN_HEAD

    for key, methods in (("explain.methods", cfg.explain.methods),
                         ("explain.budget.methods", cfg.explain.budget.methods)):
        if "cam" in methods and card.head_spec().hidden:
            raise ConfigError(f"{key}: {CAM_NEEDS_A_PLAIN_HEAD} (model {cfg.model}, head hidden "
                              f"{list(card.head_spec().hidden)})")
    unknown = [c for c in cfg.explain.budget.classes if c not in card.classes]
    if unknown:
        raise ConfigError(f"explain.budget.classes: {', '.join(map(repr, unknown))} not among the model's classes "
                          f"{', '.join(card.classes)} ({cfg.model})")


def job_settings(card: ModelCard, cfg: ScoreConfig) -> dict:
    """What rows of one output must share: the model (its sha256), the card's scoring keys, the
    row-shaping settings of ``cfg``; recorded in ``job.json`` by the first run, checked by every later one."""
    return {"model_sha256": card.weights_sha256, **card.scoring_settings(), **row_settings(cfg)}


def run_score(cfg: ScoreConfig, address: str | None = None, retry_errors: bool = False,
              shard: Shard = Shard()) -> dict:
    """Score every file of ``cfg.input`` (of ``shard``: an array task's part) that ``cfg.out`` has no
    final row for; returns the summary (``summary["interrupted"]`` is set when a signal stopped the
    run: rerun to resume). Array tasks share ``out``; the budget cap is split evenly between them."""
    from allcluster.config import write_resolved

    out = Path(cfg.out).resolve()
    card = check_before_run(cfg, shard)
    locks = lock_output(out, shard)         # before anything is written: a refused second run writes nothing
    try:
        check_job_settings(out, job_settings(card, cfg), record=False)   # again, under the lock (a race)
        methods = list(cfg.explain.methods) + list(cfg.explain.budget.methods)
        packed = methods if cfg.explain.heatmaps == "packed" else []
        recovered = recover_journals(out, shard)   # rows a killed run held in memory
        if recovered:
            say(f"[score] {sum(recovered.values())} rows a killed run had not written yet recovered from "
                f"its journal into {', '.join(sorted(recovered))}")
        state = RowsState.read(out, set_aside=True)    # the rows already here, read once for the whole start
        run_id = new_run_id(shard, after=state.newest_run())
        dropped = compact(out, shard, state)  # a run killed while replacing retried rows left two
        if dropped:
            state = RowsState.read(out)
        plan = plan_job(cfg, out, retry_errors, shard, state)
        todo = plan.todo
        say(f"[score] {plan.inputs} inputs, {plan.done} already scored in {out}, {len(todo)} to do (run {run_id})"
            + (f"; {dropped} superseded rows removed" if dropped else ""))
        start, connected = time.monotonic(), False
        times = {"seconds_to_first_row": None}      # set by stream_rows, kept when a signal ends it
        if todo.files.num_rows:   # first: our signal handlers must be the ones in force
            import ray

            connected = ensure_ray(address, dashboard=False)
            actor_plan(cfg, ray.cluster_resources())   # what only the cluster can refuse (cuda, no GPU): before
        check_job_settings(out, job_settings(card, cfg))   # recorded by the first run (after the cluster's check)
        card.write_model_info(out)
        write_resolved(cfg, out / "score.yaml", "allcluster score")
        mark_run_started(out, shard)          # a run killed on its way leaves the mark: "unfinished"
        schema = row_schema(card.classes, methods, todo.input_columns)
        writer = ShardWriter(out, schema, run_id, cfg.rows_per_shard, cfg.flush_seconds, packed, shard)
        with StopSignals(SCORE_STOPPING) as stop:
            stop.graceful()
            with InterruptionCaught() as caught:
                writer.add(error_rows(schema, todo.errors, provenance(card, cfg, run_id, "")))
                if todo.files.num_rows:
                    stream_rows(cfg, card, todo, writer, run_id, out, shard, stop, state.budget_used(shard), times)
            stop.hold()                   # writing what it has: no signal cuts it short
            summary = _finish(out, shard, state, todo, writer, time.monotonic() - start, plan.gone)
            summary.update(times)
            if caught.signal_name:
                summary["interrupted"] = caught.signal_name
                say(f"[score] interrupted by {caught.signal_name}: rows so far are written; rerun the same "
                    "command to resume")
            write_summary(out, shard, summary)
            say(summary_text(summary))
        # interrupted, or a stop signal on a joined cluster: the process ends at once (end_of_process)
        if connected and not caught.signal_name and not stopping_joined_cluster(address):
            leave_ray()
        return summary
    finally:
        for lock in reversed(locks):
            lock.release()


def _finish(out: Path, shard: Shard, state: RowsState, todo: Listing, writer: ShardWriter, seconds: float,
            gone: list[str] = ()) -> dict:
    """Write the rows in hand, tidy the output; the run's summary."""
    writer.flush()
    # final rows only: a folder that stays unlistable, or a file that stays unreadable, gets its
    # error row again at every start, which is no progress (a requeue loop would go unnoticed)
    report_progress(writer.final, "final rows")
    # retried transient errors: the new row replaces the old; a folder listed this time: its files' rows
    # replace its own; a transient error of a file gone from the input: nothing will, so it goes
    relisted = state.relisted([e["path"] for e in todo.errors if e["error_type"] == "unlistable"], shard)
    if gone:
        say(f"[score] {len(gone)} transient error row(s) of files no longer in the input removed "
            f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''})")
    compact(out, shard, relisted=pa.concat_arrays([relisted, pa.array(list(gone), relisted.type)]))
    return summarize(out, seconds, writer.written, shard)


def stream_rows(cfg: ScoreConfig, card: ModelCard, todo: Listing, writer: ShardWriter, run_id: str, out: Path,
                shard: Shard = Shard(), stop: StopSignals | None = None, budget_spent: int = 0,
                times: dict | None = None) -> None:
    """Run the pipeline and write its rows as they stream back (duplicates resolved at the end); a
    stop asked for by a signal ends it after the batch in hand (:class:`Interrupted`). Sets
    ``times["seconds_to_first_row"]``: from the command's start (the process's) to the first scored
    batch, also when a signal ends the run later. ``budget_spent``: budgeted explanations earlier
    runs of ``shard`` already made (the cap spans reruns)."""
    import pyarrow as pa
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.data.DataContext.get_current().enable_progress_bars = False     # our own progress line instead
    plan = actor_plan(cfg, ray.cluster_resources())
    say(f"[score] {plan['size']} model replica(s) on {plan['device']} "
        f"({plan['num_gpus']:g} GPU, {plan['num_cpus']:g} CPU each), batch {cfg.batch_size}")
    cap = shard.share(cfg.explain.budget.max_images)
    # on the driver's node: a worker node whose Ray dies takes only its tasks (Ray Data retries them),
    # while a ledger placed there would fail every later claim, and with it the whole dataset
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ledger = ray.remote(Ledger).options(num_cpus=0, scheduling_strategy=here).remote(cap, budget_spent)
    progress = Progress(len(todo), cfg.progress_seconds)
    waiting, times = [], {} if times is None else times
    for table in build_dataset(cfg, card, todo, ledger, run_id, plan).iter_batches(batch_size=None,
                                                                                     batch_format="pyarrow"):
        times["seconds_to_first_row"] = times.get("seconds_to_first_row") or round(process_age_s(), 1)
        if full := storage_full_in(table):
            raise full                  # the run stops as when the driver's own write fails (exit 74)
        ready, pending = split_duplicates(table)
        writer.add(ready)
        if pending.num_rows:
            waiting.append(pending.select(writer.schema.names).cast(writer.schema))
        errors = int(np.sum(np.asarray(ready["status"].to_pylist()) == "error"))
        progress.update(table.num_rows, errors)
        if stop is not None:
            stop.raise_if_requested()
    writer.add(pa.Table.from_pylist([], schema=writer.schema))
    progress.update(len(todo.errors), len(todo.errors))
    progress.show(final=True)
    write_resolved_duplicates(out, waiting, writer, todo.input_columns)
