#!/usr/bin/env python3
"""Build a folder of wheels that installs allcluster on a node with no internet (GPU compute nodes of
hospital clusters have none), on a machine that reaches the package registries (a login node).

    python3 jobs/offline_wheels.py WHEELS [--python-version 3.12] [--glibc 2.28] [--have HAVE.txt]
                                          [--skip duckdb] [--extras test] [--slim-ray]

The node's own torch and torchvision are never fetched (pyproject.toml declares them as ranges so a
site CUDA build satisfies them), nor CUDA/Triton wheels. ``--have`` names what the node already has,
one ``name`` or ``name==version`` per line, as ``python3 -m pip list --format=freeze`` on the node
writes it: those are left out too, and the versions it names constrain the resolution (the fetched
wheels must work beside them). Packages published only as source (grad-cam, lime) are built here
as pure-Python wheels. ``--slim-ray`` leaves out the parts of Ray that allcluster never imports (its
Java jars, RLlib, Serve and the LLM library): the wheel shrinks from about 79 MB to about 44 MB, for
transfers that limit size. On the node, with its Python (``jobs/gpu_acceptance.sh OUT WHEELS`` does it):

    python3 -m pip install --no-index --no-deps --target SITE WHEELS/*.whl && export PYTHONPATH=SITE

Standard library and pip >= 22.2 only (runs under the login node's python3, 3.8 or newer). pip judges
dependencies' ``python_version`` markers by the Python running it, not by ``--python-version``
(pypa/pip#11010), so the resolution's packages are checked again for the node's Python and any
dependency pip left out that way is added.
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
import urllib.request
import zipfile
from pathlib import Path
from typing import NamedTuple

try:
    import tomllib
except ImportError:             # Python < 3.11 on the login node: pip's vendored copy
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
NODE_OWN = ("torch", "torchvision")            # the node's build, never replaced
NODE_OWN_PREFIXES = ("nvidia-", "cuda-", "triton")
SLIM_RAY_DROPS = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")
LEGACY_PLATFORMS = ("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
MISSING = re.compile(r"No matching distribution found for ([^\s;]+)")


class Node(NamedTuple):
    """The machine the wheels are for: its Python (``3.12``) and glibc (``2.28``)."""
    python: str
    glibc: str


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(extras: list[str]) -> list[str]:
    """pyproject.toml's dependencies and the named extras, without the node's own torch builds."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    return [r for r in wanted if normalized(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) not in NODE_OWN]


def target_tags(python_version: str, glibc: str) -> list[str]:
    """pip's options for the node: its Python, CPython, wheels only, every manylinux tag its glibc runs
    (pip matches platform tags exactly, so each ``manylinux_2_N`` up to the node's is named)."""
    tags = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]
    newest = int(glibc.split(".")[1])
    for platform in [*(f"manylinux_2_{n}_x86_64" for n in range(newest, 4, -1)), *LEGACY_PLATFORMS]:
        tags += ["--platform", platform]
    return tags


def resolve(requirements: list[str], node: Node, work: Path, constraints: Path | None = None) -> list[dict]:
    """pip's resolution for the target Python (nothing installed): one report entry per package.
    A requirement with no wheel is built here as a pure-Python wheel and the resolution retried."""
    report = work / "report.json"
    pinned = ["-c", str(constraints)] if constraints else []
    for _ in range(10):
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                               "--report", str(report), "--target", str(work / "unused"), "--find-links", str(work),
                               *pinned, *target_tags(node.python, node.glibc), *requirements],
                              capture_output=True, text=True)
        if done.returncode == 0:
            return json.loads(report.read_text())["install"]
        missing = MISSING.search(done.stderr)
        if not missing:
            hint = (" with the node's versions (--have) as constraints: a package the node has in a version that "
                    "does not fit; delete its line from the --have file to fetch another") if constraints else ""
            sys.exit(f"pip could not resolve the requirements for Python {node.python}{hint}:\n"
                     f"{done.stderr[-2000:]}")
        if left_out(normalized(re.split(r"[<>=!~\[ ]", missing.group(1))[0]), {}, set()):
            sys.exit(f"PyPI has no wheel of {missing.group(1)} (a need of torch, which the node has and is not "
                     f"fetched) for Python {node.python} and glibc {node.glibc}; pip must still see it to resolve "
                     "torch's needs: give the node's glibc with --glibc")
        build_pure_wheel(missing.group(1), work)
    sys.exit("too many requirements without wheels")


def needed_for_target(entries: list[dict], python_version: str, have: dict[str, str], skip: set[str]) -> list[str]:
    """Requirements of the resolved packages that hold for the node's Python but are not resolved
    (pip judged their markers by this Python: pypa/pip#11010), as ``name<specifier>``."""
    from pip._vendor.packaging.requirements import Requirement

    major_minor = ".".join(python_version.split(".")[:2])
    target = {"python_version": major_minor, "python_full_version": f"{major_minor}.0"}
    resolved = {normalized(e["metadata"]["name"]) for e in entries}
    needed = {}
    for entry in entries:
        for line in entry["metadata"].get("requires_dist") or []:
            requirement = Requirement(line)
            name = normalized(requirement.name)
            if name in resolved or left_out(name, have, skip):
                continue
            extras = entry.get("requested_extras") or [""]
            if requirement.marker is None or any(requirement.marker.evaluate({**target, "extra": e}) for e in extras):
                needed[name] = f"{requirement.name}{requirement.specifier}"
    return sorted(needed.values())


def resolve_for_node(requirements: list[str], node: Node, have: dict[str, str], skip: set[str],
                     work: Path) -> list[dict]:
    """:func:`resolve`, then again with the node's versions of the resolved packages as constraints
    (the fetched wheels must work beside them; torch's own family is not fetched, so not pinned),
    adding what :func:`needed_for_target` finds."""
    entries, pinned = resolve(requirements, node, work), {}
    for _ in range(5):
        resolved = {normalized(e["metadata"]["name"]) for e in entries}
        pins = {name: version for name, version in have.items()
                if version and name in resolved and not left_out(name, {}, set())}
        extra = needed_for_target(entries, node.python, have, skip)
        if pins == pinned and not extra:
            return entries
        pinned, requirements = pins, [*requirements, *extra]
        constraints = work / "node-versions.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
        entries = resolve(requirements, node, work, constraints)
    sys.exit("the resolution for the node's Python and versions did not settle in 5 rounds")


def build_pure_wheel(requirement: str, built: Path) -> None:
    print(f"[wheels] building {requirement} (published as source only)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(built), requirement], check=True)
    impure = [w.name for w in built.glob("*.whl") if not w.name.endswith("-none-any.whl")]
    if impure:
        sys.exit(f"{requirement}: PyPI has no wheel of it for the node's Python, and built here it is not pure "
                 f"Python ({impure}): build it on a machine like the node")


def fetch(entry: dict, folder: Path) -> Path:
    """Download one resolved wheel into ``folder``, its sha256 checked against the index's."""
    url = entry["download_info"]["url"]
    target = folder / url.rsplit("/", 1)[-1]
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    with urllib.request.urlopen(url) as response, open(target, "wb") as f:
        shutil.copyfileobj(response, f)
    archive = entry["download_info"].get("archive_info", {})
    expected = archive.get("hashes", {}).get("sha256") or archive.get("hash", "").partition("sha256=")[2]
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


def read_have(path: str | None) -> dict[str, str]:
    """The node's packages from ``pip list --format=freeze`` there: name -> public version ("" if none
    given: a bare name, or ``name @ url``); ``1.2+cu124`` counts as 1.2."""
    have = {}
    for line in Path(path).read_text().splitlines() if path else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, version = line.split(" @ ")[0].partition("==")
        have[normalized(name.strip())] = version.split("+")[0].strip()
    return have


def left_out(name: str, have: dict[str, str] | set[str], skip: set[str]) -> bool:
    return name in NODE_OWN or name.startswith(NODE_OWN_PREFIXES) or name in have or name in skip


def check_pip() -> None:
    import pip

    if tuple(map(int, re.match(r"(\d+)\.(\d+)", pip.__version__).groups())) < (22, 2):
        sys.exit(f"pip {pip.__version__} is too old for this script (--dry-run --report): "
                 f"{sys.executable} -m pip install --user --upgrade pip")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for the wheels (created)")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the node's Python, e.g. 3.12 (default: this one's)")
    parser.add_argument("--glibc", default="2.28", help="the node's glibc (ldd --version there); default 2.28, "
                                                         "RHEL 8's: wheels for a newer one would not load")
    parser.add_argument("--have", help="packages the node already has (pip list --format=freeze there): left "
                                       "out, their versions constraints of the resolution")
    parser.add_argument("--skip", nargs="*", default=[], help="more packages to leave out, e.g. duckdb")
    parser.add_argument("--extras", nargs="*", default=["test"], help="pyproject extras to include")
    parser.add_argument("--slim-ray", action="store_true", help="leave Ray's jars, RLlib, Serve and LLM out")
    args = parser.parse_args(argv)
    check_pip()
    out = Path(args.out)
    if list(out.glob("*.whl")):
        sys.exit(f"{out} holds wheels already: give an empty or new folder (two versions of one package "
                 "would stop the install)")
    out.mkdir(parents=True, exist_ok=True)
    have, skip = read_have(args.have), {normalized(s) for s in args.skip}
    with tempfile.TemporaryDirectory(prefix="allcluster-wheels-") as tmp:
        node = Node(args.python_version, args.glibc)
        entries = resolve_for_node(project_requirements(args.extras), node, have, skip, Path(tmp))
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
