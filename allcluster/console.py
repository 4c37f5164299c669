"""Plain progress lines for terminals and Slurm logs."""
from __future__ import annotations

import sys


def say(message: str) -> None:
    """Write one line to stdout and flush it.

    Bypasses ``print``: inside Ray Train workers ``print`` is patched to go both to the console and
    Train's logger, which shows every line twice in the driver's output.
    """
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
