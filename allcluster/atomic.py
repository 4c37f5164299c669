"""The one atomic write: a temporary file beside the target, then ``os.replace``.

Readers (and a rerun after a kill) see the old file or the new one, never half of one: ``rename(2)``
within one folder is atomic on local filesystems and on NFS/Lustre/GPFS. Temporary names start with
``.`` so Parquet dataset readers skip them.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from allcluster.console import say

STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT)   # a full disk, a block or inode quota: no rerun helps until freed


def is_storage_full(err: BaseException) -> bool:
    """Whether ``err`` is a full disk or quota (``STORAGE_FULL``)."""
    return isinstance(err, OSError) and err.errno in STORAGE_FULL


def damaged_parquet(err: BaseException) -> bool:
    """Whether ``err`` (pyarrow's, reading a Parquet file) says the file is damaged: a parse error,
    which carries no errno, unlike the filesystem's own (EIO, ESTALE), which are no fault of the file."""
    import pyarrow as pa

    return isinstance(err, (pa.ArrowInvalid, OSError)) and getattr(err, "errno", None) is None


def storage_full_error(number: int, filename: str | Path | None) -> OSError:
    """The OSError of a full disk or quota (``number``: ENOSPC or EDQUOT) naming ``filename``: the
    target a user knows, not a hidden temporary (pyarrow's errors name no file at all)."""
    return OSError(number, os.strerror(number), str(filename) if filename else None)


def _temporary(path: Path) -> Path:
    # random, not the pid alone: two writers of one file on a shared filesystem (array tasks storing
    # the same job.json or base_config.yaml) can have equal pids on two nodes or in PID namespaces
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")


def _flush_to_disk(path: Path) -> None:
    """fsync ``path`` (a file or a folder). Some filesystems refuse it on a folder (EINVAL): nothing to do."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)``, then move the result onto ``path`` (parent folders created);
    a failed write leaves no temporary file behind. Every other helper here is this one.

    The data reach the disk before the rename, and the rename before this returns (fsync of the file,
    then of its folder): a node that crashes with the write still in its page cache (Lustre and NFS
    clients cache writes too) leaves the old file or the whole new one, never an empty or torn file
    under the new name, and a caller that deletes what the file replaces (a journal) loses nothing."""
    path = Path(path)
    for wait in (*PASSING_ERROR_WAITS_S, None):
        tmp = _temporary(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            _flush_to_disk(tmp)
            os.replace(tmp, path)
            _flush_to_disk(path.parent)
            return path
        except OSError as err:
            if is_storage_full(err):
                raise storage_full_error(err.errno, path) from err
            if err.errno not in PASSING_ERRORS or wait is None:
                raise
            say(f"warning: writing {path}: {err.strerror or err}; trying again in {wait} s", logging.WARNING)
            time.sleep(wait)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    raise AssertionError("unreachable")


# A shared filesystem's passing errors (an NFS or Lustre server failing over, a stale handle): the
# whole write is tried again after these waits before the error ends the run; a full disk is not.
PASSING_ERRORS = (errno.EIO, errno.ESTALE, errno.ETIMEDOUT)
PASSING_ERROR_WAITS_S = (2, 10, 30)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders created)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_parquet(path: str | Path, table) -> Path:
    """Write an Arrow table (or a pandas DataFrame, without its index) as one Parquet file atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"atomic_write_parquet(path, table): path must come first, got {type(path).__name__}")
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


# ``<name>.tmp-<pid>@<host>`` / ``<name>.old-<pid>@<host>``: the folder a writer fills, or one being
# removed (:func:`leftover_name`); without ``@host``, the names of versions before 2026-12.
LEFTOVER = re.compile(r"^(?P<name>.+?)\.(?:tmp|old)-(?P<pid>\d+)(?:@(?P<host>.+))?$")


def leftover_name(path: Path, kind: str) -> Path:
    """Beside ``path``, the folder this process fills (``kind`` "tmp") or removes ("old") in its stead;
    named with the host as well as the pid: on a folder shared between nodes, a pid alone tells
    nothing of whose it is (see ``allcluster.data.cache`` for a reaper that relies on it)."""
    return path.with_name(f"{path.name}.{kind}-{os.getpid()}@{socket.gethostname()}")


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """``with atomic_folder(p) as tmp:`` fill the new folder ``tmp``; at the end it replaces ``p``
    whole (readers see the old folder or the new one, never a mix). A failure removes ``tmp``.
    Folders that killed writers left (``p.tmp-*``, ``p.old-*``) are removed first: callers hold
    the lock that makes them the folder's one writer."""
    path = Path(path)
    for leftover in [*path.parent.glob(f"{path.name}.tmp-*"), *path.parent.glob(f"{path.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = leftover_name(path, "tmp")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            old = leftover_name(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_storage_full(err):
            raise storage_full_error(err.errno, path) from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def discard_folder(path: str | Path) -> None:
    """Remove a folder whole or not at all, as seen at ``path``: renamed out of the way first, so that
    neither a reader nor a rerun after a kill half way finds a part of it that looks whole; a kill
    leaves ``p.old-*``, which :func:`atomic_folder` of ``p`` removes."""
    path = Path(path)
    old = leftover_name(path, "old")
    shutil.rmtree(old, ignore_errors=True)      # a dead process's, whose pid this one has now
    try:
        os.rename(path, old)
    except FileNotFoundError:
        return
    shutil.rmtree(old, ignore_errors=True)
