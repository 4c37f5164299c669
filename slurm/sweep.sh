#!/bin/bash
# sbatch [--nodes=N --gres=gpu:K --cpus-per-task=C --mem=M ...] slurm/sweep.sh CONFIG [--set key=value ...]
#
# A Ray Tune sweep across the job's nodes: Ray head on the first node, one Ray worker per other node,
# then jobs/sweep.py on the first node. Submit from the allcluster repository root (or set
# ALLCLUSTER_HOME), with the project installed in .venv there (or ALLCLUSTER_PYTHON), on a shared
# filesystem. The sweep's experiment_dir must be on a shared filesystem too. Rerunning the same
# command continues the sweep (finished trials are kept, interrupted ones resume).
# Defaults below are overridable on the sbatch command line (command-line options win).
#SBATCH --job-name=allcluster-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one Ray node per Slurm node; Ray schedules trials inside it
#SBATCH --cpus-per-task=8            # CPUs per node handed to Ray (decode, loaders, CPU trials)
#SBATCH --mem=32G                    # per node; Ray gets 70% as task memory, 20% as object store
#SBATCH --time=24:00:00
#SBATCH --output=allcluster-sweep-%j.out
#SBATCH --open-mode=append           # one log across requeues (each start prints "restart N of job J")
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
# Time limit / preemption: SIGUSR1 to the batch shell 900 s before the end (Slurm may send it up to
# 60 s earlier): running trials stop at their last epoch checkpoint, the tables are written, the
# driver exits 75, the job requeues itself and the requeued run resumes every unfinished trial.
# Give it more than one epoch of your largest trial: sbatch --signal=B:USR1@1800 ...
# GPUs: add --gres=gpu:K (per node) or --gpus=K (in all) on the command line; each node's Ray gets the GPUs
# Slurm granted on that node.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch [sbatch options] slurm/sweep.sh CONFIG [--set key=value ...]" >&2
  exit 2
fi
config=$1; shift
source "${ALLCLUSTER_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/ray-cluster.sh"
driver=(jobs/sweep.py --config "$config" "$@")
ray_cluster_check "${driver[@]}"
ray_cluster_start
ray_cluster_run "${driver[@]}"
