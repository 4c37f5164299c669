"""Shared fixtures: a real local Ray (2 CPUs), real ALL images, synthetic images, manifests.

Tests that need the real ALL images skip with a loud reason where they are absent (they are never
copied into this repository); CI has them at ../shared/data/all_aria_2021/Original.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from allcluster.train.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train: fail fast instead of waiting for resources that never come.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
# As the CLI does: huge pages for torch's large CPU tensors (set before torch first allocates).
from allcluster.device import use_fast_allocator  # noqa: E402 - light: no torch import

use_fast_allocator()


def _real_data_dir() -> Path:
    from allcluster.data.real import all_data_dir
    return all_data_dir()


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    path = _real_data_dir()
    if not path.is_dir():
        reason = (f"REAL DATA ABSENT: {path} not found; tests on the real ALL images are SKIPPED. "
                  "Set ALLCLUSTER_ALL_DATA to the dataset's Original/ folder (Kaggle DOI "
                  "10.34740/KAGGLE/DSV/2175623) to run them.")
        warnings.warn(reason)
        print(f"\n*** {reason} ***\n", file=sys.stderr)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """One decoded-image cache root for the session (as one node shares it between runs)."""
    root = tmp_path_factory.mktemp("cache")
    os.environ["ALLCLUSTER_CACHE_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def ray_local(cache_root):
    """A real local Ray with 2 CPUs, shared by the whole session."""
    import ray

    from allcluster.ray_utils import job_env_vars

    if not ray.is_initialized():     # the job's environment, as the CLI's own Ray start gives it
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=True,
                 runtime_env={"env_vars": {**job_env_vars(), "ALLCLUSTER_CACHE_DIR": str(cache_root)}})
    _SESSION_RAY["gcs_address"] = ray.get_runtime_context().gcs_address
    yield ray
    _SESSION_RAY.clear()
    ray.shutdown()


_SESSION_RAY: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _the_session_ray_outlives_each_test(request):
    """Fails the test that shuts down (or replaces) the session's Ray: the tests after it would still
    pass, each on a Ray of its own that the CLI starts or ``ray.remote`` auto-starts without the job's
    environment, slower and not what they claim to test (one such test went unnoticed until
    pytest-xdist's order showed it)."""
    yield
    if _SESSION_RAY:
        import ray

        now = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
        assert now == _SESSION_RAY["gcs_address"], \
            f"{request.node.name} left the session's Ray (ray_local) shut down or replaced"


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    from allcluster.data.synthetic import generate
    return generate(tmp_path_factory.mktemp("synthetic"), n_per_class=40, size=48, seed=1)


@pytest.fixture(scope="session")
def synthetic_manifest(synthetic_dir, tmp_path_factory) -> Path:
    from allcluster.config import from_dict
    from allcluster.data.manifest import IndexConfig, run_index

    out = tmp_path_factory.mktemp("synthetic-manifest") / "manifest.parquet"
    run_index(from_dict(IndexConfig, {"source": str(synthetic_dir), "out": str(out)}))
    return out


@pytest.fixture(scope="session")
def real_manifest(real_data_dir, tmp_path_factory) -> Path:
    """Manifest of the whole real ALL dataset (3,256 images; about 2 s)."""
    from allcluster.config import from_dict
    from allcluster.data.manifest import IndexConfig, run_index

    out = tmp_path_factory.mktemp("real-manifest") / "manifest.parquet"
    run_index(from_dict(IndexConfig, {"source": str(real_data_dir), "out": str(out)}))
    return out


ALL_CLASSES = ["Benign", "Early", "Pre", "Pro"]


def real_images(real_data_dir: Path, per_class: int) -> list[Path]:
    """The first ``per_class`` real images of each class folder, in a fixed order."""
    return [p for c in sorted(real_data_dir.iterdir()) for p in sorted(c.glob("*.jpg"))[:per_class]]


POISON = b"ALLCLUSTER-TEST: SEGFAULT"
STUCK = b"ALLCLUSTER-TEST: STUCK"


@pytest.fixture
def segfaulting_decoder(tmp_path):
    """A folder to put first on PYTHONPATH: its sitecustomize.py makes every Python process started
    with it (Ray's workers, a decoder's child) die by a real SIGSEGV when Pillow is asked to open bytes
    that hold :data:`POISON` (as a native decoder's crash would end it), or hang on :data:`STUCK`, and
    a function that writes a real JPEG with a marker in a comment segment."""
    site = tmp_path / "segfault-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, signal\n"
        "from PIL import Image\n"
        "_open = Image.open\n"
        "def _open_or_die(fp, *args, **kwargs):\n"
        "    if hasattr(fp, 'getvalue') and " + repr(POISON) + " in fp.getvalue():\n"
        "        os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    if hasattr(fp, 'getvalue') and " + repr(STUCK) + " in fp.getvalue():\n"
        "        signal.pause()\n"
        "    return _open(fp, *args, **kwargs)\n"
        "Image.open = _open_or_die\n")

    def poisoned_copy(image: Path, target: Path, marker: bytes = POISON) -> Path:
        data = image.read_bytes()
        comment = b"\xff\xfe" + (len(marker) + 2).to_bytes(2, "big") + marker
        target.write_bytes(data[:2] + comment + data[2:])
        return target
    return site, poisoned_copy


@pytest.fixture(scope="session")
def real_sweep(ray_local, real_manifest, tmp_path_factory) -> dict:
    """One real sweep shared by the sweep and report tests (a trial's cost is mostly Ray Train's start,
    so CI runs it once, on two trials side by side): 2 backbones (augmentation and optimizer drawn per
    trial), 3 epochs at 48 px
    on a 64-per-class subset of the real images. ``printed``: what ``allcluster sweep`` printed."""
    import contextlib
    import io

    from allcluster.cli import main

    base = tmp_path_factory.mktemp("real-sweep")
    experiment = base / "sweep"
    train = {"data": {"manifest": str(real_manifest), "image_size": 48, "max_per_class": 64, "loader_workers": 0},
             "model": {"backbone": "allnet", "head": {"hidden": [16], "dropout": 0.0, "hidden_dropout": 0.0}},
             "finetune": {"head_epochs": 0, "unfreeze_blocks": -1},
             "optim": {"lr": 0.003, "weight_decay": 0.0},
             "fit": {"epochs": 3, "batch_size": 16, "early_stopping_patience": 0},
             "resources": {"num_workers": 1, "cpus_per_worker": 0.9}}
    config = write_yaml(base / "sweep.yaml", {
        "name": "report-test", "experiment_dir": str(experiment), "train": train, "seed": 0,
        "grid": {"model.backbone": ["allnet", "test_efficientnet"]},
        "sample": {"augment.name": {"choice": ["none", "mixup"]}, "optim.name": {"choice": ["adam", "adamw"]}}})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["sweep", "--config", str(config)]) == 0
    return {"experiment": experiment, "config": config, "printed": printed.getvalue()}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An exported, untrained ALL-Net model directory at 64 px with the ALL dataset's four classes
    (temperature 1.5, so raw and calibrated probabilities differ)."""
    from allcluster.models.model_dir import export_untrained
    from allcluster.models.registry import HeadSpec

    return export_untrained(tmp_path_factory.mktemp("tiny-model") / "model", "allnet", ALL_CLASSES,
                            input_size=64, head=HeadSpec((32,), 0.0, 0.0), seed=0, temperature=1.5)


def tiny_train_config(manifest: Path, output_dir: Path, **sections) -> "TrainConfig":
    """A fast CPU training config for tests; ``sections`` override whole YAML sections."""
    from allcluster.config import from_dict
    from allcluster.train.config import TrainConfig, resolve

    data = {
        "name": "test", "output_dir": str(output_dir),
        "data": {"manifest": str(manifest), "image_size": 48, "loader_workers": 0},
        "model": {"backbone": "allnet", "head": {"hidden": [32], "dropout": 0.1, "hidden_dropout": 0.1}},
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
        "finetune": {"head_epochs": 0, "unfreeze_blocks": -1},
        "fit": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 0},
        "resources": {"num_workers": 1, "cpus_per_worker": 1.0},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return resolve(from_dict(TrainConfig, data, "test config"))


def write_yaml(path: Path, data: dict) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def clean_dir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


class LoggedProcess(subprocess.Popen):
    """A CLI command in its own session (its own local Ray when ``RAY_ADDRESS`` is empty), its output
    kept in a file: a pipe that nobody reads while the test polls would stall the command once 64 KiB
    are printed (Ray's warnings on a slow machine), and the wait would then run out. Used as a context
    manager: leaving the block SIGKILLs what is left of its process group (the local Ray too)."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self._output = tempfile.TemporaryFile("w+", errors="replace")
        env = env if env is not None else {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
        super().__init__(command, cwd=REPO, env=env, stdout=self._output, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)

    def printed(self) -> str:
        """Everything the command printed so far."""
        self._output.flush()
        self._output.seek(0)
        return self._output.read()

    def printed_by_exit(self, timeout_s: float) -> str:
        """Waits up to ``timeout_s`` for the command to end (``subprocess.TimeoutExpired`` otherwise)."""
        self.wait(timeout_s)
        return self.printed()

    def wait_until(self, condition, timeout_s: float, what: str) -> None:
        """Polls ``condition()`` every 0.2 s; fails with the command's output if the command ends first,
        or if ``what`` has not happened within ``timeout_s``."""
        import time

        deadline = time.time() + timeout_s
        while not condition():
            assert self.poll() is None, f"ended (rc {self.returncode}) before {what}:\n{self.printed()[-3000:]}"
            assert time.time() < deadline, f"{what} did not happen within {timeout_s:g} s"
            time.sleep(0.2)

    def __exit__(self, *exc_info):
        kill_session(self.pid)
        return super().__exit__(*exc_info)


def kill_session(sid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL every process of the session ``sid`` until none is left alive, as a node's end (Slurm's
    cgroup kill) would. Not just the process group: Ray starts each worker in a group of its own, and
    a TrainController or a Train worker left alive goes on writing checkpoints into the run folder."""
    import signal
    import time

    deadline = time.time() + timeout_s
    while (alive := _session_members(sid)) and time.time() < deadline:
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    assert not alive, f"processes of session {sid} outlived SIGKILL for {timeout_s:g} s: {alive}"


def _session_members(sid: int) -> list[int]:
    """The live (not zombie) processes whose session is ``sid`` (Linux ``/proc/PID/stat``)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:                  # ended meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def run_then_sigkill(command: list[str], ready, timeout_s: float, what: str) -> str:
    """Run a CLI command in its own session (with its own local Ray) and SIGKILL the whole process
    group as soon as ``ready()`` holds; fails if the command exits first or ``what`` never happens.
    Returns what the command printed."""
    with LoggedProcess(command) as process:
        process.wait_until(ready, timeout_s, what)
    return process.printed()


@contextlib.contextmanager
def tmpfs(mount: Path, options: str):
    """A real tmpfs mounted at ``mount`` with ``options`` for the block (root only: skips loudly)."""
    mount.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"TMPFS MOUNT ABSENT: needs root to mount a tmpfs ({mounted.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)     # lazy: a Ray process may still hold a file
