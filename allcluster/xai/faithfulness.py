"""A cheap, batched faithfulness check per heatmap (deletion / preservation, after Petsiuk et al.
2018's RISE metrics, at a single fraction): how much of the class probability goes when the
heatmap's top pixels are removed, and how much stays when only they are kept. Removed pixels take
the baseline 0 of the normalised input (the dataset mean colour).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def faithfulness(model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                 fraction: float = 0.2, probs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per image: ``confidence`` (class probability), ``drop`` = (p - p_without_top) / p (high: the
    map found what the model uses) and ``kept`` = p_only_top / p (high: the top region suffices).

    ``probs`` (N, classes): the images' softmax outputs when already known (scoring has them from
    the prediction), which saves a third of the forward passes.
    """
    n, h, w = maps.shape
    k = max(1, int(round(fraction * h * w)))
    threshold = maps.flatten(1).topk(k, dim=1).values[:, -1]
    top = (maps >= threshold[:, None, None])[:, None]                 # (N, 1, H, W)
    parts = [torch.where(top, 0.0, images), torch.where(top, images, 0.0)]
    if probs is None:
        parts.insert(0, images)
    batch = torch.cat(parts)
    if images.is_contiguous(memory_format=torch.channels_last):      # keep the caller's (faster) layout
        batch = batch.contiguous(memory_format=torch.channels_last)
    out = torch.softmax(model(batch).float(), dim=1)
    if probs is not None:
        out = torch.cat([probs.float(), out])
    p = out.gather(1, targets.repeat(3)[:, None])[:, 0].view(3, n)
    safe = p[0].clamp_min(1e-8)
    return {"confidence": p[0], "drop": (p[0] - p[1]) / safe, "kept": p[2] / safe}
