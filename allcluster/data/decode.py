"""Bounded, format-tolerant image decoding: any JPEG/PNG/BMP/TIFF becomes an RGB uint8 array.

Every failure is a :class:`DecodeError` with a short ``kind`` (a stable error type for result
tables) and a message naming the file; callers turn it into an error row, never a crash.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# We enforce our own pixel limit before decoding (see ``check_size``); PIL's own check would only
# warn below 2x its limit, and its error type differs between versions.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 50_000_000   # ~7000 x 7000: far above any cell image, far below a bomb
DEFAULT_MIN_SIDE = 8              # a 1x1 "image" carries no cell; it is an input error


class DecodeError(Exception):
    """An input that cannot become an image; ``kind`` is a stable short error type."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DecodedImage:
    """An RGB uint8 ``array`` (H, W, 3) and the file's original ``width`` x ``height``."""
    array: np.ndarray
    width: int
    height: int


def read_bytes(path: str | Path) -> bytes:
    """Read a file's bytes, mapping OS failures to :class:`DecodeError`."""
    try:
        data = Path(path).read_bytes()
    except PermissionError as err:
        raise DecodeError("unreadable", f"{path}: permission denied") from err
    except IsADirectoryError as err:
        raise DecodeError("unreadable", f"{path}: is a directory") from err
    except OSError as err:
        raise DecodeError("unreadable", f"{path}: {err.strerror or err}") from err
    if not data:
        raise DecodeError("empty_file", f"{path}: file is empty (0 bytes)")
    return data


def check_size(width: int, height: int, name: str, max_pixels: int, min_side: int) -> None:
    """Refuse decompression bombs and degenerate images before any pixel is decoded."""
    if width * height > max_pixels:
        raise DecodeError("too_large", f"{name}: {width}x{height} = {width * height:,} pixels exceeds the "
                                       f"limit of {max_pixels:,} (possible decompression bomb)")
    if min(width, height) < min_side:
        raise DecodeError("too_small", f"{name}: {width}x{height} is smaller than {min_side} pixels per side")


def _wide_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale 16-bit, 32-bit or float samples to 0..255."""
    is_float = np.issubdtype(arr.dtype, np.floating)
    is_16bit = arr.dtype in (np.uint16, np.int16) or str(arr.dtype).endswith("u2")
    arr = np.nan_to_num(arr.astype(np.float64))
    peak = float(arr.max(initial=0))
    if is_float and peak <= 1.0 and arr.min(initial=0) >= 0:
        scale = 1.0
    elif is_16bit or 255 < peak <= 65535:
        scale = 65535.0
    elif peak <= 255:
        return np.clip(arr, 0, 255).astype(np.uint8)
    else:
        scale = peak
    return np.clip(np.rint(arr / scale * 255.0), 0, 255).astype(np.uint8)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Convert any PIL mode to an (H, W, 3) uint8 array."""
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        # Composite transparent pixels on white (a bright slide background), not black.
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"))
    if mode.startswith("I") or mode == "F":
        gray = _wide_to_uint8(np.asarray(im))
        return np.repeat(gray[..., None], 3, axis=2) if gray.ndim == 2 else gray[..., :3]
    if mode != "RGB":
        im = im.convert("RGB")      # L, 1, P, CMYK, YCbCr, LAB, HSV
    return np.asarray(im)


def _decode_with_tifffile(data: bytes, name: str, max_pixels: int, min_side: int) -> DecodedImage:
    """Fallback for TIFF layouts PIL cannot read (e.g. 16-bit-per-channel RGB)."""
    import tifffile

    try:
        arr = tifffile.imread(io.BytesIO(data))
    except Exception as err:  # tifffile raises many types for bad files
        raise DecodeError("undecodable", f"{name}: TIFF could not be decoded: {err}") from err
    while arr.ndim > 3:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    height, width = arr.shape[:2]
    check_size(width, height, name, max_pixels, min_side)
    arr = _wide_to_uint8(arr) if arr.dtype != np.uint8 else arr
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return DecodedImage(np.ascontiguousarray(arr[..., :3]), width, height)


def decode(data: bytes, name: str = "<bytes>", *, max_pixels: int = DEFAULT_MAX_PIXELS,
           min_side: int = DEFAULT_MIN_SIDE, draft: int | None = None) -> DecodedImage:
    """Decode image bytes to RGB uint8.

    ``draft`` lets JPEG decoding skip detail that a resize to ``draft`` pixels would discard (libjpeg
    DCT scaling); the whole entropy stream is still decoded, so truncation is still detected.
    """
    if not data:
        raise DecodeError("empty_file", f"{name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            check_size(width, height, name, max_pixels, min_side)
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im.load()
            im = ImageOps.exif_transpose(im) or im
            arr = _to_rgb_array(im)
    except DecodeError:
        raise
    except UnidentifiedImageError as err:
        raise DecodeError("not_an_image", f"{name}: not a recognised image format") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError("too_large", f"{name}: {err}") from err
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, KeyError) as err:
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _decode_with_tifffile(data, name, max_pixels, min_side)
        kind = "truncated" if "truncated" in str(err).lower() else "undecodable"
        raise DecodeError(kind, f"{name}: {err}") from err
    return DecodedImage(np.ascontiguousarray(arr), width, height)


def load(path: str | Path, **kwargs) -> DecodedImage:
    """Read and decode one file; see :func:`decode` for the keyword arguments."""
    return decode(read_bytes(path), str(path), **kwargs)
