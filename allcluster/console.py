"""Plain progress lines for terminals and Slurm logs (on stderr: stdout carries results, e.g. JSON)."""
from __future__ import annotations

import sys


def say(message: str) -> None:
    """Write one progress line to stderr and flush it.

    Bypasses ``print``: inside Ray Train workers ``print`` is patched to go both to the console and
    Train's logger, which shows every line twice in the driver's output.
    """
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
