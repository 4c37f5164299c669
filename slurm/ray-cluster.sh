# Ray-on-Slurm bootstrap, sourced by slurm/sweep.sh and slurm/score.sh (not run by itself).
#
#   source "$ALLCLUSTER_HOME/slurm/ray-cluster.sh"
#   ray_cluster_start            # head on the first node, one worker per other node; waits for all
#   ray_cluster_run jobs/X.py …  # the driver, on the first node, with RAY_ADDRESS set
#   (an EXIT trap stops every Ray process this job started and removes its token and temp dirs)
#
# What it guarantees:
# - Ports come from the job id (a block of 1000 per job), so two jobs on one node do not collide.
# - Each node's Ray gets exactly what Slurm granted on that node: CPUs (SLURM_CPUS_ON_NODE), GPUs
#   (the devices in the step's CUDA_VISIBLE_DEVICES) and memory (SLURM_MEM_PER_NODE); it logs them.
# - A short node-local temp dir per node and job (Unix socket paths are limited to ~107 bytes).
# - Token authentication stays on: a fresh per-job token in a file only the job owner can read
#   ($HOME/.ray-slurm/<job>, mode 600), so other users' jobs on these nodes cannot attach.
# - Nothing needs the network beyond the job's nodes; nothing is downloaded.
# - Ray is stopped by signalling this job's own srun steps, never `ray stop` (which kills every Ray
#   process on a node, other jobs' included).

export ALLCLUSTER_HOME=${ALLCLUSTER_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
export ALLCLUSTER_PYTHON=${ALLCLUSTER_PYTHON:-$ALLCLUSTER_HOME/.venv/bin/python}
RAY_JOIN_TIMEOUT_S=${RAY_JOIN_TIMEOUT_S:-300}
_ray_steps=()
_ray_tokdir=""

_log() { echo "[ray-cluster $(date +%T)] $*"; }

_ray_check_env() {
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "ray-cluster.sh: not inside a Slurm job (submit with sbatch)" >&2; return 2
  fi
  if [ ! -x "$ALLCLUSTER_PYTHON" ]; then
    echo "ray-cluster.sh: $ALLCLUSTER_PYTHON not found. Install allcluster on the shared filesystem first" \
         "(on a login node: python3 tests/run.py --co -q, or pip install -e .), submit from the repository" \
         "root, or set ALLCLUSTER_HOME / ALLCLUSTER_PYTHON." >&2
    return 2
  fi
  if [ ! -f "$ALLCLUSTER_HOME/allcluster/__init__.py" ]; then
    echo "ray-cluster.sh: $ALLCLUSTER_HOME is not the allcluster repository (submit from its root or set ALLCLUSTER_HOME)" >&2
    return 2
  fi
}

_ray_node_addr() {  # the address Slurm uses for a node (NodeAddr), else its name
  local addr
  addr=$(scontrol show node "$1" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  echo "${addr:-$1}"
}

ray_cluster_stop() {
  if [ "${#_ray_steps[@]}" -gt 0 ]; then
    _log "stopping Ray (${#_ray_steps[@]} srun steps)"
    kill -TERM "${_ray_steps[@]}" 2>/dev/null || true
    wait "${_ray_steps[@]}" 2>/dev/null || true
    _ray_steps=()
  fi
  [ -n "$_ray_tokdir" ] && rm -rf "$_ray_tokdir"
  return 0
}

ray_cluster_start() {
  _ray_check_env || return $?
  trap ray_cluster_stop EXIT
  trap 'exit 143' TERM INT
  mapfile -t RAY_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  local head=${RAY_NODES[0]} head_ip port_base
  head_ip=$(_ray_node_addr "$head")
  port_base=$(( 20000 + (SLURM_JOB_ID % 40) * 1000 ))
  export RAY_PORT_BASE=$port_base
  export RAY_ADDRESS="$head_ip:$port_base"

  _ray_tokdir=$HOME/.ray-slurm/$SLURM_JOB_ID
  ( umask 077; mkdir -p "$_ray_tokdir"
    "$ALLCLUSTER_PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$_ray_tokdir/token" )
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$_ray_tokdir/token
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
  export PYTHONPATH=$ALLCLUSTER_HOME${PYTHONPATH:+:$PYTHONPATH}

  _log "job $SLURM_JOB_ID: ${#RAY_NODES[@]} node(s): ${RAY_NODES[*]}; head $head; Ray address $RAY_ADDRESS"
  _log "token auth on; token $(stat -c '%A %U' "$RAY_AUTH_TOKEN_PATH") $RAY_AUTH_TOKEN_PATH"
  _ray_start_node "$head" head || return $?
  _ray_check_foreign_token_refused || return $?
  local node
  for node in "${RAY_NODES[@]:1}"; do
    _ray_start_node "$node" worker
  done
  "$ALLCLUSTER_PYTHON" -m allcluster.ray_utils wait "${#RAY_NODES[@]}" "$RAY_JOIN_TIMEOUT_S"
}

_ray_start_node() {  # $1 node, $2 head|worker: one srun step that runs `ray start --block` there
  local node=$1 role=$2 gres=()
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" != 0 ]; then
    gres=(--gres="gpu:$SLURM_GPUS_ON_NODE")
  fi
  srun --nodes=1 --ntasks=1 -w "$node" --overlap "${gres[@]}" \
       bash "$ALLCLUSTER_HOME/slurm/ray-node.sh" "$role" "$(_ray_node_addr "$node")" &
  _ray_steps+=($!)
  if [ "$role" = head ]; then
    local i
    for i in $(seq 240); do
      "$(dirname "$ALLCLUSTER_PYTHON")/ray" status --address="$RAY_ADDRESS" >/dev/null 2>&1 && return 0
      jobs -rp | grep -qx "${_ray_steps[-1]}" || { echo "ray-cluster.sh: the Ray head on $node exited" >&2; return 1; }
      sleep 0.5
    done
    echo "ray-cluster.sh: the Ray head on $node did not answer in 120 s" >&2
    return 1
  fi
}

_ray_check_foreign_token_refused() {  # another user's job holds another token: it must not get in
  local other rc=0
  other=$(mktemp)
  echo "not-this-jobs-token" >"$other"
  RAY_AUTH_TOKEN_PATH=$other timeout 60 "$(dirname "$ALLCLUSTER_PYTHON")/ray" status --address="$RAY_ADDRESS" \
    >/dev/null 2>&1 || rc=$?
  rm -f "$other"
  if [ "$rc" = 0 ]; then
    echo "ray-cluster.sh: a client with another token could attach to this job's Ray; stopping" >&2
    return 1
  fi
  _log "token check: a client with another token is refused"
}

ray_cluster_run() {  # the driver: its exit code is the job's
  _log "driver: $ALLCLUSTER_PYTHON $*"
  local rc=0
  ( cd "$ALLCLUSTER_HOME" && "$ALLCLUSTER_PYTHON" "$@" ) || rc=$?
  _log "driver exited with $rc"
  return $rc
}
