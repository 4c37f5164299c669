"""Which GPUs a Slurm job holds per node, read from `scontrol show job -d` as Slurm prints it
(hand-made copies of its lines; the real thing runs in tests/test_slurm.py on the local cluster)."""
from __future__ import annotations

import pytest

from allcluster.slurm_alloc import step_gpu_options


def expand(hostlist: str) -> list[str]:
    """`scontrol show hostnames` for the lists below: n[1-2] -> n1 n2."""
    return {"n[1-2]": ["n1", "n2"], "g[01-02]": ["g01", "g02"]}.get(hostlist, [hostlist])


@pytest.mark.parametrize("job, expected", [
    # sbatch -N2 --gpus=3 on typed nodes (Slurm 22.05's own lines): split 2 + 1, asked untyped, so
    # the steps name no type, and a --gpus job's steps need --gpus
    ("   Nodes=n1 CPU_IDs=0 Mem=500 GRES=gpu:fake:2(IDX:0-1)\n   Nodes=n2 CPU_IDs=0 Mem=500 GRES=gpu:fake:1(IDX:0)\n"
     "   TresPerJob=gres:gpu:3", {"n1": "--gpus=2", "n2": "--gpus=1"}),
    ("   Nodes=n1 CPU_IDs=0 Mem=500 GRES=gpu:fake:2(IDX:0-1)\n   TresPerJob=gres:gpu:fake:2",
     {"n1": "--gpus=fake:2"}),
    # --gres=gpu:a100:2 on a node range, device indexes with a comma; Slurm 23's "gres/gpu" spelling
    ("   Nodes=g[01-02] CPU_IDs=0-7 Mem=0 GRES=gpu:a100:2(IDX:0,2)\n   TresPerNode=gres/gpu:a100:2",
     {"g01": "--gres=gpu:a100:2", "g02": "--gres=gpu:a100:2"}),
    # two GPU types on one node, asked by type; another GRES beside them
    ("   Nodes=n1 CPU_IDs=0 Mem=0 GRES=nic:1,gpu:a100:1(IDX:0),gpu:v100:1(IDX:1)\n"
     "   TresPerNode=gres:gpu:a100:1,gres:gpu:v100:1", {"n1": "--gres=gpu:a100:1,gpu:v100:1"}),
    # --gpus-per-node=2 on typed nodes: untyped request, the node's types summed
    ("   Nodes=n1 CPU_IDs=0 Mem=0 GRES=nic:1,gpu:a100:1(IDX:0),gpu:v100:1(IDX:1)\n   TresPerNode=gres:gpu:2",
     {"n1": "--gres=gpu:2"}),
    # older Slurm: GRES_IDX with no count (the IDX list is it), the request as Gres=
    ("     Nodes=gpu05 CPU_IDs=2-3 Mem=0 GRES_IDX=gpu(IDX:1-4)\n   Gres=gpu:4 Reservation=(null)", {"gpu05": "--gres=gpu:4"}),
    ("   Nodes=n[1-2] CPU_IDs=0 Mem=500 GRES=\n   TresPerNode=gres:nic:1", {}),     # no GPUs: steps ask for none
    ("     Nodes=node-63 CPU_IDs=22-23 Mem=1000 GRES_IDX=\n", {}),
], ids=["gpus-3-split", "gpus-typed", "gres-typed-range", "two-types", "per-node-untyped", "old-gres-idx",
        "nic-only", "old-none"])
def test_each_nodes_step_asks_for_the_gpus_the_job_holds_there(job, expected):
    assert step_gpu_options(job, expand) == expected
