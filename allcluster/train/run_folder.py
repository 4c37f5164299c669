"""The layout of a training run's Ray Train folder, ``<output_dir>/ray`` (no torch, no Ray: the sweep's
tables read it too)."""
from __future__ import annotations

from pathlib import Path

RAY_RUN_FOLDER = "ray"          # <output_dir>/ray: Ray Train's run folder, its checkpoints inside
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"   # in it, Ray Train's list of the run's checkpoints


def checkpoint_folders(root: Path) -> list[Path]:
    """The ``checkpoint_*`` folders in ``root``, oldest first (their names sort by time: Ray Train's
    ``checkpoint_<date>_<time>``, the local session's numbers). Ray's snapshot file shares the prefix."""
    return sorted(p for p in root.glob("checkpoint_*") if p.is_dir()) if root.is_dir() else []


def newest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint folder in ``root``, None if none."""
    found = checkpoint_folders(root)
    return found[-1] if found else None
