"""Where the training loop runs: a Ray Train worker (DDP) or a plain local process.

The loop in :mod:`allcluster.train.loop` only talks to this interface, so it stays free of Ray.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


# Every report of a run carries the epochs it has trained so far, counted across restarts: a run
# resumed after epoch N reports N + 1 first. Tune's ASHA counts its milestones in it; Tune's own
# training_iteration restarts at 1 when a requeued sweep resumes a trial from its checkpoint, which
# would put a 10-epoch trial on the rungs of 1-epoch ones (and stop fresh trials against it).
EPOCHS_DONE = "epochs_done"


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def latest_checkpoint(self) -> Path | None: ...
    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None: ...
    def wrap(self, model: nn.Module) -> nn.Module: ...
    def all_gather(self, obj: Any) -> list: ...


class LocalSession:
    """Single process, no Ray: checkpoints in a local folder (benchmarks and debugging)."""

    def __init__(self, checkpoint_root: str | Path, device: str = "cpu"):
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.root = Path(checkpoint_root)
        self.reports: list[dict] = []

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.root.glob("checkpoint_*"))
        return found[-1] if found else None

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            import shutil
            # numbered after the ones already there: a resumed run must not collide with its own past
            number = len(list(self.root.glob("checkpoint_*"))) + 1
            target = self.root / f"checkpoint_{number:06d}"
            shutil.copytree(checkpoint_dir, target)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def all_gather(self, obj: Any) -> list:
        return [obj]


class RaySession:
    """Inside a Ray Train worker: DDP wrapping, gathers and checkpoints through Ray Train."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._train = ray.train

    def latest_checkpoint(self) -> Path | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        if checkpoint.filesystem.type_name == "local" and Path(checkpoint.path).is_dir():
            return Path(checkpoint.path)      # read in place: errors name the real file, no temp copy
        local = Path(tempfile.mkdtemp(prefix="allcluster-resume-"))
        return Path(checkpoint.to_directory(str(local)))

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)

    def wrap(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        if self.world_size == 1:
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp")

    def all_gather(self, obj: Any) -> list:
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return [obj]
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
