"""The one device choice: ``auto`` (CUDA when this process sees a GPU, else CPU), ``cpu`` or ``cuda[:N]``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from allcluster.config import ConfigError

if TYPE_CHECKING:
    import torch


def pick_device(choice: "str | torch.device" = "auto", what: str = "device") -> "torch.device":
    """The torch device for ``choice``; ``what`` names the setting in errors (e.g. ``workers.device``).

    Asking for CUDA where none is visible is a :class:`ConfigError` here, not a crash later inside a
    model call (on a Slurm node: was ``--gres=gpu`` requested?).
    """
    import torch

    if str(choice) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"{what}: {choice!r}: expected auto, cpu or cuda[:N]") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}: {choice!r}: CUDA is not available here (no GPU visible to this process; "
                          "on Slurm, request one with --gres=gpu:N), use auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what}: {choice!r}: expected auto, cpu or cuda[:N]")
    return device
