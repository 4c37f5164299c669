"""Optimisers (a name -> factory table with each one's learning-rate defaults), learning-rate
schedules, a moving average of the weights and early stopping on validation macro-F1.

Kept free of a top-level torch import: ``train/config.py`` derives ``optim.name``'s allowed values and
the learning-rate defaults from :data:`OPTIMIZERS`, and configs load without torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from allcluster.device import cpu_state_dict

if TYPE_CHECKING:
    import torch

    from allcluster.train.config import OptimConfig, ScheduleConfig


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimiser: its factory and its learning-rate defaults.

    ``lr_fresh`` is for weights that start random (a new head in stage 1, or every layer when training
    from scratch), ``lr_finetune`` for pretrained weights being adapted (stage 2 after ImageNet
    weights). One rate shared by every optimiser measures rate mismatch, not optimisers: Adam-family
    and RMSprop steps are scale-free (~1e-3 from scratch), SGD's step is the gradient times the rate
    (momentum 0.9 multiplies it by ~10), and Adadelta's rate is a multiplier near 1.0 by convention
    (Zeiler 2012 has no rate at all).
    """
    build: Callable[["OptimConfig", list, float], "torch.optim.Optimizer"]
    lr_fresh: float
    lr_finetune: float
    paper: str = ""


def _adam(cfg, params, lr):
    import torch
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)


def _adamw(cfg, params, lr):
    import torch
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def _adamax(cfg, params, lr):
    import torch
    return torch.optim.Adamax(params, lr=lr, weight_decay=cfg.weight_decay)


def _sgd(cfg, params, lr):
    import torch
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def _rmsprop(cfg, params, lr):
    import torch
    return torch.optim.RMSprop(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _adadelta(cfg, params, lr):
    import torch
    return torch.optim.Adadelta(params, lr=lr, weight_decay=cfg.weight_decay)


# Papers 001/002 compare Adam, SGD, RMSprop and Adadelta; Adamax and AdamW are extras.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adam": OptimizerSpec(_adam, lr_fresh=1e-3, lr_finetune=1e-4, paper="001, 002"),
    "sgd": OptimizerSpec(_sgd, lr_fresh=1e-2, lr_finetune=1e-3, paper="001, 002"),
    # a tenth of Adam's rate: optim.momentum (0.9 by default) multiplies the step by ~10, and torch's
    # zero-started square average (alpha 0.99) makes the first steps ~10x the rate. ALL-Net from scratch
    # (240 real images, 48 px) stayed on the constant-class prediction at 1e-3, and at 3e-4 for 2 of 3
    # seeds; 1e-4 learned on every seed (val macro-F1 0.67-0.75; measured 2026-12-01, tests/test_train.py)
    "rmsprop": OptimizerSpec(_rmsprop, lr_fresh=1e-4, lr_finetune=1e-5, paper="001, 002"),
    "adadelta": OptimizerSpec(_adadelta, lr_fresh=1.0, lr_finetune=0.1, paper="001, 002"),
    "adamax": OptimizerSpec(_adamax, lr_fresh=2e-3, lr_finetune=2e-4),
    "adamw": OptimizerSpec(_adamw, lr_fresh=1e-3, lr_finetune=1e-4),
}


def build_optimizer(cfg: "OptimConfig", params: Iterable["torch.nn.Parameter"], lr: float) -> "torch.optim.Optimizer":
    """The optimiser named by ``cfg.name`` over the trainable ``params`` at rate ``lr``."""
    return OPTIMIZERS[cfg.name].build(cfg, [p for p in params if p.requires_grad], lr)


def default_lr(name: str, fresh: bool) -> float:
    """The documented default rate of optimiser ``name`` for fresh (random) or pretrained weights."""
    spec = OPTIMIZERS[name]
    return spec.lr_fresh if fresh else spec.lr_finetune


class EpochScheduler:
    """One interface for the three schedules: ``step(val_macro_f1)`` once per epoch."""

    def __init__(self, cfg: "ScheduleConfig", optimizer: "torch.optim.Optimizer", epochs: int):
        import torch

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
        import torch

        if isinstance(self.inner, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.inner.step(0.0 if math.isnan(val_macro_f1) else val_macro_f1)
        elif self.inner is not None:
            self.inner.step()

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.inner is not None and state:
            self.inner.load_state_dict(state)


# Paper 002's patience, for schedules that lower the rate when validation stalls (plateau) or never
# (constant). A cosine schedule's length is set in advance and its best epochs lie in its low-rate
# tail, which patience cuts off: ALL-Net from scratch, 60 cosine epochs, best epochs 36-57 over three
# seeds; patience 10 stopped seed 0 at epoch 32 (test accuracy 0.936, against 0.979 run to the end).
DEFAULT_PATIENCE = {"plateau": 10, "constant": 10, "cosine": 0}


def default_patience(schedule: str) -> int:
    """Early stopping's patience when ``fit.early_stopping_patience`` is left unset (null): 10 epochs,
    or 0 (off) under a cosine schedule."""
    return DEFAULT_PATIENCE[schedule]


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


class WeightAverage:
    """An exponential moving average of a model's weights (parameters and buffers), updated after
    every optimiser step: timm's ``ModelEmaV3`` plus the step count a resumed run needs.

    The decay ramps up as ``1 - (1 + step) ** -0.75`` (timm's warm-up; its docstring recommends power
    3/4 for runs of under ~10k steps) and is capped at ``decay``, so the average does not remember the
    random initial weights for long: 0.993 after 800 steps, 0.9975 after 3,000.
    """

    def __init__(self, model: "torch.nn.Module", decay: float):
        from timm.utils import ModelEmaV3

        self.average = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=0.75)
        self.steps = 0

    @property
    def module(self) -> "torch.nn.Module":
        """The averaged model (in eval mode), to validate, test and export."""
        return self.average.module

    def update(self, model: "torch.nn.Module") -> None:
        self.steps += 1
        self.average.update(model, step=self.steps)

    def state_dict(self) -> dict:
        return {"steps": self.steps,
                "weights": cpu_state_dict(self.module)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.module.load_state_dict(state["weights"])
