"""The one normalisation module, on the device (kept apart from :mod:`allcluster.data.preprocess` so
that reading and decoding, which run in CPU tasks, never import torch)."""
from __future__ import annotations

import torch


class Normalize(torch.nn.Module):
    """uint8 NCHW (or NHWC-strided) batch -> float, scaled to 0..1 and standardised; runs on device.

    Keeping the batch uint8 until it reaches the device quarters host-to-device traffic.
    """

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std).view(1, 3, 1, 1) * 255.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) * self.inv_std
