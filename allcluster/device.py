"""The one device choice: ``auto`` (CUDA when this process sees a GPU, else CPU), ``cpu`` or ``cuda[:N]``,
and the one precision choice that goes with it (training and scoring share both)."""
from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from allcluster.config import ConfigError

if TYPE_CHECKING:
    import torch


# PyTorch's CPU allocator backs every tensor of 2 MB or more with transparent huge pages when this
# is set (c10/core/alloc_cpu.cpp). A CNN's activation maps are hundreds of MB per batch and are
# freed and allocated again every batch; with 4 KB pages the kernel's page faulting was a third of
# scoring's CPU time (ALL-Net 224 px, batch 32, 2-core CPU: 33 -> 21.5 ms per image). A value the
# user set wins. Only the allocation's alignment and an madvise change: results are identical.
TORCH_ALLOCATOR_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def allocator_env() -> dict[str, str]:
    """:data:`TORCH_ALLOCATOR_ENV` with the user's own values (for Ray workers' environment)."""
    return {key: os.environ.get(key, value) for key, value in TORCH_ALLOCATOR_ENV.items()}


def use_fast_allocator() -> None:
    """Set :data:`TORCH_ALLOCATOR_ENV` in this process (before torch first allocates) unless set."""
    for key, value in TORCH_ALLOCATOR_ENV.items():
        os.environ.setdefault(key, value)


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


def use_bf16(precision: str, device: "torch.device") -> bool:
    """``bf16`` autocast for ``precision`` on ``device``: ``auto`` means bf16 on CUDA (tensor cores;
    fp32 weights kept), fp32 on CPU; ``bf16`` / ``fp32`` force it either way (bf16 on CPU runs the GPU
    path's code, slowly: what the tests do)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision: {precision!r}: expected auto, fp32 or bf16")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: "torch.device", bf16: bool):
    """The autocast context for a model call (a no-op for fp32)."""
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def channels_last(x: "torch.nn.Module | torch.Tensor"):
    """A model or a 4-D batch in NHWC layout: cuDNN's tensor-core kernels and oneDNN's CPU kernels
    want it (ALL-Net's forward 40% faster on a 2-core CPU). Scoring, training on GPUs and the
    benches' ceilings all go through here."""
    import torch

    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)
