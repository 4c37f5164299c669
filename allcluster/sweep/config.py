"""``SweepConfig``: every key of a sweep YAML (``allcluster sweep --config CFG``).

A sweep is a base training config (``train``, the keys of ``configs/train/*.yaml``) plus the values
to vary: ``grid`` (every combination, Tune's ``grid_search``) and ``sample`` (``num_samples`` seeded
random draws per grid cell, Tune's random search). Keys of both are dotted training-config paths
(``optim.lr``); each value is checked against ``TrainConfig`` when the sweep is planned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from allcluster.config import bounds

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class AshaConfig:
    """Asynchronous successive halving on validation macro-F1 (Tune's ``ASHAScheduler``)."""
    enabled: bool = False
    grace_period: int = field(default=3, metadata=bounds(ge=1))       # epochs before a trial may stop
    reduction_factor: int = field(default=3, metadata=bounds(ge=2))


@dataclass(frozen=True)
class SweepConfig:
    """One experiment: a base training config and the grid/samples over it."""
    name: str = "sweep"
    experiment_dir: str = "runs/sweep"     # a shared-filesystem path on a cluster: every node writes here
    base: str = ""                         # optional training YAML the `train` section is laid over
    train: dict[str, Any] = field(default_factory=dict)   # TrainConfig keys shared by every trial
    # dotted key -> values; all combinations (--set grid.optim.name=[adam]: the key is "optim.name")
    grid: dict[str, list] = field(default_factory=dict, metadata={"dotted_keys": True})
    # dotted key -> {choice: [..]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]}
    sample: dict[str, dict] = field(default_factory=dict, metadata={"dotted_keys": True})
    num_samples: int = field(default=1, metadata=bounds(ge=1))     # random draws per grid cell
    seed: int = 0                          # seeds the draws, so a rerun plans the same trials
    max_concurrent: int = field(default=0, metadata=bounds(ge=0))  # 0: as many as the cluster fits
    asha: AshaConfig = AshaConfig()
    retry_errored: bool = False            # rerun trials that errored before (also --retry-errored)
