"""Which stage's config class reads a YAML (by its folder ``configs/<stage>/`` or by name), and its
full validation. Used by ``allcluster check-config`` and by the test that validates every shipped config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def _train():
    from allcluster.train.config import TrainConfig, resolve
    return TrainConfig, lambda cfg, path, source: resolve(cfg, source)


def _sweep():
    from allcluster.sweep.config import SweepConfig
    from allcluster.sweep.plan import base_beside, plan_trials

    def validate(cfg, path: Path, source: str):
        plan_trials(base_beside(cfg, path), source)
        return cfg
    return SweepConfig, validate


def _score():
    from allcluster.score.config import ScoreConfig, check
    return ScoreConfig, lambda cfg, path, source: check(cfg, source, require_paths=False)


# each stage: (config class, validator(cfg, config file, source as errors name it))
STAGES: dict[str, Callable[[], tuple[type, Callable[[Any, Path, str], Any]]]] = {
    "train": _train,
    "demo": _train,
    "sweep": _sweep,
    "score": _score,
}


def stage_of(path: str | Path) -> str:
    """The stage a config file configures, from where it lives (``configs/<stage>/x.yaml``, ``configs/demo.yaml``)."""
    path = Path(path)
    stage = path.stem if path.parent.name == "configs" else path.parent.name
    if stage not in STAGES:
        raise KeyError(f"{path}: cannot tell the stage from its folder; pass --stage ({', '.join(sorted(STAGES))})")
    return stage


def config_class_for(path: str | Path, stage: str | None = None) -> tuple[type, Callable[[Any, Path, str], Any]]:
    """(config class, validator) for a config file of ``stage`` (default: from its folder)."""
    return STAGES[stage or stage_of(path)]()


def check_config(path: str | Path, stage: str | None = None, overrides: list[str] = ()) -> str:
    """Load and fully validate a config file as a run would; returns its stage. Raises ``ConfigError``."""
    from allcluster.config import config_source, load

    stage = stage or stage_of(path)
    cls, validate = config_class_for(path, stage)
    validate(load(cls, path, overrides), Path(path), config_source(path, overrides))
    return stage
