"""The one atomic write: a temporary file beside the target, then ``os.replace``.

Readers (and a rerun after a kill) see the old file or the new one, never half of one: ``rename(2)``
within one folder is atomic on local filesystems and on NFS/Lustre/GPFS. Temporary names start with
``.`` so Parquet dataset readers skip them.
"""
from __future__ import annotations

import os
from pathlib import Path


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_parquet(path: str | Path, table) -> Path:
    """Write an Arrow table as one Parquet file atomically."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
