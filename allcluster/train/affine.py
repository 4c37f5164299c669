"""Keras ImageDataGenerator-style random affine on uint8 CHW tensors (paper 000 Table 3): the
``classic`` augmentation and the minority copies of ``imbalance.oversample``."""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.transforms import v2

from allcluster.train.config import ClassicAugConfig

# Keras fill_mode -> torchvision padding mode for the pixels a transform brings in
PADDING_MODE = {"nearest": "edge", "reflect": "reflect", "constant": "constant"}


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
        params = self.sample(*img.shape[-2:])
        if self.shifts_whole_pixels(params, *img.shape[-2:]):
            return self.shift(img, *params["translate"])
        return self.resample(img, params)

    def shifts_whole_pixels(self, params: dict, height: int, width: int) -> bool:
        """Whether these parameters only move the image by whole pixels (no rotation, shear, zoom)."""
        dx, dy = params["translate"]
        reflect_fits = self.cfg.fill_mode != "reflect" or (abs(dx) < width and abs(dy) < height)
        return params["angle"] == 0 and params["shear"][0] == 0 and params["scale"] == 1 and reflect_fits

    def shift(self, img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
        """A whole-pixel shift as padding plus a crop: the pixels the bilinear affine gives for it,
        without its resampling grid (15% of an ALL-Net 224 px training epoch on 2 cores)."""
        height, width = img.shape[-2:]
        padded = v2.functional.pad(img, [abs(dx), abs(dy), abs(dx), abs(dy)], fill=0,
                                   padding_mode=PADDING_MODE[self.cfg.fill_mode])
        top, left = abs(dy) - dy, abs(dx) - dx
        return padded[..., top:top + height, left:left + width]

    def resample(self, img: torch.Tensor, params: dict) -> torch.Tensor:
        """The general affine (bilinear), new pixels filled by ``fill_mode``."""
        height, width = img.shape[-2:]
        affine = lambda x: v2.functional.affine(x, **params, interpolation=v2.InterpolationMode.BILINEAR, fill=0)
        if self.cfg.fill_mode == "constant":
            return affine(img)
        pad = self.reach(params, height, width)
        mode = PADDING_MODE[self.cfg.fill_mode]
        if mode == "reflect":
            pad = min(pad, min(height, width) - 1)
        padded = v2.functional.pad(img, [pad, pad, pad, pad], padding_mode=mode)
        return v2.functional.center_crop(affine(padded), [height, width])
