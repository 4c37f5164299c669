"""Does a heatmap land on the cell? The share of a map's mass inside a region mask.

A localisation check in the sense of the "energy-based pointing game" (Wang et al. 2020, Score-CAM,
Sec. 5.2): sum of the map inside the region over the sum of the whole map. 1: all of the map's mass
lies on the region; the region's area share: a map spread evenly; 0: none on it. In scoring the region
is the stained cell (:func:`allcluster.data.preprocess.cell_mask`), so a low score flags a model
looking at the background or the slide's edges.
"""
from __future__ import annotations

import numpy as np


def mass_inside(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: sum(map * mask) / sum(map) for maps (N, H, W) >= 0 and boolean masks (N, H, W);
    NaN where a map is all zero (nothing to place)."""
    maps = np.asarray(maps, np.float64)
    if maps.shape != np.shape(masks):
        raise ValueError(f"maps {maps.shape} and masks {np.shape(masks)} differ in shape")
    total = maps.sum(axis=(1, 2))
    inside = (maps * np.asarray(masks, bool)).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)
