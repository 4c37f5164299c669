"""Optimisers, learning-rate schedules and early stopping on validation macro-F1."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from allcluster.train.config import OptimConfig, ScheduleConfig


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.name`` (papers 001/002: Adam, SGD, RMSprop, Adadelta; plus Adamax, AdamW)."""
    params = [p for p in params if p.requires_grad]
    wd = cfg.weight_decay
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if cfg.name == "adamax":
        return torch.optim.Adamax(params, lr=lr, weight_decay=wd)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=wd)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=cfg.momentum, weight_decay=wd)
    if cfg.name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=wd)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")


class EpochScheduler:
    """One interface for the three schedules: ``step(val_macro_f1)`` once per epoch."""

    def __init__(self, cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, epochs: int):
        self.cfg = cfg
        if cfg.name == "plateau":
            self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=cfg.factor, patience=cfg.patience, min_lr=cfg.min_lr)
        elif cfg.name == "cosine":
            base = optimizer.param_groups[0]["lr"]
            floor = min(cfg.min_lr / base, 1.0) if base > 0 else 0.0

            def factor(epoch: int) -> float:
                if epoch < cfg.warmup_epochs:
                    return (epoch + 1) / (cfg.warmup_epochs + 1)
                progress = (epoch - cfg.warmup_epochs) / max(1, epochs - cfg.warmup_epochs)
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            self.inner = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        else:
            self.inner = None

    def step(self, val_macro_f1: float) -> None:
        if isinstance(self.inner, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.inner.step(0.0 if math.isnan(val_macro_f1) else val_macro_f1)
        elif self.inner is not None:
            self.inner.step()

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.inner is not None and state:
            self.inner.load_state_dict(state)


class EarlyStopping:
    """Stop when validation macro-F1 has not improved for ``patience`` epochs (0 disables)."""

    def __init__(self, patience: int, best: float = -math.inf, bad_epochs: int = 0):
        self.patience, self.best, self.bad_epochs = patience, best, bad_epochs

    def update(self, score: float) -> bool:
        """Record an epoch's score; True when it is a new best."""
        if not math.isnan(score) and score > self.best:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience
