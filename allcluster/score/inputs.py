"""What a scoring job reads: a folder tree, a manifest Parquet, or a text file of paths.

Listing never opens an image. Inside a folder tree, symlinks are followed only where they stay
inside the input root; a symlink that leaves it, loops, or dangles becomes an error row (the job
still accounts for every entry it saw), and symlinked folders are never descended into.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from allcluster.config import ConfigError



@dataclass
class Listing:
    """Files to score (``paths`` with optional per-file ``extra`` columns) and listing-time errors."""
    paths: list[str] = field(default_factory=list)
    extra: dict[str, list[str]] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)     # {"path", "error_type", "error"}

    def __len__(self) -> int:
        return len(self.paths) + len(self.errors)


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
    if path.is_symlink():
        problem = _symlink_problem(path, root)
        if problem:
            return problem
    try:
        mode = path.stat().st_mode
    except OSError as err:
        return "unreadable", f"{path}: {err.strerror or err}"
    if not stat.S_ISREG(mode):                # FIFOs, sockets, devices would block or never end
        return "not_a_file", f"{path}: not a regular file"
    return None


def list_tree(root: Path) -> Listing:
    """Every non-hidden file under ``root`` (recursive, sorted); see the module docstring for links."""
    root = root.resolve()
    listing = Listing()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in sorted(d for d in dirnames if (here / d).is_symlink() and not d.startswith(".")):
            listing.errors.append({"path": str(here / name), "error_type": "symlinked_folder",
                                   "error": f"{here / name}: symlinked folder not descended into"})
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (here / d).is_symlink())
        for name in sorted(f for f in filenames if not f.startswith(".")):
            path = here / name
            problem = _entry_problem(path, root)
            if problem:
                listing.errors.append({"path": str(path), "error_type": problem[0], "error": problem[1]})
            else:
                listing.paths.append(str(path))
    return listing


def list_manifest(path: Path) -> Listing:
    """Rows of a manifest Parquet (``allcluster index``'s, or any table with a ``path`` column): every
    other column is copied into the result rows as text (renamed ``input_<name>`` where scoring
    computes a column of that name), so reports can roll up by any of them."""
    from allcluster.score.rows import input_column_name

    table = pq.read_table(path)
    if "path" not in table.column_names:
        raise ConfigError(f"{path}: a manifest to score needs a 'path' column; found {', '.join(table.column_names)}")
    extra = {input_column_name(c): ["" if v is None else str(v) for v in table.column(c).to_pylist()]
             for c in table.column_names if c != "path"}
    return Listing([str(p) for p in table.column("path").to_pylist()], extra)


def list_text(path: Path) -> Listing:
    """One path per line; blank lines and ``#`` comments skipped; relative paths from the file's folder."""
    paths = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            paths.append(str(Path(line) if Path(line).is_absolute() else path.parent / line))
    return Listing(paths)


def list_inputs(source: str | Path) -> Listing:
    """The files a scoring job covers, from any of the three input kinds."""
    source = Path(source)
    if source.is_dir():
        return list_tree(source)
    if source.is_file() and source.suffix.lower() == ".parquet":
        return list_manifest(source)
    if source.is_file():
        return list_text(source)
    raise ConfigError(f"{source}: input not found (expected a folder, a manifest .parquet or a text file of paths)")
