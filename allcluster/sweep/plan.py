"""Planning a sweep (pure, no Ray): which trials exist, their configs, folders and states.

Trials are expanded here, deterministically (grid order x seeded draws), and each gets an id from its
varied values. Rerunning a sweep therefore plans the same trials in the same folders, which is what
makes resume simple: a finished trial has its model card, an interrupted one its Ray Train
checkpoints, an errored one its ``error.json``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from allcluster.atomic import atomic_write_text
from allcluster.config import ConfigError, config_hash, deep_merge, from_dict, read_yaml, set_path
from allcluster.models.card import CARD_FILE
from allcluster.sweep.config import DISTRIBUTIONS, SweepConfig
from allcluster.sweep.schema import UNFINISHED
from allcluster.train.config import TrainConfig, resolve



@dataclass(frozen=True)
class Trial:
    """One training run of the sweep."""
    trial_id: str
    index: int
    params: dict[str, Any]          # the varied values, by dotted key
    config: TrainConfig

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir)


def base_beside(sweep: SweepConfig, config_file: str | Path) -> SweepConfig:
    """``sweep`` with its ``base`` found as documented: as given (from the working directory), else
    relative to the sweep file ``config_file``."""
    if sweep.base and not Path(sweep.base).is_file() and (Path(config_file).parent / sweep.base).is_file():
        return replace(sweep, base=str(Path(config_file).parent / sweep.base))
    return sweep


def base_train_dict(sweep: SweepConfig, source: str) -> dict:
    """The training config every trial starts from: ``base`` YAML (see :func:`base_beside`) with
    ``train`` laid over it. A key of the base file that no training config has is named in it."""
    base = {}
    if sweep.base:
        if not Path(sweep.base).is_file():
            raise ConfigError(f"{source}: base: {sweep.base} not found (from the working directory or the sweep file)")
        base = read_yaml(sweep.base)
        from_dict(TrainConfig, base, f"{sweep.base} (base of {source})")     # its own keys and types
    return deep_merge(base, sweep.train)


def _draw(spec: dict, key: str, rng: np.random.Generator, source: str) -> Any:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{source}: sample.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}}}: "
                          f"[...], got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{source}: sample.{key}.choice: expected a non-empty list")
        return args[int(rng.integers(len(args)))]
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
            and args[0] < args[1]):
        raise ConfigError(f"{source}: sample.{key}.{kind}: expected [low, high] with low < high, got {args!r}")
    low, high = args
    if kind == "uniform":
        return float(rng.uniform(low, high))
    if kind == "loguniform":
        if low <= 0:
            raise ConfigError(f"{source}: sample.{key}.loguniform: low must be > 0")
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(int(low), int(high)))      # randint: high excluded, as Tune's


def flatten(key: str, value: Any) -> dict[str, Any]:
    """A grid value that is a mapping sets several keys together: ``optim: {name: sgd, lr: 0.01}``
    becomes ``{"optim.name": "sgd", "optim.lr": 0.01}`` (coupled keys, e.g. each optimiser with its
    own rate); other keys of the section keep the base config's values."""
    if not isinstance(value, dict):
        return {key: value}
    if not value:
        raise ConfigError(f"grid.{key}: an empty mapping sets nothing")
    return {k: v for sub, item in value.items() for k, v in flatten(f"{key}.{sub}", item).items()}


def expand(sweep: SweepConfig, source: str) -> list[dict[str, Any]]:
    """Every trial's varied values (by dotted key): the grid's product, times ``num_samples`` seeded
    draws; a mapping value sets several keys together (:func:`flatten`)."""
    for key, values in sweep.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: grid.{key}: expected a non-empty list of values")
    _check_each_key_set_once(sweep, source)
    keys = list(sweep.grid)
    cells = [dict(zip(keys, combo)) for combo in itertools.product(*(sweep.grid[k] for k in keys))]
    draws = sweep.num_samples if sweep.sample else 1
    rng = np.random.default_rng(sweep.seed)
    trials = []
    for cell in cells:
        for _ in range(draws):
            values = {**cell, **{k: _draw(v, k, rng, source) for k, v in sweep.sample.items()}}
            trials.append({k: v for key, value in values.items() for k, v in flatten(key, value).items()})
    return trials


PER_TRIAL_KEYS = ("name", "output_dir")          # set for each trial by trial_config


def _check_each_key_set_once(sweep: SweepConfig, source: str) -> None:
    """A training key varied by two entries (``grid.optim.lr`` and ``sample.optim.lr``, or a coupled
    ``grid.fit`` mapping and ``grid.fit.epochs``) is refused naming both: one would silently win and
    the other's values would never be trained."""
    setters: dict[str, str] = {}
    entries = [*((f"grid.{key}", [flatten(key, v) for v in values]) for key, values in sweep.grid.items()),
               *((f"sample.{key}", _sampled_settings(key, spec)) for key, spec in sweep.sample.items())]
    for entry, settings in entries:
        for key in sorted({k for setting in settings for k in setting}):
            if key in PER_TRIAL_KEYS:
                raise ConfigError(f"{source}: {entry}: varies train.{key}, which the sweep sets for each trial "
                                  f"itself ({key}: <sweep name>/<trial id>, the trial's folder); vary another key")
            if key in setters:
                raise ConfigError(f"{source}: {entry}: varies train.{key}, which {setters[key]} varies too; "
                                  "give each key in one place")
            setters[key] = entry


def _sampled_settings(key: str, spec: Any) -> list[dict[str, Any]]:
    """The dotted keys a ``sample`` entry can set: a ``choice`` of mappings sets each mapping's keys
    (as a grid mapping does, :func:`flatten`); any other draw sets ``key``."""
    choices = spec.get("choice") if isinstance(spec, dict) else None
    if isinstance(choices, list) and choices:
        return [flatten(key, choice) for choice in choices]
    return [{key: None}]


def trial_id(params: dict[str, Any]) -> str:
    """Readable and stable: the varied values' short form plus a hash of all of them."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    # Kept as first written, though 1e+12 reads 1e-12 in the slug ('+' becomes '-'): a trial's folder is
    # named by its id, so a changed slug would orphan the trials of existing experiments (the hash
    # suffix and trials.parquet hold the exact values)
    words = [str(v) if not isinstance(v, float) else f"{v:.3g}" for v in params.values()]
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(words)).strip("-")[:60]
    return f"{slug}-{digest}" if slug else digest


def trial_config(base: dict, params: dict[str, Any], sweep: SweepConfig, tid: str, source: str) -> TrainConfig:
    data = json.loads(json.dumps(base))
    for key, value in params.items():
        set_path(data, key.split("."), value, f"{source}: {key}")
    data["name"] = f"{sweep.name}/{tid}"
    data["output_dir"] = str(Path(sweep.experiment_dir).resolve() / "trials" / tid)
    trial_source = f"{source} (trial {tid}: {', '.join(f'{k}={v!r}' for k, v in params.items())})"
    return resolve(from_dict(TrainConfig, data, trial_source), trial_source)


def plan_trials(sweep: SweepConfig, source: str) -> list[Trial]:
    """All trials of the sweep, each with a validated, resolved training config."""
    base = base_train_dict(sweep, source)
    trials, seen, trained = [], set(), set()
    for params in expand(sweep, source):
        tid = trial_id(params)
        if tid in seen:
            continue                       # e.g. a choice drawn twice in one cell
        seen.add(tid)
        config = trial_config(base, params, sweep, tid, source)
        # values spelled apart that train the same thing (epochs 1 and 1.0; lr 0, the optimiser's
        # default, and that default written out): one trial, as the dry run's "N cells, M trials" says
        same = config_hash(replace(config, name="", output_dir=""))
        if same in trained:
            continue
        trained.add(same)
        # index: 0..N-1 in plan order, what `allcluster sweep --trial-index I` (a Slurm array task) takes
        trials.append(Trial(tid, len(trials), params, config))
    return trials


def trial_status(trial_dir: Path) -> str:
    """What the folder says: finished, stopped (early, by ASHA), errored, interrupted or pending."""
    if (trial_dir / "model" / CARD_FILE).is_file():
        return "finished"
    if (trial_dir / "stopped.json").is_file():
        return "stopped"
    if (trial_dir / "error.json").is_file():
        return "errored"
    if (trial_dir / "metrics.parquet").is_file():
        return "interrupted"
    return "pending"


def mark_stopped(trial_dir: Path, by: str, epoch: int | None = None) -> None:
    """Record that a scheduler (``by``, e.g. "asha") stopped this trial early: it is never rerun.

    Only a scheduler's decision is recorded so: a trial left unfinished by a signal, ``scancel`` or
    a time limit stays "interrupted"/"pending" and the next run resumes it.
    """
    atomic_write_text(trial_dir / "stopped.json", json.dumps({"by": by, "epoch": epoch, "time": time.time()}))


def mark_errored(trial_dir: Path, err: BaseException, note: str = "") -> None:
    """Record a trial's exception in ``error.json`` (rerun only with ``--retry-errored``)."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(trial_dir / "error.json", json.dumps({"error": note + _exception_text(err), "time": time.time()}))


def _exception_text(err: BaseException) -> str:
    """The trial's own exception (the first behind Ray's and Ray Train's wrappers, whose text repeats
    whole tracebacks in terminal colours) as a traceback's last line: type and message, no escape
    codes, at most 4,000 characters."""
    from allcluster.interrupt import behind

    own = next((e for e in behind(err) if not type(e).__module__.startswith("ray.")), err)
    text = "".join(traceback.format_exception_only(type(own), own)).strip()
    return _TERMINAL_COLOURS.sub("", text)[-4000:]


_TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


# Runs in a row, each with no new epoch, in which a trial's Ray processes may die with no stop signal
# before it counts as errored: a node lost, or a worker the kernel's OOM killer ended, says nothing
# about the trial's config, and the rerun resumes it from its last checkpoint; a trial that kills its
# processes every time, before it records an epoch, ends errored.
LOST_RUNS_ALLOWED = 2


def epochs_recorded(trial_dir: Path) -> int:
    """Epochs in the trial's ``metrics.parquet`` (read from its footer)."""
    path = trial_dir / "metrics.parquet"
    return pq.read_metadata(path).num_rows if path.is_file() else 0


def mark_lost(trial_dir: Path, err: BaseException) -> int:
    """Count a run in which this trial's Ray processes died with no stop signal (``lost.json``);
    returns how many such runs it has had in a row without a new epoch (an epoch recorded since
    the last one starts the count again). The trial keeps its state (interrupted or pending)."""
    path, epochs = trial_dir / "lost.json", epochs_recorded(trial_dir)
    try:
        last = json.loads(path.read_text())
        runs = int(last["runs"]) + 1 if int(last["epochs"]) == epochs else 1
    except (OSError, ValueError, KeyError, TypeError):
        runs = 1
    trial_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"runs": runs, "epochs": epochs, "error": _exception_text(err),
                                        "time": time.time()}))
    return runs


def clear_error(trial_dir: Path) -> None:
    """A retried errored trial starts clean: its ``error.json`` goes, and with it the count of runs
    its Ray processes died in (``lost.json``), if that is what made it errored."""
    if (trial_dir / "error.json").is_file():
        (trial_dir / "lost.json").unlink(missing_ok=True)
        (trial_dir / "error.json").unlink(missing_ok=True)


def trials_to_run(trials: list[Trial], retry_errored: bool) -> list[Trial]:
    """Pending and interrupted trials (and errored ones when asked); finished/stopped never rerun."""
    wanted = set(UNFINISHED) | ({"errored"} if retry_errored else set())
    return [t for t in trials if trial_status(t.dir) in wanted]
