"""The one atomic write: a temporary file beside the target, then ``os.replace``.

Readers (and a rerun after a kill) see the old file or the new one, never half of one: ``rename(2)``
within one folder is atomic on local filesystems and on NFS/Lustre/GPFS. Temporary names start with
``.`` so Parquet dataset readers skip them.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT)   # a full disk, a block or inode quota: no rerun helps until freed


def is_storage_full(err: BaseException) -> bool:
    """Whether ``err`` is a full disk or quota (``STORAGE_FULL``)."""
    return isinstance(err, OSError) and err.errno in STORAGE_FULL


def storage_full_error(number: int, filename: str | Path | None) -> OSError:
    """The OSError of a full disk or quota (``number``: ENOSPC or EDQUOT) naming ``filename``: the
    target a user knows, not a hidden temporary (pyarrow's errors name no file at all)."""
    return OSError(number, os.strerror(number), str(filename) if filename else None)


def _temporary(path: Path) -> Path:
    # random, not the pid alone: two writers of one file on a shared filesystem (array tasks storing
    # the same job.json or base_config.yaml) can have equal pids on two nodes or in PID namespaces
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)``, then move the result onto ``path`` (parent folders created);
    a failed write leaves no temporary file behind. Every other helper here is this one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if is_storage_full(err):
            raise storage_full_error(err.errno, path) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """``with atomic_folder(p) as tmp:`` fill the new folder ``tmp``; at the end it replaces ``p``
    whole (readers see the old folder or the new one, never a mix). A failure removes ``tmp``.
    Folders that killed writers left (``p.tmp-*``, ``p.old-*``) are removed first: callers hold
    the lock that makes them the folder's one writer."""
    path = Path(path)
    for leftover in [*path.parent.glob(f"{path.name}.tmp-*"), *path.parent.glob(f"{path.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
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
