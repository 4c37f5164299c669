# One Ray node inside a Slurm step (started by ray-cluster.sh; not run by hand).
#   bash slurm/ray-node.sh head|worker NODE_ADDRESS
# Reads what Slurm granted to this step on this node and hands exactly that to `ray start`, on ports
# that are free on this node right now, with Ray's temp dir inside a fresh private folder.
# Needs RAY_JOB_DIR (the job's private folder, mode 700, on a filesystem every node sees): the head
# writes the cluster address there (file `address`) once its Ray runs, workers read it from there.
set -euo pipefail
# SIGUSR1 reaches a step from `scancel --signal=USR1 JOB` without --batch, or a --signal=USR1@T
# without B: (the scripts' own warning, --signal=B:USR1, goes to the batch shell alone). By default it
# ends a process (the head's `ray start` died of it and the driver lost its cluster): Ray's processes
# inherit it ignored, and the head's shell, once its address is published, passes it on to the batch
# shell (below), which takes it as the warning it meant to be. Commands this shell starts after that
# get SIGUSR1's default action back (bash resets handled signals in children): they are guarded.
trap '' USR1
role=$1 node_ip=$2
ray_bin=$(dirname "$ALLCLUSTER_PYTHON")/ray
cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
gpus=0
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
fi
# The memory Slurm granted on this node (MB): --mem is per node; --mem-per-cpu and --mem-per-gpu set no
# SLURM_MEM_PER_NODE, only their own variable. Ray gets 70% for tasks and 20% for its object store.
# None, or 0 (--mem=0: all of the node's): Ray sizes both from the node (its cgroup limit, if any).
mem_mb=${SLURM_MEM_PER_NODE:-}
if [ -z "$mem_mb" ] && [ -n "${SLURM_MEM_PER_CPU:-}" ]; then mem_mb=$(( SLURM_MEM_PER_CPU * cpus )); fi
if [ -z "$mem_mb" ] && [ -n "${SLURM_MEM_PER_GPU:-}" ]; then mem_mb=$(( SLURM_MEM_PER_GPU * gpus )); fi
mem=()
if [ "${mem_mb:-0}" -gt 0 ]; then
  mem=(--memory=$(( mem_mb * 1024 * 1024 * 7 / 10 )) --object-store-memory=$(( mem_mb * 1024 * 1024 * 2 / 10 )))
fi
_log() { echo "[ray-node $(date +%T)] $*"; }

# ---- private temp folder. `ray start --temp-dir=D` makes D world-writable (ray._common.utils
# try_to_create_directory chmods it 0777), so D must not be the private folder itself: D is a
# subfolder of a fresh mktemp -d folder (mode 700, ours), which nobody else can enter. Ray puts its
# Unix sockets under D/session_<date>_<time>_<us>_<pid>/sockets/ and a socket path must fit in
# sun_path (108 bytes with the NUL): a node-local tmp with a long path falls back to /tmp.
tmp_base=${RAY_TMP_ROOT:-${TMPDIR:-/tmp}}
longest_suffix=/ray-XXXXXXXX/r/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store
if [ ! -d "$tmp_base" ] || [ $(( ${#tmp_base} + ${#longest_suffix} )) -gt 107 ]; then
  _log "temp base $tmp_base is missing or too long for Ray's socket paths; using /tmp"
  tmp_base=/tmp
fi
private=$(mktemp -d "$tmp_base/ray-XXXXXXXX")
trap 'rm -rf "$private"' EXIT
tmp=$private/r

# ---- ports: every port this node's Ray listens on, picked now from RAY_PORT_RANGE (default
# 20000-65535) outside the kernel's ephemeral range and Ray's fixed defaults, and checked free by
# binding it (allcluster/slurm_ports.py, whose rule ray-cluster.sh also checks before the job starts).
# The worker ports are one contiguous block (--min/--max-worker-port) of RAY_WORKER_PORTS ports, all
# free now; Ray's raylet also skips a port of its range that is in use when it starts a worker.
# What is left is the short race between this check and Ray binding them.
names=(gcs dashboard client node_manager object_manager agent_grpc agent_http metrics runtime_env)
read -r "${names[@]}" worker_min worker_max < <("$ALLCLUSTER_PYTHON" -m allcluster.slurm_ports pick \
    "${#names[@]}" "${RAY_WORKER_PORTS:-1000}" "${RAY_PORT_RANGE:-20000-65535}" || true)
[ -n "$worker_max" ] || { echo "ray-node.sh: could not pick free ports on $(hostname -s)" >&2; exit 1; }
ports=(--node-manager-port="$node_manager" --object-manager-port="$object_manager"
       --dashboard-agent-grpc-port="$agent_grpc" --dashboard-agent-listen-port="$agent_http"
       --metrics-export-port="$metrics" --runtime-env-agent-port="$runtime_env"
       --min-worker-port="$worker_min" --max-worker-port="$worker_max")

_log "$role on $(hostname -s) ($node_ip): $cpus CPUs, $gpus GPUs (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}), memory ${mem_mb:-unset} MB"
_log "temp root $private ($(stat -c '%a %U' "$private")), Ray temp dir $tmp"
args=(--block --node-ip-address="$node_ip" --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$tmp"
      --disable-usage-stats "${mem[@]}" "${ports[@]}")
start=()
if [ "$role" = head ]; then
  _log "ports: gcs $gcs, dashboard $dashboard, client server $client, node manager $node_manager, object manager $object_manager, agent $agent_grpc/$agent_http, metrics $metrics, runtime env $runtime_env, workers $worker_min-$worker_max"
  address=$node_ip:$gcs
  # The dashboard serves Ray's State API, which Ray Train needs to free the resources of a trial that
  # Tune stops early; it listens on this node's address (token auth applies).
  start=(--head --port="$gcs" --ray-client-server-port="$client" --include-dashboard=true
         --dashboard-host="$node_ip" --dashboard-port="$dashboard")
else
  _log "ports: node manager $node_manager, object manager $object_manager, agent $agent_grpc/$agent_http, metrics $metrics, runtime env $runtime_env, workers $worker_min-$worker_max"
  address=$(cat "$RAY_JOB_DIR/address")
  start=(--address="$address")
fi
# Ray's processes and workers inherit this: Ray code that looks its cluster up without an address
# (Ray Train's PlacementGroupCleaner, through the State API) otherwise scans the node's processes and
# fails with "Found multiple active Ray instances" when another Ray runs there (another user's job).
export RAY_ADDRESS=$address
# In the background, so that on SIGTERM (ray-cluster.sh stopping the step, or Slurm ending the job)
# this shell waits for Ray to stop before the EXIT trap removes its temp folder.
"$ray_bin" start "${start[@]}" "${args[@]}" &
ray_pid=$!
stopping=""
trap 'stopping=1; kill -TERM "$ray_pid" 2>/dev/null || true' TERM INT
passed_on=""
_pass_warning_on() {   # the head's step: SIGUSR1 (see the top) to the job's batch shell, once per start
  # (a second one would make the driver stop at once rather than write what it has)
  local self=${ALLCLUSTER_SLURM_SELF:-${SLURM_JOB_ID:-}}   # an array task: ARRAYID_TASK, not the array
  if [ -n "$passed_on" ]; then
    _log "SIGUSR1 to this step again: ignored by Ray; passed on once already"
  elif [ -z "$self" ]; then
    _log "SIGUSR1 to this step: ignored by Ray (no Slurm job to pass it on to)"
  elif timeout 10 scancel --batch --signal=USR1 "$self"; then
    passed_on=1
    _log "SIGUSR1 to this step: ignored by Ray, passed on to job $self's batch shell (scancel --batch)," \
         "which takes it as the time-limit warning"
  else
    _log "SIGUSR1 to this step: ignored by Ray; passing it on to job $self's batch shell failed"
  fi
}
published=""
if [ "$role" = head ]; then
  # Publish the address once every head process runs: `ray start` writes TEMP_DIR/ray_current_cluster
  # after its Node() has started them all (ray/scripts/scripts.py), and exits instead when one of them
  # failed, e.g. on a port another process bound between our check and Ray's bind. Such a head is
  # retried below with fresh ports, before anyone has read its address. Written whole, then
  # renamed: a reader never sees half of it.
  while [ -z "$stopping" ] && kill -0 "$ray_pid" 2>/dev/null && [ ! -s "$tmp/ray_current_cluster" ]; do
    sleep 0.2
  done
  if [ -z "$stopping" ] && [ -s "$tmp/ray_current_cluster" ]; then
    echo "$address" >"$RAY_JOB_DIR/address.tmp" && mv "$RAY_JOB_DIR/address.tmp" "$RAY_JOB_DIR/address"
    published=1
    _log "Ray head running; address $address published in $RAY_JOB_DIR/address"
  fi
fi
if [ "$role" = head ]; then    # from here on this shell starts nothing but the guarded lines below
  trap _pass_warning_on USR1
else
  trap '_log "SIGUSR1 to this step: ignored by Ray (the head passes it on to the batch shell)"' USR1
fi
rc=0
while :; do
  rc=0; wait "$ray_pid" || rc=$?
  [ "$rc" -gt 128 ] && kill -0 "$ray_pid" 2>/dev/null || break
done
if [ "$rc" -gt 128 ]; then     # a trapped signal cut the wait short as Ray ended: Ray's own exit code
  rc=0; wait "$ray_pid" 2>/dev/null || rc=$?
fi
if [ -n "$stopping" ]; then   # asked to stop (ray start --block ends with 1 then): not a failure of the step
  _log "Ray stopped on $(hostname -s) (ray start exited with $rc on SIGTERM)"
  exit 0
fi
# Ray ended by itself: show why before its logs go with the temp folder
_log "ray start exited with $rc on $(hostname -s); the end of its logs:"
for f in "$tmp"/session_latest/logs/{raylet.out,gcs_server.out,dashboard_agent.log,dashboard_agent.err,runtime_env_agent.log}; do
  # glog's error/fatal lines (E/F + date), not the stack trace that follows a fatal one
  [ -s "$f" ] || continue
  { echo "--- $f"; grep -E '^\[?[0-9-]* ?[0-9:,.]* [EFC] |ERROR|^[EF][0-9]{4} |Check failed|Error' "$f" | tail -n 8 || true; }
done
# A node retries with fresh ports and temp folder. A worker: Ray's raylet gives its dashboard agent a
# fixed ~15 s to report its ports and exits otherwise (ray-project/ray#65983), which a loaded node
# or a slow shared filesystem (the agent's imports) can exceed; the head's cluster waits for the
# worker (RAY_JOIN_TIMEOUT_S). The head: only before its address is published (ray-cluster.sh
# waits for it); a head that ends later ends the job's cluster.
attempt=${RAY_NODE_ATTEMPT:-1}
# Not once told to stop (a SIGTERM while the logs above were shown).
if [ -z "$stopping" ] && { [ "$role" = worker ] || [ -z "$published" ]; } && [ "$attempt" -lt "${RAY_START_TRIES:-3}" ]; then
  _log "retrying ray start on $(hostname -s) (attempt $((attempt + 1)) of ${RAY_START_TRIES:-3})"
  rm -rf "$private" || true
  RAY_NODE_ATTEMPT=$((attempt + 1)) exec bash "$0" "$role" "$node_ip"
fi
exit "$rc"
