"""Which stage's config class reads a YAML under ``configs/`` (by folder), and its full validation.

Used by ``allcluster check-config`` and by the test that validates every shipped config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def _train():
    from allcluster.train.config import TrainConfig, resolve
    return TrainConfig, lambda cfg, path: resolve(cfg, str(path))


STAGES: dict[str, Callable[[], tuple[type, Callable[[Any, Path], Any]]]] = {
    "train": _train,
    "demo": _train,
}


def config_class_for(path: str | Path) -> tuple[type, Callable[[Any, Path], Any]]:
    """(config class, validator) for a config file, from its folder name (``configs/<stage>/``)."""
    path = Path(path)
    stage = path.stem if path.parent.name == "configs" else path.parent.name
    if stage not in STAGES:
        raise KeyError(f"{path}: no stage reads configs/{stage}/; known: {', '.join(sorted(STAGES))}")
    return STAGES[stage]()
