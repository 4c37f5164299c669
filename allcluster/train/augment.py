"""Training-split augmentation: a name -> factory table (:data:`AUGMENTATIONS`, from which
``augment.name``'s allowed values derive), per-image transforms on uint8 tensors, batch mixing on
the device.

Per image (DataLoader workers, uint8 CHW): ``classic`` (Keras ImageDataGenerator-style affine, paper
000 Table 3), ``randaug`` and ``augmix`` (torchvision's implementations). Per batch (on the device,
after normalisation): ``mixup`` and ``cutmix`` (torchvision's), which return soft targets. Free of a
top-level torch import, like ``train/optim.py``: configs load without torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from allcluster.train.config import AugmentConfig

ImageTransform = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class Augmentation:
    """One ``augment.name``: a per-image transform factory or a per-batch mixer factory (or neither)."""
    image: Callable[["AugmentConfig"], ImageTransform] | None = None
    batch: Callable[["AugmentConfig", int], Callable] | None = None
    paper: str = ""


def _classic(cfg):
    from allcluster.train.affine import ClassicAffine
    return ClassicAffine(cfg.classic)


def _randaug(cfg):
    from torchvision.transforms import v2
    return v2.RandAugment(num_ops=cfg.randaug_num_ops, magnitude=cfg.randaug_magnitude)


def _augmix(cfg):
    from torchvision.transforms import v2
    return v2.AugMix(severity=cfg.augmix_severity, mixture_width=cfg.augmix_width)


def _mixup(cfg, num_classes):
    from torchvision.transforms import v2
    return v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes)


def _cutmix(cfg, num_classes):
    from torchvision.transforms import v2
    return v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes)


AUGMENTATIONS: dict[str, Augmentation] = {
    "none": Augmentation(),
    "classic": Augmentation(image=_classic, paper="000"),
    "randaug": Augmentation(image=_randaug, paper="001"),
    "augmix": Augmentation(image=_augmix, paper="001"),
    "mixup": Augmentation(batch=_mixup, paper="001"),
    "cutmix": Augmentation(batch=_cutmix, paper="001"),
}
BATCH_MIXING = tuple(name for name, spec in AUGMENTATIONS.items() if spec.batch)   # need an even batch


def image_transform(cfg: "AugmentConfig") -> ImageTransform | None:
    """The per-image transform for ``cfg.name`` (None for the batch mixers and none)."""
    spec = AUGMENTATIONS[cfg.name]
    return spec.image(cfg) if spec.image else None


def minority_transform(cfg: "AugmentConfig") -> ImageTransform:
    """Transform for oversampled minority copies: paper 000's Table 3 affine, so copies differ."""
    return _classic(cfg)


class BatchMixer:
    """MixUp or CutMix on a device batch; always returns soft targets (smoothed when asked)."""

    def __init__(self, cfg: "AugmentConfig", num_classes: int, label_smoothing: float):
        self.num_classes = num_classes
        self.smoothing = label_smoothing
        spec = AUGMENTATIONS[cfg.name]
        self.mix = spec.batch(cfg, num_classes) if spec.batch else None

    def __call__(self, images: "torch.Tensor", labels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        from torch import nn

        if self.mix is not None:
            images, targets = self.mix(images, labels)
        else:
            targets = nn.functional.one_hot(labels, self.num_classes).to(images.dtype)
        if self.smoothing:
            targets = targets * (1 - self.smoothing) + self.smoothing / self.num_classes
        return images, targets


def soft_cross_entropy(logits: "torch.Tensor", targets: "torch.Tensor",
                       class_weights: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Cross-entropy with soft targets; with class weights, a weighted mean over the batch.

    Matches ``F.cross_entropy(weight=w, label_smoothing=...)``'s normalisation for hard labels: each
    sample's loss is weighted by its target's class weight and the sum divided by the total weight.
    """
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=1)
    per_sample = -(targets * log_probs).sum(dim=1)
    if class_weights is None:
        return per_sample.mean()
    sample_weight = targets @ class_weights
    return (per_sample * sample_weight).sum() / sample_weight.sum().clamp_min(1e-12)
