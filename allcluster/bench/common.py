"""What every benchmark shares: the machine it ran on and fair timing of repeated calls."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

from allcluster.data.real import REPO
from allcluster.device import pick_device


def real_images(data: str | Path, limit: int | None = None) -> list[Path]:
    """The JPEGs under ``data`` (the real ALL images; sorted, at most ``limit``); none is an error
    naming the folder and how to point at it."""
    files = sorted(Path(data).rglob("*.jpg"))[:limit] if Path(data).is_dir() else []
    if not files:
        raise FileNotFoundError(f"{data}: real ALL images not found (set --data or $ALLCLUSTER_ALL_DATA)")
    return files


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a bench's child command: the checkout first on ``PYTHONPATH``,
    the caller's own entries kept (an offline install's site folder: ``jobs/gpu_acceptance.sh``)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def device_info() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_model(backbone: str):
    from allcluster.models import build_model, get_spec

    device = pick_device()
    model = build_model(backbone, 4).to(device).eval()
    return model, get_spec(backbone).cam_layer, device


def rate(fn, images: int, repeat: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):                                 # allocator and oneDNN/cuDNN kernel caches
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images * repeat / (time.perf_counter() - start)


def interleaved_rates(fns: dict[str, Callable[[], object]], images: int, repeat: int) -> dict[str, float]:
    """Median images/s of each function, timed in alternating rounds after a warm-up of each, so a
    slow phase of a shared or throttled machine does not land on one side only."""
    import statistics

    import torch

    for fn in list(fns.values()) * 2:
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: images / statistics.median(seconds) for name, seconds in times.items()}
