"""Progress lines for terminals and Slurm logs, through Python ``logging`` (logger ``allcluster``).

Lines go to stderr as plain text (stdout carries results, e.g. JSON), one per message, with no
prefix: Slurm logs stay readable and grep-able. The level comes from ``allcluster --log-level`` or
``$ALLCLUSTER_LOG_LEVEL`` (default ``info``; Ray workers get the driver's). A library caller
silences it like any logger: ``logging.getLogger("allcluster").setLevel(logging.WARNING)``.
"""
from __future__ import annotations

import logging
import os
import sys
import time

LOG_LEVEL_ENV = "ALLCLUSTER_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error")
logger = logging.getLogger("allcluster")


class _StderrLines(logging.Handler):
    """Writes each record as one flushed line to the *current* ``sys.stderr`` (looked up per record,
    so redirections such as pytest's capture or Ray's worker log files see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:        # noqa: BLE001 - logging must never break the job
            self.handleError(record)


_IMPORTED = time.monotonic()


def process_age_s() -> float:
    """Seconds since this process started (Linux ``/proc``: the interpreter's start and every
    import count), else since allcluster was imported."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")          # field 22, starttime (ticks since boot)
        return float(open("/proc/uptime").read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def set_level(name: str) -> None:
    """Set the level of allcluster's lines here and, through the environment, in Ray workers
    started afterwards (``ray_utils.ensure_ray`` passes it on)."""
    if name.lower() not in LEVELS:
        raise ValueError(f"log level {name!r}: expected one of {', '.join(LEVELS)}")
    os.environ[LOG_LEVEL_ENV] = name.lower()
    logger.setLevel(name.upper())


if not logger.handlers:          # our own plain handler unless the application configured one
    _handler = _StderrLines()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False
    logger.setLevel(os.environ.get(LOG_LEVEL_ENV, "info").upper() if
                    os.environ.get(LOG_LEVEL_ENV, "info").lower() in LEVELS else logging.INFO)


def say(message: str, level: int = logging.INFO) -> None:
    """One progress line (``logging`` at ``level``, INFO by default).

    Not ``print``: inside Ray Train workers ``print`` is patched to go both to the console and
    Train's logger, which shows every line twice in the driver's output.
    """
    logger.log(level, message)
