#!/usr/bin/env python3
"""Build a folder of wheels that installs allcluster on a node with no internet (GPU compute nodes of
hospital clusters have none), on a machine that reaches the package registries (a login node).

    python3 jobs/offline_wheels.py WHEELS [--python-version 3.12] [--have HAVE.txt] [--skip duckdb]
                                          [--extras test] [--slim-ray]

The node's own torch and torchvision are never fetched (pyproject.toml declares them as ranges so a
site CUDA build satisfies them), nor CUDA/Triton wheels. ``--have`` names what the node already has,
one ``name`` or ``name==version`` per line, as ``python3 -m pip list --format=freeze`` on the node
writes it: those are left out too. Packages published only as source (grad-cam, lime) are built here
as pure-Python wheels. ``--slim-ray`` leaves out the parts of Ray that allcluster never imports (its
Java jars, RLlib, Serve and the LLM library): the wheel shrinks from about 79 MB to about 45 MB, for
transfers that limit size. On the node, with its Python (``jobs/gpu_acceptance.sh OUT WHEELS`` does it):

    python3 -m pip install --no-index --no-deps --target SITE WHEELS/*.whl && export PYTHONPATH=SITE

Standard library only (runs under the machine's python3, before anything is installed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE_OWN = ("torch", "torchvision")            # the node's build, never replaced
NODE_OWN_PREFIXES = ("nvidia-", "cuda-", "triton")
SLIM_RAY_DROPS = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64")
MISSING = re.compile(r"No matching distribution found for (\S+)")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(extras: list[str]) -> list[str]:
    """pyproject.toml's dependencies and the named extras, without the node's own torch builds."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    return [r for r in wanted if normalized(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) not in NODE_OWN]


def target_tags(python_version: str) -> list[str]:
    tags = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]
    for platform in PLATFORMS:
        tags += ["--platform", platform]
    return tags


def resolve(requirements: list[str], python_version: str, built: Path) -> list[dict]:
    """pip's resolution for the target Python (nothing installed): one report entry per package.
    A requirement with no wheel is built here as a pure-Python wheel and the resolution retried."""
    report = built / "report.json"
    for _ in range(10):
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                               "--report", str(report), "--target", str(built / "unused"), "--find-links", str(built),
                               *target_tags(python_version), *requirements], capture_output=True, text=True)
        if done.returncode == 0:
            return json.loads(report.read_text())["install"]
        missing = MISSING.search(done.stderr)
        if not missing:
            sys.exit(f"pip could not resolve the requirements for Python {python_version}:\n{done.stderr[-2000:]}")
        build_pure_wheel(missing.group(1), built)
    sys.exit("too many requirements without wheels")


def build_pure_wheel(requirement: str, built: Path) -> None:
    print(f"[wheels] building {requirement} (published as source only)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(built), requirement], check=True)
    impure = [w.name for w in built.glob("*.whl") if not w.name.endswith("-none-any.whl")]
    if impure:
        sys.exit(f"{requirement}: its wheel is not pure Python ({impure}); build it on a machine like the node")


def fetch(entry: dict, folder: Path) -> Path:
    """Download one resolved wheel into ``folder``, its sha256 checked against the index's."""
    url = entry["download_info"]["url"]
    target = folder / url.rsplit("/", 1)[-1]
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    with urllib.request.urlopen(url) as response, open(target, "wb") as f:
        shutil.copyfileobj(response, f)
    expected = entry["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
    if expected and hashlib.sha256(target.read_bytes()).hexdigest() != expected:
        sys.exit(f"{url}: sha256 differs from the index's")
    return target


def slim_ray(wheel: Path, slim: Path) -> None:
    """Write Ray's ``wheel`` to ``slim`` without :data:`SLIM_RAY_DROPS`, its RECORD rewritten to match."""
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if item.filename.startswith(SLIM_RAY_DROPS):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(line + "\n" for line in data.decode().splitlines()
                               if not line.startswith(SLIM_RAY_DROPS)).encode()
            target.writestr(item, data)


def have_names(path: str | None) -> set[str]:
    if not path:
        return set()
    lines = (line.split("==")[0].split(" @ ")[0].strip() for line in Path(path).read_text().splitlines())
    return {normalized(name) for name in lines if name and not name.startswith("#")}


def left_out(name: str, have: set[str], skip: set[str]) -> bool:
    return name in NODE_OWN or name.startswith(NODE_OWN_PREFIXES) or name in have or name in skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for the wheels (created)")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the node's Python, e.g. 3.12 (default: this one's)")
    parser.add_argument("--have", help="packages the node already has, left out by name "
                                       "(pip list --format=freeze there)")
    parser.add_argument("--skip", nargs="*", default=[], help="more packages to leave out, e.g. duckdb")
    parser.add_argument("--extras", nargs="*", default=["test"], help="pyproject extras to include")
    parser.add_argument("--slim-ray", action="store_true", help="leave Ray's jars, RLlib, Serve and LLM out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    have, skip = have_names(args.have), {normalized(s) for s in args.skip}
    with tempfile.TemporaryDirectory(prefix="allcluster-wheels-") as tmp:
        entries = resolve(project_requirements(args.extras), args.python_version, Path(tmp))
        kept = [e for e in entries if not left_out(normalized(e["metadata"]["name"]), have, skip)]
        for entry in kept:
            wheel = fetch(entry, Path(tmp))
            if args.slim_ray and normalized(entry["metadata"]["name"]) == "ray":
                slim_ray(wheel, out / wheel.name)
            else:
                shutil.copyfile(wheel, out / wheel.name)
    size = sum(w.stat().st_size for w in out.glob("*.whl"))
    print(f"[wheels] {len(kept)} of {len(entries)} packages for Python {args.python_version} in {out} "
          f"({size / 1e6:.1f} MB); on the node: python3 -m pip install --no-index --no-deps --target SITE "
          f"{out}/*.whl && export PYTHONPATH=SITE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
