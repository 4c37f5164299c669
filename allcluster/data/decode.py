"""Bounded, format-tolerant image decoding: any JPEG/PNG/TIFF/BMP/GIF/WebP/JPEG 2000/PNM becomes an RGB uint8 array.

Every failure is a :class:`DecodeError` with a short ``kind`` (a stable error type for result
tables) and a message naming the file; callers turn it into an error row, never a crash.
Memory per file is bounded twice: a file over ``max_bytes`` is refused from its size alone (never
read), and an image whose header declares more than ``max_pixels`` is refused before its pixels are
decoded.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import math
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from allcluster.data.paths import clean_text, to_text

# We enforce our own pixel limit before decoding (see ``check_size``); PIL's own check would only
# warn below 2x its limit, and its error type differs between versions.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 50_000_000   # ~7000 x 7000: far above any cell image, far below a bomb
DEFAULT_MIN_SIDE = 8              # a 1x1 "image" carries no cell; it is an input error
DEFAULT_MAX_BYTES = 512 * 2**20   # far above any microscope image; a whole-slide .svs or a tar is refused
_CHUNK = 1 << 20
# The formats read (Pillow's names); any other file is ``not_an_image``. An allow-list, because a
# dump is untrusted input: Pillow would hand an EPS/PostScript file (any name) to Ghostscript where
# one is installed, and each further plugin is more parser code exposed to whatever lies in a dump.
READ_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "DIB", "GIF", "WEBP", "JPEG2000", "PPM")
READ_FORMATS_TEXT = "JPEG, PNG, TIFF, BMP, GIF, WebP, JPEG 2000, PNM"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Error types that may not be the file's own fault (I/O hiccups, a file still being copied, an
# out-of-memory GPU while scoring): a rerun tries such files again. Every other type is
# determined by the file's content or kind and is kept until ``--retry-errors``.
TRANSIENT_ERRORS = frozenset({
    "unreadable",        # missing, permission denied, I/O error (NFS hiccup)
    "empty_file",        # 0 bytes: often a copy that has only just started
    "truncated",         # the image data stops early: often a copy still in progress
    "read_error",        # any other exception while reading or hashing
    "changed_since_index",  # the file's bytes are not the ones indexed (a re-index puts them right)
    "unlistable",        # a folder that could not be listed
    "list_error",        # any other exception while listing or stat-ing an entry
    "model_error",       # predict/explain failed for the batch (CUDA OOM; a full disk stops the run instead)
    "write_error",       # the shard's heatmap pack could not be written (a full disk or quota stops the run)
    "duplicate_unresolved",  # the first copy of these bytes got no row (it will on the rerun)
    "out_of_memory",     # the node had no memory for this file's pixels (a shared node): not the file's fault
    "reader_crashed",    # the process decoding it died (a native decoder's crash, the OOM killer, a lost node)
})


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


def _open_regular(path: str | Path, name: str, max_bytes: int) -> tuple[int, int]:
    """(fd, size) of a regular file no larger than ``max_bytes``; checked on the open descriptor, so
    a FIFO never blocks (O_NONBLOCK) and a huge file is refused without reading a byte."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError as err:
        raise DecodeError("unreadable", f"{name}: permission denied") from err
    except OSError as err:
        if err.errno == errno.ELOOP:        # as a listed folder's loop is (score.inputs): no rerun mends it
            raise DecodeError("symlink_loop", f"{name}: symlink loop") from err
        raise DecodeError("unreadable", f"{name}: {err.strerror or err}") from err
    info = os.fstat(fd)
    problem = None
    if stat.S_ISDIR(info.st_mode):
        problem = DecodeError("unreadable", f"{name}: is a directory")
    elif not stat.S_ISREG(info.st_mode):
        problem = DecodeError("not_a_file", f"{name}: not a regular file")
    elif info.st_size > max_bytes:
        problem = DecodeError("too_large", f"{name}: {info.st_size:,} bytes exceeds the file size limit of "
                                           f"{max_bytes:,} bytes (max_bytes); not read")
    if problem:
        os.close(fd)
        raise problem
    return fd, info.st_size


def read_hashed(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, str]:
    """(bytes, sha256 hex) of a file, read and hashed in 1 MiB chunks; OS failures, non-regular files,
    empty files and files over ``max_bytes`` (even one that grows while read) become :class:`DecodeError`."""
    name = to_text(path)
    fd, size = _open_regular(path, name, max_bytes)
    digest, buffer = hashlib.sha256(), bytearray()
    try:
        with os.fdopen(fd, "rb", buffering=0) as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                buffer += chunk
                if len(buffer) > max_bytes:
                    raise DecodeError("too_large", f"{name}: grew past the file size limit of {max_bytes:,} bytes while read")
    except OSError as err:
        raise DecodeError("unreadable", f"{name}: {err.strerror or err}") from err
    if not buffer:
        raise DecodeError("empty_file", f"{name}: file is empty (0 bytes)")
    return bytes(buffer), digest.hexdigest()


def read_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """A file's bytes (see :func:`read_hashed` for the failures)."""
    return read_hashed(path, max_bytes)[0]


def unexpected(kind: str, name: str, err: BaseException) -> DecodeError:
    """An exception nobody anticipated, as a :class:`DecodeError` naming the file and the exception;
    a ``MemoryError`` is ``out_of_memory`` whatever the step (:func:`out_of_memory`)."""
    if isinstance(err, MemoryError):
        return out_of_memory(name, err)
    return DecodeError(kind, clean_text(f"{name}: {type(err).__name__}: {err}"))


def out_of_memory(name: str, err: MemoryError) -> DecodeError:
    """A file whose pixels found no memory on this node: transient (on a node shared with other jobs
    the next try may fit), not ``undecodable``, which no rerun would try again."""
    return DecodeError("out_of_memory", clean_text(f"{name}: not enough memory on this node to decode it "
                                                   f"(MemoryError{': ' + str(err) if str(err) else ''}); a rerun tries it again"))


def check_size(width: int, height: int, name: str, max_pixels: int, min_side: int) -> None:
    """Refuse decompression bombs and degenerate images before any pixel is decoded."""
    if width * height > max_pixels:
        raise DecodeError("too_large", f"{name}: {width}x{height} = {width * height:,} pixels exceeds the "
                                       f"limit of {max_pixels:,} (possible decompression bomb)")
    if min(width, height) < min_side:
        raise DecodeError("too_small", f"{name}: {width}x{height} is smaller than {min_side} pixels per side")


def _declared_full_scale(bits_per_sample, max_sample_value) -> int | None:
    """The sample value that is full brightness in a TIFF's 16-bit samples, from its tags: 2**bits - 1
    for a BitsPerSample (258) of 9 to 15 bits, else for an SMaxSampleValue (341) below 65535 (a 12-bit
    camera's 4095) that value rounded up to whole bits, so 12-bit data whose largest value is less
    still get 4095 rather than a contrast stretched per image. None where neither says fewer than 16
    bits: the samples are then taken to be true 16-bit data, full scale 65535. Nothing is guessed
    from the pixel values, which cannot tell 12-bit data from a dark 16-bit image; MaxSampleValue
    (281) is not read, being by the TIFF specification statistics, not meant to change how an image looks."""
    bits = max(_tag_values(bits_per_sample), default=0)
    if 8 < bits < 16:
        return 2 ** bits - 1
    largest = int(max(_tag_values(max_sample_value), default=0))
    if 255 < largest < 65535:
        return 2 ** largest.bit_length() - 1
    return None


def _tag_values(value) -> list[float]:
    """A TIFF tag's value (a number, one per sample, or absent) as a list of numbers."""
    if value is None:
        return []
    values = value if isinstance(value, (tuple, list)) else [value]
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _wide_to_uint8(arr: np.ndarray, full_scale: int | None = None) -> np.ndarray:
    """Scale 16-bit, 32-bit or float samples to 0..255 (integer samples with ``full_scale``, where
    the file declares it: see :func:`_declared_full_scale`). One float32 copy, scaled in place: a
    50-megapixel 16-bit RGB slide peaks at about 3x its samples' bytes (float64 temporaries took 12x)."""
    is_float = np.issubdtype(arr.dtype, np.floating)
    is_16bit = arr.dtype in (np.uint16, np.int16) or str(arr.dtype).endswith("u2")
    with np.errstate(over="ignore"):        # a float64 sample beyond float32's range: inf, then the largest
        arr = arr.astype(np.float32)
    if is_float:                            # (its masks cost memory too: integers have no NaN)
        np.nan_to_num(arr, copy=False)
    peak = float(arr.max(initial=0))
    if is_float and peak <= 1.0 and arr.min(initial=0) >= 0:
        scale = 1.0
    elif full_scale and not is_float:
        scale = float(full_scale)
    elif is_16bit or 255 < peak <= 65535:
        scale = 65535.0
    elif peak <= 255:
        return np.clip(arr, 0, 255, out=arr).astype(np.uint8)
    else:
        scale = peak
    arr *= np.float32(255.0 / scale)
    return np.clip(np.rint(arr, out=arr), 0, 255, out=arr).astype(np.uint8)


def _to_rgb_array(im: Image.Image, full_scale: int | None = None) -> np.ndarray:
    """Convert any PIL mode to an (H, W, 3) uint8 array (wide samples scaled to ``full_scale``, if given)."""
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        # Composite transparent pixels on white (a bright slide background), not black.
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"))
    if mode.startswith("I") or mode == "F":
        gray = _wide_to_uint8(np.asarray(im), full_scale)
        return np.repeat(gray[..., None], 3, axis=2) if gray.ndim == 2 else gray[..., :3]
    if mode != "RGB":
        im = im.convert("RGB")      # L, 1, P, CMYK, YCbCr, LAB, HSV
    return np.asarray(im)


def _tiff_plane(shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of the first image plane of a TIFF series shape (pages/planes first or last)."""
    while len(shape) > 3:
        shape = shape[1:]
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        return shape[1], shape[2]
    return shape[0], shape[1] if len(shape) > 1 else 1


@contextlib.contextmanager
def _tifffile_quiet():
    """tifffile logs a warning or error for each odd tag of a file it reads; a file we cannot read becomes an
    error row that says why, so its warnings would only flood a job's log (one per tag per file)."""
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def _decode_with_tifffile(data: bytes, name: str, max_pixels: int, min_side: int) -> DecodedImage:
    """TIFFs PIL cannot read, or reads only as 8 bits (16-bit-per-channel RGB): every sample at its
    declared scale, turned upright by the Orientation tag."""
    import tifffile

    try:
        with _tifffile_quiet(), tifffile.TiffFile(io.BytesIO(data)) as tif:
            height, width = _tiff_plane(tif.series[0].shape)    # from the tags: no pixel decoded yet
            check_size(width, height, name, max_pixels, min_side)
            arr = tif.series[0].asarray()
            tags = {t: tag.value for t, tag in tif.series[0].keyframe.tags.items() if t in (258, 274, 341)}
            full_scale = _declared_full_scale(tags.get(258), tags.get(341))
    except DecodeError:
        raise
    except MemoryError as err:
        raise out_of_memory(name, err) from err
    except Exception as err:  # tifffile raises many types for bad files
        raise DecodeError("undecodable", f"{name}: TIFF could not be decoded: {err}") from err
    while arr.ndim > 3:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    height, width = arr.shape[:2]
    check_size(width, height, name, max_pixels, min_side)
    if arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4):
        raise DecodeError("undecodable", f"{name}: TIFF with {arr.shape[2]} channels is not an RGB or gray image")
    arr = _wide_to_uint8(arr, full_scale) if arr.dtype != np.uint8 else arr
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] in (1, 2):          # gray (+ alpha)
        arr = np.repeat(arr[..., :1], 3, axis=2)
    return DecodedImage(_oriented(np.ascontiguousarray(arr[..., :3]), tags.get(274)), width, height)


# TIFF/EXIF Orientation (tag 274) -> the transpose that shows the image upright, as ImageOps.exif_transpose
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _oriented(rgb: np.ndarray, orientation) -> np.ndarray:
    """``rgb`` turned upright by its Orientation tag, as PIL's path does for the files it reads."""
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return rgb if method is None else np.asarray(Image.fromarray(rgb).transpose(method))


# TIFF field types -> bytes per value (TIFF 6.0 and BigTIFF)
_TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}


def _tiff_cut_short(data: bytes) -> bool:
    """Whether a TIFF's first directory, a value it keeps elsewhere, or the pixel data it points to
    lies past the file's end (Pillow writes the directory after the pixels, tifffile before them)."""
    big = data[2:4] in (b"+\x00", b"\x00+")
    order = "<" if data[:2] == b"II" else ">"
    word, head = ("Q", 16) if big else ("I", 8)
    if len(data) < head:
        return True
    first = struct.unpack_from(order + word, data, head - struct.calcsize(word))[0]
    if _tiff_directory_past_end(data, order, big, first):
        return True
    try:
        import tifffile

        with _tifffile_quiet(), tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            return max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0) > len(data)
    except Exception:  # noqa: BLE001 - a directory tifffile cannot read says nothing about the file's end
        return False


def _tiff_directory_past_end(data: bytes, order: str, big: bool, first: int) -> bool:
    """Whether the directory at ``first`` (its entries, its next-directory pointer, or a value stored
    outside an entry) runs past the end of ``data``."""
    count_format, entry_bytes, word = (order + "Q", 20, order + "Q") if big else (order + "H", 12, order + "I")
    inline = struct.calcsize(word)
    entries = first + struct.calcsize(count_format)
    if entries > len(data):
        return True
    count = struct.unpack_from(count_format, data, first)[0]
    if count > 4096:                          # no real directory has that many tags (tifffile's limit): garbage
        return False
    if entries + count * entry_bytes + inline > len(data):
        return True
    for entry in range(entries, entries + count * entry_bytes, entry_bytes):
        kind, = struct.unpack_from(order + "H", data, entry + 2)
        values, = struct.unpack_from(word, data, entry + 4)
        size = _TIFF_TYPE_BYTES.get(kind, 1) * values
        if size > inline and struct.unpack_from(word, data, entry + 4 + inline)[0] + size > len(data):
            return True
    return False


_END_MARKER = b"\xff\xd9"                 # JPEG's end of image, JPEG 2000's end of codestream


def _jp2_cut_short(data: bytes) -> bool:
    """Whether a JP2 file's boxes run past its end (or its last box, the codestream to the end of
    the file, lacks the end-of-codestream marker)."""
    at = 0
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if length == 1:                       # a 64-bit length follows
            if at + 16 > len(data):
                return True
            length, header = struct.unpack_from(">Q", data, at + 8)[0], 16
        elif length == 0:                     # the last box: it runs to the end of the file
            return kind == b"jp2c" and not data.endswith(_END_MARKER)
        if length < header:
            return False                      # no box structure to judge by
        if at + length > len(data):
            return True
        at += length
    return at < len(data)                     # a box header cut short


def cut_short(data: bytes) -> bool:
    """Whether ``data`` stops before the end that its own structure declares: a TIFF (see
    :func:`_tiff_cut_short`), a WebP (the RIFF size), a BMP (the file size field), a JPEG 2000 (its
    boxes' lengths; a bare codestream: no end-of-codestream marker), a JPEG, PNG or GIF without its
    closing marker (EOI, IEND, trailer; trailing zero bytes allowed). Pillow reports a file cut in its
    header or directory as undecodable or as no image at all; asked only of a file that failed."""
    ending = data.rstrip(b"\x00")
    if data[:3] == b"\xff\xd8\xff":
        return not ending.endswith(_END_MARKER)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return not ending.endswith(b"IEND\xaeB`\x82")
    if data[:4] == b"GIF8":
        return not ending.endswith(b";")
    if data[:4] in _TIFF_MAGIC:
        return _tiff_cut_short(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return struct.unpack("<I", data[4:8])[0] + 8 > len(data)
    if data[:2] == b"BM" and len(data) >= 6:
        return struct.unpack("<I", data[2:6])[0] > len(data)
    if data.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"):
        return _jp2_cut_short(data)
    if data.startswith(b"\xff\x4f\xff\x51"):
        return not data.endswith(_END_MARKER)
    return False


def decode(data: bytes, name: str = "<bytes>", *, max_pixels: int = DEFAULT_MAX_PIXELS,
           min_side: int = DEFAULT_MIN_SIDE, draft: int | None = None) -> DecodedImage:
    """Decode image bytes to RGB uint8.

    ``draft`` lets JPEG decoding skip detail that a resize to ``draft`` pixels would discard (libjpeg
    DCT scaling); the whole entropy stream is still decoded, so truncation is still detected.
    A file that fails and stops before the end its header declares is ``truncated`` (transient: a
    copy still in progress is scored by the rerun), whatever the decoder said.
    """
    try:
        return _decode(data, name, max_pixels, min_side, draft)
    except DecodeError as err:
        if err.kind not in ("undecodable", "not_an_image") or not cut_short(data):
            raise
        raise DecodeError("truncated", f"{name}: the file ends after {len(data):,} bytes, before the end its "
                                       f"header declares (a copy still in progress?); {err}") from err


def _decode(data: bytes, name: str, max_pixels: int, min_side: int, draft: int | None) -> DecodedImage:
    if not data:
        raise DecodeError("empty_file", f"{name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=READ_FORMATS)
            width, height = im.size
            check_size(width, height, name, max_pixels, min_side)
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            tags = getattr(im, "tag_v2", None) or {}        # TIFF only; read before a transpose drops them
            full_scale = _declared_full_scale(tags.get(258), tags.get(341))
            if full_scale and max(_tag_values(tags.get(258)), default=8) > 8 and not im.mode.startswith("I"):
                try:        # PIL keeps only the high byte of wide RGB samples
                    return _decode_with_tifffile(data, name, max_pixels, min_side)
                except DecodeError:
                    pass    # a compression tifffile reads only with imagecodecs (LZW...): PIL's reading, as before
            im.load()
            im = ImageOps.exif_transpose(im) or im
            arr = _to_rgb_array(im, full_scale)
    except DecodeError:
        raise
    except UnidentifiedImageError as err:
        if data[:4] in _TIFF_MAGIC:           # a TIFF Pillow does not open (a big-endian BigTIFF)
            return _decode_with_tifffile(data, name, max_pixels, min_side)
        raise DecodeError("not_an_image", f"{name}: not a recognised image format (read: {READ_FORMATS_TEXT})") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError("too_large", f"{name}: {err}") from err
    except MemoryError as err:
        raise out_of_memory(name, err) from err
    except (OSError, ValueError, SyntaxError, EOFError, KeyError) as err:
        if data[:4] in _TIFF_MAGIC:
            return _decode_with_tifffile(data, name, max_pixels, min_side)
        kind = "truncated" if "truncated" in str(err).lower() else "undecodable"
        raise DecodeError(kind, f"{name}: {err}") from err
    return DecodedImage(np.ascontiguousarray(arr), width, height)


def decode_any(data: bytes, name: str, **kwargs) -> DecodedImage:
    """:func:`decode`, with any unanticipated exception (``struct.error``, ``TypeError``... from a
    decoder or EXIF transposition) turned into a ``decode_error``: one bad file never stops a job."""
    try:
        return decode(data, name, **kwargs)
    except DecodeError:
        raise
    except Exception as err:        # noqa: BLE001 - the point: nothing escapes as a crash
        raise unexpected("decode_error", name, err) from err


def read_any(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, str]:
    """:func:`read_hashed`, with any unanticipated exception turned into a ``read_error``."""
    try:
        return read_hashed(path, max_bytes)
    except DecodeError:
        raise
    except Exception as err:        # noqa: BLE001
        raise unexpected("read_error", to_text(path), err) from err


def load(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, **kwargs) -> DecodedImage:
    """Read and decode one file (any failure is a :class:`DecodeError`); see :func:`decode`."""
    return decode_any(read_any(path, max_bytes)[0], to_text(path), **kwargs)
