"""Pixel preprocessing shared by training and scoring: ROI crop, resize, normalisation."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from allcluster.data import decode as dec


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


def decode_preprocessed(data: bytes, name: str, preprocess: Preprocess,
                        max_pixels: int = dec.DEFAULT_MAX_PIXELS) -> tuple[dec.DecodedImage, np.ndarray]:
    """(the decoded image, its model input: uint8 (size, size, 3)) of image bytes: the one way the
    training cache and scoring turn a file into pixels, so both see the same. Any failure, of the
    decode or of the preprocessing, is a :class:`~allcluster.data.decode.DecodeError`.

    A JPEG is decoded at a reduced draft size (see :func:`~allcluster.data.decode.decode`) that
    keeps at least ``size`` pixels a side of what becomes the input. With the ROI crop, the cell's box
    is found on the draft at ``size`` (the same box whatever the file's resolution), and a file whose
    box there is smaller than ``size`` is decoded again at the scale the box needs, and cropped there."""
    image = dec.decode_any(data, name, max_pixels=max_pixels, draft=preprocess.size)
    if not preprocess.roi_crop:
        return image, _preprocessing(name, lambda: preprocess(image.array))
    box = _preprocessing(name, lambda: roi_box(image.array, preprocess.roi_margin))
    if box is None:             # no plausible cell: the whole image, as roi_crop keeps it
        return image, _preprocessing(name, lambda: resize(image.array, preprocess.size))
    draft = _roi_draft(image, box, preprocess.size)
    if draft:
        found_on = image.array.shape
        image = dec.decode_any(data, name, max_pixels=max_pixels, draft=draft)
        box = _scaled(box, found_on, image.array.shape)
    y0, y1, x0, x1 = box
    return image, _preprocessing(name, lambda: resize(np.ascontiguousarray(image.array[y0:y1, x0:x1]), preprocess.size))


def _preprocessing(name: str, step):
    """``step()``, any failure of it (an odd shape, cv2 in the ROI search) the file's ``decode_error``."""
    try:
        return step()
    except Exception as err:      # noqa: BLE001
        raise dec.unexpected("decode_error", name, err) from err


def _roi_draft(image: dec.DecodedImage, box: tuple[int, int, int, int], size: int) -> int | None:
    """The draft size to decode ``image`` (a draft decode) at again so that its ROI ``box`` keeps
    ``size`` pixels a side; None when this decode does already (full size, or a box large enough)."""
    height, width = image.array.shape[:2]
    if max(height, width) >= max(image.width, image.height):
        return None
    y0, y1, x0, x1 = box
    factor = size / min(y1 - y0, x1 - x0)
    # decode() asks for a square draft; PIL then takes the largest scale that keeps both sides at least
    # that long, so the shorter side (whichever way EXIF turns the image) decides it
    return math.ceil(min(height, width) * factor) if factor > 1 else None


def _scaled(box: tuple[int, int, int, int], found_on: tuple, now: tuple) -> tuple[int, int, int, int]:
    """``box`` (y0, y1, x0, x1) found on an array of shape ``found_on``, on one of shape ``now``."""
    sy, sx = now[0] / found_on[0], now[1] / found_on[1]
    y0, y1, x0, x1 = box
    return (math.floor(y0 * sy), min(now[0], math.ceil(y1 * sy)),
            math.floor(x0 * sx), min(now[1], math.ceil(x1 * sx)))


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
    box = roi_box(rgb, margin, min_area_fraction)
    if box is None:
        return rgb
    y0, y1, x0, x1 = box
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def roi_box(rgb: np.ndarray, margin: float = 0.1, min_area_fraction: float = 0.01) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) that :func:`roi_crop` keeps, or None when it keeps the whole image."""
    import cv2

    largest = largest_region(rgb, min_area_fraction)
    if largest is None:
        return None
    height, width = rgb.shape[:2]
    x, y, w, h = cv2.boundingRect(largest)
    pad_x, pad_y = int(round(w * margin)), int(round(h * margin))
    return max(0, y - pad_y), min(height, y + h + pad_y), max(0, x - pad_x), min(width, x + w + pad_x)
