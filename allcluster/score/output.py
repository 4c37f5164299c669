"""The driver's side of a scoring job: result shards, resume state, duplicates, progress, summary.

Layout of ``OUT``::

    rows/part-<run>-<n>.parquet   result rows, one shard per flush (atomic: written, then renamed)
    rows/.journal-<K>-of-<N>/     the rows a run holds until its next shard (:mod:`allcluster.score.journal`)
    heatmaps/part-<run>-<n>.parquet   that shard's 8-bit maps (PNG bytes by sha256 and method), written
                                  first; or heatmaps/ab/<sha256>.<method>.png (``explain.heatmaps: files``)
    score.yaml, job.json          the resolved config; the settings every rerun must keep
    summary.json                  counts per class, flagged, errors by type, throughput
    .lock                         held by the one run writing here (released by the OS when it dies)
    .compacting.lock              array tasks rewrite shards they share one at a time (:func:`compact`)

Exactly one row per input file: a rerun skips files whose row is final (``ok``, or an error their
content determines) and scores the others again (transient errors,
:data:`allcluster.data.decode.TRANSIENT_ERRORS`); :func:`compact` then drops every row that a newer
run's row for the same path supersedes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from allcluster.atomic import (atomic_write_parquet, atomic_write_text, damaged_parquet, is_storage_full,
                               storage_full_error)
from allcluster.config import ConfigError
from allcluster.console import say
from allcluster.data.decode import TRANSIENT_ERRORS
from allcluster.locks import (ExclusiveLock, LockHeld, check_folder_free, check_writable_folder, lock_folder,
                              taking_turns)
from allcluster.score.config import IMPLIED_BEFORE
from allcluster.score.heatmaps import pack_of, point_rows_at_pack, write_pack
from allcluster.score.inputs import Shard, all_distinct, large_text, path_codes
from allcluster.score.journal import Journal, journal_folder, journaled_shards, read_journal
from allcluster.score.rows import OWN_COLUMNS, method_columns, methods_of, slug

BUDGET_REASONS = ["low_confidence", "class", "sample"]     # rows that got the expensive methods
COMPACTING_LOCK = ".compacting.lock"
SUMMARY_LOCK = ".summary.lock"            # array parts write summary.json in turn


def parquet_files(folder: Path) -> list[Path]:
    """The finished Parquet files of a folder, sorted: temporary files (and ``.damaged/``) start with
    '.'. Every reader of row shards lists them here."""
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []


def parquet_footer(path: Path) -> pa.Schema | None:
    """The schema in a Parquet file's footer; None for a damaged file (empty, torn: a run killed while
    a copy was cut short). Anything else that fails to read (EIO, ESTALE) raises."""
    try:
        return pq.read_schema(path)
    except Exception as err:     # noqa: BLE001 - pyarrow raises several types for a damaged file
        if damaged_parquet(err):
            return None
        raise


def shard_footers(files: list[Path]) -> tuple[dict[Path, pa.Schema], list[Path]]:
    """The schemas of the row shards ``files`` whose footer reads, and those that are damaged
    (:func:`parquet_footer`): what a reader leaves out and names."""
    footers = {shard: parquet_footer(shard) for shard in files}
    return ({shard: schema for shard, schema in footers.items() if schema is not None},
            [shard for shard, schema in footers.items() if schema is None])


def rows_dataset(out: Path) -> pads.Dataset | None:
    """All finished shards of ``out`` (:func:`parquet_files` of ``rows/``); None when there is none."""
    shards = parquet_files(out / "rows")
    return pads.dataset([str(s) for s in shards], format="parquet") if shards else None


# The bookkeeping columns a run reads once at its start (resume, compaction, budget spent); the
# repetitive ones stay dictionary-encoded, so a resumed 10-million-row output costs about its paths.
STATE_COLUMNS = ("path", "run_id", "status", "error_type", "duplicate_of", "budget_reason")
STATE_DICTIONARY = ["run_id", "status", "error_type", "duplicate_of", "budget_reason"]


def final_rows(status: pa.ChunkedArray | pa.Array, error_type: pa.ChunkedArray | pa.Array,
               retry_errors: bool = False) -> pa.ChunkedArray | pa.Array:
    """Which rows are final (a rerun skips their paths): ``ok`` rows and errors that the file's
    content determines (with ``retry_errors``, ``ok`` rows only). Transient errors are scored again."""
    final = pc.equal(status, "ok")
    if not retry_errors:
        transient = pc.is_in(error_type, pa.array(sorted(TRANSIENT_ERRORS)))
        final = pc.or_(final, pc.invert(pc.fill_null(transient, False)))
    return pc.fill_null(final, False)


def _readable_shards(shards: list[Path], set_aside: bool) -> list[Path]:
    """The shards whose state columns read (footer and pages); the others are named in a warning (and
    moved to ``rows/.damaged/`` with ``set_aside``)."""
    readable = []
    for shard in shards:
        try:
            pq.read_table(shard, columns=list(STATE_COLUMNS))     # its pages too, not only the footer
            readable.append(shard)
        except (pa.ArrowInvalid, OSError) as err:
            if not damaged_parquet(err):
                raise
            where = "left out"
            if set_aside:
                (shard.parent / ".damaged").mkdir(exist_ok=True)
                with contextlib.suppress(FileNotFoundError):     # another array task moved it first
                    shard.rename(shard.parent / ".damaged" / shard.name)
                where = f"moved to {shard.parent / '.damaged'}"
            say(f"[score] warning: {shard} is not a readable Parquet file ({err}); {where}: its files are "
                "scored again", logging.WARNING)
    return readable


class RowsState:
    """The rows already in ``out``, as their bookkeeping columns (:data:`STATE_COLUMNS`), read once."""

    def __init__(self, table: pa.Table):
        self.table = table

    @classmethod
    def read(cls, out: Path, set_aside: bool = False) -> "RowsState":
        """The rows of ``out``. A shard that is no Parquet file (empty or torn: a crash, a copy cut
        short) is left out with a warning, so its files are scored again; with ``set_aside`` (a run,
        under the output's lock) it is also moved to ``rows/.damaged/``, where no reader looks."""
        shards = parquet_files(out / "rows")
        fmt = pads.ParquetFileFormat(read_options=pads.ParquetReadOptions(dictionary_columns=STATE_DICTIONARY))

        def state_of(files: list[Path]) -> pa.Table:
            if not files:
                return pa.table({c: pa.array([], pa.string()) for c in STATE_COLUMNS})
            return pads.dataset(files, format=fmt).to_table(columns=list(STATE_COLUMNS))
        try:
            return cls(state_of(shards))
        except (pa.ArrowInvalid, OSError) as err:   # shard by shard only then: a healthy start opens each once
            if not damaged_parquet(err):
                raise
            return cls(state_of(_readable_shards(shards, set_aside)))

    @functools.cached_property
    def one_row_per_path(self) -> bool:
        """No path has two rows (checked once: a start asks it for compaction and for the done set)."""
        return all_distinct(self.table.column("path"))

    def text(self, name: str) -> pa.ChunkedArray:
        """Column ``name`` as plain strings (dictionary-decoded)."""
        return pc.cast(self.table.column(name), pa.string())

    def done_paths(self, retry_errors: bool = False) -> pa.Array | pa.ChunkedArray:
        """Paths whose row is final, which a rerun skips: ``ok`` rows and errors that the file's
        content determines (with ``retry_errors``, ``ok`` rows only). Transient errors are scored again."""
        final = final_rows(self.text("status"), self.text("error_type"), retry_errors)
        paths = self.table.column("path")
        done = large_text(paths if pc.all(final).as_py() else paths.filter(final))   # all final: no copy
        return done if self.one_row_per_path or all_distinct(done) else pc.unique(done)

    def budget_used(self, shard: Shard = Shard()) -> int:
        """Budgeted explanations already spent by earlier runs of ``shard`` (the cap spans reruns): ok
        first copies only, as a run gives back the grant of rows that end as errors (an error row whose
        maps were not written still names its budget reason; its file is scored again)."""
        spent = pc.and_(pc.and_(pc.equal(self.text("duplicate_of"), ""), pc.equal(self.text("status"), "ok")),
                        pc.is_in(self.text("budget_reason"), pa.array(BUDGET_REASONS)))
        return sum(shard.holds(self.table.column("path").filter(pc.fill_null(spent, False)).to_pylist()))

    def superseded(self, shard: Shard = Shard()) -> tuple[pa.Array, pa.Array]:
        """(paths of ``shard`` with rows from several runs, their ``path + NUL + newest run_id`` keys)."""
        if self.one_row_per_path:                            # the usual case
            return pa.array([], pa.large_string()), pa.array([], pa.large_string())
        paths = large_text(self.table.column("path"))
        distinct, codes = path_codes(paths)
        counts = pa.table({"code": codes, "run_id": self.text("run_id")}).group_by("code").aggregate(
            [("run_id", "max"), ("run_id", "count")])
        repeated = counts.filter(pc.greater(counts["run_id_count"], 1))
        repeated = pa.table({"path": distinct.take(repeated["code"]), "run_id": repeated["run_id_max"]})
        repeated = repeated.filter(pa.array(shard.holds(repeated["path"].to_pylist()), pa.bool_()))
        return repeated["path"], row_keys(repeated)

    def newest_run(self) -> str:
        """The newest run id among the rows ("" when there are none)."""
        column = self.table.column("run_id")
        runs = pa.chunked_array([c.dictionary for c in column.chunks], pa.string()) \
            if pa.types.is_dictionary(column.type) else column
        return pc.max(runs).as_py() or ""

    def retried_paths(self, shard: Shard = Shard()) -> pa.Array:
        """Paths of ``shard`` whose row is a transient error of a file (not an ``unlistable`` folder's):
        what a run tries again, if the file is still there."""
        error_type = self.text("error_type")
        retried = pc.and_(pc.invert(final_rows(self.text("status"), error_type)), pc.not_equal(error_type, "unlistable"))
        paths = pc.unique(large_text(self.table.column("path").filter(pc.fill_null(retried, False))))
        return paths.filter(pa.array(shard.holds(paths.to_pylist()), pa.bool_()))

    def relisted(self, still_unlistable: list[str], shard: Shard = Shard()) -> pa.Array:
        """Folders of ``shard`` with an ``unlistable`` row that are not in ``still_unlistable`` (this
        run's listing errors of that type): this run listed them, and their files' rows replace it."""
        rows = pc.equal(self.text("error_type"), "unlistable")
        folders = pc.unique(large_text(self.table.column("path").filter(pc.fill_null(rows, False))))
        folders = folders.filter(pc.invert(pc.is_in(folders, pa.array(still_unlistable, pa.string()))))
        return folders.filter(pa.array(shard.holds(folders.to_pylist()), pa.bool_()))


def row_keys(table: pa.Table) -> pa.ChunkedArray:
    """``path + NUL + run_id`` of each row: one row of one run."""
    text = pa.large_string()              # a whole job's keys can pass 2 GiB (see large_text)
    return pc.binary_join_element_wise(pc.cast(table["path"], text), pc.cast(table["run_id"], text),
                                       pa.scalar("\x00", text))


def superseded_rows(table: pa.Table, paths: pa.Array, newest: pa.Array) -> pa.Array:
    """Which rows of ``table`` (with ``path`` and ``run_id``) a newer run's row replaces, given
    :meth:`RowsState.superseded`'s ``(paths, newest)``: what :func:`compact` drops and reports skip."""
    return pc.and_(pc.is_in(table["path"], paths), pc.invert(pc.is_in(row_keys(table), newest)))


def compact(out: Path, shard: Shard = Shard(), state: RowsState | None = None, relisted: pa.Array | None = None) -> int:
    """Drop rows superseded by a newer run's row for the same path (a retried transient error, or a
    row a killed run wrote twice), and the rows of ``relisted`` folders (:meth:`RowsState.relisted`);
    shards are rewritten atomically. Only paths of ``shard`` are touched, so array tasks sharing
    ``out`` never rewrite each other's rows. ``state``: the rows' bookkeeping if already read.
    Returns the rows dropped."""
    paths, newest = (state if state is not None else RowsState.read(out)).superseded(shard)
    relisted = relisted if relisted is not None else pa.array([], pa.string())
    if not len(paths) and not len(relisted):
        return 0
    dropped = 0
    # A shard written by a whole job (or by another N) holds several array tasks' paths: each task
    # rewrites it in turn, reading it after the previous one's rewrite, or one would put back the
    # rows the other dropped (two rows for one file).
    with taking_turns(out / COMPACTING_LOCK):
        for fragment in rows_dataset(out).get_fragments():
            table = pq.read_table(fragment.path)
            stale = pc.or_(superseded_rows(table, paths, newest), pc.is_in(table["path"], relisted))
            if pc.any(stale).as_py():
                keep = table.filter(pc.invert(stale))
                dropped += table.num_rows - keep.num_rows
                replace_shard(Path(fragment.path), keep)
    return dropped


def replace_shard(path: Path, table: pa.Table) -> None:
    """Write ``table`` to ``path`` atomically (temp file + rename). A shard emptied by compaction
    stays as a file of no rows: another array task reading the rows at that moment must not find a
    file of its listing gone."""
    atomic_write_parquet(path, table)


def lock_output(out: Path, shard: Shard = Shard()) -> list[ExclusiveLock]:
    """Make ``out`` and hold its locks for this run (:func:`allcluster.locks.lock_folder`): a whole job
    exclusively, array tasks side by side with ``.lock-K-of-N`` each, but not beside a part of another
    split (another N), whose files overlap theirs."""
    locks = lock_folder(*_output_locks(out, shard))
    try:
        _refuse_unwritable_folders(out)
        _refuse_other_splits(out, shard)     # after taking ours: of two starting at once, one sees the other
    except ConfigError:
        for lock in reversed(locks):
            lock.release()
        raise
    return locks


def check_output_free(out: Path, shard: Shard = Shard()) -> None:
    """Refuse, as :func:`lock_output` would, an ``out`` that another run holds; takes and writes nothing."""
    check_folder_free(*_output_locks(out, shard))
    _refuse_unwritable_folders(out)
    _refuse_other_splits(out, shard)


def _refuse_unwritable_folders(out: Path) -> None:
    """``rows/``, ``heatmaps/`` (and ``overlays/``) of an existing ``out`` must take this run's files too (another
    user's, a read-only mount, a file in their place): found after scoring, every row of the run
    would be lost or turn into a ``write_error``."""
    for folder in (out / "rows", out / "heatmaps", out / "overlays"):
        if os.path.lexists(folder):
            check_writable_folder(folder)


def _refuse_other_splits(out: Path, shard: Shard) -> None:
    """A part of another split (``--shard K/M``, M != N: say a resubmission with ALLCLUSTER_SHARDS=8
    while a 4-part job runs) that holds its lock: its files overlap this part's, both would score
    them and each would drop the other's rows."""
    if shard.whole:
        return
    for lock_file in sorted(out.glob(".lock-*-of-*")):
        part = Shard.from_name(lock_file.name.removeprefix(".lock-"))
        if part and part.count != shard.count:
            ExclusiveLock(lock_file, f"output folder {out} (part {part.text} of another split than "
                                     f"{shard.text})").probe()


def _output_locks(out: Path, shard: Shard) -> tuple:
    return (out, f"output folder {out}", "" if shard.whole else shard.name,
            f"shard {shard.text} of {out}")


def unfinished(out: Path) -> str:
    """Why the scoring output ``out`` is not a finished job's, for its readers ("" when nothing says
    so): a run writes it now, a killed run's rows wait in a journal (not yet in ``rows/``), its last
    run was interrupted, or no run into it has finished. Reads only."""
    try:
        ExclusiveLock(out / ".lock", f"output folder {out}").probe()
    except LockHeld:
        return "a run is writing it now"
    except ConfigError:                   # a lock file this user cannot open: nothing said by it
        pass
    if any(any(folder.iterdir()) for folder in journal_folders(out)):
        return "a killed run's last rows wait in its journal, not yet in rows/; its next run writes them"
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return "no run into it has finished" if (out / "job.json").is_file() else ""
    if summary.get("interrupted"):
        return f"its last run was interrupted by {summary['interrupted']}"
    if summary.get("running"):
        return (f"its last run (started {summary['running']}) ended without finishing (killed, or it failed): "
                "rerun its command")
    return _unfinished_parts(summary.get("parts") or {})


def _unfinished_parts(parts: dict[str, dict]) -> str:
    """Why an array job's parts (``summary.json``'s ``parts``: each part's last run) leave it
    unfinished: a part whose last run was interrupted, or parts with no finished run."""
    parts = {name: part for name, part in parts.items() if Shard.from_name(name)}     # a hand-edited file's others
    interrupted = sorted((name for name, part in parts.items() if part.get("interrupted")), key=_part_order)
    if interrupted:
        return (f"the last run of part {', '.join(Shard.from_name(n).text for n in interrupted)} of its array "
                f"job was interrupted (by {parts[interrupted[0]]['interrupted']})")
    unended = sorted((name for name, part in parts.items() if not part.get("ended_at")), key=_part_order)
    if unended:
        return (f"the last run of part {', '.join(Shard.from_name(n).text for n in unended)} of its array job "
                "ended without finishing (killed, or it failed)")
    count = max((_part_order(name)[1] for name in parts), default=0)
    missing = [Shard(k, count).text for k in range(count) if Shard(k, count).name not in parts]
    return f"part {', '.join(missing)} of its array job has no finished run recorded" if missing else ""


def _part_order(name: str) -> tuple[int, int]:
    part = Shard.from_name(name)
    return part.index, part.count


def mark_run_started(out: Path, shard: Shard) -> None:
    """Record in ``summary.json`` that a run (of ``shard``) has started; :func:`write_summary` at its end
    replaces the mark, so a run killed or failed on its way (a SIGKILL, a full disk) leaves it, and
    :func:`unfinished` says so where the counts of an earlier run would read as final."""
    _update_summary(out, shard, lambda earlier: {**earlier, "running": _now()},
                    {"interrupted": "", "started_at": _now(), "ended_at": None})


def write_summary(out: Path, shard: Shard, summary: dict) -> None:
    """Write ``summary.json`` at a run's end. Array parts share it: each adds its own last run under
    ``parts`` (whether a signal interrupted it), so that the part that ends last does not hide
    another's interruption; a part of another split (another N) starts the record afresh, a whole
    run drops it."""
    _update_summary(out, shard, lambda earlier: summary,
                    {"interrupted": summary.get("interrupted", ""), "run_rows": summary["run_rows"],
                     "ended_at": _now()})


def _update_summary(out: Path, shard: Shard, whole: Callable[[dict], dict], part: dict) -> None:
    with taking_turns(out / SUMMARY_LOCK):           # array parts write it in turn
        try:
            earlier = json.loads((out / "summary.json").read_text())
            earlier = earlier if isinstance(earlier, dict) else {}
        except (OSError, ValueError):
            earlier = {}
        summary = whole({k: v for k, v in earlier.items() if k != "parts"})
        if not shard.whole:
            parts = {name: entry for name, entry in (earlier.get("parts") or {}).items()
                     if Shard.from_name(name) and Shard.from_name(name).count == shard.count}
            parts[shard.name] = {**parts.get(shard.name, {}), **part}
            summary = {**summary, "parts": dict(sorted(parts.items(), key=lambda item: _part_order(item[0])))}
            summary.pop("running", None)              # parts say it each for itself
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def check_job_settings(out: Path, settings: dict, record: bool = True) -> None:
    """A rerun into ``out`` must keep the model and the row-shaping keys, so every shard agrees.
    The first run records them (``job.json``) unless ``record`` is false (a check that writes nothing)."""
    path = out / "job.json"
    if path.is_file():
        before = json.loads(path.read_text())
        before.update({k: v for k, v in IMPLIED_BEFORE.items() if k in settings and k not in before})
        # an older job.json recorded the weights only: the other model.* keys of its model are unknown
        compared = sorted(k for k in set(before) | set(settings) if k in before or not k.startswith("model."))
        changed = [k for k in compared if before.get(k) != settings.get(k)]
        if changed:
            detail = "; ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ConfigError(f"{out}: already holds rows scored with other settings ({detail}); "
                              "rerun with the same settings to resume, or score into a new --out")
    elif record:       # atomic: array tasks run this side by side, and one may read while another writes
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2))


RUN_TIME_FORMAT = "%Y%m%d-%H%M%S"


def new_run_id(shard: Shard = Shard(), after: str = "") -> str:
    """This run's id: its local start time (so that the newest run's row sorts last, what
    :func:`compact` keeps), then the shard, then 32 random bits. Array tasks write into the same
    ``rows/`` and often start in the same second: the shard keeps their file names apart.

    ``after``: the newest run id already in the output. A clock that went back since (the hour
    repeated when daylight saving time ends, a requeue onto a node whose clock lags) would make
    this run's rows sort before that run's, and compaction would keep the older row; the id's time
    is then one second after that run's instead."""
    import datetime
    import secrets

    stamp = time.strftime(RUN_TIME_FORMAT)
    try:
        newest = datetime.datetime.strptime(after[:len(stamp)], RUN_TIME_FORMAT)
    except ValueError:                  # none, or rows written by other tools: the clock's time
        newest = None
    if newest is not None and stamp <= after[:len(stamp)]:
        stamp = (newest + datetime.timedelta(seconds=1)).strftime(RUN_TIME_FORMAT)
    return f"{stamp}-{shard.index:04d}-{secrets.token_hex(4)}"


class ShardWriter:
    """Buffers result rows and writes them as atomic Parquet shards; with ``packed_methods``, the
    maps the batches carry go into one pack per shard (:mod:`allcluster.score.heatmaps`), written
    before the shard whose rows point at it. What it buffers is journaled too
    (:mod:`allcluster.score.journal`): a driver killed before its next shard loses none of it."""

    def __init__(self, out: Path, schema: pa.Schema, run_id: str, rows_per_shard: int, flush_seconds: float,
                 packed_methods: list[str] = (), shard: Shard = Shard()):
        self.dir = out / "rows"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out, self.schema, self.run_id, self.methods = out, schema, run_id, list(packed_methods)
        self.journal_dir = journal_folder(self.dir, shard.name)
        self.journal: Journal | None = None
        self.journaling = True
        self.rows_per_shard, self.flush_seconds = rows_per_shard, flush_seconds
        self.buffer: list[pa.Table] = []
        self.maps: list[pa.Table] = []
        self.buffered = 0
        self.shards = 0
        self.written = 0                  # rows this writer has written (this run's rows)
        self.final = 0                    # of which final (:func:`final_rows`): this run's progress
        self.last_flush = time.monotonic()

    def name(self) -> str:
        """The file name of the shard (and pack) being buffered."""
        return f"part-{self.run_id}-{self.shards:05d}.parquet"

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            maps = None
            if self.methods:
                maps = pack_of(table, self.methods)
                self.maps.append(maps)
                table = point_rows_at_pack(table, self.methods, f"heatmaps/{self.name()}")
            rows = table.select(self.schema.names).cast(self.schema)
            self.buffer.append(rows)
            self.buffered += table.num_rows
            self.journal_batch(rows, maps)
        if self.buffered >= self.rows_per_shard or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def journal_batch(self, rows: pa.Table, maps: pa.Table | None) -> None:
        """Append the batch to this shard's journal. No room (a full disk, a quota) stops the run like
        any write into the output (exit 74), keeping the journal's whole batches for the rerun; a journal
        that cannot be written otherwise (a broken folder) is given up with one line: the rows stay in
        memory and reach the shard as before."""
        if not self.journaling:
            return
        try:
            self.journal = self.journal or Journal(self.journal_dir, self.name())
            self.journal.append(rows, maps)
        except OSError as err:
            if is_storage_full(err):      # going on would score the night into memory the next write loses
                raise storage_full_error(err.errno, self.journal_dir) from err
            self.journaling = False
            self.drop_journal()
            say(f"[score] warning: journal {self.journal_dir} not written ({type(err).__name__}: {err}); "
                f"rows held for the next shard are lost if this run is killed", logging.WARNING)

    def drop_journal(self) -> None:
        journal, self.journal = self.journal, None
        if journal is not None:
            journal.discard()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffered:
            return
        rows = write_shard(self.out, self.name(), pa.concat_tables(self.buffer),
                           pa.concat_tables(self.maps) if self.maps else None, self.methods)
        self.drop_journal()
        self.written += rows.num_rows
        self.final += pc.sum(final_rows(rows["status"], rows["error_type"])).as_py() or 0
        self.buffer, self.maps, self.buffered = [], [], 0
        self.shards += 1


def write_shard(out: Path, name: str, rows: pa.Table, pack: pa.Table | None, methods: list[str]) -> pa.Table:
    """Write one shard ``rows/<name>`` atomically, its maps' pack ``heatmaps/<name>`` first; returns the
    rows as written (those whose pack could not be written become ``write_error`` rows)."""
    if pack is not None and pack.num_rows:
        try:
            write_pack(out / "heatmaps" / name, pack)
        except OSError as err:            # a broken folder...: rows say so, reruns retry
            if is_storage_full(err):     # no room for anything: the run stops (the CLI says so, exit 74)
                raise
            rows = unwritten_maps(rows, f"heatmaps/{name}", methods, err)
    replace_shard(out / "rows" / name, rows)
    return rows


def with_journaled_rows(out: Path, state: RowsState) -> RowsState:
    """``state`` plus the rows every journal in ``out`` holds: what the next run finds once it has
    recovered them (:func:`recover_journals`), read without writing anything (``--dry-run``)."""
    held = [read_journal(stream) for folder in journal_folders(out) for _, stream, _ in journaled_shards(folder)]
    held = [t.select(list(STATE_COLUMNS)) for t in held if t is not None and t.num_rows]
    if not held:
        return state
    plain = pa.schema([(name, pa.string()) for name in STATE_COLUMNS])
    return RowsState(pa.concat_tables([state.table.cast(plain), *(t.cast(plain) for t in held)]))


def journal_folders(out: Path, shard: Shard = Shard()) -> list[Path]:
    """The journal folders in ``out`` that ``shard`` may recover: every one for a whole job (its
    exclusive lock says no array task runs), an array task only its own."""
    rows_dir = out / "rows"
    folders = sorted(rows_dir.glob(".journal-*")) if shard.whole else [journal_folder(rows_dir, shard.name)]
    return [folder for folder in folders if folder.is_dir()]


def recover_journals(out: Path, shard: Shard = Shard()) -> dict[str, int]:
    """Write the rows a killed run held in memory (:mod:`allcluster.score.journal`) as the shards it
    would have written, under its own run id; returns rows recovered per shard file. A whole job
    recovers every journal (its exclusive lock says no array task runs); an array task only its own.
    A shard already written (a run killed between its shard and the journal's removal) is not
    written again. A journal that cannot be read or removed is left with one line (its rows are
    scored again). Call with the output's lock held, before reading the rows' state."""
    recovered = {}
    for folder in journal_folders(out, shard):
        try:
            recovered.update(recover_folder(out, folder))
        except OSError as err:
            say(f"[score] warning: journal {folder} not recovered ({type(err).__name__}: {err}); "
                "the files whose rows it holds are scored again", logging.WARNING)
    return recovered


def recover_folder(out: Path, folder: Path) -> dict[str, int]:
    """:func:`recover_journals` for one journal folder."""
    recovered = {}
    for name, rows_stream, maps_stream in journaled_shards(folder):
        rows = read_journal(rows_stream)
        if not (out / "rows" / name).exists() and rows is not None and rows.num_rows:
            pack, methods = read_journal(maps_stream), methods_of(rows.schema)
            held = set(zip(pack["sha256"].to_pylist(), pack["method"].to_pylist())) if pack is not None else set()
            # a map the journal lost (a torn maps stream) makes its row a transient error: scored again
            rows = unwritten_maps(rows, f"heatmaps/{name}", methods, FileNotFoundError("not in the run's journal"),
                                  held)
            recovered[name] = write_shard(out, name, rows, pack, methods).num_rows
        rows_stream.unlink()
    for leftover in folder.iterdir():         # maps of a batch whose rows were never appended
        if not leftover.name.startswith(".nfs"):   # NFS's stand-in for a file some process still has open
            leftover.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
    return recovered


def unwritten_maps(rows: pa.Table, pack: str, methods: list[str], err: OSError,
                   held: set[tuple[str, str]] | None = None) -> pa.Table:
    """Rows whose maps were meant for ``pack``, which could not be written, as ``write_error`` rows
    (a transient error: the next run scores them again); the other rows as they are. With ``held``
    (the pack's ``(sha256, method)`` keys), only the rows whose maps it lacks."""
    out = rows.to_pylist()
    for row in out:
        named = [m for m in methods if row.get(method_columns(m)["heatmap"]) == pack]
        if named and (held is None or any((row["sha256"], slug(m)) not in held for m in named)):
            row.update({method_columns(m)["heatmap"]: None for m in methods})
            row.update(status="error", error_type="write_error",
                       error=f"{row['path']}: heatmaps not written to {pack}: {type(err).__name__}: {err}")
    return pa.Table.from_pylist(out, schema=rows.schema)


def split_duplicates(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(rows ready to write, rows of duplicates still waiting for their first copy's results)."""
    waiting = pc.and_(pc.not_equal(table["duplicate_of"], ""), pc.equal(table["status"], "ok"))
    waiting = pc.fill_null(waiting, False)
    return table.filter(pc.invert(waiting)), table.filter(waiting)


# Duplicates resolved per pass at the end of a run: :func:`resolve_duplicates` turns rows into Python
# objects, and a dump where half the files are copies holds millions of them.
DUPLICATES_PER_PASS = 100_000


def write_resolved_duplicates(out: Path, waiting: list[pa.Table], writer: "ShardWriter", extra: list[str] = ()) -> None:
    """Resolve the duplicates a run held back (:func:`split_duplicates`) and write them, a pass of
    :data:`DUPLICATES_PER_PASS` rows at a time, after the run's own rows are written."""
    writer.flush()                        # their first copies' rows must be in the shards first
    if not waiting:
        return
    held = pa.concat_tables(waiting)      # one table: each pass reads the shards once
    for start in range(0, held.num_rows, DUPLICATES_PER_PASS):
        writer.add(resolve_duplicates(out, held.slice(start, DUPLICATES_PER_PASS), extra))
    writer.flush()


def resolve_duplicates(out: Path, waiting: pa.Table, extra: list[str] = ()) -> pa.Table:
    """Each waiting duplicate gets its first copy's results (read back from the written shards; the
    newest row where a retried first copy still has an older one) with its own path, identity, run
    and input (``extra``) columns; a duplicate whose first copy has no row is an error."""
    own = [*OWN_COLUMNS, "run_id", "scored_at", *extra]
    if not waiting.num_rows:
        return waiting
    shas = pc.unique(waiting["sha256"])
    data = rows_dataset(out)
    owners = data.to_table(filter=pc.field("sha256").isin(shas) & (pc.field("duplicate_of") == "")) if data else None
    by_sha = {}
    if owners is not None:
        for row in owners.to_pylist():
            if row["sha256"] not in by_sha or row["run_id"] > by_sha[row["sha256"]]["run_id"]:
                by_sha[row["sha256"]] = row
    filled = []
    for row in waiting.to_pylist():
        owner = by_sha.get(row["sha256"])
        if owner is None:
            filled.append({**row, "status": "error", "error_type": "duplicate_unresolved",
                           "error": f"{row['path']}: same bytes as {row['duplicate_of']}, which has no result row"})
        elif owner["status"] == "error":        # the message names this file, then the copy it shares
            filled.append({**owner, **{k: row[k] for k in own},
                           "error": f"{row['path']}: same bytes as {row['duplicate_of']}, whose row says: {owner['error']}"})
        else:
            filled.append({**owner, **{k: row[k] for k in own}})
    return pa.Table.from_pylist(filled, schema=waiting.schema)


class Progress:
    """done/total, images/s, ETA and errors: in place on a terminal, plain lines in a Slurm log."""

    def __init__(self, total: int, interval: float = 0.0, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval or (1.0 if self.tty else 30.0)
        self.total, self.done, self.errors = total, 0, 0
        self.start = self.last = time.monotonic()

    def update(self, done: int, errors: int) -> None:
        self.done += done
        self.errors += errors
        if time.monotonic() - self.last >= self.interval:
            self.show()

    def rate(self) -> float:
        return self.done / max(1e-9, time.monotonic() - self.start)

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 360_000 else "?"
        share = 100.0 * self.done / max(1, self.total)
        return (f"[score] {self.done}/{self.total} ({share:.1f}%)  {rate:.1f} img/s  ETA {eta_text}  "
                f"errors {self.errors}")

    def show(self, final: bool = False) -> None:
        self.last = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()


def stale_row_keys(files: list[Path] | list[str]) -> pa.Array | None:
    """The keys (:func:`row_keys`) of the rows of one job's shards ``files`` that a newer run's row
    replaced, or None. A run killed before its final compaction (or one still running: another array
    part) leaves a retried file's old row beside its new one until that run compacts; counts take the
    newer only. Reads the ``run_id`` column and, for a job several runs wrote, the ``path`` column."""
    fmt = pads.ParquetFileFormat(read_options=pads.ParquetReadOptions(dictionary_columns=["run_id"]))
    rows = pads.dataset([str(f) for f in files], format=fmt)
    runs = rows.to_table(columns=["run_id"])["run_id"]
    if len({run for chunk in runs.chunks for run in chunk.dictionary.to_pylist()}) < 2:
        return None
    keys = rows.to_table(columns=["path", "run_id"])
    stale = superseded_rows(keys, *RowsState(keys).superseded())
    return row_keys(keys).filter(stale).combine_chunks() if pc.any(stale).as_py() else None


def summarize(out: Path, run_seconds: float, run_rows: int, shard: Shard = Shard()) -> dict:
    """Counts over every row of ``out`` (all runs; a row a newer run replaced is not counted), plus this
    run's throughput. An array part reads the shards between the other parts' compactions (which
    rewrite shared shards: a file replaced under an NFS reader is ESTALE)."""
    with contextlib.nullcontext() if shard.whole else taking_turns(out / COMPACTING_LOCK):
        table = _summary_columns(out)
    df = table.to_pandas() if table is not None else None
    if df is None or df.empty:
        return {"rows": 0, "ok": 0, "errors": 0, "run_rows": run_rows, "run_seconds": round(run_seconds, 1)}
    ok = df[df["status"] == "ok"]
    return {
        "rows": int(len(df)), "ok": int(len(ok)), "errors": int((df["status"] == "error").sum()),
        "per_class": {str(k): int(v) for k, v in ok["predicted_class"].value_counts().sort_index().items()},
        "uncertain": int(ok["uncertain"].fillna(False).sum()),
        "errors_by_type": {str(k): int(v) for k, v in df.loc[df["status"] == "error", "error_type"].value_counts().items()},
        "duplicates": int((df["duplicate_of"].fillna("") != "").sum()),
        "budget_explained": int((ok["budget_reason"].isin(BUDGET_REASONS) & (ok["duplicate_of"] == "")).sum()),
        "run_rows": run_rows, "run_seconds": round(run_seconds, 1),
        "run_images_per_s": round(run_rows / run_seconds, 2) if run_seconds > 0 else 0.0,
    }


def _summary_columns(out: Path) -> pa.Table | None:
    data = rows_dataset(out)
    if data is None:
        return None
    columns = ["status", "error_type", "predicted_class", "uncertain", "duplicate_of", "budget_reason"]
    stale = stale_row_keys(data.files)
    table = data.to_table(columns=columns + (["path", "run_id"] if stale is not None else []))
    if stale is not None:
        table = table.filter(pc.invert(pc.is_in(row_keys(table), stale)))
    return table.select(columns)


def summary_text(summary: dict) -> str:
    lines = [f"[score] {summary['rows']} rows: {summary['ok']} ok, {summary['errors']} errors"
             f" ({summary.get('duplicates', 0)} duplicates filled from their first copy)"]
    if summary.get("per_class"):
        lines.append("[score] predicted: " + ", ".join(f"{k} {v}" for k, v in summary["per_class"].items())
                     + f"; uncertain (flagged) {summary['uncertain']}; budgeted explanations "
                     f"{summary['budget_explained']}")
    if summary.get("errors_by_type"):
        lines.append("[score] errors: " + ", ".join(f"{k} {v}" for k, v in summary["errors_by_type"].items()))
    lines.append(f"[score] this run: {summary['run_rows']} rows in {summary['run_seconds']} s"
                 f" ({summary.get('run_images_per_s', 0.0)} img/s)")
    return "\n".join(lines)
