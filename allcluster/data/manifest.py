"""``allcluster index``: an image tree or CSV becomes a manifest Parquet with leak-free splits.

The manifest is the single source of truth for which files exist, which decode, what they are and
where they go (train/val/test). Every input file is one row; a broken file is a row with
``status="error"``, so nothing is silently lost.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from allcluster.atomic import atomic_write_parquet, atomic_write_text
from allcluster.config import ConfigError, bounds, write_resolved
from allcluster.console import say
from allcluster.data import decode as dec
from allcluster.data.paths import absolute, clean_text, normalised_column, table_path, to_fs, to_text
from allcluster.data.splits import assign_splits, check_folds

MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()), ("sha256", pa.string()), ("label", pa.string()), ("patient", pa.string()),
    ("split", pa.string()), ("fold", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
    ("size_bytes", pa.int64()), ("status", pa.string()), ("error_type", pa.string()),
    ("error", pa.string()), ("n_copies", pa.int64()), ("label_conflict", pa.bool_()),
])


@dataclass(frozen=True)
class IndexConfig:
    """Options of ``allcluster index`` (written next to the manifest as ``<name>.config.yaml``)."""
    source: str = ""
    out: str = "manifest.parquet"
    ratios: tuple[float, ...] = (0.8, 0.1, 0.1)
    folds: int = field(default=0, metadata=bounds(ge=0))
    seed: int = 0
    patient_regex: str = ""
    max_pixels: int = field(default=dec.DEFAULT_MAX_PIXELS, metadata=bounds(gt=0))
    min_side: int = field(default=dec.DEFAULT_MIN_SIDE, metadata=bounds(ge=1))
    workers: int = field(default=0, metadata=bounds(ge=0))

    def __post_init__(self):
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or not 0.999 < sum(self.ratios) < 1.001:
            raise ConfigError(f"ratios: {list(self.ratios)} must be three non-negative shares "
                              "(train, val, test) summing to 1, e.g. 0.8 0.1 0.1")
        if self.folds == 1:
            raise ConfigError("folds: 1 is not a k-fold; use 0 (plain split) or 2 or more")
        if self.patient_regex:
            try:
                re.compile(self.patient_regex)
            except re.error as err:
                raise ConfigError(f"patient_regex: {self.patient_regex!r} is not a valid regex: {err}")


@dataclass(frozen=True)
class SourceFile:
    """One input file: its table path (:mod:`allcluster.data.paths`), label, patient, and a problem
    found while listing (error type, message) when it cannot be read at all."""
    path: str
    label: str
    patient: str = ""
    problem: tuple[str, str] | None = None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_folder(root: Path, hidden: list[str] | None = None) -> list[SourceFile]:
    """``<root>/<class>/**/<file>``: the first folder level is the label; symlinked folders are not
    followed (they may loop or leave the tree) and each is one error row (``symlinked_folder``: a
    linked class folder must not vanish unseen); files at the top level get no label; a folder that
    cannot be listed is one error row (``unlistable``). Hidden files and folders (``.name``, as
    scoring skips them) get no row and are not entered; their paths are added to ``hidden``
    (folders ending in ``/``) where given. ``root`` itself is resolved once (a linked dump folder),
    as scoring resolves its folder input: one file gets one ``path`` in manifests and rows."""
    root = Path(absolute(root)).resolve()
    files = []
    hidden = [] if hidden is None else hidden

    def unlistable(err: OSError) -> None:
        where = err.filename or str(root)
        files.append(SourceFile(to_text(where), "", problem=("unlistable", to_text(
            f"{where}: cannot list folder: {err.strerror or err}"))))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=False):
        hidden += [table_path(Path(dirpath) / d) + "/" for d in sorted(dirnames) if _is_hidden(d)]
        hidden += [table_path(Path(dirpath) / f) for f in sorted(filenames) if _is_hidden(f)]
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            dirnames.remove(name)
            linked = Path(dirpath) / name
            files.append(SourceFile(table_path(linked), "", problem=("symlinked_folder", to_text(
                f"{linked}: symlinked folder not descended into (link its files, or index its target)"))))
        rel = Path(dirpath).relative_to(root)
        label = to_text(rel.parts[0]) if rel.parts else ""
        files += [SourceFile(table_path(Path(dirpath) / f), label) for f in sorted(filenames) if not _is_hidden(f)]
    return files


def list_csv(csv_path: Path) -> list[SourceFile]:
    """A CSV with ``path,label[,patient]`` columns; relative paths are relative to the CSV's folder.
    A line too short to hold a path is an error row (``bad_csv_row``) named after the CSV and line."""
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte order mark, which would hide the first column's name
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = {"path", "label"} - set(columns)
        if missing:
            raise ConfigError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}; "
                              f"expected path,label[,patient], found {', '.join(columns) or 'no header'}")
        rows = [(reader.line_num, r) for r in reader]
    base = Path(absolute(csv_path)).parent
    return [_csv_source(r, base, f"{table_path(csv_path)}:{line}") for line, r in rows]


def _csv_source(row: dict, base: Path, where: str) -> SourceFile:
    if not row["path"]:           # None: the line is too short to reach the path column
        return SourceFile(where, "", problem=("bad_csv_row", f"{where}: line has no value for column 'path'"))
    return SourceFile(table_path(row["path"], base), to_text((row.get("label") or "").strip()),
                      to_text((row.get("patient") or "").strip()))


def list_source(source: str | Path, hidden: list[str] | None = None) -> list[SourceFile]:
    """Files of a folder tree (hidden ones added to ``hidden``: see :func:`list_folder`) or a CSV file list."""
    source = Path(source)
    if source.is_dir():
        return list_folder(source, hidden)
    if source.is_file() and source.suffix.lower() == ".csv":
        return list_csv(source)
    raise ConfigError(f"{source}: SOURCE must be a folder of <class>/<images> or a .csv file "
                      "with path,label[,patient] columns")


def inspect_file(path: str, max_pixels: int = dec.DEFAULT_MAX_PIXELS,
                 min_side: int = dec.DEFAULT_MIN_SIDE, max_bytes: int = dec.DEFAULT_MAX_BYTES) -> dict:
    """Hash and fully decode one file (``path``: a table path) at a small JPEG draft size, enough to
    detect truncation; any failure is the row's error, never an exception."""
    row = dict(path=path, sha256="", width=-1, height=-1, size_bytes=-1, status="ok", error_type="", error="")
    try:
        data, row["sha256"] = dec.read_any(to_fs(path), max_bytes)
        row["size_bytes"] = len(data)
        image = dec.decode_any(data, path, max_pixels=max_pixels, min_side=min_side, draft=64)
        row["width"], row["height"] = image.width, image.height
    except dec.DecodeError as err:
        row.update(status="error", error_type=err.kind, error=clean_text(str(err)))
    return row


def _inspect_chunk(args: tuple[list[str], int, int]) -> list[dict]:
    paths, max_pixels, min_side = args
    return [inspect_file(p, max_pixels, min_side) for p in paths]


def inspect_files(paths: list[str], max_pixels: int, min_side: int, workers: int = 0) -> list[dict]:
    """Inspect files on a thread pool, preserving order (PIL and hashlib release the GIL)."""
    workers = workers or min(32, os.cpu_count() or 1)
    if workers == 1 or len(paths) < 64:
        return _inspect_chunk((paths, max_pixels, min_side))
    chunk = max(16, min(256, len(paths) // (workers * 4) or 1))
    chunks = [(paths[i:i + chunk], max_pixels, min_side) for i in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(workers) as pool:
        return [row for rows in pool.map(_inspect_chunk, chunks) for row in rows]


def inspect_sources(files: list[SourceFile], max_pixels: int, min_side: int, workers: int = 0) -> list[dict]:
    """:func:`inspect_files` for the readable files; listing problems become error rows as they are."""
    readable = [f.path for f in files if f.problem is None]
    inspected = iter(inspect_files(readable, max_pixels, min_side, workers))
    failed = dict(sha256="", width=-1, height=-1, size_bytes=-1, status="error")
    return [next(inspected) if f.problem is None else
            {**failed, "path": f.path, "error_type": f.problem[0], "error": f.problem[1]} for f in files]


def patient_from_name(path: str, pattern: re.Pattern) -> str:
    """Patient id from the file name: the regex's first group, or its whole match."""
    match = pattern.search(Path(path).name)
    if not match:
        return ""
    return match.group(1) if match.groups() else match.group(0)


def patient_matches(names: list[str], regex: str) -> list[bool]:
    """Whether ``regex`` finds a patient id in each file name (never refuses: see :func:`check_patient_regex`)."""
    pattern = re.compile(regex)
    return [bool(patient_from_name(n, pattern)) for n in names]


def check_patient_regex(names: list[str], regex: str) -> list[bool]:
    """Whether ``regex`` finds a patient id in each file name; refuses a regex that finds none (the
    splits would silently be per image, leaking patients between train and test)."""
    matched = patient_matches(names, regex)
    if names and not any(matched):
        examples = ", ".join(Path(n).name for n in names[:3])
        raise ConfigError(f"--patient-regex {regex!r}: matches none of the {len(names)} file names "
                          f"(e.g. {examples}), so the splits would be per image, leaking patients between "
                          "train and test; it is searched in each file name, its first group (or whole match) "
                          "being the patient id")
    return matched


def patients_by_regex(df: pd.DataFrame, regex: str) -> list[str]:
    """The ``patient`` column with ids from the file names where the source gave none; refuses a
    regex that matches no decodable file and warns of decodable files left without a patient."""
    pattern = re.compile(regex)
    patients = [p or patient_from_name(path, pattern) for p, path in zip(df["patient"], df["path"])]
    ok = (df["status"] == "ok").tolist()
    check_patient_regex([p for p, keep in zip(df["path"], ok) if keep], regex)
    _warn_no_patient([path for path, p, keep in zip(df["path"], patients, ok) if keep and not p], sum(ok), regex)
    return patients


def _warn_no_patient(names: list[str], total: int, regex: str) -> None:
    if names:
        say(f"warning: --patient-regex {regex!r} gives no patient id to {len(names)} of {total} decodable files "
            f"(e.g. {', '.join(Path(n).name for n in names[:5])}); each of those is split as a patient of its own",
            logging.WARNING)


def mark_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``n_copies`` and ``label_conflict`` (copies of one image carrying different labels)."""
    df = df.copy()
    ok = df["status"] == "ok"
    copies = df[ok].groupby("sha256")["label"].agg(["size", "nunique"])
    df["n_copies"] = df["sha256"].map(copies["size"]).fillna(1).astype(np.int64).where(ok, 1)
    df["label_conflict"] = df["sha256"].map(copies["nunique"] > 1).fillna(False).astype(bool) & ok
    return df


def check_before_hashing(files: list[SourceFile], cfg: IndexConfig) -> None:
    """Refuse from the listing alone what hashing (hours for an archive) could not make right: a
    ``--patient-regex`` that matches no file name, or more ``--folds`` than these files could fill."""
    patients = [f.patient for f in files]
    if cfg.patient_regex:
        check_patient_regex([f.path for f in files], cfg.patient_regex)
        pattern = re.compile(cfg.patient_regex)
        patients = [p or patient_from_name(f.path, pattern) for p, f in zip(patients, files)]
    if cfg.folds > 1 and files:       # at most one group per patient, or per file without one
        check_folds(cfg.folds, np.array([f.label for f in files]),
                    np.array([p or f.path for p, f in zip(patients, files)]), f"the {len(files)} listed files")


def build_manifest(cfg: IndexConfig, hidden: list[str] | None = None) -> pd.DataFrame:
    """List, hash, decode-check, de-duplicate and split ``cfg.source``; returns the manifest rows
    (the hidden files and folders left out are added to ``hidden``, where given)."""
    files = list_source(cfg.source, hidden)
    if not files:
        raise ConfigError(f"{cfg.source}: no files found")
    check_before_hashing([f for f in files if f.problem is None], cfg)
    rows = inspect_sources(files, cfg.max_pixels, cfg.min_side, cfg.workers)
    df = pd.DataFrame(rows)
    df["label"] = [f.label for f in files]
    df["patient"] = [f.patient for f in files]
    unlabeled = (df["label"] == "") & (df["status"] == "ok")
    df.loc[unlabeled, ["status", "error_type"]] = ["error", "no_label"]
    df.loc[unlabeled, "error"] = df.loc[unlabeled, "path"] + ": no class folder or label for this file"
    if cfg.patient_regex:
        df["patient"] = patients_by_regex(df, cfg.patient_regex)
    df = mark_duplicates(df)
    df["eligible"] = (df["status"] == "ok") & ~df["label_conflict"]
    df = assign_splits(df, tuple(cfg.ratios), cfg.seed, cfg.folds)
    return df.drop(columns="eligible").sort_values("path", kind="stable").reset_index(drop=True)


def summarize(df: pd.DataFrame, patient_regex: str = "", hidden: Sequence[str] = ()) -> dict:
    """Counts per class per split, patients, duplicate groups, label conflicts and errors by type;
    with ``patient_regex``, how many decodable files it matched; the ``hidden`` files and folders
    (see :func:`list_folder`) that got no row. Never refuses: it describes a manifest already made."""
    ok = df[df["status"] == "ok"]
    patients = {"count": int(ok.loc[ok["patient"] != "", "patient"].nunique())}
    if patient_regex:
        matched = sum(patient_matches(ok["path"].tolist(), patient_regex))
        patients.update(regex=patient_regex, matched=matched, unmatched=len(ok) - matched)
    dup = ok[ok["n_copies"] > 1]
    dup_groups = dup.groupby("sha256")["path"].apply(list)
    conflicting = dup[dup["label_conflict"]]
    conflicts = [[f"{p} ({l})" for p, l in zip(g["path"], g["label"])] for _, g in conflicting.groupby("sha256")]
    per_split = pd.crosstab(ok["label"], ok["split"].replace("", "excluded"))
    return {
        "files": int(len(df)),
        "ok": int(len(ok)),
        "classes": sorted(ok["label"].unique().tolist()),
        "per_class_per_split": {c: {s: int(v) for s, v in per_split.loc[c].items()} for c in per_split.index},
        "patients": patients,
        "duplicates": {"groups": int(len(dup_groups)), "files": int(len(dup)),
                       "examples": [list(g) for g in dup_groups.head(10)]},
        "label_conflicts": {"groups": int(len(conflicts)), "files": int(dup["label_conflict"].sum()),
                            "groups_list": conflicts},
        "errors": {"count": int((df["status"] == "error").sum()),
                   "by_type": {k: int(v) for k, v in df.loc[df["status"] == "error", "error_type"].value_counts().items()},
                   "examples": df.loc[df["status"] == "error", "error"].head(10).tolist()},
        "hidden_skipped": {"files": sum(not p.endswith("/") for p in hidden),
                           "folders": sum(p.endswith("/") for p in hidden), "examples": list(hidden[:10])},
    }


def format_summary(summary: dict) -> str:
    """Human-readable text of :func:`summarize` for the console."""
    splits = ["train", "val", "test", "excluded"]
    lines = [f"{summary['files']} files, {summary['ok']} decodable, classes: {', '.join(summary['classes'])}",
             f"{'class':<16}" + "".join(f"{s:>10}" for s in splits)]
    for cls, counts in summary["per_class_per_split"].items():
        lines.append(f"{cls:<16}" + "".join(f"{counts.get(s, 0):>10}" for s in splits))
    d, c, e = summary["duplicates"], summary["label_conflicts"], summary["errors"]
    p = summary["patients"]
    lines.append(f"patients: {p['count']}" + (f"; --patient-regex matched {p['matched']} decodable files, "
                                              f"{p['unmatched']} unmatched" if "regex" in p else ""))
    lines.append(f"duplicates: {d['groups']} groups of identical files ({d['files']} files); "
                 "each group kept inside one split")
    lines.append(f"label conflicts: {c['groups']} groups ({c['files']} files) excluded from all splits")
    lines += [f"  {' | '.join(g)}" for g in c["groups_list"][:10]]
    lines.append(f"errors: {e['count']}" + (f" by type {e['by_type']}" if e["count"] else ""))
    lines += [f"  {m}" for m in e["examples"]]
    h = summary.get("hidden_skipped", {})
    if h.get("files") or h.get("folders"):
        lines.append(f"hidden (names starting with '.'), no row: {h['files']} file(s) skipped, {h['folders']} "
                     f"folder(s) not entered; e.g. {', '.join(h['examples'][:5])}")
    return "\n".join(lines)


def write_manifest(df: pd.DataFrame, out: str | Path) -> Path:
    """Write the manifest Parquet atomically (readable by pandas/pyarrow/DuckDB without allcluster)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df[MANIFEST_SCHEMA.names], schema=MANIFEST_SCHEMA, preserve_index=False)
    return atomic_write_parquet(out, table)


_shared_reads: dict[tuple, pd.DataFrame] | None = None     # see shared_manifest_reads


@contextmanager
def shared_manifest_reads() -> Iterator[None]:
    """Within it, :func:`read_manifest` parses each manifest file once and returns copies: a driver's
    start-up checks (content fingerprint, splits per backbone) read the same file several times, a
    million-row manifest seconds each. The frames are dropped on leaving (not held by training)."""
    global _shared_reads
    outer = _shared_reads
    _shared_reads = {} if outer is None else outer           # nested: the outer block's reads go on
    try:
        yield
    finally:
        _shared_reads = outer


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest, checking that it has the columns training needs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: manifest not found; build it with `allcluster index SOURCE --out {path}`")
    if _shared_reads is None:
        return _read_manifest_file(path)
    info = path.stat()              # a rewrite (atomic: a new inode) is read again
    identity = (str(path.resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if identity not in _shared_reads:
        _shared_reads[identity] = _read_manifest_file(path)
    return _shared_reads[identity].copy()


def _read_manifest_file(path: Path) -> pd.DataFrame:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"{path}: cannot read this manifest as Parquet ({err})") from None
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ConfigError(f"{path}: not an allcluster manifest (missing columns {', '.join(sorted(missing))})")
    # Older manifests stored paths as given; relative ones are taken from the manifest's folder.
    try:
        paths = normalised_column(table.column("path"), path.resolve().parent)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ConfigError(f"{path}: column 'path' ({table.schema.field('path').type}) is not text ({err})") from None
    return table.set_column(table.column_names.index("path"), "path", paths).to_pandas()


def manifest_fingerprint(df: pd.DataFrame, columns: Iterable[str] = ("path", "sha256", "label", "split", "status")) -> str:
    """Hash of the manifest content that matters downstream (changes invalidate caches)."""
    digest = hashlib.sha256()
    for column in columns:
        digest.update("\x1f".join(map(str, df[column].tolist())).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]


def check_manifest_target(out: str | Path) -> None:
    """Refuse an ``--out`` that cannot take the manifest before any file is read (an archive's
    hashing and decoding would otherwise be lost at the end): a folder, or a path below a file."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; name the manifest file to write, e.g. {out / 'manifest.parquet'}")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a folder")


def run_index(cfg: IndexConfig) -> tuple[pd.DataFrame, dict]:
    """Build, write and summarise a manifest; writes ``<out>.summary.json`` and ``<out>.config.yaml``."""
    check_manifest_target(cfg.out)
    hidden: list[str] = []
    df = build_manifest(cfg, hidden)
    out = write_manifest(df, cfg.out)
    summary = summarize(df, cfg.patient_regex, hidden)
    atomic_write_text(out.with_name(out.stem + ".summary.json"), json.dumps(summary, indent=2))
    write_resolved(cfg, out.with_name(out.stem + ".config.yaml"), "allcluster index")
    return df, summary
