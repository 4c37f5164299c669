"""The scoring driver's journal: the rows it holds in memory until the next shard, also on disk.

A scoring driver buffers rows for up to ``flush_seconds`` (or ``rows_per_shard``) before it writes
them as one shard. A process that dies in between would lose them, and it can die without a chance
to write: under Slurm, ``scontrol requeue``, preemption and ``scancel`` send SIGTERM to every process
of the job at once, so the head node's raylet stops too, and Ray's core worker then ends the driver
itself ("The connection to the plasma store is failed. Terminate the process", exit 1) a few
milliseconds later. So every batch the driver buffers is also appended to an Arrow IPC stream beside
the shards; the next run turns what a dead run left there into the shard that run would have
written (:func:`allcluster.score.output.recover_journals`).

Layout, per shard being buffered (``N`` = ``part-<run>-<n>.parquet``, the shard's future name)::

    rows/.journal-<K>-of-<M>/N.maps.arrows   the packed maps of the batches (written first)
    rows/.journal-<K>-of-<M>/N.rows.arrows   their rows

Each append goes straight to the file (no user-space buffer), so what a killed process appended is
in the file; a torn last message is ignored when read back. Names start with '.', so Parquet dataset
readers skip the folder.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow as pa

ROWS_SUFFIX, MAPS_SUFFIX = ".rows.arrows", ".maps.arrows"


def journal_folder(rows_dir: Path, shard_name: str) -> Path:
    """The journal folder of one shard of a job (``shard_name``: ``K-of-M``, ``0-of-1`` for a whole job)."""
    return rows_dir / f".journal-{shard_name}"


class Journal:
    """Appends one shard's batches (maps first, then rows) to its two streams; :meth:`discard` once
    the shard is written."""

    def __init__(self, folder: Path, shard_file: str):
        self.folder, self.shard_file = folder, shard_file
        self._streams: dict[str, tuple[pa.NativeFile, pa.ipc.RecordBatchStreamWriter]] = {}

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.shard_file}{suffix}"

    def append(self, rows: pa.Table, maps: pa.Table | None = None) -> None:
        """Append a batch; its maps land before its rows, so a row read back always has its maps."""
        if maps is not None and maps.num_rows:
            self._write(MAPS_SUFFIX, maps)
        self._write(ROWS_SUFFIX, rows)

    def _write(self, suffix: str, table: pa.Table) -> None:
        if suffix not in self._streams:
            self.folder.mkdir(parents=True, exist_ok=True)
            sink = pa.OSFile(str(self.path(suffix)), "wb")
            self._streams[suffix] = (sink, pa.ipc.new_stream(sink, table.schema))
        self._streams[suffix][1].write_table(table)

    def discard(self) -> None:
        """Close and remove the streams (their rows are in the shard now), and the folder if empty.
        Never raises: a stream that cannot be closed or removed (the error that made the writer give
        the journal up) is left, and the next run finds its shard written and removes it."""
        streams, self._streams = self._streams, {}
        for suffix, (sink, writer) in streams.items():
            for step in (writer.close, sink.close, self.path(suffix).unlink):
                with contextlib.suppress(OSError, pa.ArrowException):
                    step()
        with contextlib.suppress(OSError):
            self.folder.rmdir()             # a finished output keeps no empty journal folder


def read_journal(path: Path) -> pa.Table | None:
    """Every whole batch of one stream (a torn tail, from a process killed while appending, is left
    out); None when the file is missing or not even its schema was written. Read into memory, so
    no handle stays open on a file about to be removed (NFS would keep it as ``.nfs*``)."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(path.read_bytes()))
    except (FileNotFoundError, pa.ArrowInvalid):
        return None
    batches = []
    while True:
        try:
            batches.append(reader.read_next_batch())
        except (StopIteration, OSError, pa.ArrowInvalid):     # the end, or a torn last message
            break
    return pa.Table.from_batches(batches, schema=reader.schema)


def journaled_shards(folder: Path) -> list[tuple[str, Path, Path]]:
    """(shard file name, rows stream, maps stream) of every shard journaled in ``folder``, oldest first."""
    found = sorted(folder.glob(f"*{ROWS_SUFFIX}")) if folder.is_dir() else []
    return [(p.name[:-len(ROWS_SUFFIX)], p, p.with_name(p.name[:-len(ROWS_SUFFIX)] + MAPS_SUFFIX)) for p in found]
