"""A cheap, batched faithfulness check per heatmap (deletion / preservation, after Petsiuk et al.
2018's RISE metrics, at a single fraction): how much of the class probability goes when the
heatmap's top pixels are removed, and how much stays when only they are kept. Removed pixels take
the baseline 0 of the normalised input (the dataset mean colour).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def faithfulness(model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                 fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """Per image: ``confidence`` (class probability), ``drop`` = (p - p_without_top) / p (high: the
    map found what the model uses) and ``kept`` = p_only_top / p (high: the top region suffices)."""
    n, h, w = maps.shape
    k = max(1, int(round(fraction * h * w)))
    threshold = maps.flatten(1).topk(k, dim=1).values[:, -1]
    top = (maps >= threshold[:, None, None])[:, None]                 # (N, 1, H, W)
    batch = torch.cat([images, torch.where(top, 0.0, images), torch.where(top, images, 0.0)])
    probs = torch.softmax(model(batch).float(), dim=1)
    p = probs.gather(1, targets.repeat(3)[:, None])[:, 0].view(3, n)
    safe = p[0].clamp_min(1e-8)
    return {"confidence": p[0], "drop": (p[0] - p[1]) / safe, "kept": p[2] / safe}
