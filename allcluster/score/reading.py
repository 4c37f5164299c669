"""Stage 1 of scoring (CPU tasks): read, hash and decode a batch of files into model-sized pixels.
Every file keeps its row: a failure is recorded on it, never raised.

A failure that is no Python exception (a native decoder's segfault, the kernel's OOM killer) ends
the task's process instead, and Ray Data retries such a task without limit (``max_retries=-1``):
one poisonous file would stop the whole job's progress for good. So a batch that is tried again
decodes each file in a child process of its own (:class:`IsolatedDecoder`): a file that kills it
gets a ``reader_crashed`` row and the others are decoded; a batch whose tries keep dying gets
``reader_crashed`` rows without being read (:data:`ISOLATED_TRIES`).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import subprocess
import sys
import time

import numpy as np

from allcluster.data import decode as dec
from allcluster.data.paths import clean_text, parent_text, to_fs
from allcluster.data.preprocess import Preprocess, decode_preprocessed
from allcluster.score.ledger import Claim


def _fail(out: dict, i: int, err: dec.DecodeError) -> None:
    out["status"][i], out["error_type"][i], out["error"][i] = "error", err.kind, clean_text(str(err))


# Tries of one batch, after its first, that decode each file in a child process; a batch whose
# process died that often too (a node lost each time, or the task itself killed for memory) gets its
# rows without being read, so the job always ends. Transient: the next run tries them again.
ISOLATED_TRIES = 2
# A file the child decodes for longer than this is taken for a decoder stuck in a loop (the largest
# allowed TIFF decodes in seconds).
DECODE_TIMEOUT_S = 300.0


def read_decode(batch: dict[str, np.ndarray], size: int, roi_crop: bool, roi_margin: float, max_pixels: int,
                claim: Claim, max_bytes: int = dec.DEFAULT_MAX_BYTES, attempt: int = 1) -> dict[str, np.ndarray]:
    """Read, hash and decode a batch of files into uint8 ``pixels`` (N, size, size, 3).

    ``batch["path"]`` holds table paths (:mod:`allcluster.data.paths`). Every file keeps its row: any
    failure while reading, hashing, decoding or preprocessing it gets ``status="error"``; a file whose
    bytes another file of the job already has gets ``duplicate_of`` and is not decoded (it is filled
    in at the end). Files are read ahead of their decoding by at most :data:`READ_AHEAD_BYTES` (and
    one file), so a batch of large files never sits in memory whole. ``attempt``: which try of this
    batch this is (see the module's docstring).
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
    if attempt > 1 + ISOLATED_TRIES:
        for i, path in enumerate(paths):
            _fail(out, i, dec.DecodeError("reader_crashed", f"{path}: the process reading its batch died "
                                          f"{attempt - 1} times (a lost node, or one killed for memory)"))
        return out
    preprocess = Preprocess(size, roi_crop, roi_margin)
    with IsolatedDecoder() if attempt > 1 else contextlib.nullcontext(decode_into) as decode_one:
        first = 0
        while first < n:                      # read ahead at most READ_AHEAD_BYTES, then decode those
            blobs, first = _read_ahead(out, paths, first, max_bytes)
            _decode_read(out, paths, blobs, claim, preprocess, max_pixels, decode_one)
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
                 max_pixels: int, decode_one) -> None:
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
            decode_one(out, i, data, paths[i], preprocess, max_pixels)
        except dec.DecodeError as err:
            _fail(out, i, err)
        del data
        out["t_decode_ms"][i] = (time.perf_counter() - start) * 1e3


def decode_into(out: dict, i: int, data: bytes, path: str, preprocess: Preprocess, max_pixels: int) -> None:
    """Decode + preprocess one file into row ``i`` of ``out``; every failure is a :class:`DecodeError`."""
    image, out["pixels"][i] = decode_preprocessed(data, path, preprocess, max_pixels)   # as the training cache
    out["width"][i], out["height"][i] = image.width, image.height


class IsolatedDecoder:
    """:func:`decode_into` run in a child process (``python -m allcluster.score.reading``, fed over
    its pipes), started again after a file that killed it; that file gets a ``reader_crashed`` error."""

    def __init__(self, timeout_s: float = 0.0):
        self.child: subprocess.Popen | None = None
        self.timeout_s = timeout_s or DECODE_TIMEOUT_S

    def __enter__(self) -> "IsolatedDecoder":
        return self

    def __exit__(self, *exc) -> None:
        if self.child is not None:
            with contextlib.suppress(OSError):
                self.child.stdin.close()
            self._end(self.child, kill=False)

    def __call__(self, out: dict, i: int, data: bytes, path: str, preprocess: Preprocess, max_pixels: int) -> None:
        if self.child is None:
            # the worker's own import path: Ray puts the driver's folder on a worker's sys.path, not in
            # its environment, and allcluster may be a checkout that is not installed
            paths = [*os.environ.get("PYTHONPATH", "").split(os.pathsep), *sys.path]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(p for p in paths if p))}
            self.child = subprocess.Popen([sys.executable, "-m", "allcluster.score.reading"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            pickle.dump((data, path, preprocess, max_pixels), self.child.stdin)
            self.child.stdin.flush()
            if not select.select([self.child.stdout], [], [], self.timeout_s)[0]:
                raise TimeoutError
            answer = pickle.load(self.child.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as err:
            child, self.child = self.child, None
            code = self._end(child, kill=True)
            how = f"stuck: no answer in {self.timeout_s:g} s" if isinstance(err, TimeoutError) else _death(code)
            raise dec.DecodeError("reader_crashed", f"{path}: the process decoding it died ({how})") from None
        if answer[0] == "error":
            raise dec.DecodeError(answer[1], answer[2])
        out["width"][i], out["height"][i], out["pixels"][i] = answer[1:]

    def _end(self, child: subprocess.Popen, kill: bool) -> int:
        """Wait for ``child`` (killed first with ``kill``: it may be alive, stuck or mid-answer), close
        its pipes; its exit code."""
        if kill and child.poll() is None:
            child.kill()
        code = child.wait()
        for pipe in (child.stdin, child.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        return code


def _death(code: int) -> str:
    if code >= 0:
        return f"exit {code}"
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
    return f"killed by {name}" + ("; the out-of-memory killer sends it" if -code == signal.SIGKILL else "")


def _serve() -> None:
    """The child's loop: decode what arrives on stdin, answer on stdout, until stdin closes."""
    from allcluster.data.preprocess import decode_preprocessed

    requests, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                             # a library's print must not corrupt the answers
    while True:
        try:
            data, path, preprocess, max_pixels = pickle.load(requests)
        except EOFError:
            return
        try:
            image, pixels = decode_preprocessed(data, path, preprocess, max_pixels)
            answer = ("ok", image.width, image.height, pixels)
        except dec.DecodeError as err:
            answer = ("error", err.kind, str(err))
        pickle.dump(answer, answers)
        answers.flush()


if __name__ == "__main__":
    _serve()
