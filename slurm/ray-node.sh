# One Ray node inside a Slurm step (started by ray-cluster.sh; not run by hand).
#   bash slurm/ray-node.sh head|worker NODE_ADDRESS
# Reads what Slurm granted to this step on this node and hands exactly that to `ray start`.
set -euo pipefail
role=$1 node_ip=$2
ray_bin=$(dirname "$ALLCLUSTER_PYTHON")/ray
cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
gpus=0
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
fi
mem=()
if [ -n "${SLURM_MEM_PER_NODE:-}" ]; then
  mem=(--memory=$(( SLURM_MEM_PER_NODE * 1024 * 1024 * 7 / 10 )) --object-store-memory=$(( SLURM_MEM_PER_NODE * 1024 * 1024 * 2 / 10 )))
fi
tmp=${RAY_TMP_ROOT:-/tmp}/ray_${SLURM_JOB_ID}_$(hostname -s)
trap 'rm -rf "$tmp"' EXIT
b=$RAY_PORT_BASE
ports=(--node-manager-port=$((b + 2)) --object-manager-port=$((b + 3)) --dashboard-agent-grpc-port=$((b + 4))
       --dashboard-agent-listen-port=$((b + 5)) --metrics-export-port=$((b + 6)) --runtime-env-agent-port=$((b + 7))
       --min-worker-port=$((b + 100)) --max-worker-port=$((b + 999)))
echo "[ray-node $(date +%T)] $role on $(hostname -s) ($node_ip): $cpus CPUs, $gpus GPUs (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}), memory ${SLURM_MEM_PER_NODE:-unset} MB, temp $tmp"
args=(--block --node-ip-address="$node_ip" --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$tmp"
      --disable-usage-stats "${mem[@]}" "${ports[@]}")
if [ "$role" = head ]; then
  # The dashboard serves Ray's State API, which Ray Train needs to free the resources of a trial that
  # Tune stops early; it listens on this node's address (token auth applies), on a port of the job's block.
  "$ray_bin" start --head --port="$b" --include-dashboard=true --dashboard-host="$node_ip" \
    --dashboard-port=$((b + 8)) "${args[@]}"
else
  "$ray_bin" start --address="$RAY_ADDRESS" "${args[@]}"
fi
