"""File paths as they are stored in every table (manifests, result rows): absolute, normalised, UTF-8 text.

Linux file names are bytes; Python hands names that are not valid UTF-8 (Windows/Samba exports,
Latin-1 archives) to us as ``surrogateescape`` strings, which Parquet cannot store. Tables therefore hold
a reversible *text form* of each path:

* every byte that is not valid UTF-8 is written ``\\xNN`` (two lowercase hex digits),
* a literal backslash is written ``\\\\`` (so the form stays reversible),
* everything else (spaces, newlines, tabs, leading dashes, any valid Unicode) is kept as it is.

:func:`to_text` makes the text form, :func:`to_fs` turns it back into the name to open. A name without
backslashes that is valid UTF-8 (almost every name) is its own text form.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_NEEDS_ESCAPE = re.compile(r"[\\\udc80-\udcff]")
_ESCAPED = re.compile(r"\\(\\|x[0-9a-f]{2})")


def _escape(match: re.Match) -> str:
    char = match.group(0)
    return "\\\\" if char == "\\" else f"\\x{ord(char) - 0xDC00:02x}"


def _unescape(match: re.Match) -> str:
    code = match.group(1)
    return "\\" if code == "\\" else chr(0xDC00 + int(code[1:], 16))


def to_text(name: str | os.PathLike) -> str:
    """The table form of a file name (valid UTF-8 text; see the module docstring)."""
    return _NEEDS_ESCAPE.sub(_escape, os.fspath(name))


def to_fs(text: str) -> str:
    """The file-system name of a table path (inverse of :func:`to_text`)."""
    return _ESCAPED.sub(_unescape, text) if "\\" in text else text


def clean_text(message: str) -> str:
    """Any string (e.g. an exception message naming a file) as valid UTF-8 text for a table."""
    return message.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def absolute(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """``path`` made absolute (relative to ``base``, else the working directory) and normalised
    (``.``/``..``/``//`` removed) without resolving symlinks: the link a user listed stays the path."""
    path = os.fspath(path)
    if not os.path.isabs(path):
        path = os.path.join(os.fspath(base) if base is not None else os.getcwd(), path)
    return os.path.normpath(path)


def table_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """What every table stores for a file: the text form of its absolute, normalised path."""
    return to_text(absolute(path, base))


def table_paths(texts, base: str | os.PathLike | None = None) -> list[str]:
    """:func:`table_path` of paths read from a table or a list file (already text: unescaped first)."""
    return [table_path(to_fs(t), base) for t in texts]


def parent_text(text: str) -> str:
    """The folder of a table path, in text form (escaping never produces ``/``)."""
    return str(Path(text).parent)


# A path that is absolute and already normalised needs no per-row work (the usual manifest).
_NOT_NORMAL = r"//|/\./|/\.\./|/\.$|/\.\.$|\\"


def normalised_column(column, base: str | os.PathLike):
    """An Arrow column of paths as table paths (relative ones from ``base``), vectorised when the
    column is already absolute and normal (then returned as it is)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = pc.fill_null(column.cast(pa.string()), "")
    if len(column) == 0:
        return column
    absolute_ = pc.all(pc.starts_with(column, "/")).as_py()
    if absolute_ and not pc.any(pc.match_substring_regex(column, _NOT_NORMAL)).as_py():
        return column
    return pa.array(table_paths(column.to_pylist(), base), pa.string())
