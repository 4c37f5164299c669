"""Which stage's config class reads a YAML under ``configs/`` (by folder), and its full validation.

Used by ``allcluster check-config`` and by the test that validates every shipped config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def _train():
    from allcluster.train.config import TrainConfig, resolve
    return TrainConfig, lambda cfg, path: resolve(cfg, str(path))


def _sweep():
    from allcluster.sweep.config import SweepConfig
    from allcluster.sweep.plan import plan_trials

    def validate(cfg, path: Path):
        plan_trials(cfg, str(path))
        return cfg
    return SweepConfig, validate


def _score():
    from allcluster.score.config import ScoreConfig, check
    return ScoreConfig, lambda cfg, path: check(cfg, str(path), require_paths=False)


STAGES: dict[str, Callable[[], tuple[type, Callable[[Any, Path], Any]]]] = {
    "train": _train,
    "demo": _train,
    "sweep": _sweep,
    "score": _score,
}


def config_class_for(path: str | Path) -> tuple[type, Callable[[Any, Path], Any]]:
    """(config class, validator) for a config file, from its folder name (``configs/<stage>/``)."""
    path = Path(path)
    stage = path.stem if path.parent.name == "configs" else path.parent.name
    if stage not in STAGES:
        raise KeyError(f"{path}: no stage reads configs/{stage}/; known: {', '.join(sorted(STAGES))}")
    return STAGES[stage]()
