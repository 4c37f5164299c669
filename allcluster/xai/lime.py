"""LIME for images (Ribeiro et al. 2016), following the ``lime`` package's algorithm, batched on the
device: quickshift superpixels (lime's defaults), ``num_samples`` random on/off superpixel vectors
(the first all on), hidden superpixels filled with their mean colour, the model's class probability
for every perturbed image (built and scored in batches on the model's device), cosine distances to the
all-on vector, kernel weights sqrt(exp(-d^2 / width^2)), and a weighted ridge surrogate
(alpha 1, with intercept) whose coefficients are the superpixels' weights. Seeded.
"""
from __future__ import annotations

import numpy as np
import torch

from allcluster.xai.base import Explainer


def quickshift_segments(rgb01: np.ndarray, seed: int) -> np.ndarray:
    """lime's default segmentation: quickshift(kernel_size=4, max_dist=200, ratio=0.2)."""
    from skimage.segmentation import quickshift

    return quickshift(rgb01, kernel_size=4, max_dist=200, ratio=0.2, rng=seed)


def weighted_ridge(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Coefficients of ridge regression with intercept and sample weights (sklearn's ``Ridge``)."""
    # minimises sum_i w_i (y_i - x_i b - c)^2 + alpha |b|^2: centre on the weighted means, then solve
    x_mean, y_mean = (w[:, None] * x).sum(0) / w.sum(), (w * y).sum() / w.sum()
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ (w[:, None] * xc) + alpha * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(gram, xc.T @ (w * yc))


class Lime(Explainer):
    """LIME superpixel weights as a heatmap (positive part); ``superpixels`` keeps, per image, the
    segments and weights for the paper-002 views (see :func:`lime_views`)."""
    name = "lime"
    expensive = True
    uses_layer = False
    batch_size = 100
    kernel_width = 0.25
    seed = 0
    superpixels: list[tuple[np.ndarray, np.ndarray]] = []    # per image of the last call (see lime_views)

    @property
    def num_samples(self) -> int:
        return self.settings.lime_samples

    def segment_weights(self, image: torch.Tensor, target: int) -> tuple[np.ndarray, torch.Tensor]:
        """(segments (H, W), weight per segment) for one normalised image."""
        mean, std = (torch.tensor(values).view(3, 1, 1) for values in self.model.normalization)
        device = image.device
        rgb01 = (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).double().numpy()
        segments = quickshift_segments(rgb01, self.seed)
        seg = torch.as_tensor(segments, device=device, dtype=torch.long)
        n = int(seg.max()) + 1
        counts = torch.bincount(seg.flatten(), minlength=n).clamp_min(1)
        means = torch.stack([torch.bincount(seg.flatten(), image[c].flatten(), minlength=n) for c in range(3)]) / counts
        fudged = means[:, seg]                                                    # (3, H, W)
        generator = torch.Generator().manual_seed(self.seed)
        data = torch.randint(0, 2, (self.num_samples, n), generator=generator).to(device)
        data[0] = 1
        probs = []
        with torch.no_grad():
            for start in range(0, self.num_samples, self.batch_size):
                keep = data[start:start + self.batch_size][:, seg].bool()[:, None]  # (B, 1, H, W)
                batch = torch.where(keep, image[None], fudged[None])
                probs.append(torch.softmax(self.model(batch).float(), dim=1)[:, target])
        labels = torch.cat(probs).double()
        x = data.double()
        cosine = x.sum(1) / (x.norm(dim=1).clamp_min(1e-12) * n ** 0.5)
        distances = 1 - cosine
        weights = torch.sqrt(torch.exp(-(distances ** 2) / self.kernel_width ** 2))
        return segments, weighted_ridge(x, labels, weights)

    def attribute(self, images, targets):
        with torch.no_grad():
            logits = self.model(images)
        targets = logits.argmax(1) if targets is None else targets.to(logits.device)
        maps, self.superpixels = [], []
        for image, target in zip(images, targets):
            segments, weights = self.segment_weights(image, int(target))
            self.superpixels.append((segments, weights.cpu().numpy()))
            maps.append(weights.float()[torch.as_tensor(segments, device=image.device)])
        return torch.stack(maps), logits, targets


def lime_views(rgb_u8: np.ndarray, segments: np.ndarray, weights: np.ndarray, top: int = 5) -> dict[str, np.ndarray]:
    """Paper 002's three LIME views of one image: ``positive_only`` (the ``top`` supporting
    superpixels outlined on the image), ``hide_rest`` (only those superpixels shown) and
    ``pros_cons`` (supporting superpixels tinted green, opposing ones red)."""
    order = np.argsort(-weights)
    support = [s for s in order[:top] if weights[s] > 0]
    oppose = [s for s in np.argsort(weights)[:top] if weights[s] < 0]
    keep = np.isin(segments, support)
    from skimage.segmentation import mark_boundaries

    positive = (mark_boundaries(rgb_u8, keep.astype(int), color=(1, 1, 0)) * 255).astype(np.uint8)
    hide_rest = np.where(keep[..., None], rgb_u8, 0).astype(np.uint8)
    tinted = rgb_u8.astype(np.float32)
    tinted[keep] = 0.5 * tinted[keep] + 0.5 * np.array([0, 255, 0])
    against = np.isin(segments, oppose)
    tinted[against] = 0.5 * tinted[against] + 0.5 * np.array([255, 0, 0])
    return {"positive_only": positive, "hide_rest": hide_rest, "pros_cons": tinted.astype(np.uint8)}
