"""``allcluster sweep --dry-run``: the grid, each trial's state, and measured cost estimates.

The estimate comes from a short probe: a few real training steps (forward, backward, optimiser) of
each distinct backbone x input size x batch size on this machine's device, then
``epochs x (train images / probe img/s + val images / (3 x probe img/s))`` per trial. It is an upper
bound in epochs (early stopping and ASHA end trials sooner) and is only as good as the device the
dry run ran on, which it names: run it on a node like the ones the sweep will use.
"""
from __future__ import annotations

import time

import pandas as pd
import torch

from allcluster.config import ConfigError
from allcluster.data.manifest import read_manifest
from allcluster.device import pick_device
from allcluster.models import build_model
from allcluster.train.optim import build_optimizer
from allcluster.sweep.plan import Trial, trial_status
from allcluster.train.config import TrainConfig, head_spec

PROBE_STEPS = 3


def probe_images_per_s(cfg: TrainConfig, device: torch.device, num_classes: int = 4) -> float:
    """Training throughput of one worker for this backbone, input size and batch size."""
    model = build_model(cfg.model.backbone, num_classes, head_spec(cfg)).to(device).train()
    optimizer = build_optimizer(cfg.optim, model.parameters(), cfg.optim.lr)
    batch = min(cfg.fit.batch_size, 32)
    x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()                                   # warm-up (allocations, cuDNN autotune)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(PROBE_STEPS):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return PROBE_STEPS * batch / (time.perf_counter() - start)


def _probe_or_refuse(trial: Trial, device: torch.device) -> float:
    """:func:`probe_images_per_s` for ``trial``; a model that cannot take one training step (an input
    size too small for the backbone's pooling) is a :class:`ConfigError` naming the trial and its
    values: the sweep itself would record the trial as errored."""
    try:
        return probe_images_per_s(trial.config, device)
    except torch.OutOfMemoryError:
        raise                                 # a busy GPU, not the trial's fault
    except (RuntimeError, ValueError) as err:
        values = ", ".join(f"{k}={v!r}" for k, v in trial.params.items())
        raise ConfigError(f"trial {trial.index} ({trial.trial_id}: {values}): its model cannot take one training "
                          f"step: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def _split_class_counts(manifest: str) -> pd.Series:
    frame = read_manifest(manifest)
    return frame[frame["status"] == "ok"].groupby(["split", "label"]).size()


def _split_sizes(cfg: TrainConfig, counts: pd.Series) -> tuple[int, int]:
    cap = cfg.data.max_per_class or None

    def size(split: str) -> int:
        per_class = counts.get(split, pd.Series(dtype=int))
        return int(per_class.clip(upper=cap).sum()) if cap else int(per_class.sum())
    return size("train"), size("val")


def estimate_table(trials: list[Trial], probe: bool = True) -> pd.DataFrame:
    """One row per trial: state, varied values, and (with ``probe``) estimated hours."""
    device = pick_device()
    measured: dict[tuple, float] = {}
    counts = {m: _split_class_counts(m) for m in {t.config.data.manifest for t in trials}} if probe else {}
    rows = []
    for trial in trials:
        cfg = trial.config
        row = {"index": trial.index, "trial_id": trial.trial_id, "state": trial_status(trial.dir), **trial.params}
        if probe:
            key = (cfg.model.backbone, cfg.data.image_size, min(cfg.fit.batch_size, 32), tuple(cfg.model.head.hidden))
            if key not in measured:
                measured[key] = _probe_or_refuse(trial, device)
            ips = measured[key] * cfg.resources.num_workers
            n_train, n_val = _split_sizes(cfg, counts[cfg.data.manifest])
            epochs = cfg.finetune.head_epochs + cfg.fit.epochs
            hours = epochs * (n_train / ips + n_val / (3 * ips)) / 3600
            row.update(probe_images_per_s=round(ips, 1), max_epochs=epochs, est_hours=round(hours, 3),
                       est_gpu_hours=round(hours * cfg.resources.gpus, 3))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return table


def dry_run_text(trials: list[Trial], grid_cells: int, probe: bool = True) -> str:
    table = estimate_table(trials, probe)
    lines = [f"grid: {grid_cells} cells, {len(trials)} trials; states: "
             + ", ".join(f"{n} {s}" for s, n in table["state"].value_counts().items())]
    if probe:
        lines.append(f"estimates measured on {table.attrs['device']} (all epochs; bare training steps: data "
                     f"loading, augmentation, evaluation and Ray's start-up come on top): "
                     f"{table['est_hours'].sum():.2f} trial-hours, {table['est_gpu_hours'].sum():.2f} GPU-hours")
    lines.append(table.to_string(index=False))
    return "\n".join(lines)
