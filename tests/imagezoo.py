"""Builders for real image files in every format and failure mode the decoders must handle."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def rgb_array(size: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    return base


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def jpeg_bytes(seed: int = 0, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb_array(size, seed)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_bomb_bytes(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, valid PNG header claiming a gigantic image (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def good_files(folder: Path) -> dict[str, Path]:
    """Valid images in every supported layout; each must decode to RGB uint8."""
    arr = rgb_array()
    gray = arr[..., 0]
    files = {
        "jpeg": save(folder / "rgb.jpg", Image.fromarray(arr), quality=90),
        "png": save(folder / "rgb.png", Image.fromarray(arr)),
        "bmp": save(folder / "rgb.bmp", Image.fromarray(arr)),
        "tiff8": save(folder / "rgb8.tif", Image.fromarray(arr)),
        "gray_png": save(folder / "gray.png", Image.fromarray(gray)),
        "rgba_png": save(folder / "rgba.png", Image.fromarray(np.dstack([arr, np.full(gray.shape, 128, np.uint8)]))),
        "palette_png": save(folder / "palette.png", Image.fromarray(arr).convert("P")),
        "cmyk_jpeg": save(folder / "cmyk.jpg", Image.fromarray(arr).convert("CMYK"), quality=90),
        "tiff16_gray": save(folder / "gray16.tif", Image.fromarray((gray.astype(np.uint16) * 257))),
        "gif": save(folder / "rgb.gif", Image.fromarray(arr)),
        "webp": save(folder / "rgb.webp", Image.fromarray(arr)),
        "jpeg2000": save(folder / "rgb.jp2", Image.fromarray(arr)),
        "ppm": save(folder / "rgb.ppm", Image.fromarray(arr)),
    }
    import tifffile
    rgb16 = folder / "rgb16.tif"
    tifffile.imwrite(rgb16, arr.astype(np.uint16) * 257, photometric="rgb")
    files["tiff16_rgb"] = rgb16
    return files


def bad_files(folder: Path) -> dict[str, Path]:
    """Inputs that must become one error row each (name -> path), with their expected error type."""
    folder.mkdir(parents=True, exist_ok=True)
    data = jpeg_bytes(3)
    entries = {
        "truncated": (folder / "truncated.jpg", data[: len(data) // 2]),
        "empty": (folder / "empty.jpg", b""),
        "text": (folder / "notes.jpg", b"this is not an image, just text named .jpg\n"),
        "bomb": (folder / "bomb.png", png_bomb_bytes()),
    }
    for path, content in entries.values():
        path.write_bytes(content)
    tiny = save(folder / "tiny.png", Image.fromarray(np.zeros((1, 1, 3), np.uint8)))
    return {**{k: v[0] for k, v in entries.items()}, "tiny": tiny}


EXPECTED_ERROR = {"truncated": "truncated", "empty": "empty_file", "text": "not_an_image",
                  "bomb": "too_large", "tiny": "too_small"}
