"""The one device choice: ``auto`` (CUDA when this process sees a GPU, else CPU), ``cpu`` or ``cuda[:N]``,
and the one precision choice that goes with it (training and scoring share both)."""
from __future__ import annotations

import contextlib
import functools
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


# glibc's malloc hands every block above its mmap threshold (32 MB at most) back to the kernel when
# it is freed, so each training step faults its activations in afresh; tcmalloc keeps freed pages
# for the next allocation of their size. ALL-Net 224 px, bf16, batch 32, one training step on a
# 2-core EPYC: 7,000 page faults and a quarter of the CPU time in the kernel with glibc, 150 faults
# and none with tcmalloc: 53 -> 82 img/s (jemalloc: no gain). Intel's and AMD's PyTorch CPU tuning
# guides recommend the same preload. It can only be chosen at a process's start (LD_PRELOAD): the
# Ray processes this package starts get it in their environment, the command restarts itself on it.
MALLOC_ENV = "ALLCLUSTER_MALLOC"
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")   # gperftools: Debian libtcmalloc-minimal4, RHEL gperftools-libs


@functools.lru_cache(maxsize=None)
def _find_library(name: str) -> str | None:
    import ctypes.util

    return ctypes.util.find_library(name)


def malloc_preload() -> dict[str, str]:
    """``{"LD_PRELOAD": library}`` for Ray workers: tcmalloc where this node has it, unless
    ``$ALLCLUSTER_MALLOC`` is ``system`` (glibc's malloc) or names the library to preload, and never
    over an ``LD_PRELOAD`` the user set. Empty where nothing is to be preloaded."""
    choice = os.environ.get(MALLOC_ENV, "auto").strip() or "auto"
    if os.environ.get("LD_PRELOAD") or choice == "system":
        return {}
    if choice != "auto":
        if not os.path.isfile(choice):
            raise ConfigError(f"${MALLOC_ENV}: {choice!r}: expected auto, system or the path of a malloc "
                              "library to preload (e.g. /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)")
        return {"LD_PRELOAD": choice}
    found = next(filter(None, map(_find_library, TCMALLOC_LIBRARIES)), None)
    return {"LD_PRELOAD": found} if found else {}


_PRELOADED_MARK = "ALLCLUSTER_MALLOC_PRELOADED"


def restart_on_preferred_malloc() -> None:
    """Run this command on :func:`malloc_preload`'s library too: re-execute it in place (same PID, so
    Slurm's signals still reach it) with ``LD_PRELOAD``, which acts only at a process's start. The
    restarted process drops the preload from its environment, so what it starts later (Chromium,
    sbatch) keeps the system's malloc; Ray's processes get theirs from :func:`allocator_env`. Call it
    first thing (nothing heavy imported yet: the re-execution costs an interpreter start)."""
    import sys

    if os.environ.pop(_PRELOADED_MARK, None):
        os.environ.pop("LD_PRELOAD", None)
        return
    try:
        preload = malloc_preload()
    except ConfigError:
        return                      # reported by main() as a user error (use_fast_allocator raises it)
    if preload:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **preload, _PRELOADED_MARK: "1"})


def allocator_env() -> dict[str, str]:
    """The allocator settings for Ray workers' environment: :func:`malloc_preload` where it preloads
    tcmalloc, else :data:`TORCH_ALLOCATOR_ENV`; the user's own values of those keys always."""
    preload = malloc_preload()
    return {**_torch_allocator_settings(preload), **preload}


def use_fast_allocator() -> None:
    """Set :data:`TORCH_ALLOCATOR_ENV` in this process (before torch first allocates) unless set, or
    where its workers run on tcmalloc (this command restarted on it: :func:`restart_on_preferred_malloc`)."""
    os.environ.update(_torch_allocator_settings(malloc_preload()))


def _torch_allocator_settings(preload: dict[str, str]) -> dict[str, str]:
    # Huge pages only without tcmalloc: tcmalloc keeps its pages, so huge pages add nothing in steady
    # state (ALL-Net training 78-86 img/s either way, inference the same) and cost their first touch,
    # about 1.7 s on a model's first batch (2-core EPYC, 2026-12-02).
    defaults = {} if preload else TORCH_ALLOCATOR_ENV
    return {**defaults, **{key: os.environ[key] for key in TORCH_ALLOCATOR_ENV if key in os.environ}}


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


def device_is_broken(err: BaseException) -> bool:
    """Whether ``err`` is one of CUDA's sticky errors (an illegal memory access, a device-side assert,
    ``torch.AcceleratorError``): the process's CUDA context is unusable from then on, so every later
    call fails too and only a fresh process helps. An out-of-memory error is not one (the next batch
    may fit)."""
    import torch

    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(err, accelerator_error) or (isinstance(err, RuntimeError) and "CUDA error" in str(err))


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


def cpu_state_dict(module: "torch.nn.Module") -> "dict[str, torch.Tensor]":
    """A copy of ``module``'s weights on the CPU, detached and in the default (NCHW) layout: what
    checkpoints, the best-epoch snapshot and safetensors files hold, whatever device and memory
    format the module trains in (safetensors refuses non-contiguous tensors)."""
    import torch

    return {name: tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for name, tensor in module.state_dict().items()}
