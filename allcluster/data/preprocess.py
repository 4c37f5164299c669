"""Pixel preprocessing shared by training and scoring: ROI crop, resize, normalisation."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes model input (uint8 at ``size``; normalised later on device)."""
    size: int
    roi_crop: bool = False
    roi_margin: float = 0.1

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        if self.roi_crop:
            rgb = roi_crop(rgb, self.roi_margin)
        return resize(rgb, self.size)

    def key(self) -> str:
        """Identifies the pixel content this preprocessing yields (part of the cache key)."""
        return f"s{self.size}-roi{int(self.roi_crop)}-m{self.roi_margin:g}"


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` (the papers resize, they do not crop), antialiased."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.array(Image.fromarray(rgb).resize((size, size), Image.BILINEAR, reducing_gap=3.0))  # writable


def foreground_mask(rgb: np.ndarray) -> np.ndarray:
    """Binary mask of stained material: Otsu threshold on HSV saturation.

    Stained nuclei and cytoplasm are saturated; the bright slide background and black acquisition
    margins are not, so one threshold separates the cell from both.
    """
    import cv2

    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    saturation = cv2.GaussianBlur(saturation, (5, 5), 0)
    _, mask = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask


def largest_region(rgb: np.ndarray, min_area_fraction: float = 0.01):
    """The largest contour of :func:`foreground_mask` (the stained cell), or None when there is no
    plausible one (no contour, or one smaller than ``min_area_fraction`` of the image)."""
    import cv2

    contours, _ = cv2.findContours(foreground_mask(rgb), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    height, width = rgb.shape[:2]
    return largest if cv2.contourArea(largest) >= min_area_fraction * height * width else None


def cell_mask(rgb: np.ndarray, min_area_fraction: float = 0.01) -> np.ndarray:
    """Boolean (H, W) mask of the stained cell: the filled region the ROI crop boxes; the whole
    foreground when there is no plausible largest region."""
    import cv2

    largest = largest_region(rgb, min_area_fraction)
    if largest is None:
        return foreground_mask(rgb) > 0
    mask = np.zeros(rgb.shape[:2], np.uint8)
    cv2.drawContours(mask, [largest], -1, 255, thickness=cv2.FILLED)
    return mask > 0


def roi_crop(rgb: np.ndarray, margin: float = 0.1, min_area_fraction: float = 0.01) -> np.ndarray:
    """Crop to the bounding box of the largest foreground contour (paper 002, Sec. 3.2), plus margin.

    Returns the image unchanged when no plausible region is found, so the crop never loses a cell.
    """
    import cv2

    largest = largest_region(rgb, min_area_fraction)
    if largest is None:
        return rgb
    height, width = rgb.shape[:2]
    x, y, w, h = cv2.boundingRect(largest)
    pad_x, pad_y = int(round(w * margin)), int(round(h * margin))
    x0, y0 = max(0, x - pad_x), max(0, y - pad_y)
    x1, y1 = min(width, x + w + pad_x), min(height, y + h + pad_y)
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])
