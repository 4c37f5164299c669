"""Input-space attribution methods (they override ``attribute``, not ``channel_weights``)."""
from __future__ import annotations

import torch

from allcluster.xai.base import Explainer


class IntegratedGradients(Explainer):
    """Integrated Gradients (Sundararajan et al. 2017, Eq. 3, Riemann midpoint sum): gradients of
    the class score along the straight path from a baseline (the normalised mean image, i.e. zeros)
    to the input, times (input - baseline); the map is the sum of |attribution| over colour channels.
    ``steps`` path points are pushed through the model in batches."""
    name = "ig"
    expensive = True
    uses_layer = False
    batch_size = 64

    @property
    def steps(self) -> int:
        return self.settings.ig_steps

    def attributions(self, image: torch.Tensor, target: int) -> torch.Tensor:
        """Signed per-pixel, per-channel attributions (3, H, W) of one image for class ``target``."""
        alphas = (torch.arange(self.steps, device=image.device, dtype=image.dtype) + 0.5) / self.steps
        total = torch.zeros_like(image)
        with torch.enable_grad():
            for start in range(0, self.steps, self.batch_size):
                a = alphas[start:start + self.batch_size, None, None, None]
                path = (a * image[None]).requires_grad_(True)
                score = self.model(path)[:, target].sum()
                total += torch.autograd.grad(score, path)[0].sum(0)
        return image * total / self.steps

    def attribute(self, images, targets):
        with torch.no_grad():
            logits = self.model(images)
        targets = logits.argmax(1) if targets is None else targets.to(logits.device)
        maps = [self.attributions(image, int(t)).abs().sum(0) for image, t in zip(images, targets)]
        return torch.stack(maps), logits, targets
