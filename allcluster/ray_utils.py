"""Connecting to Ray: an existing cluster (Slurm bootstrap, ``RAY_ADDRESS``) or a local one."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from typing import Iterator

# Settings the driver's environment hands to every Ray worker (caches and offline weight stores).
PASSED_TO_WORKERS = ("ALLCLUSTER_CACHE_DIR", "ALLCLUSTER_LOG_LEVEL", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME")
# Ray Train's defaults our jobs change (a value in the driver's environment wins). Its preemption
# watcher, one more actor per training run, polls Ray for node drains, which cloud autoscalers
# announce, and only logs them; on Slurm, preemption and time limits arrive as signals
# (slurm/ray-cluster.sh), so it only lengthened every trial's start (~2 s on a 2-core node).
RAY_TRAIN_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Ray's own bookkeeping actors: what they print (resource requests, worker-group start-up, their
# retries and tracebacks when the machine is busy) is Ray's business, not the job's.
RAY_INTERNAL_ACTORS = frozenset({"TrainController", "PlacementGroupCleaner", "AutoscalingCoordinator",
                                 "_AutoscalingCoordinatorActor", "_StatsActor", "SplitCoordinator"})
# Lines Ray's own code prints inside any worker: its C++ log format, e.g. "[2026-11-30 20:21:58,542 E
# 2361 2419] core_worker.cc:2465: ..." (ray-project/ray#53727), and Ray Train's set-up notice.
_RAY_OWN_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+:\d+: "
                           r"|^Setting up process group for: ")
# Ray's driver-side notices on every start: token auth (which stays on: it keeps other users' jobs
# out) and the C++ log's own line about RAY_BACKEND_LOG_LEVEL.
_RAY_DRIVER_NOTICE = re.compile(r"Token authentication is enabled for this Ray cluster"
                                r"|logging\.cc:\d+: Set ray log level from environment variable")


def ensure_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True) -> bool:
    """Connect once per process; True if this call connected (False: already connected).

    ``address`` (or ``$RAY_ADDRESS``, which ``slurm/ray-cluster.sh`` exports) joins a running
    cluster; otherwise a local single-node Ray starts with this machine's CPUs (and GPUs), with
    its dashboard unless ``dashboard`` is False (a job that runs no Ray Train: scoring).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    env_vars = job_env_vars()
    env = {"env_vars": env_vars}
    quiet = _ray_log_level()
    with _ray_driver_notices_dropped(quiet > logging.INFO), _ray_start_guarded():
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=True, logging_level=quiet)
        else:
            # The dashboard serves Ray's State API: without it Ray Train cannot free the placement group
            # of a trial that Tune (ASHA) stops, and that trial's CPUs/GPUs stay reserved. Ray Data
            # does not use it; its start costs a scoring job about a second of a small node's CPU.
            # A local Ray's processes inherit this environment: set it here rather than as a runtime
            # env, so that Ray's pre-started workers (one per CPU) can serve the job instead of new
            # ones starting beside them while the model replicas load.
            os.environ.update(env_vars)
            try:
                ray.init(num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True, logging_level=quiet)
            finally:
                # Ray's processes, started above, keep the malloc preload; this process's later
                # children (Chromium for the report, sbatch) should not get it.
                if "LD_PRELOAD" in env_vars:
                    del os.environ["LD_PRELOAD"]
        if quiet > logging.INFO:
            quiet_worker_output()
    if quiet > logging.INFO:
        quiet_ray_data_console()
    return True


def job_env_vars() -> dict[str, str]:
    """The environment every Ray process of a job gets: offline weight stores (workers never go
    online, whatever the driver's environment says: stated here, not inherited), the driver's
    :data:`PASSED_TO_WORKERS`, :data:`RAY_TRAIN_DEFAULTS` and the allocator settings."""
    from allcluster.device import allocator_env
    from allcluster.models.weights import worker_env

    env_vars = {**worker_env(), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env_vars.update({k: os.environ[k] for k in PASSED_TO_WORKERS if os.environ.get(k)})
    env_vars.update({k: os.environ.get(k, v) for k, v in RAY_TRAIN_DEFAULTS.items()})
    env_vars.update(allocator_env())
    return env_vars


@contextlib.contextmanager
def ray_connected(address: str | None = None) -> Iterator[None]:
    """:func:`ensure_ray` for one block: a connection the block made is closed when it ends, however
    it ends (but see :func:`stopping_joined_cluster`), by an explicit ``ray.shutdown`` while the
    interpreter is whole. Left to Ray's exit hook,
    the shutdown runs during interpreter finalization, beside whatever threads a stop signal left
    running (``call_in_thread`` leaves Tune's); one CI run saw a sweep driver, warned while starting,
    print its exit line and then die there with a segmentation fault (exit 139, not 75)."""
    from allcluster.interrupt import left_running

    connected = ensure_ray(address)
    try:
        yield
    finally:
        # not under a thread still inside Ray (a second signal leaves Tune's fit running): the exit
        # hook then, as before
        if connected and not left_running() and not stopping_joined_cluster(address):
            leave_ray()


def stopping_joined_cluster(address: str | None) -> bool:
    """A stop signal came and this process joined a running cluster (``address`` or ``$RAY_ADDRESS``):
    Slurm's SIGTERM goes to the job's Ray too, and disconnecting waits on its stopping head (5 s seen
    here), time taken from Slurm's KillWait. Such a connection is left to the command line's
    ``end_of_process``, which ends the process at once."""
    from allcluster.interrupt import STOP_REQUESTED

    return STOP_REQUESTED.is_set() and bool(address or os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def _ray_start_guarded():
    """Around ``ray.init``, which replaces the SIGTERM handler with its own ``sys.exit(15)``
    (``ray._private.worker.init``; a local head's node with one that stops its processes and exits
    with 1: ``ray._private.node``): the driver's handler is put back at once, and a SIGTERM that came
    while Ray started (one of Ray's handlers ran: a ``SystemExit``, which nothing else in the start
    raises) is the driver's :class:`Interrupted`, so the command still ends with 75. A start that
    fails or is interrupted part way leaves a half-made connection: it is taken down now rather than
    in Ray's exit hook (see :func:`ray_connected`)."""
    import ray

    from allcluster.interrupt import Interrupted

    ours = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    except BaseException as err:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if isinstance(err, SystemExit) and callable(ours):
            raise Interrupted("SIGTERM") from None
        raise
    finally:
        if callable(ours):
            signal.signal(signal.SIGTERM, ours)


def leave_ray() -> None:
    """Disconnect now (a local Ray this process started stops) rather than in Ray's exit hook, which
    first sleeps 0.5 s so that workers' last lines can reach the console
    (``ray._private.worker.shutdown(_exiting_interpreter=True)``): for a job whose results are all
    written. About 1 s of a scoring command's wall clock on a 2-core node."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def _ray_driver_notices_dropped(quiet: bool):
    """Around ``ray.init`` when ``quiet``: the driver's C++ core worker logs only fatal lines (Ray Data's
    actor pools make it print an ``E ... core_worker.cc`` line on every start, ray-project/ray#53727),
    and Ray's start-up notices are dropped. Both write to file descriptor 2 below Python, so it goes to
    a temporary file during the start and every other line of it is written back after. A user's own
    ``RAY_BACKEND_LOG_LEVEL`` wins. A local Ray's node inherits the level (its session log folder then
    holds fatal lines only); a Slurm job's nodes are started by ``slurm/ray-cluster.sh`` with Ray's
    default."""
    if not quiet:
        yield
        return
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    sys.stderr.flush()
    screen = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(screen, 2)
            os.close(screen)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not _RAY_DRIVER_NOTICE.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def job_lines(batch: dict) -> list[str]:
    """The lines of one batch of forwarded worker output (Ray's log-monitor record: ``lines``,
    ``actor_name``, ...) that come from the job's own code, not from Ray's bookkeeping."""
    if batch.get("actor_name") in RAY_INTERNAL_ACTORS:
        return []
    return [line for line in batch.get("lines", []) if not _RAY_OWN_LINE.match(line)]


def quiet_worker_output() -> None:
    """Workers' output still reaches the driver (our progress lines, tracebacks of our code), less
    what ``job_lines`` leaves out. Wraps the printer ``ray.init(log_to_driver=True)`` registers with
    Ray's stdout/stderr dispatcher, under the same name (``ray.shutdown`` removes it by that name);
    if a Ray version names it otherwise, its output stays as it is."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not sys.stderr.isatty():           # a Slurm log or a file: Ray's prefixes without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")     # (read by Ray's printer at each line)
    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    if len(printers) != 1:
        return
    print_batch = printers[0]

    def print_job_lines(batch: dict) -> None:
        lines = job_lines(batch)
        if lines:
            print_batch({**batch, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_job_lines)


def quiet_ray_data_console() -> None:
    """Ray Data's INFO lines ("Starting execution of Dataset", its execution plan) off the console;
    they still go to the session's ``ray-data.log``. Ray Data configures its ``console`` handler
    when ``ray.data`` is imported (in the driver only once), so this runs after that import."""
    import ray.data  # noqa: F401  (configures the ray.data logger)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)
            # we turn Ray Data's progress bars off for our own progress line: no hint about it
            handler.addFilter(lambda record: not record.getMessage().startswith("Progress bars disabled"))


def _ray_log_level() -> int:
    """Ray's own driver-side INFO lines (the start-up banner) only at ``--log-level debug``:
    our progress lines already say what runs. Workers' output still reaches the driver."""
    from allcluster.console import logger

    return logging.INFO if logger.getEffectiveLevel() <= logging.DEBUG else logging.WARNING


def wait_for_nodes(expected: int, timeout_s: float) -> list[dict]:
    """Block until ``expected`` nodes are alive in the connected cluster; returns them."""
    import time

    import ray

    deadline = time.time() + timeout_s
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= expected:
            return alive
        if time.time() > deadline:
            raise TimeoutError(f"only {len(alive)} of {expected} Ray nodes joined within {timeout_s:g} s")
        time.sleep(0.5)


def _main(argv: list[str]) -> int:
    """``python -m allcluster.ray_utils wait N TIMEOUT``: used by slurm/ray-cluster.sh."""
    import ray

    if len(argv) != 3 or argv[0] != "wait":
        print("usage: python -m allcluster.ray_utils wait NODES TIMEOUT_S")
        return 2
    ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    try:
        nodes = wait_for_nodes(int(argv[1]), float(argv[2]))
    except TimeoutError as err:
        print(f"[ray-cluster] {err}")
        return 1
    for n in sorted(nodes, key=lambda n: n["NodeManagerAddress"]):
        res = n["Resources"]
        print(f"[ray-cluster] node {n['NodeManagerHostname']} ({n['NodeManagerAddress']}): "
              f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs, "
              f"{res.get('memory', 0) / 2**30:.1f} GiB memory")
    total = ray.cluster_resources()
    print(f"[ray-cluster] all {len(nodes)} nodes joined: {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
