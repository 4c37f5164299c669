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
        scores = torch.empty(activations.shape[:2], device=images.device)
        with torch.no_grad():
            for n in range(images.shape[0]):
                for start in range(0, activations.shape[1], self.batch_size):
                    # one image's slice of channels at a time: the whole batch's masks at input
                    # resolution would be N x C x H x W (~10-20 GB for 16 images at 224 px)
                    masks = self.masks(activations[n:n + 1, start:start + self.batch_size], images.shape[-2:])
                    chunk = masks[0, :, None] * images[n][None]
                    scores[n, start:start + len(chunk)] = self.model(chunk)[:, targets[n]].float()
            return torch.softmax(scores, dim=-1)

    @staticmethod
    def masks(activations: torch.Tensor, size) -> torch.Tensor:
        """The channels of ``activations`` (N, C, h, w) upsampled to ``size``, each min-max scaled."""
        up = torch.nn.functional.interpolate(activations, size=size, mode="bilinear", align_corners=True)
        flat = up.flatten(2)
        lo, hi = flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]
        return (up - lo) / (hi - lo + 1e-8)


# CAM (Zhou et al. 2016) weighs the last feature maps by the dense layer right after pooling: a head
# with hidden layers has no such layer. Also checked from the model card before a scoring job starts.
CAM_NEEDS_A_PLAIN_HEAD = ("CAM needs a head with no hidden layer (GAP -> dense); this model's head has hidden "
                          "layers: use gradcam, or train with model.head.hidden: []")


class CAM(Explainer):
    """Class activation mapping (Zhou et al. 2016, Eq. 2): weights are the final dense layer's row
    for the class. Defined only for a GAP -> dense head (``model.head.hidden: []``)."""
    name = "cam"
    needs_gradients = False

    def check_head(self) -> None:
        """Raise ``ValueError`` unless the model's head is GAP -> dense (no hidden layer)."""
        if any(isinstance(m, torch.nn.Linear) for m in self.model.head.mlp):
            raise ValueError(CAM_NEEDS_A_PLAIN_HEAD)

    def channel_weights(self, images, targets, activations, grads):
        self.check_head()
        return self.model.head.fc.weight[targets].detach()
