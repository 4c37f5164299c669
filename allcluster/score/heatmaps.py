"""Heatmap files of a scoring output: named by content (sha256) and method, written atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from allcluster.atomic import atomic_write_bytes
from allcluster.score.rows import method_columns
from allcluster.xai.overlay import jet_overlay


def heatmap_relpath(sha: str, method: str, suffix: str = ".png") -> str:
    """Deterministic name of one image's map: ``heatmaps/ab/abcdef....gradcam.png``."""
    return f"heatmaps/{sha[:2]}/{sha}.{method_columns(method)['heatmap'][len('heatmap_'):]}{suffix}"


def write_heatmaps(out_dir: Path, shas: list[str], method: str, maps_u8: np.ndarray,
                   pixels: np.ndarray | None = None) -> list[str]:
    """8-bit maps at the model's resolution (PNG), plus colour overlays (JPEG) when ``pixels`` given."""
    import cv2

    names = []
    for i, sha in enumerate(shas):
        rel = heatmap_relpath(sha, method)
        atomic_write_bytes(out_dir / rel, cv2.imencode(".png", maps_u8[i])[1].tobytes())
        if pixels is not None:
            blend = jet_overlay(pixels[i], maps_u8[i])[..., ::-1]             # RGB -> cv2's BGR
            atomic_write_bytes(out_dir / rel.replace("heatmaps/", "overlays/", 1).replace(".png", ".jpg"),
                          cv2.imencode(".jpg", blend, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
        names.append(rel)
    return names
