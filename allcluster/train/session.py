"""Where the training loop runs: a Ray Train worker (DDP) or a plain local process.

The loop in :mod:`allcluster.train.loop` only talks to this interface, so it stays free of Ray.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from allcluster.locks import pid_alive
from allcluster.train.run_folder import checkpoint_folders, newest_checkpoint


# Every report of a run carries the epochs it has trained so far, counted across restarts: a run
# resumed after epoch N reports N + 1 first. Tune's ASHA counts its milestones in it; Tune's own
# training_iteration restarts at 1 when a requeued sweep resumes a trial from its checkpoint, which
# would put a 10-epoch trial on the rungs of 1-epoch ones (and stop fresh trials against it).
EPOCHS_DONE = "epochs_done"


@contextlib.contextmanager
def scratch_dir(kind: str) -> Iterator[Path]:
    """A fresh folder in this node's temp space (``$TMPDIR``), removed when the block ends.

    A process killed inside the block (the OOM killer, Slurm's SIGKILL after KillWait, a lost Ray
    worker) cannot remove its folder, and a node's ``/tmp`` is not always cleaned between jobs: a
    checkpoint staged there is the whole training state, hundreds of MB for a large backbone. So the
    name carries the host and the process id, and every new one of the same kind first removes this
    user's folders on this host whose process is gone and that are over an hour old (the host part
    keeps a ``$TMPDIR`` on a shared file system safe: another node's folders are never touched; the
    age, a process in another PID namespace on the same host, which looks gone from here)."""
    host, prefix = socket.gethostname(), f"allcluster-{kind}-"
    _remove_orphans(Path(tempfile.gettempdir()), prefix, host)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{host}-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


ORPHAN_AGE_S = 3600


def _remove_orphans(folder: Path, prefix: str, host: str) -> None:
    owner = re.compile(re.escape(f"{prefix}{host}-") + r"(\d+)-[^-]+$")
    for found in folder.glob(f"{prefix}*"):
        match = owner.match(found.name)
        with contextlib.suppress(OSError):
            info = found.lstat()
            if (match and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
                    and time.time() - info.st_mtime > ORPHAN_AGE_S and not pid_alive(int(match.group(1)))):
                shutil.rmtree(found, ignore_errors=True)


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The folder of the run's latest checkpoint while the block runs (None: no checkpoint yet)."""
        ...
    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None: ...
    @property
    def resumed_unlisted(self) -> bool: ...
    def wrap(self, model: nn.Module) -> nn.Module: ...
    def all_gather(self, obj: Any) -> list: ...


class LocalSession:
    """Single process, no Ray: checkpoints in a local folder (benchmarks and debugging)."""

    def __init__(self, checkpoint_root: str | Path, device: str = "cpu"):
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.root = Path(checkpoint_root)
        self.reports: list[dict] = []
        self.resumed_unlisted = False       # every checkpoint here is listed (see RaySession)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield newest_checkpoint(self.root)

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            import shutil
            # numbered after the ones already there: a resumed run must not collide with its own past
            number = len(checkpoint_folders(self.root)) + 1
            target = self.root / f"checkpoint_{number:06d}"
            shutil.copytree(checkpoint_dir, target)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def all_gather(self, obj: Any) -> list:
        return [obj]


class RaySession:
    """Inside a Ray Train worker: DDP wrapping, gathers and checkpoints through Ray Train. ``run_folder``:
    the Ray Train run's folder, for the checkpoints Ray Train does not know (see :meth:`latest_checkpoint`)."""

    def __init__(self, run_folder: Path | None = None):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._train = ray.train
        self.run_folder = run_folder
        self._unlisted: list[Path] = []

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        """Ray Train's latest checkpoint, or a newer one in the run folder that Ray Train does not list
        (its snapshot was unreadable or never written, or a stop came between its copy of the
        checkpoint and its record of it: :func:`allcluster.train.ray_train.repair_run_folder` has
        removed those that do not load): the newest of those. Ray Train never removes folders it does
        not list (its ``num_to_keep`` counts its own), so :meth:`report` removes them once it holds a
        newer checkpoint."""
        checkpoint = self._train.get_checkpoint()
        local = checkpoint is None or (checkpoint.filesystem.type_name == "local" and Path(checkpoint.path).is_dir())
        if local and self.run_folder is not None:
            known = Path(checkpoint.path).name if checkpoint is not None else ""
            self._unlisted = [f for f in checkpoint_folders(self.run_folder) if f.name > known]
            if self._unlisted:
                yield self._unlisted[-1]
                return
        if local:           # read in place: errors name the real file, no temp copy
            yield Path(checkpoint.path) if checkpoint is not None else None
            return
        with scratch_dir("resume") as local:
            yield Path(checkpoint.to_directory(str(local)))

    @property
    def resumed_unlisted(self) -> bool:
        """Whether :meth:`latest_checkpoint` gave a folder Ray Train does not list (it is removed, and
        Ray's list made whole, at the next report with a checkpoint)."""
        return bool(self._unlisted)

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None and self._unlisted and self.rank == 0:
            self._remove_unlisted()

    def _remove_unlisted(self) -> None:
        """Remove the checkpoint folders Ray Train does not list: ``report`` has just stored a newer one
        in the run folder (its default SYNC upload has copied it there before it returns), which a rerun
        resumes from."""
        from allcluster.console import say

        for folder in self._unlisted:
            shutil.rmtree(folder, ignore_errors=True)
        say(f"[train] removed {len(self._unlisted)} checkpoint folder(s) Ray Train does not list, now that "
            f"it holds a newer one: {', '.join(f.name for f in self._unlisted)}")
        self._unlisted = []

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
