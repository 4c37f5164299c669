"""Keras ImageDataGenerator-style random affine on uint8 CHW tensors (paper 000 Table 3): the
``classic`` augmentation and the minority copies of ``imbalance.oversample``."""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.transforms import v2

from allcluster.train.config import ClassicAugConfig


class ClassicAffine(nn.Module):
    """Random flips, rotation, shifts, shear and zoom, filling new pixels like Keras ``fill_mode``.

    torchvision's affine only fills with a constant, so "nearest"/"reflect" pad the image first
    (edge/reflect padding) by exactly as much as the sampled transform can reach, transform around
    the same centre, then crop the centre back.
    """

    def __init__(self, cfg: ClassicAugConfig):
        super().__init__()
        self.cfg = cfg

    def sample(self, height: int, width: int) -> dict:
        c = self.cfg
        uniform = lambda bound: float(torch.empty(1).uniform_(-bound, bound)) if bound else 0.0
        return {"angle": uniform(c.rotation), "translate": [round(uniform(c.width_shift) * width),
                                                              round(uniform(c.height_shift) * height)],
                "scale": 1.0 + uniform(c.zoom), "shear": [uniform(c.shear), 0.0]}

    @staticmethod
    def reach(params: dict, height: int, width: int) -> int:
        """Pixels beyond the border that the inverse map can sample for these parameters."""
        angle, shear = math.radians(abs(params["angle"])), math.radians(abs(params["shear"][0]))
        half = max(height, width) / 2
        spread = (math.cos(angle) + math.sin(angle) + math.tan(shear)) / params["scale"]
        shift = max(abs(t) for t in params["translate"]) / params["scale"]
        return int(math.ceil(max(0.0, half * spread - half) + shift)) + 2

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.hflip and torch.rand(1) < 0.5:
            img = img.flip(-1)
        if c.vflip and torch.rand(1) < 0.5:
            img = img.flip(-2)
        height, width = img.shape[-2:]
        params = self.sample(height, width)
        affine = lambda x: v2.functional.affine(x, **params, interpolation=v2.InterpolationMode.BILINEAR, fill=0)
        if c.fill_mode == "constant":
            return affine(img)
        pad = self.reach(params, height, width)
        mode = "edge" if c.fill_mode == "nearest" else "reflect"
        if mode == "reflect":
            pad = min(pad, min(height, width) - 1)
        padded = v2.functional.pad(img, [pad, pad, pad, pad], padding_mode=mode)
        return v2.functional.center_crop(affine(padded), [height, width])
