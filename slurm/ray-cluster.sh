# Ray-on-Slurm bootstrap, sourced by slurm/sweep.sh and slurm/score.sh (not run by itself).
#
#   source "$ALLCLUSTER_HOME/slurm/ray-cluster.sh"
#   ray_cluster_check jobs/X.py …  # the driver's own refusals (--check): a bad config ends the job here
#   ray_cluster_start            # head on the first node, one worker per other node; waits for all
#   ray_cluster_run jobs/X.py …  # the driver, on the first node, with RAY_ADDRESS set
#   (an EXIT trap stops every Ray process this job started, removes its private folders and, after
#   a time-limit warning, requeues the job)
#
# What it guarantees:
# - Every Ray port is picked on its node when Ray starts there and checked free by binding it
#   (slurm/ray-node.sh), the Ray client server's included, so jobs sharing a node do not collide. The
#   head publishes the cluster address in the job's private folder; workers and the driver read it.
# - The job's private folder $HOME/.ray-slurm/<cluster>-<job> (mode 700, created afresh at every start) holds
#   the address and a fresh per-job token (mode 600): token authentication stays on, so other users'
#   jobs on these nodes cannot attach.
# - Each node's Ray temp dir lives inside a fresh mktemp -d folder (mode 700) under the node-local
#   tmp, short enough for Unix socket paths (~107 bytes).
# - Each node's Ray gets exactly what Slurm granted on that node: CPUs (SLURM_CPUS_ON_NODE), GPUs
#   (the devices in the step's CUDA_VISIBLE_DEVICES) and memory (--mem, or --mem-per-cpu/--mem-per-gpu
#   times the node's CPUs/GPUs); it logs them.
#   Any GPU request works: --gres=gpu:[TYPE:]K and --gpus-per-node (K per node), or --gpus=K (the
#   job's total, which Slurm may split unevenly): each node's step asks for that node's share.
# - Time limits and preemption: the batch shell traps SIGUSR1 (sbatch --signal=B:USR1@SECONDS, which
#   Slurm sends to the batch shell only), forwards it to the driver and waits for it; the driver
#   writes what it has and exits 75 ("interrupted; rerun resumes"); the shell then runs
#   `scontrol requeue $SLURM_JOB_ID` and stops Ray (ignoring SIGTERM meanwhile). The requeued job runs this script again from the top (restart
#   N in the log, SLURM_RESTART_COUNT) and the driver resumes. SIGTERM (scancel, `scontrol requeue`
#   from outside, the time limit itself) reaches every process of the job, the driver included:
#   the shell waits for the driver (sending it a second SIGTERM, "stop at once", if the head's Ray
#   stops under it first) and does not requeue (Slurm requeues by itself when it preempts with
#   PreemptMode=REQUEUE or when asked to). Slurm SIGKILLs every process of the job KillWait seconds
#   after that SIGTERM, this shell included: a driver still running ALLCLUSTER_CLEANUP_RESERVE_S (10)
#   seconds before then is killed, so that the shell always stops Ray and removes its folders in time
#   (`off`: never; for sites whose preemption GraceTime gives more than KillWait after its SIGTERM).
# - No requeue loop: the driver records the work each start completed ($ALLCLUSTER_PROGRESS_FILE:
#   rows written, epochs recorded; allcluster/interrupt.py report_progress). After
#   ALLCLUSTER_MAX_STALLED_STARTS (3) warned starts in a row with none (an epoch, or Ray's start,
#   longer than the time before the warning) the job stops requeueing and says why: it would
#   otherwise return to the queue forever, spending the allocation on nothing.
# - Ray failing under the job (a node's Ray ends unasked: a raylet or agent crash, a node's Ray
#   killed, a signal to its step from outside) does not end it: when the driver fails after one of
#   this start's Ray steps ended unasked, or Ray's start fails that way, the shell stops what is left of that Ray, starts a fresh
#   one in the same allocation and runs the driver again, which resumes (scoring: rows already
#   written and its journal; sweep: each trial's last checkpoint). ALLCLUSTER_RAY_RESTARTS (1) times
#   per start at most; a driver that fails while its Ray runs fails the job as before.
# - Nothing needs the network beyond the job's nodes; nothing is downloaded.
# - Ray is stopped by signalling this job's own srun steps, never `ray stop` (which kills every Ray
#   process on a node, other jobs' included).

export ALLCLUSTER_HOME=${ALLCLUSTER_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
export ALLCLUSTER_PYTHON=${ALLCLUSTER_PYTHON:-$ALLCLUSTER_HOME/.venv/bin/python}
RAY_JOIN_TIMEOUT_S=${RAY_JOIN_TIMEOUT_S:-300}
EX_TEMPFAIL=75               # the drivers' "interrupted; rerunning the same command resumes"
EX_IOERR=74                  # the drivers' "the output's storage is full": a requeue would fail the same way
ALLCLUSTER_MAX_STALLED_STARTS=${ALLCLUSTER_MAX_STALLED_STARTS:-3}
ALLCLUSTER_RAY_RESTARTS=${ALLCLUSTER_RAY_RESTARTS:-1}
_ray_steps=()
_ray_step_nodes=()           # the node of each of _ray_steps
_ray_restarts=0              # Ray restarts in this allocation (_ray_restart_after_ray_failure)
_ray_earlier_progress=""     # what a driver recorded before a Ray restart ("<units> <what>")
_ray_jobdir=""
_ray_warned=""               # the time-limit/preemption warning (SIGUSR1) arrived
_ray_stopping=""             # TERM or INT once that signal arrived
_ray_told_twice=""           # the driver got a second SIGTERM from this shell (its Ray had stopped)
_ray_term_at=""              # $SECONDS when that signal arrived: Slurm's KillWait counts from then
_ray_kill_wait_s=""          # Slurm's KillWait in seconds (_ray_read_kill_wait, at each start)
_ray_driver_killed=""        # this shell SIGKILLed the driver to clean up before KillWait
_ray_driver_pid=""
_ray_driver_ran=""           # a driver of this start ran and ended

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
  _ray_check_settings || return 2
  if [ ! -f "$ALLCLUSTER_HOME/allcluster/__init__.py" ]; then
    echo "ray-cluster.sh: $ALLCLUSTER_HOME is not the allcluster repository (submit from its root or set ALLCLUSTER_HOME)" >&2
    return 2
  fi
}

_ray_check_settings() {  # the job scripts' settings (README: "The job scripts' settings"), each refused by
  # name before anything starts: a bad one would otherwise surface as a bash or Python error mid-job.
  # At most 9 digits: bash's test reads a longer number as no number at all.
  local spec name kind value
  for spec in ALLCLUSTER_MAX_STALLED_STARTS:count ALLCLUSTER_RAY_RESTARTS:whole \
              ALLCLUSTER_MIN_RUN_BEFORE_REQUEUE_S:whole ALLCLUSTER_CLEANUP_RESERVE_S:whole-or-off \
              RAY_JOIN_TIMEOUT_S:count RAY_START_TRIES:count RAY_WORKER_PORTS:ports RAY_PORT_RANGE:range; do
    name=${spec%%:*} kind=${spec#*:}
    value=${!name:-}
    [ -n "$value" ] || continue          # unset: its default
    case $kind in
      count) [[ $value =~ ^[1-9][0-9]{0,8}$ ]] && continue; kind="not a whole number from 1 to 999999999" ;;
      whole) [[ $value =~ ^(0|[1-9][0-9]{0,8})$ ]] && continue; kind="not a whole number from 0 to 999999999" ;;
      whole-or-off) [[ $value =~ ^(off|0|[1-9][0-9]{0,8})$ ]] && continue; kind="neither a whole number of seconds nor off" ;;
      ports) [[ $value =~ ^([2-9]|[1-9][0-9]{1,3})$ ]] && continue
             kind="not a whole number from 2 to 9999 (Ray needs its max worker port above its min)" ;;
      range) [[ $value =~ ^([0-9]{1,5})-([0-9]{1,5})$ ]] && [ "$((10#${BASH_REMATCH[1]}))" -ge 1024 ] &&
               [ "$((10#${BASH_REMATCH[1]}))" -lt "$((10#${BASH_REMATCH[2]}))" ] &&
               [ "$((10#${BASH_REMATCH[2]}))" -le 65535 ] && continue
             kind="not LOW-HIGH with 1024 <= LOW < HIGH <= 65535" ;;
    esac
    echo "ray-cluster.sh: $name=$value is $kind" >&2
    return 2
  done
  _ray_check_port_room
}

_ray_check_port_room() {  # ray-node.sh picks every port of a node by allcluster/slurm_ports.py's rule:
  # refused here when RAY_PORT_RANGE can never hold them (this node's ephemeral range; the job's other
  # nodes are taken to share it). 9: the single ports ray-node.sh names besides the worker block.
  "$ALLCLUSTER_PYTHON" -m allcluster.slurm_ports check 9 "${RAY_WORKER_PORTS:-1000}" "${RAY_PORT_RANGE:-20000-65535}"
}

_ray_node_addr() {  # the address Slurm uses for a node (NodeAddr), else its name
  local addr
  addr=$(scontrol show node "$1" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  echo "${addr:-$1}"
}

# ---------------------------------------------------------------- signals
# Bash runs a trap only between commands, or when it interrupts `wait`: the driver therefore runs in
# the background and the shell waits for it in a loop (ray_cluster_run).
_ray_on_usr1() {
  # A warning within a minute of the start means the time limit is shorter than the --signal
  # offset (e.g. --time=15 with B:USR1@900): Slurm sends it at once, and stopping + requeueing would
  # loop forever. Run on instead; at the time limit the driver still writes what it has (SIGTERM).
  if [ "$SECONDS" -lt "${ALLCLUSTER_MIN_RUN_BEFORE_REQUEUE_S:-60}" ]; then
    _log "SIGUSR1 only ${SECONDS} s after the start: the time limit is within the --signal warning time," \
         "so a requeue would loop; ignoring it (raise --time or lower --signal=B:USR1@<seconds>)"
    # 0, not a bare return: in a trap handler that gives the status of the command the signal
    # interrupted (`wait`: 138), and under set -e the shell would exit with it
    return 0
  fi
  _ray_warned=1
  if [ -n "$_ray_driver_pid" ] && kill -0 "$_ray_driver_pid" 2>/dev/null; then
    _log "SIGUSR1 (time limit or preemption ahead): asking the driver (pid $_ray_driver_pid) to write what it has and stop"
    kill -USR1 "$_ray_driver_pid" 2>/dev/null || true
  elif [ -n "$_ray_driver_ran" ]; then
    _log "SIGUSR1 (time limit or preemption ahead) after the driver ended: no driver starts again; an unfinished job requeues"
  else
    _log "SIGUSR1 (time limit or preemption ahead) before the driver started: the job will requeue"
  fi
}

_ray_on_term() {  # $1 = TERM|INT
  _ray_stopping=$1
  _ray_term_at=${_ray_term_at:-$SECONDS}
  if [ -n "$_ray_driver_pid" ] && kill -0 "$_ray_driver_pid" 2>/dev/null; then
    # Slurm signals every process of the job (scancel, time limit, `scontrol requeue`): the driver
    # has its own SIGTERM; sending a second would cut its graceful stop short.
    _log "SIG$1: waiting for the driver to write what it has and exit"
  else
    local when="before the driver started"
    [ -z "$_ray_driver_ran" ] || when="after the driver ended"
    _log "SIG$1 $when: stopping"
    exit 143
  fi
}

_ray_steps_running() {  # some srun step of this start's Ray has not ended
  [ "${#_ray_steps[@]}" -gt 0 ] && jobs -rp | grep -qxF -f <(printf '%s\n' "${_ray_steps[@]}")
}

_ray_head_running() {  # the srun step of the Ray head (the first one) has not ended
  [ "${#_ray_steps[@]}" -gt 0 ] && jobs -rp | grep -qx "${_ray_steps[0]}"
}

_ray_stop_driver_at_once() {
  # Slurm's SIGTERM reached the head's Ray too and it stopped: the batch the driver waits for can
  # no longer come, and Ray's core worker does not always end the driver (seen: still waiting at
  # Slurm's KillWait, whose SIGKILL also takes this shell: no line, no clean-up). A second signal
  # stops the driver at once; what it had not written is in its journal (scoring) or redone from the
  # last checkpoint (sweep).
  _ray_told_twice=1
  _log "SIG$_ray_stopping: this job's Ray head stopped under the driver: asking it (pid $_ray_driver_pid) to stop at once"
  kill -TERM "$_ray_driver_pid" 2>/dev/null || true
}

_ray_read_kill_wait() {  # Slurm's KillWait ("KillWait = 30 sec"), once; 30, its default, if unreadable
  [ -z "$_ray_kill_wait_s" ] || return 0
  local seconds
  seconds=$(timeout 10 scontrol show config 2>/dev/null | awk '$1 == "KillWait" {print $3; exit}') || true
  if [[ ${seconds:-} =~ ^[0-9]+$ ]]; then _ray_kill_wait_s=$((10#$seconds)); else _ray_kill_wait_s=30; fi
}

_ray_seconds_before_kill() {  # $1 = seconds kept back: what is left of KillWait since the SIGTERM (0 at least)
  # whole seconds ($SECONDS; bash 4 has no finer clock): up to 1 s early or late, within what is kept back
  local left=$(( ${_ray_term_at:-$SECONDS} + ${_ray_kill_wait_s:-30} - $1 - SECONDS ))
  echo $(( left > 0 ? left : 0 ))
}

_ray_wait_for_stopping_driver() {
  # After Slurm's SIGTERM (scancel, `scontrol requeue`, the time limit) every process of the job has
  # KillWait seconds before Slurm's SIGKILL, which takes this shell too: no clean-up, no last line.
  # A driver that has not exited when only the clean-up reserve is left is killed (a CI run: the first
  # start of a sweep requeued from outside just as its trials finished never logged its clean-up; the
  # driver's way out waits on the Ray that the same SIGTERM stops). What it had not written is redone
  # by the rerun, as after any SIGKILL.
  # Only after SIGTERM: no KillWait follows a SIGINT (Ctrl-C in an salloc session).
  local reserve=${ALLCLUSTER_CLEANUP_RESERVE_S:-10} kill_wait=${_ray_kill_wait_s:-30}
  if [ "$_ray_stopping" != TERM ] || [ "$reserve" = off ]; then
    reserve=""
  elif [ "$((10#$reserve))" -ge "$kill_wait" ]; then
    reserve=$(( kill_wait / 2 ))
  fi
  while kill -0 "$_ray_driver_pid" 2>/dev/null; do
    if [ -z "$_ray_told_twice" ] && ! _ray_head_running; then
      _ray_stop_driver_at_once
    fi
    if [ -n "$reserve" ] && [ "$(_ray_seconds_before_kill "$((10#$reserve))")" = 0 ] &&
       kill -0 "$_ray_driver_pid" 2>/dev/null; then
      _log "SIG$_ray_stopping: the driver (pid $_ray_driver_pid) is still running $(( SECONDS - _ray_term_at )) s later;" \
           "killing it so that Ray's steps and this job's folders are seen to before Slurm's KillWait" \
           "(${_ray_kill_wait_s} s) ends every process of the job"
      _ray_driver_killed=1
      kill -KILL "$_ray_driver_pid" 2>/dev/null || true
      return 0
    fi
    sleep 0.5 || true     # Slurm's SIGTERM may reach the sleep too (under set -e)
  done
}

_ray_self() {  # this job for scancel/scontrol/squeue: an array task is ARRAYID_TASK, because a task
  # whose own id equals the array's id (the last task, often) would address the whole array
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "$SLURM_JOB_ID"
  fi
}

_ray_requeue() {  # the warning came and the driver stopped unfinished: back to the queue
  local out rc=0
  _log "requeueing job $SLURM_JOB_ID (scontrol requeue): its next start resumes the work"
  out=$(scontrol requeue "$(_ray_self)" 2>&1) || rc=$?
  if [ "$rc" != 0 ]; then
    _log "scontrol requeue failed ($out): resubmit the same command to resume (sbatch --requeue may be needed)"
    return 1
  fi
}

_ray_job_key() {  # job ids are per cluster: sites whose clusters share $HOME (sbatch -M) reuse them
  echo "${SLURM_CLUSTER_NAME:+$SLURM_CLUSTER_NAME-}$SLURM_JOB_ID"
}

_ray_stalls_file() {  # beside the private folder, which every start recreates
  echo "$HOME/.ray-slurm/$(_ray_job_key).stalls"
}

_ray_forget_earlier_jobs_stalls() {  # a count belongs to one job's starts: at its first, a count left by an
  # earlier job with this id (killed with its node, or before a reset of Slurm's job ids) is void
  if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then rm -f "$(_ray_stalls_file)"; fi
}

_ray_driver_progress() {  # the work the driver of this Ray recorded ("<units> <what>"), if units > 0
  local units="" what=""
  { read -r units what <"$_ray_jobdir/progress"; } 2>/dev/null || true   # none: the driver never got to write it
  if [[ ${units:-} =~ ^[0-9]+$ ]] && [ "$units" -gt 0 ]; then echo "$units $what"; fi
}

_ray_made_progress() {  # this start's drivers recorded work done (the one before a Ray restart counts)
  local recorded
  recorded=$(_ray_driver_progress)
  [ -n "$recorded" ] || recorded=${_ray_earlier_progress:+$_ray_earlier_progress (before Ray restarted)}
  [ -n "$recorded" ] || return 1
  _log "this start's progress: $recorded"
}

_ray_keeps_requeueing() {  # false once ALLCLUSTER_MAX_STALLED_STARTS warned starts in a row did no work
  local file stalls
  file=$(_ray_stalls_file)
  if [ -n "$_ray_jobdir" ] && _ray_made_progress; then
    rm -f "$file"
    return 0
  fi
  stalls=$(cat "$file" 2>/dev/null || true)
  [[ $stalls =~ ^[0-9]+$ ]] || stalls=0
  stalls=$((stalls + 1))
  if [ "$stalls" -ge "$ALLCLUSTER_MAX_STALLED_STARTS" ]; then
    _log "no progress in $stalls starts in a row (each stopped by the time-limit warning before it" \
         "completed a unit of work: an epoch, a batch of rows): not requeueing, so the job does not loop." \
         "Raise --time or lower --signal=B:USR1@<seconds>, then resubmit the same command: it resumes"
    rm -f "$file"
    return 1
  fi
  echo "$stalls" >"$file"
  _log "no progress this start ($stalls of $ALLCLUSTER_MAX_STALLED_STARTS in a row before the job stops requeueing)"
}

_ray_wait_for_steps() {  # $1 seconds at most, by the clock, and never past $2 s before KillWait's SIGKILL
  local until=$(( SECONDS + $1 )) last=$(( SECONDS + $(_ray_seconds_before_kill "$2") ))
  [ "$last" -ge "$until" ] || until=$last
  while [ "$SECONDS" -lt "$until" ] && _ray_steps_running; do
    sleep 0.5 || true     # Slurm's SIGTERM may reach the sleep too (under set -e)
  done
}

_ray_stop_steps() {  # $1 = requeued by this shell: SIGTERM to this start's Ray steps, wait for them;
  # false when some are still ending (srun cancelled them)
  local requeued=$1 ending=""
  _log "stopping Ray (${#_ray_steps[@]} srun steps)"
  # SIGTERM to the steps' tasks only (scancel without --batch spares the batch shell): each
  # ray-node.sh stops its Ray and removes its temp folder. SIGTERM to srun itself would cancel the
  # step, which SIGKILLs the tasks before they can clean up. Not after our own requeue: Slurm
  # SIGTERMs every process of a requeued job itself, and refuses a signal to a job in that state
  # ("Job can not be altered now"), which scancel retries for ~95 s (sleep 5, 6, ... 14 s), past
  # KillWait (30 s by default), whose SIGKILL would take this shell before it cleans up (seen on
  # 22.05: every self-requeue ended that way, ~27 s late). Nor when the steps have ended already
  # (Slurm's SIGTERM to the whole job: scancel, `scontrol requeue`, the time limit; the steps get a
  # few seconds to stop by themselves first). The timeout bounds the same wait should Slurm refuse
  # the signal for another reason; the waits here end 4 s before KillWait (the last one, after srun
  # is told to cancel its step, 1 s before).
  if [ -n "$_ray_stopping" ]; then _ray_wait_for_steps 5 4; fi
  local patience
  patience=$(_ray_seconds_before_kill 4); [ "$patience" -le 10 ] || patience=10
  if [ -z "$requeued" ] && [ "$patience" -gt 0 ] && _ray_steps_running; then
    timeout "$patience" scancel --signal=TERM "$(_ray_self)" 2>/dev/null || true
  fi
  _ray_wait_for_steps 30 4
  kill -TERM "${_ray_steps[@]}" 2>/dev/null || true   # whatever is left: srun cancels it
  _ray_wait_for_steps 5 1
  if _ray_steps_running; then ending=1; else wait "${_ray_steps[@]}" 2>/dev/null || true; fi
  _ray_steps=() _ray_step_nodes=()
  [ -z "$ending" ]
}

ray_cluster_stop() {  # the EXIT trap
  local rc=$?
  # Stopping already. A SIGTERM now (the time limit's, when the driver was slow to stop after the
  # warning; or Slurm's own after `scontrol requeue`) must not end this trap half way: _ray_on_term
  # would exit 143 with Ray's steps, the private folder and the requeue left undone. Ignored (and
  # so by every command started here too), it goes unseen: the waits below count Slurm's KillWait
  # from the earlier SIGTERM if one came, else from now, never later than from one that comes now.
  trap '' TERM INT
  _ray_term_at=${_ray_term_at:-$SECONDS}
  # After the warning any unfinished end requeues (75 as promised, or killed before its handler was
  # in place, or failing while it stopped): the time limit ends this run anyway and the rerun resumes.
  # Without the warning nothing requeues: a failure is reported, not retried; nor does a full disk
  # or quota (74) after it: the next start would stop at its first write again. Requeued first, so that
  # Slurm's SIGKILL (KillWait after the time limit's SIGTERM) cannot fall between the stop and the
  # requeue; the requeued job starts again only once every process of this one has ended.
  local requeued="" ending=""
  if [ -n "$_ray_warned" ] && [ "$rc" != 0 ] && [ "$rc" != "$EX_IOERR" ] && _ray_keeps_requeueing; then
    _ray_requeue && requeued=1
  else
    rm -f "$(_ray_stalls_file)"            # the job ends here: no count is left for a later job
    if [ "$rc" = "$EX_TEMPFAIL" ] && [ -z "$_ray_warned" ]; then   # said at 7 a.m.: nothing will resume it
      _log "not requeued by this script: no time-limit warning came first (scancel, a time limit reached" \
           "without --signal=B:USR1@<seconds>, preemption, scontrol requeue); unless Slurm requeues the job" \
           "itself (scontrol requeue, PreemptMode=REQUEUE: squeue shows it pending again), resubmit the same" \
           "command to resume"
    fi
  fi
  if [ "${#_ray_steps[@]}" -gt 0 ]; then
    _ray_stop_steps "$requeued" || ending=1
  fi
  [ -n "$_ray_jobdir" ] && rm -rf "$_ray_jobdir"
  _ray_jobdir=""
  if [ -n "$ending" ]; then
    _log "stopped: private folder removed; Ray's steps still ending (srun cancelled them; KillWait ends what is left)"
  else
    _log "stopped: Ray's steps ended, private folder removed"
  fi
  return 0
}

# ---------------------------------------------------------------- start
ray_cluster_check() {  # DRIVER ARGS...: the driver's own refusals (its --check), before any Ray starts
  _ray_check_env || return $?
  _ray_signal_traps
  local driver rc=0
  driver=$(_ray_driver_path "$1"); shift
  # A bad config key, a missing manifest or model, a changed base config: refused in seconds, not
  # after Ray started on every node (the driver would refuse the same, with the same message)
  HF_HUB_OFFLINE=1 "$ALLCLUSTER_PYTHON" "$driver" "$@" --check || rc=$?
  if [ "$rc" != 0 ]; then
    _log "the driver refused its arguments (exit $rc): Ray not started"
    exit "$rc"
  fi
}

_ray_signal_traps() {  # from the first check on: bash's default for SIGUSR1 (an early warning) ends the shell
  trap _ray_on_usr1 USR1
  trap '_ray_on_term TERM' TERM
  trap '_ray_on_term INT' INT
}

_ray_driver_path() {  # the driver script is the installation's
  if [[ $1 = /* ]]; then echo "$1"; else echo "$ALLCLUSTER_HOME/$1"; fi
}

ray_cluster_start() {
  _ray_check_env || return $?
  _ray_read_kill_wait
  trap ray_cluster_stop EXIT
  _ray_signal_traps
  _ray_forget_earlier_jobs_stalls
  mapfile -t RAY_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  _log "job $SLURM_JOB_ID: restart ${SLURM_RESTART_COUNT:-0} of job $SLURM_JOB_ID;" \
       "time limit $(squeue -h -j "$(_ray_self)" -o %l 2>/dev/null || echo '?')"
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
  export PYTHONUNBUFFERED=1     # the driver's last lines reach the log even when KillWait's SIGKILL ends it
  export PYTHONPATH=$ALLCLUSTER_HOME${PYTHONPATH:+:$PYTHONPATH}
  local job
  if ! job=$(scontrol show job -d "$SLURM_JOB_ID") ||
     ! _ray_gpu_options=$("$ALLCLUSTER_PYTHON" -m allcluster.slurm_alloc step-gpus "$SLURM_JOB_ID" <<<"$job"); then
    echo "ray-cluster.sh: could not read which GPUs job $SLURM_JOB_ID holds on each node (scontrol show job -d)" >&2
    return 1
  fi
  _ray_up
}

_ray_up() {  # this start's Ray on every node; started afresh once more if Ray itself failed on the way
  until _ray_bring_up; do
    _ray_restart_after_ray_failure "Ray's start" || return 1
  done
}

_ray_bring_up() {  # the private folder, the head, the workers, and the wait for all of them
  # Runs as a condition (errexit is off in here): every step that can fail is checked.
  # The job's private folder, afresh at every start (a requeued job keeps its id: drop what the
  # previous start left). mkdir without -p under umask 077: created by us, mode 700.
  _ray_jobdir=$HOME/.ray-slurm/$(_ray_job_key)
  ( umask 077; mkdir -p "$HOME/.ray-slurm" ) || return 1
  rm -rf "$_ray_jobdir" || return 1
  ( umask 077; mkdir "$_ray_jobdir" &&
    "$ALLCLUSTER_PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$_ray_jobdir/token" ) || return 1
  export RAY_JOB_DIR=$_ray_jobdir ALLCLUSTER_PROGRESS_FILE=$_ray_jobdir/progress
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$_ray_jobdir/token
  unset RAY_ADDRESS
  local head=${RAY_NODES[0]} node
  _log "job $SLURM_JOB_ID: ${#RAY_NODES[@]} node(s): ${RAY_NODES[*]}; head $head"
  _log "private folder $(stat -c '%a %U' "$_ray_jobdir") $_ray_jobdir;" \
       "token auth on; token $(stat -c '%A %U' "$RAY_AUTH_TOKEN_PATH") $RAY_AUTH_TOKEN_PATH"
  _ray_start_node "$head" head || return 1
  _ray_check_foreign_token_refused || return 1
  for node in "${RAY_NODES[@]:1}"; do
    _ray_start_node "$node" worker
  done
  "$ALLCLUSTER_PYTHON" -m allcluster.ray_utils wait "${#RAY_NODES[@]}" "$RAY_JOIN_TIMEOUT_S"
}

_ray_ended_step_nodes() {  # the nodes whose Ray step of this start has ended (by itself, or not)
  local k running
  running=$(jobs -rp)
  for k in "${!_ray_steps[@]}"; do
    grep -qx "${_ray_steps[$k]}" <<<"$running" || echo "${_ray_step_nodes[$k]}"
  done
}

_ray_restart_after_ray_failure() {  # $1 = what failed. True, with what is left of this start's Ray
  # stopped, when that failure came after a Ray step ended unasked (ray-node.sh logged why) and
  # a restart is left: a raylet or Ray agent that crashes (seen once in CI: a head's runtime_env_agent
  # failing right after the head published its address, the driver ending 60 s later) must not cost
  # the night's run. Not after a stop signal or the time-limit warning, also one that comes while
  # this decides (those end or requeue the job), nor when every step still runs (the driver's own
  # failure; `ray start --block` ends its step within about a second of one of its processes dying:
  # waited for, 10 s at most), nor when a step of the failed Ray will not end (its node is in trouble).
  _ray_not_stopping || return 1
  local ended waited=0 recorded
  while ended=$(_ray_ended_step_nodes); [ -z "$ended" ] && [ "$waited" -lt 20 ]; do
    sleep 0.5 || true
    waited=$((waited + 1))
  done
  [ -n "$ended" ] && _ray_not_stopping || return 1
  ended=$(paste -sd, - <<<"$ended")
  if [ "$_ray_restarts" -ge "$ALLCLUSTER_RAY_RESTARTS" ]; then
    _log "$1 failed after this job's Ray on $ended ended unasked; Ray was restarted $_ray_restarts time(s)" \
         "in this allocation already (ALLCLUSTER_RAY_RESTARTS=$ALLCLUSTER_RAY_RESTARTS): not again"
    return 1
  fi
  _ray_restarts=$((_ray_restarts + 1))
  _log "$1 failed after this job's Ray on $ended ended unasked (its lines above say why: a crash, or a signal" \
       "to its step from outside this script): restarting Ray" \
       "in this allocation ($_ray_restarts of $ALLCLUSTER_RAY_RESTARTS); the driver then resumes"
  recorded=$(_ray_driver_progress)
  [ -z "$recorded" ] || _ray_earlier_progress=$recorded
  if ! _ray_stop_steps ""; then
    _log "the failed Ray's steps did not end when srun cancelled them: not starting another Ray beside them"
    return 1
  fi
  _ray_not_stopping
}

_ray_not_stopping() {  # neither a stop signal nor the time-limit warning has come
  [ -z "$_ray_stopping" ] && [ -z "$_ray_warned" ]
}

_ray_gpu_options=""   # "NODE OPTION" per node holding GPUs of this job (allcluster/slurm_alloc.py)

_ray_start_node() {  # $1 node, $2 head|worker: one srun step that runs `ray start --block` there
  local node=$1 role=$2 gpus tres
  gpus=$(awk -v node="$node" '$1 == node {print $2}' <<<"$_ray_gpu_options")
  # The job's GPU request reaches srun through the environment as well: SLURM_GPUS=K (sbatch --gpus=K)
  # makes every one-node step ask for all K GPUs, which fails on a multi-node job ("Invalid generic
  # resource (gres) specification"); SLURM_NTASKS_PER_GPU would start a task per GPU, a GPU binding
  # could hide some of the node's GPUs from its one task. The CPU request too: srun 22.05 ignores
  # SLURM_CPUS_PER_TASK, but 23.11+ reads it again (and cpu= in SLURM_TRES_PER_TASK), and --cpus-per-task
  # implies --exact: an --exclusive job's Ray would get 8 of the node's CPUs. Left out (from
  # SLURM_TRES_PER_TASK, 23.11+'s home of --gpus-per-task and --cpus-per-task, only those items); the
  # step asks for what the job holds on its node.
  tres=$(tr ',' '\n' <<<"${SLURM_TRES_PER_TASK:-}" | grep -v -e 'gpu' -e '^cpu=' | paste -sd, -) || true
  env -u SLURM_GPUS -u SLURM_GPUS_PER_NODE -u SLURM_GPUS_PER_TASK -u SLURM_NTASKS_PER_GPU -u SLURM_CPUS_PER_TASK \
      -u SLURM_GPU_BIND -u SLURM_TRES_BIND -u SLURM_TRES_PER_TASK ${tres:+SLURM_TRES_PER_TASK="$tres"} \
    ALLCLUSTER_SLURM_SELF="$(_ray_self)" srun --nodes=1 --ntasks=1 -w "$node" --overlap ${gpus:+"$gpus"} \
       bash "$ALLCLUSTER_HOME/slurm/ray-node.sh" "$role" "$(_ray_node_addr "$node")" &
  _ray_steps+=($!) _ray_step_nodes+=("$node")
  [ "$role" = head ] || return 0
  local deadline=$(( SECONDS + 120 ))     # by the clock (a last `ray status` may add up to 30 s)
  while [ "$SECONDS" -lt "$deadline" ]; do
    if [ -z "${RAY_ADDRESS:-}" ] && [ -s "$_ray_jobdir/address" ]; then
      export RAY_ADDRESS=$(cat "$_ray_jobdir/address")
      _log "Ray address $RAY_ADDRESS (published by the head in $_ray_jobdir/address)"
    fi
    if [ -n "${RAY_ADDRESS:-}" ] && timeout 30 "$(dirname "$ALLCLUSTER_PYTHON")/ray" status --address="$RAY_ADDRESS" >/dev/null 2>&1; then
      return 0
    fi
    jobs -rp | grep -qx "${_ray_steps[-1]}" || { echo "ray-cluster.sh: the Ray head on $node exited" >&2; return 1; }
    sleep 0.5
  done
  echo "ray-cluster.sh: the Ray head on $node did not answer in 120 s" >&2
  return 1
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

# ---------------------------------------------------------------- the driver
ray_cluster_run() {  # the driver: its exit code is the job's
  local rc
  while :; do
    rc=0; _ray_run_driver "$@" || rc=$?
    case $rc in 0|"$EX_TEMPFAIL"|"$EX_IOERR") return "$rc" ;; esac
    _ray_restart_after_ray_failure "the driver (exit $rc)" || return "$rc"
    _ray_up || return 1
  done
}

_ray_run_driver() {  # DRIVER ARGS...: one run of the driver (a condition: errexit is off in here)
  if [ -n "$_ray_warned" ]; then
    _log "not starting the driver: the time-limit warning already came"
    return "$EX_TEMPFAIL"
  fi
  # The user's relative paths (--config, --input, --out) mean what they meant where the job was
  # submitted: the batch shell's working directory (sbatch's submit directory, or its --chdir), also
  # when ALLCLUSTER_HOME points elsewhere.
  local driver
  driver=$(_ray_driver_path "$1"); shift
  _ray_read_kill_wait
  _log "driver: $ALLCLUSTER_PYTHON $driver $* (in $PWD)"
  "$ALLCLUSTER_PYTHON" "$driver" "$@" &
  _ray_driver_pid=$!
  local rc
  while :; do
    if [ -n "$_ray_stopping" ]; then
      _ray_wait_for_stopping_driver
      break
    fi
    rc=0; wait "$_ray_driver_pid" || rc=$?
    # > 128 with the driver alive: a trapped signal interrupted `wait`; wait again
    [ "$rc" -gt 128 ] && kill -0 "$_ray_driver_pid" 2>/dev/null || break
  done
  # bash keeps a reaped background job's status: this repeats it, or gives the real one when the
  # driver exited between the interrupted wait and kill -0
  rc=0; wait "$_ray_driver_pid" 2>/dev/null || rc=$?
  _ray_driver_pid="" _ray_driver_ran=1     # a signal from now on finds no driver (its pid may be reused)
  case $rc in
    0) _log "driver exited with 0" ;;
    "$EX_TEMPFAIL") _log "driver exited with $rc: interrupted; rerunning the same command resumes" ;;
    "$EX_IOERR") _log "driver exited with $rc: the output's storage is full (see its error above); free space or raise the quota, then resubmit the same command to resume" ;;
    *) if [ -n "$_ray_driver_killed" ] && [ "$rc" = 137 ]; then
         _log "driver killed (exit $rc) after SIG$_ray_stopping; a rerun (a requeued job's next start) recovers what it had not written (scoring: its journal) or redoes it (sweep: from each trial's last checkpoint)"
       elif [ "$rc" = 137 ] && [ -z "$_ray_stopping" ]; then
         _log "driver killed by SIGKILL (exit 137: the kernel's OOM killer when the job outgrew its memory, or a kill -9); what it wrote is kept$([ -n "$_ray_warned" ] || echo "; this script does not requeue it: resubmit the same command to resume (with more --mem if it ran out)")"
       elif [ -n "$_ray_stopping" ]; then
         # Slurm's SIGTERM reached this node's Ray too; when the raylet stops first, Ray's core worker
         # ends the driver (exit 1, "connection to the plasma store is failed"), not the driver itself
         _log "driver exited with $rc after SIG$_ray_stopping: when Slurm signals the whole job, this node's Ray stops under the driver and Ray ends it; a rerun (a requeued job's next start) recovers what it had not written (scoring: its journal) or redoes it (sweep: from each trial's last checkpoint)"
       else
         _log "driver exited with $rc"
       fi ;;
  esac
  return $rc
}
