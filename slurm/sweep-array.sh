#!/bin/bash
# sbatch --array=0-(T-1) [--gres=gpu:1 --cpus-per-task=C --mem=M ...] slurm/sweep-array.sh CONFIG [--set key=value ...]
#
# A sweep as one array task per planned trial (T trials: `allcluster sweep --config CONFIG --dry-run`
# lists them with their index). Task I runs `jobs/sweep.py --config CONFIG --trial-index I` on its own
# single-node Ray: one Ray Train run, no Ray Tune (so no ASHA), in the trial folder a Tune run would use.
# When every task has ended, write the tables and the best model (no Ray needed, rerunnable):
#   allcluster sweep --config CONFIG --collect
# or chain it: sbatch --dependency=afterany:<array job id> --wrap ".venv/bin/allcluster sweep --config CONFIG --collect"
# Each task requeues itself at its time limit (SIGUSR1 warning, as slurm/sweep.sh) and resumes its trial
# from the last epoch checkpoint.
#SBATCH --job-name=allcluster-sweep-array
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --output=allcluster-sweep-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
set -euo pipefail
if [ $# -lt 1 ] || [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "usage: sbatch --array=0-(T-1) [sbatch options] slurm/sweep-array.sh CONFIG [--set key=value ...]" >&2
  exit 2
fi
config=$1; shift
source "${ALLCLUSTER_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/ray-cluster.sh"
driver=(jobs/sweep.py --config "$config" --trial-index "$SLURM_ARRAY_TASK_ID" "$@")
ray_cluster_check "${driver[@]}"
ray_cluster_start
ray_cluster_run "${driver[@]}"
