"""Stop signals of a driver (sweep or scoring): SIGINT, SIGTERM and SIGUSR1 end it gracefully, exit 75.

The contract (``slurm/*.sh`` rely on it): on any of the three signals a driver stops at its next safe
point, keeps what it has written, prints one line saying so and exits 75 (``EX_TEMPFAIL``): rerunning
the same command resumes. A scoring run stops after the batch in hand (its rows are written). A
sweep stops its running trials (each keeps the checkpoint of its last finished epoch, so at most the
running epoch is lost), starts no new ones and writes its tables for what finished. An array task
(``--trial-index``: one Ray Train run, no Tune) ends at once on the first signal, also with 75.

The handler only sets a flag that the driver reads at its safe points: an exception raised from a
handler lands in whatever the main thread runs, which may be Ray code that catches and logs it
(seen: raised inside Ray Data's block pickling, the scoring run carried on). Only a second signal
raises, as a ``BaseException``.

Why a handler of our own: Ray Tune catches SIGINT and SIGUSR1 only while ``tune.run`` runs in the
main thread (``ray.tune.tune._setup_signal_catching``) and never SIGTERM, and ``ray.init`` replaces
the SIGTERM handler with ``sys.exit`` (``ray._private.worker.init``; a local head's node even kills
every Ray process on SIGTERM). So the driver keeps one handler for all three in the main thread,
put back right after ``ray.init`` (``ray_utils._ray_start_guarded``), and runs ``Tuner.fit`` in a
worker thread (where Tune installs none); the handler sets :data:`STOP_REQUESTED`, which a Tune
``Stopper`` turns into ``stop_all``.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from allcluster.atomic import atomic_write_text, is_storage_full, storage_full_error
from allcluster.console import say

EX_TEMPFAIL = 75
# Set by slurm/ray-cluster.sh to a file in the job's private folder: see report_progress.
PROGRESS_FILE_ENV = "ALLCLUSTER_PROGRESS_FILE"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# Module level on purpose: Tune (cloud)pickles its Stopper and callbacks into the experiment state, and
# an Event cannot be pickled; by reference to this module every copy sees the same flag.
STOP_REQUESTED = threading.Event()


class Interrupted(BaseException):
    """A stop signal arrived while nothing could be stopped gracefully (before Tune, a second signal,
    an array task). A ``BaseException``, like ``KeyboardInterrupt``: ``except Exception`` blocks (in
    Ray too) must not swallow it."""

    def __init__(self, signal_name: str):
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name


class StopSignals:
    """Context manager owning SIGINT/SIGTERM/SIGUSR1 for one driver run (main thread only).

    Outside :meth:`graceful` the first signal raises :class:`Interrupted` at once (used while
    Ray starts: nothing is running that could be saved); inside it the first signal only sets
    :data:`STOP_REQUESTED` and a second one raises. ``signal_name``: the first signal's name ("" if none).
    """

    def __init__(self, on_first: str = ""):
        self.signal_name = ""
        self._on_first = on_first       # printed (``{signal}`` filled in) when a graceful stop is asked for
        self._graceful = self._held = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        STOP_REQUESTED.clear()
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def graceful(self, on: bool = True) -> None:
        """While on, the first signal only asks to stop (Tune's ``Stopper`` reads it) instead of raising."""
        self._graceful = on

    def hold(self) -> None:
        """From now on no signal raises, not even a second one: the run is writing what it has (the
        sweep's tables, the scoring rows and summary), which must not be cut short. Wanted because
        ``slurm/ray-cluster.sh`` sends the second SIGTERM itself once the job's Ray stops under the
        driver, as the driver leaves Ray's wait."""
        self._held = True

    @property
    def requested(self) -> bool:
        return STOP_REQUESTED.is_set()

    def raise_if_requested(self) -> None:
        """At a safe point of a graceful run: end it now if a stop was asked for."""
        if STOP_REQUESTED.is_set():
            raise Interrupted(self.signal_name)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        first = not STOP_REQUESTED.is_set()
        if first:
            self.signal_name = name
            STOP_REQUESTED.set()
        if first and self._graceful:
            say(self._on_first.format(signal=name) + " (send it again to stop at once)")
            return
        if self._held:
            return
        raise Interrupted(self.signal_name)


def stop_at_once() -> None:
    """From a driver's first line until :class:`StopSignals` takes over (and again after it): the
    first SIGINT/SIGTERM/SIGUSR1 raises :class:`Interrupted`, which the command line turns into exit
    75. Python's own actions would end the process with 130, 143 or 138 instead: seen when the
    time-limit warning came while the driver was still importing torch (``slurm/ray-cluster.sh``
    forwards it as soon as the driver runs)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _interrupt)


def _interrupt(signum: int, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def behind(err: BaseException):
    """``err`` and every exception behind it: Python's ``__cause__``/``__context__`` and Ray's
    wrappers (``RayTaskError.cause``, Ray Train's ``ControllerError.controller_failure``,
    ``WorkerGroupError.worker_failures`` and ``WorkerHealthCheckFailedError.health_check_failure``,
    which is how a Train worker's death reaches the trial), each once, nearest first: breadth-first, so
    that of several failed Train workers rank 0's comes first."""
    todo, seen = collections.deque([err]), set()
    while todo:
        found = todo.popleft()
        if found is None or id(found) in seen:
            continue
        seen.add(id(found))
        yield found
        # what Ray's wrappers carry before the Python chain of the wrapper itself (raised in Ray's code)
        todo += [getattr(found, "cause", None), getattr(found, "controller_failure", None),
                 getattr(found, "health_check_failure", None),
                 *(getattr(found, "worker_failures", None) or {}).values(), found.__cause__, found.__context__]


def storage_full_cause(err: BaseException) -> OSError | None:
    """The full disk or quota (ENOSPC, EDQUOT) behind ``err``, if any: also one a Ray task or a Ray
    Train worker met (Ray's wrappers of it carry no errno themselves)."""
    return next((found for found in behind(err) if is_storage_full(found)), None)


def storage_full_at(err: BaseException, folder: str | Path) -> OSError | None:
    """The full disk or quota behind ``err`` as an OSError naming its file, or ``folder`` where it named
    none (Ray Train copies checkpoints with pyarrow, whose errors name no file); None if none."""
    full = storage_full_cause(err)
    return None if full is None else storage_full_error(full.errno, full.filename or folder)


def interrupted_cause(err: BaseException) -> Interrupted | None:
    """The :class:`Interrupted` behind ``err``, if any. A handler's exception raised while the main
    thread is inside Ray's compiled code (``ray.get``: ``_raylet.check_signals``) comes out as
    ``SystemError: ... returned a result with an exception set``, the Interrupted as its context."""
    return next((found for found in behind(err) if isinstance(found, Interrupted)), None)


class InterruptionCaught:
    """``with InterruptionCaught() as caught:`` ends the block quietly when a stop signal's
    :class:`Interrupted` ends it, in whatever wrapper it comes out (from inside Ray's compiled code:
    a ``SystemError``, see :func:`interrupted_cause`); ``caught.signal_name`` names the signal ("" if
    none). Any other exception passes through."""

    def __init__(self):
        self.signal_name = ""

    def __enter__(self) -> "InterruptionCaught":
        return self

    def __exit__(self, kind, err, traceback) -> bool:
        cause = interrupted_cause(err) if isinstance(err, (Interrupted, Exception)) else None
        if cause is not None:
            self.signal_name = cause.signal_name
        return cause is not None


def interrupted_exit(signal_name: str) -> int:
    """Say that a stop signal ended the command outside a graceful stop; the exit code (75)."""
    say(f"allcluster: interrupted by {signal_name} outside a graceful stop; what was written is kept: "
        f"rerun the same command to resume (exit {EX_TEMPFAIL})")
    return EX_TEMPFAIL


def run_driver(command: str, argv: list[str]) -> int:
    """A Slurm job's driver (``jobs/*.py``): ``allcluster COMMAND ARGV...`` with the stop signals
    ending it with 75 from the first line on (:func:`stop_at_once`), imports included."""
    stop_at_once()
    try:
        from allcluster.cli import main

        return end_of_process(main([command, *argv]))
    except Interrupted as err:                  # while importing
        return interrupted_exit(err.signal_name)


def end_of_process(code: int) -> int:
    """The command line's last step, its work done and ``code`` decided: from here no stop signal
    changes the code (the time-limit warning a moment late, ``ray-cluster.sh``'s second SIGTERM), and
    a process that used Ray ends at once (``os._exit`` after flushing), its output all written.

    Python's own shutdown would first join the threads Ray and Tune started, then run Ray's exit
    hook, and both wait on the job's Ray, which after Slurm's SIGTERM may be gone. Seen: a sweep
    driver that had written its tables and printed its exit line was still alive at Slurm's
    ``KillWait`` 30 s later, and that SIGKILL took the batch shell too, before it could log the exit
    and clean up. And a signal during that shutdown met our handler inside an atexit callback (a
    traceback) or, later, the default action: a finished array task exited 138 and Slurm requeued
    it. A local Ray this process started is killed with it (:func:`kill_descendants`)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    if "ray" not in sys.modules:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    kill_descendants()
    os._exit(code)


def kill_descendants() -> None:
    """SIGKILL every process this one started, and theirs: a local Ray's GCS, raylet, workers and
    agents. Without ``ray.shutdown()`` (which ``os._exit`` skips) the raylet and workers follow the
    driver, but Ray 2.60's ``DashboardAgent`` and ``RuntimeEnvAgent`` stayed alive on their own,
    about 240 MB after every interrupted local run (seen here). The tree is frozen first (SIGSTOP,
    then a fresh look for what the frozen ones started meanwhile, until nothing new shows): a
    process that starts another between one look at ``/proc`` and the kill (the raylet starting a
    worker) would leave that one orphaned. A Slurm job's Ray is not this process's child: ``ray
    start`` in ``slurm/ray-cluster.sh`` owns it. Linux ``/proc``; elsewhere nothing."""
    frozen: list[int] = []
    for _ in range(100):    # bounded: each round only meets processes started before the last freeze
        new = [pid for pid in _descendants(os.getpid()) if pid not in frozen]
        if not new:
            break
        frozen += new
        _signal_each(new, signal.SIGSTOP)
    _signal_each(frozen, signal.SIGKILL)


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` in the process tree, from one look at ``/proc``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue        # ended meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _signal_each(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            pass            # ended meanwhile


def report_progress(units: int, what: str) -> None:
    """Record how much work this run completed (``units`` of ``what``: rows written, epochs recorded)
    in the file named by ``$ALLCLUSTER_PROGRESS_FILE``, when set.

    The Slurm job script reads it when the time-limit warning stopped the driver: a job requeues
    itself only while its starts make progress, so one that cannot finish a unit of work before the
    warning (an epoch longer than the time limit) stops after a few starts instead of looping
    (``slurm/ray-cluster.sh``). Written as ``"<units> <what>"``, one line.
    """
    path = os.environ.get(PROGRESS_FILE_ENV)
    if path:
        atomic_write_text(path, f"{int(units)} {what}\n")


# One event per call_in_thread call, set when its function returns or raises (see left_running).
_CALLS_ENDED: list[threading.Event] = []


def left_running() -> bool:
    """A :func:`call_in_thread` function that a signal's :class:`Interrupted` left behind is still
    running (inside Ray). Told by the function's own end, not ``Thread.is_alive``: a join cut short by
    a handler's exception marks the thread stopped while it runs on (CPython 3.11, bpo-45274)."""
    return not all(ended.is_set() for ended in _CALLS_ENDED)


def call_in_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a worker thread while the main thread waits, free to run the signal handlers.

    Used for ``Tuner.fit`` and ``TorchTrainer.fit``: off the main thread neither installs its own
    SIGINT/SIGUSR1 handler (Tune's ``_setup_signal_catching``, Train's ``_register_sigint_handler``
    both check ``threading.main_thread()``). ``fn``'s exception, if any, is raised here; a
    :class:`Interrupted` from a handler leaves the (daemon) thread behind (:func:`left_running`).
    """
    box: dict = {}
    ended = threading.Event()
    _CALLS_ENDED[:] = [e for e in _CALLS_ENDED if not e.is_set()] + [ended]

    def target():
        try:
            box["result"] = fn()
        except BaseException as err:      # noqa: BLE001 - handed to the main thread
            box["error"] = err
        finally:
            ended.set()

    thread = threading.Thread(target=target, name="allcluster-fit", daemon=True)
    thread.start()
    while not ended.wait(0.5):
        pass
    if "error" in box:
        raise box["error"]
    return box["result"]
