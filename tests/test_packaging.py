"""Packaging: what the code imports is what pyproject.toml declares; torch is a range, pinned by constraints."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

import pytest

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    """PEP 503 normalised distribution name of a requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def _imported_top_level_modules(folders=("allcluster", "jobs")) -> dict[str, str]:
    """Every absolute import's top-level module -> one file importing it (lazy imports included)."""
    found = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def test_every_imported_third_party_package_is_declared():
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        declared |= {_name(r) for r in extra}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, where in _imported_top_level_modules().items():
        # pip: the installer, which jobs/offline_wheels.py drives on a login node (not a runtime need)
        if module in sys.stdlib_module_names or module in ("allcluster", "jobs", "__future__", "pip"):
            continue
        provided_by = {_name(d) for d in distributions.get(module, [module])}
        if not provided_by & declared:
            missing[module] = (where, sorted(provided_by))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_torch_is_a_tested_range_and_constraints_pin_the_tested_builds():
    requirements = {_name(r): r for r in PYPROJECT["project"]["dependencies"]}
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    for package in ("torch", "torchvision"):
        assert "==" not in requirements[package] and "<" in requirements[package], requirements[package]
        installed = importlib.metadata.version(package).split("+")[0]
        assert pins[package] == installed, f"constraints.txt pins {package}=={pins[package]}, tested with {installed}"
    readme = (REPO / "README.md").read_text()
    assert "pip install -c constraints.txt" in readme
    assert '"-c", str(CONSTRAINTS)' in (REPO / "allcluster" / "_bootstrap.py").read_text()


def test_the_one_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    import pytest

    from allcluster.atomic import atomic_write, atomic_write_text

    target = atomic_write_text(tmp_path / "sub" / "table.json", "old")

    def half_then_fail(tmp):
        tmp.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["table.json"]


def test_the_one_atomic_write_puts_the_data_on_disk_before_the_rename_and_the_rename_before_it_returns(
        tmp_path, monkeypatch):
    """A node crash (no test can make one here; os.fsync and os.replace are watched) must leave the old
    file or the whole new one: the file's data are fsynced before the rename, its folder after."""
    import os as real_os

    from allcluster import atomic

    calls = []
    fsync, replace = real_os.fsync, real_os.replace

    def watched_fsync(fd):
        calls.append(("fsync", real_os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def watched_replace(src, dst):
        calls.append(("replace", str(dst)))
        return replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", watched_fsync)
    monkeypatch.setattr(atomic.os, "replace", watched_replace)
    target = atomic.atomic_write_text(tmp_path / "rows" / "part-1.parquet", "rows")
    assert [c for c, _ in calls] == ["fsync", "replace", "fsync"], calls
    assert calls[0][1].startswith(str(target.parent / ".part-1.parquet.")) and calls[0][1].endswith(".tmp")
    assert calls[1][1] == str(target) and calls[2][1] == str(target.parent)
    assert target.read_text() == "rows"


def test_the_one_atomic_write_tries_a_shared_filesystems_passing_error_again_but_not_a_full_disk(
        tmp_path, monkeypatch, capsys):
    """An NFS/Lustre server failing over answers EIO or ESTALE for a while (injected: os.replace fails):
    an overnight job must not end on it. A full disk is not retried, a lasting EIO ends the write."""
    import errno
    import os as real_os

    import pytest

    from allcluster import atomic

    monkeypatch.setattr(atomic, "PASSING_ERROR_WAITS_S", (0, 0, 0))
    replace, failures = real_os.replace, []

    def failing_replace(number: int, times: int):
        def fake(src, dst):
            if len(failures) < times:
                failures.append(number)
                raise OSError(number, real_os.strerror(number))
            return replace(src, dst)
        return fake

    monkeypatch.setattr(atomic.os, "replace", failing_replace(errno.ESTALE, 2))
    target = atomic.atomic_write_text(tmp_path / "summary.json", "{}")
    assert target.read_text() == "{}" and failures == [errno.ESTALE] * 2
    assert "Stale file handle; trying again" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"], "no temporary left by the failed tries"
    for number, times, calls in ((errno.EIO, 99, 4), (errno.ENOSPC, 99, 1)):
        failures.clear()
        monkeypatch.setattr(atomic.os, "replace", failing_replace(number, times))
        with pytest.raises(OSError) as failed:
            atomic.atomic_write_text(tmp_path / "summary.json", "new")
        assert failed.value.errno == number and len(failures) == calls
        assert target.read_text() == "{}"


def test_two_writers_of_one_file_with_the_same_pid_never_take_each_others_temporary(tmp_path):
    """Array tasks on two nodes (or in two PID namespaces) write the same job.json / base_config.yaml at
    once with equal pids: two real processes, each pid 1 in its own namespace (``unshare``), write one
    file 300 times each; no write may fail and the file is always one writer's whole text."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("UNSHARE ABSENT: needs root and util-linux's unshare for two PID namespaces")
    target = tmp_path / "job.json"
    writer = ("import os, sys; from allcluster.atomic import atomic_write_text\n"
              "assert os.getpid() == 1\n"
              "for _ in range(300): atomic_write_text(sys.argv[1], sys.argv[2] * 5000)\n")
    runs = [subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", writer, str(target), text],
                             cwd=REPO, stderr=subprocess.PIPE, text=True) for text in "AB"]
    for run in runs:
        assert run.wait(timeout=120) == 0, run.stderr.read()[-2000:]
    assert target.read_text() in ("A" * 5000, "B" * 5000)
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"], "a temporary file was left"


def test_no_module_writes_a_file_by_hand_through_a_temporary_and_a_rename():
    """Files and whole folders (the model directory, best_model, a cache build) are written atomically
    through allcluster/atomic.py only; the other renames move things aside (an experiment's old outputs,
    Ray Train's unreadable snapshot), they write nothing."""
    allowed = {"atomic.py": 4, "sweep/experiment.py": 2, "train/ray_train.py": 1}   # experiment: old outputs, a stale best_model
    found = {}
    for path in (REPO / "allcluster").rglob("*.py"):
        count = path.read_text().count("os.replace(")
        if count:
            found[str(path.relative_to(REPO / "allcluster"))] = count
    assert found == allowed, found


def test_xai_depends_only_on_models_and_train_tables_load_without_torch():
    imported = {}
    for path in (REPO / "allcluster" / "xai").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("allcluster"):
                imported.setdefault(node.module.split(".")[1] if "." in node.module else "", set()).add(path.name)
    assert set(imported) <= {"xai", "models"}, imported
    import subprocess
    done = subprocess.run([sys.executable, "-c", "import sys, allcluster.train.config, allcluster.config_registry; "
                           "print('torch' in sys.modules)"], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def _offline_wheels():
    import importlib.util
    spec = importlib.util.spec_from_file_location("offline_wheels", REPO / "jobs" / "offline_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_wheels_leave_out_the_nodes_torch_and_what_it_already_has(tmp_path):
    wheels = _offline_wheels()
    requirements = {_name(r) for r in wheels.project_requirements(["test"])}
    assert {"ray", "grad-cam", "lime", "pytest"} <= requirements and not {"torch", "torchvision"} & requirements
    have = tmp_path / "have.txt"
    have.write_text("# pip list --format=freeze\nNumPy==2.5.2\nscikit_learn==1.8.0\nmy-pkg @ file:///src/my-pkg\n"
                    "torch==2.11.0+cu130\nopencv-python-headless\n")
    present = wheels.read_have(str(have))
    assert present == {"numpy": "2.5.2", "scikit-learn": "1.8.0", "my-pkg": "", "torch": "2.11.0",
                       "opencv-python-headless": ""}
    kept = [n for n in ("torch", "nvidia-cublas", "triton", "numpy", "scikit-learn", "duckdb", "ray", "lime")
            if not wheels.left_out(n, present, {"duckdb"})]
    assert kept == ["ray", "lime"]
    tags = wheels.target_tags("3.12", "2.28")   # pip matches platform tags exactly: each glibc up to the node's
    platforms = {tags[i + 1] for i, t in enumerate(tags) if t == "--platform"}
    assert {"manylinux_2_18_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64"} <= platforms
    assert "manylinux_2_29_x86_64" not in platforms and tags[tags.index("--python-version") + 1] == "3.12"



def test_offline_wheels_add_what_the_nodes_python_needs_and_pip_judged_by_this_one():
    """pip evaluates dependencies' python_version markers with the Python running it (pypa/pip#11010)."""
    wheels = _offline_wheels()

    def entry(name, requires, extras=None):
        return {"metadata": {"name": name, "requires_dist": requires}, "requested_extras": extras}

    entries = [entry("A", ["tomli>=2; python_version < '3.11'", "B>=1", "C>=3; extra == 'x'",
                           "D<5; python_version >= '3.12'", "torch>=2.6", "E; extra == 'y'"], extras=["x"]),
               entry("B", ["numpy>=1.26"])]
    assert wheels.needed_for_target(entries, "3.12", {"numpy": "2.5.2"}, set()) == ["C>=3", "D<5"]
    assert wheels.needed_for_target(entries, "3.10", {}, {"numpy"}) == ["C>=3", "tomli>=2"]


def test_offline_wheels_refuse_a_folder_that_holds_wheels_already(tmp_path):
    wheels = _offline_wheels()
    (tmp_path / "old-1.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(SystemExit, match="holds wheels already"):
        wheels.main([str(tmp_path)])
    assert [p.name for p in tmp_path.iterdir()] == ["old-1.0-py3-none-any.whl"]

def test_a_slim_ray_wheel_drops_only_parts_allcluster_never_imports(tmp_path):
    import zipfile

    wheels = _offline_wheels()
    files = ["ray/__init__.py", "ray/tune/tuner.py", "ray/jars/ray_dist.jar", "ray/rllib/algo.py",
             "ray/serve/api.py", "ray/llm/x.py", "ray/data/read_api.py"]
    full, slim = tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl", tmp_path / "slim.whl"
    with zipfile.ZipFile(full, "w") as wheel:
        for name in files:
            wheel.writestr(name, name)
        wheel.writestr("ray-2.60.0.dist-info/RECORD", "".join(f"{n},sha256=x,{len(n)}\n" for n in files))
    wheels.slim_ray(full, slim)
    kept = ["ray/__init__.py", "ray/tune/tuner.py", "ray/data/read_api.py"]
    with zipfile.ZipFile(slim) as wheel:
        assert sorted(wheel.namelist()) == sorted([*kept, "ray-2.60.0.dist-info/RECORD"])
        record = wheel.read("ray-2.60.0.dist-info/RECORD").decode().splitlines()
        assert [line.split(",")[0] for line in record] == kept
        assert wheel.read("ray/tune/tuner.py") == b"ray/tune/tuner.py"
    dropped = tuple(d.rstrip("/").replace("/", ".") for d in wheels.SLIM_RAY_DROPS)
    imported = set()   # "from ray import serve" counts as ray.serve
    for folder in ("allcluster", "jobs", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    imported |= {f"{node.module}.{alias.name}" for alias in node.names}
    assert {m for m in imported if m.startswith(dropped)} == set(), "slim Ray would lack these"
    assert any(m.startswith("ray.tune") for m in imported), "the scan sees allcluster's Ray imports"


def test_bench_child_commands_see_the_checkout_and_keep_the_callers_pythonpath(monkeypatch):
    """An offline install's site folder on PYTHONPATH (jobs/gpu_acceptance.sh WHEELS) reaches the
    bench's reference loops and scoring commands."""
    import os

    from allcluster.bench.common import child_env

    monkeypatch.setenv("PYTHONPATH", "/opt/site-gpu")
    assert child_env(RAY_ADDRESS="")["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/opt/site-gpu"]
    monkeypatch.delenv("PYTHONPATH")
    assert child_env()["PYTHONPATH"] == str(REPO)


def test_the_gpu_acceptance_refuses_without_wheels_or_cuda_and_writes_nothing(tmp_path):
    """Refused before anything is made: no OUT, no .venv-gpu or .site-gpu in the checkout; relative
    paths are the caller's (the command run from another folder)."""
    import os
    import subprocess

    import torch

    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    made_by_script = [REPO / ".venv-gpu", REPO / ".site-gpu"]
    before = [p.exists() for p in made_by_script]
    (tmp_path / "wheels").mkdir()
    script = str(REPO / "jobs" / "gpu_acceptance.sh")
    no_wheels = subprocess.run(["bash", script, "out", "wheels"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert no_wheels.returncode == 2 and f"no wheels in {tmp_path / 'wheels'} " in no_wheels.stderr, no_wheels.stderr
    if not torch.cuda.is_available():
        no_cuda = subprocess.run(["bash", script, "out"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert no_cuda.returncode == 2 and "sees no CUDA device" in no_cuda.stderr, no_cuda.stderr
    assert not (tmp_path / "out").exists() and [p.exists() for p in made_by_script] == before


def test_the_readmes_error_table_says_which_errors_a_rerun_retries_as_the_code_does():
    """README's error-type table (users plan reruns by it) against ``TRANSIENT_ERRORS``."""
    from allcluster.data.decode import TRANSIENT_ERRORS

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index('<a id="error-types"></a>'):].split("\n\n")[1]
    kinds = {}
    for line in table.splitlines()[2:]:
        names, kind = line.split("|")[1:3]
        for name in re.findall(r"`([a-z_]+)`", names):
            kinds[name] = kind.strip()
    assert {n for n, k in kinds.items() if k == "transient"} == set(TRANSIENT_ERRORS)
    assert {k for k in kinds.values()} == {"transient", "deterministic"}
