"""Colour overlays of heatmaps, shared by scoring (``explain.overlays``) and the report's gallery."""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def _jet_lut() -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps["jet"](np.arange(256))[:, :3] * 255.0      # (256, 3) RGB


def jet_overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """An RGB uint8 image with an 8-bit heatmap of the same size in matplotlib's jet at ``alpha``."""
    blend = (1 - alpha) * rgb.astype(np.float32) + alpha * _jet_lut()[heat]
    return np.clip(blend, 0, 255).astype(np.uint8)
