"""What a scoring job reads: a folder tree, a manifest Parquet, or a text file of paths.

Listing never opens an image. Inside a folder tree, symlinks are followed only where they stay
inside the input root; a symlink that leaves it, loops, or dangles becomes an error row (the job
still accounts for every entry it saw), and symlinked folders are never descended into.
"""
from __future__ import annotations

import codecs
import functools
import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from allcluster.config import ConfigError
from allcluster.data.decode import unexpected
from allcluster.data.paths import normalised_column, table_path, to_text


@dataclass
class Listing:
    """Files to score (``files``: a ``path`` column in table form plus optional input columns, all
    text) and listing-time errors. Held as Arrow, not Python objects: millions of paths stay small."""
    files: pa.Table = field(default_factory=lambda: pa.table({"path": pa.array([], pa.string())}))
    errors: list[dict] = field(default_factory=list)     # {"path", "error_type", "error"}

    @property
    def paths(self) -> list[str]:
        return self.files.column("path").to_pylist()

    @property
    def extra(self) -> dict[str, list[str]]:
        return {c: self.files.column(c).to_pylist() for c in self.input_columns}

    @property
    def input_columns(self) -> list[str]:
        """The passed-through input (manifest) columns, in order."""
        return [c for c in self.files.column_names if c != "path"]

    def __len__(self) -> int:
        return self.files.num_rows + len(self.errors)

    def first_of_each_path(self) -> "Listing":
        """The entries in order, each path once (its first entry): a list or manifest may name one
        file twice, also as ``a.jpg`` and ``./a.jpg``, and every file gets exactly one row."""
        if all_distinct(self.files.column("path")):
            return self
        paths = large_text(self.files.column("path"))
        _, codes = path_codes(paths)
        numbered = pa.table({"code": codes, "row": pa.array(np.arange(len(paths), dtype=np.int64))})
        first = numbered.group_by("code", use_threads=False).aggregate([("row", "min")])["row_min"]
        keep = np.zeros(len(paths), dtype=bool)
        keep[first.to_numpy()] = True        # a mask, not take(): filter keeps the chunks (take joins them)
        return Listing(self.files.filter(pa.array(keep)), self.errors)

    def part(self, shard: Shard) -> "Listing":
        """The entries that belong to ``shard``."""
        if shard.whole:
            return self
        keep = pa.array(shard.holds(self.files.column("path").to_pylist()), pa.bool_())
        errors = [e for e, k in zip(self.errors, shard.holds([e["path"] for e in self.errors])) if k]
        return Listing(self.files.filter(keep), errors)

    def without(self, done: pa.Array | pa.ChunkedArray) -> "Listing":
        """The entries whose path is not in ``done`` (vectorised: a hash set in Arrow, not in Python)."""
        if not len(done):
            return self
        keep = pc.invert(pc.is_in(self.files.column("path"), value_set=done))
        error_paths = pa.array([e["path"] for e in self.errors], pa.string())
        error_keep = pc.invert(pc.is_in(error_paths, value_set=done)).to_pylist()
        return Listing(self.files.filter(keep), [e for e, k in zip(self.errors, error_keep) if k])


def large_text(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """``column`` as text that one array can hold whole, for what gathers every path into one (a
    hash table's keys, a concatenation): tens of millions of paths pass 2 GiB of text, which one
    ``string`` array cannot hold (ArrowCapacityError / "offset overflow"); such a column gets 64-bit
    offsets (``large_string``). A smaller one is returned as it is (the cast would copy it)."""
    if column.nbytes < 2**31 - 1:
        return column
    return pc.cast(column, pa.large_string())


def all_distinct(column: pa.ChunkedArray | pa.Array) -> bool:
    """Whether no value of ``column`` (paths; no nulls: every caller's path column is filled) appears
    twice, decided by comparing neighbours in sorted order a window at a time rather than by a hash
    table: a hash set of a million paths (``count_distinct``) costs about three times their text;
    this, the sort's index array, one window and, for a column of several chunks, one joined copy
    of the text (``allcluster bench plan``, 2026-12-03)."""
    values = large_text(column)
    if isinstance(values, pa.ChunkedArray):     # take() on several chunks joins them once per call
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    order = pc.sort_indices(values)
    for start in range(0, max(0, len(values) - 1), _DISTINCT_WINDOW):
        window = values.take(order.slice(start, _DISTINCT_WINDOW + 1))
        if pc.any(pc.equal(window.slice(1), window.slice(0, len(window) - 1))).as_py():
            return False
    return True


_DISTINCT_WINDOW = 1 << 16


def path_codes(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.ChunkedArray | pa.Array]:
    """(each distinct path once, in order of first entry; each entry's index into it): what to group
    paths by. Arrow's ``group_by`` on the path text itself aborts the process (``std::length_error``)
    once the keys pass 2 GiB, even as ``large_string``; on these integer codes it does not."""
    paths = large_text(column)
    distinct = pc.unique(paths)
    return distinct, pc.index_in(paths, value_set=distinct)


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` of a job (a Slurm array task): the files whose path hash falls in it."""
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``K/N`` with 0 <= K < N (``--shard``; Slurm: ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard: {text!r} is not K/N (e.g. 0/4)") from None
        if not 0 <= index < count:
            raise ConfigError(f"--shard: {text!r} needs 0 <= K < N")
        return cls(index, count)

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def name(self) -> str:
        """``K-of-N``: how files and folders of the part are named (its lock, journal, summary entry)."""
        return f"{self.index}-of-{self.count}"

    @property
    def text(self) -> str:
        """``K/N``, as ``--shard`` takes it and messages say it."""
        return f"{self.index}/{self.count}"

    @classmethod
    def from_name(cls, name: str) -> "Shard | None":
        """The part a :attr:`name` names (None for any other text)."""
        found = re.fullmatch(r"(\d+)-of-(\d+)", name)
        return cls(int(found[1]), int(found[2])) if found else None

    def share(self, total: int) -> int:
        """This part's share of a job-wide cap (the budget's ``max_images``), split evenly."""
        return math.ceil(total / self.count)

    def holds(self, paths: list[str]) -> list[bool]:
        """Whether each table path belongs to this shard (a stable hash: the same on every node and rerun)."""
        if self.whole:
            return [True] * len(paths)
        return [int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "big") % self.count == self.index
                for p in paths]


def _error(path: str, kind: str, message: str) -> dict:
    return {"path": to_text(path), "error_type": kind, "error": to_text(message)}


def _symlink_problem(path: Path, root: Path) -> tuple[str, str] | None:
    """(error type, message) when a symlinked file must not be read; None when it may."""
    try:
        target = path.resolve(strict=True)
    except RuntimeError:                      # Python < 3.13 reports loops as RuntimeError
        return "symlink_loop", f"{path}: symlink loop"
    except OSError as err:
        if err.errno == 40:                   # ELOOP
            return "symlink_loop", f"{path}: symlink loop"
        return "unreadable", f"{path}: symlink target missing ({err.strerror})"
    if not target.is_relative_to(root):
        return "outside_root", f"{path}: symlink leaves the input root {root} (-> {target}); not followed"
    return None


def _entry_problem(path: Path, root: Path) -> tuple[str, str] | None:
    """Why a directory entry cannot be scored, checked without reading it."""
    try:
        if path.is_symlink() and (problem := _symlink_problem(path, root)):
            return problem
        mode = path.stat().st_mode
    except OSError as err:
        return "unreadable", f"{path}: {err.strerror or err}"
    if not stat.S_ISREG(mode):                # FIFOs, sockets, devices would block or never end
        return "not_a_file", f"{path}: not a regular file"
    return None


def _checked_entry(path: Path, root: Path) -> tuple[str, str] | None:
    """:func:`_entry_problem`, with any unanticipated exception as a ``list_error`` for this entry."""
    try:
        return _entry_problem(path, root)
    except Exception as err:                  # noqa: BLE001 - one odd entry never stops the listing
        failure = unexpected("list_error", str(path), err)
        return failure.kind, str(failure)


def list_tree(root: Path, exclude: tuple[str | Path, ...] = ()) -> Listing:
    """Every non-hidden file under ``root`` (recursive, sorted; ``root`` resolved to its real path);
    folders in ``exclude`` (the job's own output) are never entered. See the module docstring for links."""
    root = root.resolve()
    skip = {os.path.realpath(p) for p in exclude}
    paths, errors = [], []

    def unlistable(err: OSError) -> None:
        errors.append(_error(err.filename or str(root), "unlistable", f"{err.filename}: cannot list folder: {err.strerror or err}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=False):
        here = Path(dirpath)
        keep = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            if str(here / name) in skip:
                continue
            try:
                link = (here / name).is_symlink()
            except OSError as err:            # its folder is readable but not searchable (no x)
                unlistable(err)
                continue
            if link:
                errors.append(_error(str(here / name), "symlinked_folder", f"{here / name}: symlinked folder not descended into"))
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(f for f in filenames if not f.startswith(".")):
            problem = _checked_entry(here / name, root)
            if problem:
                errors.append(_error(str(here / name), *problem))
            else:
                paths.append(to_text(here / name))
    return Listing(pa.table({"path": pa.array(paths, pa.string())}), errors)


def list_manifest(path: Path) -> Listing:
    """Rows of a manifest Parquet (``allcluster index``'s, or any table with a ``path`` column; relative
    paths are relative to the manifest's folder): every other column is copied into the result rows as
    text (renamed ``input_<name>`` where scoring computes a column of that name), so reports can roll
    up by any of them."""
    from allcluster.score.rows import input_column_name

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    # One column at a time: an archive-sized manifest is never held twice (as read and as text).
    columns = {"path": normalised_column(_text_column(parquet, "path", path), Path(path).resolve().parent)}
    for name in names:
        if name != "path":
            columns[input_column_name(name)] = pc.fill_null(_text_column(parquet, name, path), "")
    return Listing(pa.table(columns)).first_of_each_path()


def _text_column(parquet: pq.ParquetFile, name: str, path: Path) -> pa.ChunkedArray:
    """Column ``name`` of the manifest at ``path`` as text; a :class:`ConfigError` naming both where
    it has none (a list or struct column, bytes that are not UTF-8)."""
    column = parquet.read(columns=[name]).column(0)
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ConfigError(f"{path}: column {name!r} ({column.type}) has no text form ({err}); every manifest "
                          "column is copied into the rows as text: drop it or write it as UTF-8 text") from None


def _may_not_be_text(type_: pa.DataType) -> bool:
    """Whether a column of this type may fail :func:`_text_column`: no cast to text (lists, structs)
    or bytes that may not be UTF-8. Numbers, times and text always cast."""
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    return not any(test(type_) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer,
                                            pa.types.is_floating, pa.types.is_boolean, pa.types.is_temporal,
                                            pa.types.is_decimal, pa.types.is_null))


def list_text(path: Path) -> Listing:
    """One path per line (any bytes but a newline); relative paths from the file's folder. Only lines
    of nothing but white space are skipped: there are no comments, since ``#12 slide.jpg`` (the
    output of ``ls``) is a file name, which a comment rule would drop without a row."""
    base = Path(path).resolve().parent
    paths = []
    for raw in Path(path).read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n"):
        line = os.fsdecode(raw.rstrip(b"\r"))
        if line.strip():
            paths.append(table_path(line, base))
    return Listing(pa.table({"path": pa.array(paths, pa.string())})).first_of_each_path()


def check_input(source: str | Path, exclude: tuple[str | Path, ...] = ()) -> Callable[[], Listing]:
    """What lists ``source`` (see :func:`list_inputs`), after the checks that need no listing: it
    exists; a manifest (a ``.parquet`` name or Parquet bytes, whatever its name) has a ``path``
    column and every column has a text form; a list of paths is readable text, not a CSV or an
    image. A :class:`ConfigError` naming the file otherwise."""
    source = Path(source)
    try:
        is_dir, is_file = source.is_dir(), source.is_file()
    except OSError as err:        # EIO, ESTALE: a mount that fails (is_dir() hides only "not there")
        raise ConfigError(f"{source}: input cannot be reached ({err.strerror or err}); check its mount and "
                          "rerun the same command") from None
    if is_dir:
        return functools.partial(list_tree, source, exclude)
    if not is_file:
        raise ConfigError(f"{source}: input not found (expected a folder, a manifest .parquet or a text file of paths)")
    head = _head(source)
    if source.suffix.lower() == ".parquet" or head.startswith(b"PAR1"):
        _check_manifest(source)
        return functools.partial(list_manifest, source)
    if source.suffix.lower() == ".csv":
        raise ConfigError(f"{source}: a CSV is not an input to score; make a manifest of it with `allcluster index "
                          f"{source} --out MANIFEST.parquet` (columns path,label) and score that, or give a text "
                          "file with one path per line")
    if b"\0" in head:
        raise ConfigError(f"{source}: not a text file of paths (it holds NUL bytes: an image, or UTF-16 text?); "
                          "--input takes a folder, a manifest Parquet or a UTF-8 text file with one path per line")
    return functools.partial(list_text, source)


def _head(source: Path, size: int = 8192) -> bytes:
    """The first bytes of an input file (what tells Parquet and binary files from a list of paths)."""
    try:
        with source.open("rb") as handle:
            return handle.read(size)
    except OSError as err:
        raise ConfigError(f"{source}: cannot read this input ({err.strerror or err})") from None


def _check_manifest(source: Path) -> None:
    """Refuse a manifest that is not Parquet, has no ``path`` column, or a column without a text form."""
    try:
        parquet = pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"{source}: cannot read this manifest as Parquet ({err})") from None
    schema = parquet.schema_arrow
    if "path" not in schema.names:
        raise ConfigError(f"{source}: a manifest to score needs a 'path' column; found {', '.join(schema.names)}")
    for field_ in schema:
        if _may_not_be_text(field_.type):
            _text_column(parquet, field_.name, source)
    _check_every_row_names_a_path(_text_column(parquet, "path", source), source)


def _check_every_row_names_a_path(paths: pa.ChunkedArray, source: Path) -> None:
    """Refuse a manifest with null or empty paths: such a row names no file, so it could get no row of
    its own (made relative to the manifest's folder, it would become that folder)."""
    missing = pc.or_(pc.is_null(paths), pc.equal(pc.utf8_trim_whitespace(paths), "")).fill_null(True)
    count = pc.sum(missing).as_py() or 0
    if count:
        rows = np.flatnonzero(missing.to_numpy(zero_copy_only=False))[:5].tolist()
        raise ConfigError(f"{source}: {count:,} row(s) have an empty or null 'path' (row {', '.join(map(str, rows))}"
                          f"{', ...' if count > 5 else ''}; counted from 0): every row must name one file to "
                          "score; drop or fill them")


def list_inputs(source: str | Path, exclude: tuple[str | Path, ...] = ()) -> Listing:
    """The files a scoring job covers, from any of the three input kinds (``exclude``: folders never
    listed inside a folder input, i.e. the job's own output)."""
    return check_input(source, exclude)()
