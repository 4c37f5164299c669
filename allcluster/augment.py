"""Training-split augmentation: per-image transforms on uint8 tensors, batch mixing on the device.

Per image (DataLoader workers, uint8 CHW): ``classic`` (Keras ImageDataGenerator-style affine, paper
000 Table 3), ``randaug`` and ``augmix`` (torchvision's implementations). Per batch (on the device,
after normalisation): ``mixup`` and ``cutmix`` (torchvision's), which return soft targets.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torchvision.transforms import v2

from allcluster.train.config import AugmentConfig, ClassicAugConfig

ImageTransform = Callable[[torch.Tensor], torch.Tensor]


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


def image_transform(cfg: AugmentConfig) -> ImageTransform | None:
    """The per-image transform for ``cfg.name`` (None for none/mixup/cutmix)."""
    if cfg.name == "classic":
        return ClassicAffine(cfg.classic)
    if cfg.name == "randaug":
        return v2.RandAugment(num_ops=cfg.randaug_num_ops, magnitude=cfg.randaug_magnitude)
    if cfg.name == "augmix":
        return v2.AugMix(severity=cfg.augmix_severity, mixture_width=cfg.augmix_width)
    return None


def minority_transform(cfg: AugmentConfig) -> ImageTransform:
    """Transform for oversampled minority copies: paper 000's Table 3 affine, so copies differ."""
    return ClassicAffine(cfg.classic)


class BatchMixer:
    """MixUp or CutMix on a device batch; always returns soft targets (smoothed when asked)."""

    def __init__(self, cfg: AugmentConfig, num_classes: int, label_smoothing: float):
        self.num_classes = num_classes
        self.smoothing = label_smoothing
        if cfg.name == "mixup":
            self.mix = v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes)
        elif cfg.name == "cutmix":
            self.mix = v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes)
        else:
            self.mix = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        else:
            targets = nn.functional.one_hot(labels, self.num_classes).to(images.dtype)
        if self.smoothing:
            targets = targets * (1 - self.smoothing) + self.smoothing / self.num_classes
        return images, targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with soft targets; with class weights, a weighted mean over the batch.

    Matches ``F.cross_entropy(weight=w, label_smoothing=...)``'s normalisation for hard labels: each
    sample's loss is weighted by its target's class weight and the sum divided by the total weight.
    """
    log_probs = torch.log_softmax(logits.float(), dim=1)
    per_sample = -(targets * log_probs).sum(dim=1)
    if class_weights is None:
        return per_sample.mean()
    sample_weight = targets @ class_weights
    return (per_sample * sample_weight).sum() / sample_weight.sum().clamp_min(1e-12)
