"""The GPUs a Slurm job holds on each of its nodes, from ``scontrol show job -d``.

``slurm/ray-cluster.sh`` starts one Ray node per Slurm node, each in a one-node ``srun`` step that
must ask for that node's GPUs itself: the batch shell's ``SLURM_GPUS_ON_NODE`` counts the first
node only, and a ``--gpus=K`` job (the job's total) may be split unevenly (3 on 2 nodes: 2 + 1).

    scontrol show job -d "$SLURM_JOB_ID" | python -m allcluster.slurm_alloc step-gpus "$SLURM_JOB_ID"

prints ``NODE OPTION`` per node that holds GPUs (``n1 --gpus=2``), with the option a step there
needs. Formats read (a line per group of nodes with the same allocation):

    Nodes=n[1-2] CPU_IDs=0-7 Mem=500 GRES=gpu:a100:2(IDX:0-1)     Slurm >= 21.08
    Nodes=gpu05 CPU_IDs=2-3 Mem=0 GRES_IDX=gpu(IDX:1-4)            older: the count is the IDX list's
    Nodes=n1 CPU_IDs=0 Mem=0 GRES=gpu(CNT:2)                       GPUs without device files
"""
from __future__ import annotations

import re
import subprocess
import sys
from typing import Callable

_NODE_LINE = re.compile(r"^\s*Nodes=(\S+)\s.*?\bGRES(?:_IDX)?=(\S*)", re.M)
# the job's request: TresPerJob=gres:gpu:3 (--gpus), TresPerNode=gres/gpu:a100:2 (--gres, --gpus-per-node),
# TresPerTask=..., or Gres=gpu:2 (older Slurm)
_REQUEST = re.compile(r"(?:^|\s)(TresPer\w+|Gres)=(\S+)", re.M)


class NoGpusFound(ValueError):
    """The job asked for GPUs, but no node line of ``scontrol show job -d`` names any."""


def _record(text: str, job_id: str) -> str:
    """The record of ``job_id``: for an array's first task (its JobId is the ArrayJobId) scontrol
    prints every task of the array, blank-line separated, and other tasks may share its nodes."""
    for record in re.split(r"\n\s*\n", text):
        if re.match(rf"\s*JobId={re.escape(job_id)}\s", record):
            return record
    return text


def _items(gres: str) -> list[str]:
    """``nic:1,gpu:a100:1(IDX:0,2),gpu:v100:1(IDX:1)`` -> its items (IDX lists hold commas too)."""
    return [item for item in re.findall(r"[^,(]+(?:\([^)]*\))?", gres) if item]


def _index_count(idx: str) -> int:
    """``0,2-3`` -> 3."""
    count = 0
    for part in filter(None, idx.split(",")):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def gpus_in(gres: str) -> dict[str, int]:
    """GPUs per type ('' untyped) in a GRES field: a node line's (``gpu:a100:2(IDX:0-1)``) or
    sinfo's ``%G`` (``gpu:2(S:0-1),nic:1``, ``(null)``)."""
    held: dict[str, int] = {}
    for item in _items(gres):
        head, _, rest = item.partition("(")
        name, *fields = head.split(":")
        if name != "gpu":
            continue
        count = int(fields.pop()) if fields and fields[-1].isdigit() else 0
        if rest.startswith("IDX:"):
            count = _index_count(rest[len("IDX:"):].rstrip(")"))
        elif rest.startswith("CNT:"):
            count = int(rest[len("CNT:"):].rstrip(")"))
        if count:
            kind = fields[0] if fields else ""
            held[kind] = held.get(kind, 0) + count
    return held


def _request(job_text: str) -> tuple[bool, bool, bool]:
    """(the job asked for GPUs, by type, with --gpus=K: a job total)."""
    asked = typed = per_job = False
    for field, value in _REQUEST.findall(job_text):
        for entry in value.split(","):
            parts = re.split(r"[:=]", re.sub(r"^gres[:/]", "", entry))    # gpu:2, gres/gpu=2 (per-task TRES)
            if parts[0] != "gpu":
                continue
            asked = True
            typed |= len(parts) >= 3 and not parts[1].isdigit()
            per_job |= field == "TresPerJob"
    return asked, typed, per_job


def step_gpu_options(job_text: str, expand: Callable[[str], list[str]], job_id: str = "") -> dict[str, str]:
    """Per node that holds GPUs of job ``job_id``, the ``srun`` option that gives a one-node step
    there exactly those GPUs. ``expand`` turns a Slurm host list (``n[1-2]``) into names. Raises
    :class:`NoGpusFound` when the job asked for GPUs but no node line names any (a format this does
    not read: the steps would fail, or run without GPUs).

    Slurm 22.05, seen on the local cluster's fake GPUs: a step names GPU types only where the job's
    request did ("Step requested GRES (gpu:TYPE) not found in the job"), and in a ``--gpus=K`` job only
    ``--gpus`` creates a step (``--gres=gpu:2`` there: "Invalid generic resource (gres) specification");
    ``--gres`` serves every other job, and Slurm versions before ``--gpus`` existed (19.05)."""
    job_text = _record(job_text, job_id) if job_id else job_text
    asked, typed, per_job = _request(job_text)
    options = {}
    for nodes, gres in _NODE_LINE.findall(job_text):
        held = gpus_in(gres)
        if not held:
            continue
        if not typed:
            held = {"": sum(held.values())}
        kinds = [f"{kind}:{count}" if kind else str(count) for kind, count in held.items()]
        option = "--gpus=" + ",".join(kinds) if per_job else "--gres=" + ",".join(f"gpu:{k}" for k in kinds)
        for node in expand(nodes):
            options[node] = option
    if asked and not options:
        raise NoGpusFound("the job asked for GPUs, but no 'Nodes=... GRES=gpu...' line of "
                          "`scontrol show job -d` names any")
    return options


def _expand(hostlist: str) -> list[str]:
    done = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, check=True)
    return done.stdout.split()


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "step-gpus":
        print("usage: scontrol show job -d JOB | python -m allcluster.slurm_alloc step-gpus JOB", file=sys.stderr)
        return 2
    text = sys.stdin.read()
    try:
        options = step_gpu_options(text, _expand, argv[1])
    except NoGpusFound as err:
        print(f"slurm_alloc: job {argv[1]}: {err}:\n{text}", file=sys.stderr)
        return 1
    for node, option in options.items():
        print(node, option)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
