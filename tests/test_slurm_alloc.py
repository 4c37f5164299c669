"""Which GPUs a Slurm job holds per node, read from `scontrol show job -d` as Slurm prints it
(hand-made copies of its lines; the real thing runs in tests/test_slurm.py on the local cluster)."""
from __future__ import annotations

import pytest

from allcluster.slurm_alloc import NoGpusFound, step_gpu_options


def expand(hostlist: str) -> list[str]:
    """`scontrol show hostnames` for the lists below: n[1-2] -> n1 n2."""
    return {"n[1-2]": ["n1", "n2"], "g[01-02]": ["g01", "g02"], "n[1-3,5]": ["n1", "n2", "n3", "n5"]}.get(
        hostlist, [hostlist])


@pytest.mark.parametrize("job, expected", [
    # sbatch -N2 --gpus=3 on typed nodes (Slurm 22.05's own lines): split 2 + 1, asked untyped, so
    # the steps name no type, and a --gpus job's steps need --gpus
    ("   NumNodes=2 NumCPUs=2 NumTasks=2 CPUs/Task=1 ReqB:S:C:T=0:0:*:*\n   JOB_GRES=gpu:fake:3\n"
     "     Nodes=n1 CPU_IDs=0 Mem=500 GRES=gpu:fake:2(IDX:0-1)\n     Nodes=n2 CPU_IDs=0 Mem=500 GRES=gpu:fake:1(IDX:0)\n"
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
    ("     Nodes=n[1-3,5] CPU_IDs=0 Mem=0 GRES=gpu(IDX:0-7)\n   TresPerNode=gpu:8",      # 20.11: no count
     {n: "--gres=gpu:8" for n in ("n1", "n2", "n3", "n5")}),
    ("     Nodes=n1 CPU_IDs=0 Mem=0 GRES=gpu(CNT:2)\n   TresPerTask=gres/gpu:2", {"n1": "--gres=gpu:2"}),  # no device files
    ("   Nodes=n[1-2] CPU_IDs=0 Mem=500 GRES=\n   TresPerNode=gres:nic:1", {}),     # no GPUs: steps ask for none
    ("     Nodes=node-63 CPU_IDs=22-23 Mem=1000 GRES_IDX=\n", {}),
], ids=["gpus-3-split", "gpus-typed", "gres-typed-range", "two-types", "per-node-untyped", "old-gres-idx",
        "20.11-idx-only", "cnt", "nic-only", "old-none"])
def test_each_nodes_step_asks_for_the_gpus_the_job_holds_there(job, expected):
    assert step_gpu_options(job, expand) == expected


ARRAY = """JobId=700 ArrayJobId=700 ArrayTaskId=0 JobName=score-array
   Comment=TresPerJob=gres:gpu:9
     Nodes=n1 CPU_IDs=0 Mem=500 GRES=gpu:2(IDX:0-1)
   TresPerNode=gres:gpu:2

JobId=701 ArrayJobId=700 ArrayTaskId=1 JobName=score-array
     Nodes=n1 CPU_IDs=1 Mem=500 GRES=gpu:1(IDX:2)
   TresPerNode=gres:gpu:1
"""


def test_an_array_task_reads_its_own_record_where_scontrol_prints_the_whole_array():
    """`scontrol show job -d <ArrayJobId>` (the first task's SLURM_JOB_ID) prints every task; another
    task on the same node must not stand for this one. A Comment= that reads like a request is not one."""
    assert step_gpu_options(ARRAY, expand, "700") == {"n1": "--gres=gpu:2"}
    assert step_gpu_options(ARRAY, expand, "701") == {"n1": "--gres=gpu:1"}


@pytest.mark.parametrize("request_line", ["TresPerJob=gres:gpu:2", "TresPerTask=cpu=4,gres/gpu=1"])
def test_a_job_that_asked_for_gpus_but_shows_none_per_node_is_refused(request_line):
    """A node-line format this does not read would leave the steps without GPUs (or failing): said."""
    with pytest.raises(NoGpusFound, match="asked for GPUs"):
        step_gpu_options(f"   Nodes=n1 CPU_IDs=0 Mem=0 GRES=gpu~2\n   {request_line}", expand)
