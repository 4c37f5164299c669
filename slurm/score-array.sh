#!/bin/bash
# sbatch --array=0-7 [--gres=gpu:1 --cpus-per-task=C --mem=M ...] slurm/score-array.sh --model MODEL_DIR --input PATH --out OUT_DIR [--config CFG] [--set key=value ...]
#
# Overnight scoring as N independent one-node array tasks (busy GPU queues grant many one-GPU jobs long
# before one multi-node allocation): task K runs `jobs/score.py --shard K/N`, the files whose path hash
# falls in part K, into the SAME OUT_DIR as the other tasks (per-part locks; `allcluster report OUT_DIR`
# reads all parts as one result). N is SLURM_ARRAY_TASK_MAX + 1, so submit --array=0-(N-1); to rerun one
# task of an 8-part job alone: ALLCLUSTER_SHARDS=8 sbatch --array=3 slurm/score-array.sh ...
# Each task starts its own single-node Ray (the bootstrap of slurm/score.sh) and requeues itself at its
# time limit like slurm/score.sh; rerunning the whole array resumes every part.
#SBATCH --job-name=allcluster-score-array
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=allcluster-score-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail
if [ $# -lt 1 ] || [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "usage: sbatch --array=0-(N-1) [sbatch options] slurm/score-array.sh --model MODEL_DIR --input PATH --out OUT_DIR [--set key=value ...]" >&2
  exit 2
fi
# Without ALLCLUSTER_SHARDS the array itself must be 0..N-1: --array=1-8 would make N 9 and leave
# part 0's files without rows; --array=3 alone would run part 3 of 4 beside an 8-part job's tasks.
if [ -n "${ALLCLUSTER_SHARDS:-}" ]; then
  if ! [[ $ALLCLUSTER_SHARDS =~ ^[1-9][0-9]{0,5}$ ]] || [ "$SLURM_ARRAY_TASK_ID" -ge "$ALLCLUSTER_SHARDS" ]; then
    echo "score-array.sh: ALLCLUSTER_SHARDS=$ALLCLUSTER_SHARDS is not a number of parts above this task's index $SLURM_ARRAY_TASK_ID" >&2
    exit 2
  fi
  shards=$ALLCLUSTER_SHARDS
elif [ "${SLURM_ARRAY_TASK_MIN:-0}" != 0 ] || [ "${SLURM_ARRAY_TASK_COUNT:-$((SLURM_ARRAY_TASK_MAX + 1))}" != "$((SLURM_ARRAY_TASK_MAX + 1))" ]; then
  echo "score-array.sh: this array's tasks are ${SLURM_ARRAY_TASK_MIN:-?}..${SLURM_ARRAY_TASK_MAX} (${SLURM_ARRAY_TASK_COUNT:-?} of them): submit --array=0-(N-1) for an N-part job, or name N to run some of its parts: ALLCLUSTER_SHARDS=N sbatch --array=K[,K...] slurm/score-array.sh ..." >&2
  exit 2
else
  shards=$((SLURM_ARRAY_TASK_MAX + 1))
fi
source "${ALLCLUSTER_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/ray-cluster.sh"
driver=(jobs/score.py --shard "$SLURM_ARRAY_TASK_ID/$shards" "$@")
ray_cluster_check "${driver[@]}"
ray_cluster_start
ray_cluster_run "${driver[@]}"
