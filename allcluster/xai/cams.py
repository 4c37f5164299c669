"""The class-activation-map family: each method only says how to weight the layer's channels."""
from __future__ import annotations

import torch

from allcluster.xai.base import Explainer


class GradCAM(Explainer):
    """Grad-CAM (Selvaraju et al. 2017, Eq. 1): weight = spatial mean of the class-score gradient."""
    name = "gradcam"

    def channel_weights(self, images, targets, activations, grads):
        return grads.mean(dim=(2, 3))


class GradCAMPlusPlus(Explainer):
    """Grad-CAM++ (Chattopadhay et al. 2018, Eq. 19) with the exp-score closed form for alpha:
    alpha = g^2 / (2 g^2 + sum(A) g^3), weight = sum(alpha * relu(g))."""
    name = "gradcam++"

    def channel_weights(self, images, targets, activations, grads):
        g2 = grads.pow(2)
        g3 = g2 * grads
        total = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + total * g3 + 1e-6)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        return (alpha * grads.clamp_min(0)).sum(dim=(2, 3))


class ScoreCAM(Explainer):
    """Score-CAM (Wang et al. 2020, Eq. 6-8): each channel, upsampled and min-max scaled, masks the
    input; the softmax over channels of the masked inputs' target scores is the weight. Forward-only
    and costly (one forward per channel), so it runs in batches of ``batch_size`` masked images."""
    name = "scorecam"
    expensive = True
    needs_gradients = False
    batch_size = 64

    def channel_weights(self, images, targets, activations, grads):
        size = images.shape[-2:]
        with torch.no_grad():
            up = torch.nn.functional.interpolate(activations, size=size, mode="bilinear", align_corners=True)
            flat = up.flatten(2)
            lo, hi = flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]
            masks = (up - lo) / (hi - lo + 1e-8)                                   # (N, C, H, W)
            scores = torch.empty(masks.shape[:2], device=images.device)
            for n in range(images.shape[0]):
                for start in range(0, masks.shape[1], self.batch_size):
                    chunk = masks[n, start:start + self.batch_size, None] * images[n][None]
                    scores[n, start:start + len(chunk)] = self.model(chunk)[:, targets[n]].float()
            return torch.softmax(scores, dim=-1)


class CAM(Explainer):
    """Class activation mapping (Zhou et al. 2016, Eq. 2): weights are the final dense layer's row
    for the class. Defined only for a GAP -> dense head (``model.head.hidden: []``)."""
    name = "cam"
    needs_gradients = False

    def channel_weights(self, images, targets, activations, grads):
        head = self.model.head
        if any(isinstance(m, torch.nn.Linear) for m in head.mlp):
            raise ValueError("CAM needs a head with no hidden layer (GAP -> dense); this model's head has "
                             "hidden layers: use gradcam, or train with model.head.hidden: []")
        return head.fc.weight[targets].detach()
