"""File locks that the OS releases when their holder dies, so a killed job never leaves a stale lock.

``flock(2)`` locks belong to the open file: when the process exits (normally, by SIGKILL, or when
Slurm ends the job) the kernel drops them. On NFS, Linux emulates ``flock`` with POSIX byte-range
locks, so they hold across nodes; Lustre needs the ``flock`` mount option (most sites set it).
Lock files are opened with ``O_NOFOLLOW``: a symlink planted at the lock path is refused, never
followed to a file of the planter's choosing.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path

from allcluster.atomic import is_storage_full, storage_full_error
from allcluster.config import ConfigError


def open_lock_file(path: str | Path, create: bool = True) -> int:
    """An fd for ``path`` (created 0600 if missing; -1 instead when not ``create``); refuses a
    symlink or a non-regular file there."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0) | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno == errno.ENOENT and not create:
            return -1
        if is_storage_full(err):              # no inode left: a full disk (exit 74), not a refusal
            raise storage_full_error(err.errno, path) from err
        if err.errno == errno.ELOOP:          # the final component is a symlink
            raise ConfigError(f"{path}: lock file is a symlink; refusing to follow it (remove it if it is yours)") from err
        raise ConfigError(f"{path}: cannot open lock file: {err.strerror or err}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: lock path is not a regular file")
    return fd


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host (and PID namespace) exists, whoever owns it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # another user's process has that id
        return True
    return True


def holder_info() -> dict:
    """Who holds a lock: host, pid, Slurm job id (when inside a job), start time."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe_holder(info: dict) -> str:
    text = f"host {info.get('host', '?')}, pid {info.get('pid', '?')}"
    if info.get("slurm_job_id"):
        text += f", Slurm job {info['slurm_job_id']}"
    return text + (f", since {info['since']}" if info.get("since") else "")


class LockHeld(ConfigError):
    """Another process holds the lock (the refusal names it)."""


class ExclusiveLock:
    """A non-blocking exclusive (or ``shared``) lock on ``path``; an exclusive holder records itself in the file.

    ``acquire()`` raises :class:`ConfigError` naming the current holder when another process has it.
    Keep the object alive for as long as the lock must be held; ``release()`` (or process exit) ends it.
    """

    def __init__(self, path: str | Path, what: str, shared: bool = False):
        self.path, self.what, self.shared, self.fd = Path(path), what, shared, -1

    def acquire(self) -> "ExclusiveLock":
        fd = open_lock_file(self.path)
        self._lock_or_refuse(fd)
        try:
            os.ftruncate(fd, 0)          # shared holders (array tasks) name themselves in their own lock
            if not self.shared:
                os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        except BaseException as err:     # a full disk: not left holding a lock nobody will release
            os.close(fd)
            if is_storage_full(err):
                raise storage_full_error(err.errno, self.path) from err
            raise
        self.fd = fd
        return self

    def probe(self) -> None:
        """Refuse as :meth:`acquire` would while another process holds the lock; takes nothing (the
        lock is dropped at once), creates and writes nothing: what ``--check`` runs."""
        fd = open_lock_file(self.path, create=False)      # read-write, as acquire opens it: NFS
        if fd < 0:                                        # emulates flock with POSIX locks, whose
            return                                        # exclusive kind needs a writable fd
        self._lock_or_refuse(fd)
        os.close(fd)

    def _lock_or_refuse(self, fd: int) -> None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd)
            os.close(fd)
            who = describe_holder(holder) if holder else f"Slurm array tasks: see {self.path}-*"
            raise LockHeld(f"{self.what} is in use by another run ({who}); "
                              f"wait for it to finish or stop it first (lock: {self.path})") from None
        except OSError as err:       # ENOSYS, ENOLCK...: a filesystem without flock (Lustre mounted without it)
            os.close(fd)
            raise ConfigError(f"{self.path}: cannot lock it ({err.strerror or err}): one writer per output needs "
                              "a filesystem with flock (Lustre: the flock mount option); use a folder on one") from None

    @staticmethod
    def _read_holder(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)        # closing the fd drops the flock
            self.fd = -1

    def __enter__(self) -> "ExclusiveLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder: str | Path, what: str, part: str = "", part_what: str = "") -> list[ExclusiveLock]:
    """Make ``folder`` and hold its locks for this run (one writer per output); a second run into it is
    refused naming the holder. A whole run holds ``folder/.lock`` exclusively. A ``part`` (a Slurm
    array task's shard or trial) holds it shared, so parts run side by side and a whole run is refused
    while any runs, plus ``folder/.lock-<part>`` exclusively, so the same part cannot run twice
    (``part_what`` names it in the refusal)."""
    _make_writable_folder(Path(folder))
    held: list[ExclusiveLock] = []
    try:
        for lock in _folder_locks(folder, what, part, part_what):
            held.append(lock.acquire())
    except BaseException:                   # a refusal, a full disk (74): none of them stays held
        for lock in reversed(held):
            lock.release()
        raise
    return held


def check_folder_free(folder: str | Path, what: str, part: str = "", part_what: str = "") -> None:
    """Refuse, as :func:`lock_folder` with the same arguments would, a folder that another run holds;
    takes no lock and creates nothing (a check before the run: the run still takes its locks)."""
    check_writable_folder(Path(folder))
    for lock in _folder_locks(folder, what, part, part_what):
        lock.probe()


def _make_writable_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if is_storage_full(err):            # no inode left: a full disk (exit 74), not a refusal
            raise storage_full_error(err.errno, folder) from err
        raise ConfigError(f"{folder}: cannot write into this folder ({err.strerror or err})") from None
    check_writable_folder(folder)


def check_writable_folder(folder: Path, readable: bool = True) -> None:
    """Refuse a folder that cannot be made, or written into, by this user (as the run would be): the
    folder, or where it does not exist yet, its nearest existing parent; with ``readable``, an existing
    folder must also list (a rerun reads what it holds; a drop folder that only takes files need not)."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{folder}: cannot write into this folder ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{folder}: cannot write into this folder ({existing} is not writable)")
    if readable and existing == folder and not os.access(folder, os.R_OK):
        raise ConfigError(f"{folder}: cannot write into this folder (it cannot be listed: not readable)")


def _folder_locks(folder: str | Path, what: str, part: str, part_what: str) -> list[ExclusiveLock]:
    folder = Path(folder)
    if not part:
        return [ExclusiveLock(folder / ".lock", what)]
    return [ExclusiveLock(folder / ".lock", what, shared=True),
            ExclusiveLock(folder / f".lock-{part}", part_what or f"{part} of {what}")]


@contextlib.contextmanager
def taking_turns(path: str | Path):
    """Wait for, then hold, an exclusive ``flock`` on ``path`` for a ``with`` block: writers that
    share a folder (array tasks) rewrite a shared file one after another, each reading what the
    previous one wrote. Released when the block ends or its holder dies."""
    fd = open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def holding(folder: str | Path, what: str, part: str = "", part_what: str = ""):
    """:func:`lock_folder` for the length of a ``with`` block."""
    locks = lock_folder(folder, what, part, part_what)
    try:
        yield
    finally:
        for lock in reversed(locks):
            lock.release()
