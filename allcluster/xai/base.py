"""The explainer base: one forward (and backward) pass gives the prediction and the heatmaps.

Everything stays on the model's device as tensors: no per-image trip through numpy. Heatmaps are
post-processed like pytorch-grad-cam (ReLU, per-image min-max, bilinear resize to the input size,
min-max again) so the Grad-CAM family matches it to 1e-3 (tests/test_xai.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from allcluster.models import resolve_module


@dataclass
class Explanation:
    """A batch of explanations at the model's input resolution."""
    logits: torch.Tensor        # (N, classes), from the same forward pass
    targets: torch.Tensor       # (N,) the class each map explains
    maps: torch.Tensor          # (N, H, W) float in [0, 1]
    raw_max: torch.Tensor       # (N,) maximum of the map before normalisation (0: nothing found)
    method: str
    layer: str

    def rows(self, keep: list[int]) -> "Explanation":
        """The explanations of the images at positions ``keep`` only."""
        at = torch.tensor(keep, device=self.maps.device)
        return Explanation(self.logits[at], self.targets[at], self.maps[at], self.raw_max[at], self.method, self.layer)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-image ``(x - min) / (1e-7 + max)`` as pytorch-grad-cam's ``scale_cam_image``."""
    flat = maps.flatten(1)
    shifted = flat - flat.min(dim=1, keepdim=True).values
    return (shifted / (1e-7 + shifted.max(dim=1, keepdim=True).values)).view_as(maps)


def to_input_size(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU -> min-max -> bilinear resize (half-pixel centres, as cv2.resize) -> min-max."""
    cam = minmax(raw.clamp_min(0))
    if cam.shape[-2:] != size:
        cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax(cam)


@dataclass(frozen=True)
class ExplainSettings:
    """The knobs of the methods that have any (one object for every method's constructor)."""
    lime_samples: int = 1000     # LIME: random superpixel on/off vectors per image
    ig_steps: int = 32           # Integrated Gradients: path points


class Explainer:
    """Base of every method, one constructor for all: ``Cls(model, layer, settings)``. Subclasses
    override exactly one method: ``channel_weights`` for the class-activation-map family, or
    ``attribute`` for methods that work on the input (those set ``uses_layer = False`` and ignore
    ``layer``)."""
    name = "base"
    expensive = False            # run on a budget (selected images only) when True
    needs_gradients = True       # CAM-family methods that only need a forward pass set False
    uses_layer = True            # False: works on the input; no layer looked up

    def __init__(self, model: torch.nn.Module, layer: str = "", settings: ExplainSettings = ExplainSettings()):
        self.model = model.eval()
        self.settings = settings
        self.layer = layer if self.uses_layer else "input"
        self._module = resolve_module(model, layer) if self.uses_layer else None
        self._activations: torch.Tensor | None = None

    # ---- hooks ---------------------------------------------------------------------------------
    def _keep(self, _module, _inputs, output):
        if self.needs_gradients and torch.is_grad_enabled():
            # A fresh leaf: the backward pass stops at the target layer instead of running down
            # through the backbone (and into weights that need no gradient).
            output = output.detach().requires_grad_(True)
        self._activations = output
        return output

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the target layer's activations, from one forward pass."""
        handle = self._module.register_forward_hook(self._keep)
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        return logits, self._activations

    # ---- the one public call -------------------------------------------------------------------
    def explain(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> Explanation:
        """Explain ``targets`` (default: the predicted classes) for normalised ``images`` (N, 3, H, W)."""
        raw, logits, targets = self.attribute(images, targets)
        return Explanation(logits.detach(), targets, to_input_size(raw.detach(), tuple(images.shape[-2:])),
                           raw.detach().clamp_min(0).flatten(1).max(dim=1).values, self.name, self.layer)

    def attribute(self, images: torch.Tensor, targets: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(raw maps (N, h, w), logits, targets). CAM family: weights x activations (Eq. 1-2 of
        Selvaraju et al. 2017, with the method's own channel weights)."""
        with torch.set_grad_enabled(self.needs_gradients):
            self.model.zero_grad(set_to_none=True)
            logits, activations = self.forward(images)
            targets = logits.argmax(1) if targets is None else targets.to(logits.device)
            if self.needs_gradients:
                logits.gather(1, targets[:, None]).sum().backward()
            weights = self.channel_weights(images, targets, activations.detach(),
                                           activations.grad if self.needs_gradients else None)
        raw = (weights[:, :, None, None] * activations.detach()).sum(1)
        return raw, logits, targets

    def channel_weights(self, images: torch.Tensor, targets: torch.Tensor, activations: torch.Tensor,
                        grads: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError
