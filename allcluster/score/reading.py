"""Stage 1 of scoring (CPU tasks): read, hash and decode a batch of files into model-sized pixels.
Every file keeps its row: a failure is recorded on it, never raised."""
from __future__ import annotations

import time

import numpy as np

from allcluster.data import decode as dec
from allcluster.data.paths import clean_text, parent_text, to_fs
from allcluster.data.preprocess import Preprocess, decode_preprocessed
from allcluster.score.ledger import Claim


def _fail(out: dict, i: int, err: dec.DecodeError) -> None:
    out["status"][i], out["error_type"][i], out["error"][i] = "error", err.kind, clean_text(str(err))


def read_decode(batch: dict[str, np.ndarray], size: int, roi_crop: bool, roi_margin: float, max_pixels: int,
                claim: Claim, max_bytes: int = dec.DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
    """Read, hash and decode a batch of files into uint8 ``pixels`` (N, size, size, 3).

    ``batch["path"]`` holds table paths (:mod:`allcluster.data.paths`). Every file keeps its row: any
    failure while reading, hashing, decoding or preprocessing it gets ``status="error"``; a file whose
    bytes another file of the job already has gets ``duplicate_of`` and is not decoded (it is filled
    in at the end). Files are read ahead of their decoding by at most :data:`READ_AHEAD_BYTES` (and
    one file), so a batch of large files never sits in memory whole.
    """
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    out = {k: np.asarray(v) for k, v in batch.items()}
    out.update(folder=np.array([parent_text(p) for p in paths], dtype=object),
               sha256=np.full(n, "", dtype=object), size_bytes=np.full(n, -1, np.int64),
               width=np.full(n, -1, np.int32), height=np.full(n, -1, np.int32),
               status=np.full(n, "ok", dtype=object), error_type=np.full(n, "", dtype=object),
               error=np.full(n, "", dtype=object), duplicate_of=np.full(n, "", dtype=object),
               t_read_ms=np.zeros(n, np.float32), t_decode_ms=np.zeros(n, np.float32),
               pixels=np.zeros((n, size, size, 3), np.uint8))
    preprocess = Preprocess(size, roi_crop, roi_margin)
    first = 0
    while first < n:                          # read ahead at most READ_AHEAD_BYTES, then decode those
        blobs, first = _read_ahead(out, paths, first, max_bytes)
        _decode_read(out, paths, blobs, claim, preprocess, max_pixels)
    return out


# The bytes one task holds between reading files and decoding them. A batch of 32 files just under
# max_bytes (512 MiB: large TIFF exports) would otherwise hold 16 GiB before the first decode; with
# blood-smear JPEGs and PNGs (0.1-5 MB) a whole batch is read at once, as before.
READ_AHEAD_BYTES = 256 * 2**20


def _read_ahead(out: dict, paths: list[str], first: int, max_bytes: int) -> tuple[dict[int, bytes], int]:
    """Read and hash files from ``first`` until READ_AHEAD_BYTES are held (at least one file):
    ``({row: bytes}, the next row to read)``; a file that cannot be read gets its error here."""
    blobs, held, i = {}, 0, first
    while i < len(paths) and (held < READ_AHEAD_BYTES or i == first):
        start = time.perf_counter()
        try:
            data, out["sha256"][i] = dec.read_any(to_fs(paths[i]), max_bytes)
            out["size_bytes"][i] = len(data)
            blobs[i], held = data, held + len(data)
        except dec.DecodeError as err:
            _fail(out, i, err)
        out["t_read_ms"][i] = (time.perf_counter() - start) * 1e3
        i += 1
    return blobs, i


def _decode_read(out: dict, paths: list[str], blobs: dict[int, bytes], claim: Claim, preprocess: Preprocess,
                 max_pixels: int) -> None:
    """Decode the files read (``blobs``, emptied as it goes) whose bytes no other file of the job owns."""
    hashed = list(blobs)
    owners = claim([out["sha256"][i] for i in hashed], [paths[i] for i in hashed]) if hashed else []
    for i, owner in zip(hashed, owners):
        data = blobs.pop(i)                   # free the bytes as soon as they are decoded
        if owner:
            out["duplicate_of"][i] = owner
            continue
        start = time.perf_counter()
        try:
            decode_into(out, i, data, paths[i], preprocess, max_pixels)
        except dec.DecodeError as err:
            _fail(out, i, err)
        del data
        out["t_decode_ms"][i] = (time.perf_counter() - start) * 1e3


def decode_into(out: dict, i: int, data: bytes, path: str, preprocess: Preprocess, max_pixels: int) -> None:
    """Decode + preprocess one file into row ``i`` of ``out``; every failure is a :class:`DecodeError`."""
    image, out["pixels"][i] = decode_preprocessed(data, path, preprocess, max_pixels)   # as the training cache
    out["width"][i], out["height"][i] = image.width, image.height
