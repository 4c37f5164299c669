#!/bin/bash
# sbatch [--nodes=N --gres=gpu:K --cpus-per-task=C --mem=M ...] slurm/score.sh --model MODEL_DIR --input PATH --out OUT_DIR [--config CFG] [--set key=value ...]
#
# Overnight scoring across the job's nodes: the same Ray-on-Slurm bootstrap as slurm/sweep.sh (Ray head
# on the first node, one Ray worker per other node), then jobs/score.py on the first node. Each node's
# GPUs each get one model replica; the decode tasks use the CPUs. MODEL_DIR, PATH and OUT_DIR must be on
# a shared filesystem. Rerunning the same command after a kill or a time limit resumes: files that
# already have a row are skipped. Defaults below are overridable on the sbatch command line.
#SBATCH --job-name=allcluster-score
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one Ray node per Slurm node
#SBATCH --cpus-per-task=8            # decode tasks + CPU model replicas
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=allcluster-score-%j.out
#SBATCH --open-mode=append           # one log across requeues (each start prints "restart N of job J")
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
# Time limit / preemption: SIGUSR1 to the batch shell 300 s before the end (Slurm may send it up to
# 60 s earlier): the driver writes the rows it has and exits 75, the job requeues itself and the
# requeued run resumes (rows already written are kept). Override: sbatch --signal=B:USR1@600 ...
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch [sbatch options] slurm/score.sh --model MODEL_DIR --input PATH --out OUT_DIR [--set key=value ...]" >&2
  exit 2
fi
source "${ALLCLUSTER_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/ray-cluster.sh"
driver=(jobs/score.py "$@")
ray_cluster_check "${driver[@]}"
ray_cluster_start
ray_cluster_run "${driver[@]}"
