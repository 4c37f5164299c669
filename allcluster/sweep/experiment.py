"""The config an experiment folder was started with (pure, no Ray).

Every trial is the sweep's base training config plus its varied values, and trial folders are
named by the varied values only. A rerun under a changed base (``--set train.fit.epochs=3``) would
therefore resume or keep trials trained under the old config beside new ones. The first run stores
the resolved base in ``<experiment_dir>/base_config.yaml``; a rerun whose base differs is refused,
naming the keys, unless ``--new-config``: the old outputs then move to
``<experiment_dir>/superseded-<YYYYmmdd-HHMMSS>/`` and every trial starts afresh.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from allcluster.atomic import atomic_write_text
from allcluster.config import ConfigError, config_diff, flatten, from_dict, read_yaml, to_dict
from allcluster.data.manifest import manifest_fingerprint, read_manifest
from allcluster.sweep.config import SweepConfig
from allcluster.sweep.plan import PER_TRIAL_KEYS, base_train_dict
from allcluster.train.config import RESUME_FREE_KEYS, TrainConfig

BASE_FILE = "base_config.yaml"
# Not a config key: the fingerprint of the manifest's content (paths, hashes, labels, splits). The
# config names the manifest by path only; one re-indexed at that path (another seed or ratios) would
# put trials of two splits, compared on two validation sets, in one table and one best_model.
CONTENT_KEY = "data.manifest_content"
# What a sweep writes into its experiment folder (and --new-config moves aside); tune-*/ as well.
OUTPUTS = ("trials", "trials.parquet", "epochs.parquet", "best_model", "sweep.yaml", BASE_FILE)


def resolved_base(sweep: SweepConfig, source: str) -> dict[str, Any]:
    """The base training config of every trial, every default filled, as dotted keys."""
    cfg = from_dict(TrainConfig, base_train_dict(sweep, source), f"{source}: train")
    base = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in PER_TRIAL_KEYS}
    if "data.manifest" not in varied_keys(sweep) and Path(cfg.data.manifest).is_file():
        base[CONTENT_KEY] = manifest_content(cfg.data.manifest)
    return base


def manifest_content(path: str) -> str:
    """The fingerprint of a manifest's content; a null is "" whatever pandas spells it ('None', 'nan')."""
    frame = read_manifest(path)
    return manifest_fingerprint(frame.astype(object).where(frame.notna(), ""))


def varied_keys(sweep: SweepConfig) -> set[str]:
    return set(sweep.grid) | set(sweep.sample)


def base_diff(stored: dict[str, Any], current: dict[str, Any], varied: set[str] = frozenset()) -> list[str]:
    """``"train.KEY: OLD -> NEW"`` for every key whose value differs, sorted; keys the grid or the
    samples set (``varied``) are skipped: every trial overrides them; so are the keys a run may change
    and still resume (``RESUME_FREE_KEYS``: resources, cache folder, loader workers), so a requeued
    sweep can land on nodes of another shape and a run refused for its resources can be fixed."""
    if CONTENT_KEY not in stored or CONTENT_KEY not in current:
        # an experiment of an older allcluster (not recorded), or a manifest not here (--collect on a
        # login node; a run is refused for the missing file itself, by preflight)
        stored, current = ({k: v for k, v in d.items() if k != CONTENT_KEY} for d in (stored, current))
    lines = config_diff(stored, current, skip=(*varied, *RESUME_FREE_KEYS), prefix="train.")
    return [f"the content of data.manifest {current.get('data.manifest')} (re-indexed since: {line.split(': ', 1)[1]})"
            if line.startswith(f"train.{CONTENT_KEY}:") else line for line in lines]


def read_stored_base(experiment_dir: Path) -> dict[str, Any] | None:
    """The base stored by the experiment's first run; None for a new folder (or one that predates it)."""
    path = experiment_dir / BASE_FILE
    return read_yaml(path) if path.is_file() else None


def store_base(experiment_dir: Path, base: dict[str, Any]) -> Path:
    # array tasks may write it at once: each writes its own temporary file (pid) and renames it
    return atomic_write_text(experiment_dir / BASE_FILE,
                             "# the resolved base training config this experiment was started with; a rerun whose\n"
                             "# base differs is refused (allcluster sweep --new-config starts afresh)\n"
                             + yaml.safe_dump(base, sort_keys=True))


def record_base(experiment_dir: Path, base: dict[str, Any]) -> bool:
    """Store ``base`` as the experiment's when it has none (True), or add the manifest's content to a
    base an older allcluster stored without it, so that a re-index is caught from now on."""
    stored = read_stored_base(experiment_dir)
    if stored is None:
        store_base(experiment_dir, base)
        return True
    if CONTENT_KEY in base and CONTENT_KEY not in stored:
        store_base(experiment_dir, {**stored, CONTENT_KEY: base[CONTENT_KEY]})
    return False


def check_base(experiment_dir: Path, base: dict[str, Any], varied: set[str], source: str,
               new_config: bool) -> list[str]:
    """The differing keys (empty: same config, or a new folder); raises ``ConfigError`` when the
    base differs and ``new_config`` is not set. Reads only: a refusal writes nothing."""
    stored = read_stored_base(experiment_dir)
    diffs = base_diff(stored, base, varied) if stored is not None else []
    if diffs and not new_config:
        raise ConfigError(
            f"{source}: the resolved base config differs from the one {experiment_dir} was started with "
            f"({experiment_dir / BASE_FILE}): {'; '.join(diffs)}. Refusing to mix trials trained under two "
            "configs: rerun with the original config, or add --new-config to move the old outputs to "
            f"{experiment_dir}/superseded-<time>/ and start every trial afresh")
    return diffs


def supersede(experiment_dir: Path) -> Path:
    """Move the experiment's outputs into a new ``superseded-<time>/`` folder inside it; the moved
    ``trials.parquet`` gets its ``model_dir``/``checkpoint_path`` columns pointed at the new place."""
    exp = experiment_dir.resolve()
    target = _new_name(exp, "superseded")
    target.mkdir()
    for path in [*(exp / name for name in OUTPUTS), *sorted(exp.glob("tune-*")), *sorted(exp.glob("best_model.stale-*"))]:
        if path.exists():
            os.replace(path, target / path.name)
    _repoint_trials_table(target / "trials.parquet", str(exp / "trials"), str(target / "trials"))
    return target


def retire_best(experiment_dir: Path) -> Path | None:
    """When no trial of the grid finished (all cells new since the last export, or every one of them
    errored): move an earlier run's ``best_model/`` aside to ``best_model.stale-<time>/`` and return
    where. It was a trial of another grid, and ``EXP/best_model`` in a scoring config would go on
    scoring with it unnoticed; moved, not deleted (it may be the only copy of a superseded trial's model)."""
    current = experiment_dir / "best_model"
    if not current.exists():
        return None
    target = _new_name(experiment_dir, "best_model.stale")
    os.replace(current, target)
    return target


def _new_name(exp: Path, prefix: str) -> Path:
    """``exp/<prefix>-<time>`` (``-2``, ``-3``... when taken): where something is moved aside."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = exp / f"{prefix}-{stamp}", 1
    while target.exists():
        n += 1
        target = exp / f"{prefix}-{stamp}-{n}"
    return target


def _repoint_trials_table(path: Path, old: str, new: str) -> None:
    import pandas as pd

    from allcluster.atomic import atomic_write_parquet

    if not path.is_file():
        return
    table = pd.read_parquet(path)
    for column in ("model_dir", "checkpoint_path"):
        if column in table:
            table[column] = [v.replace(old, new, 1) if isinstance(v, str) and v.startswith(old) else v
                             for v in table[column]]
    atomic_write_parquet(path, table)
