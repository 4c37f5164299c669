"""`sbatch slurm/sweep.sh` on a real Slurm cluster: the local 2-node one from slurm/dev/.

CI starts it (`.ci/run`); elsewhere start it with `sudo slurm/dev/local-cluster-up.sh` and
`export SLURM_CONF=/etc/slurm-2node/slurm.conf`. Without a reachable Slurm these tests skip loudly.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from allcluster.score.heatmaps import load_heatmap
from allcluster.slurm_alloc import gpus_in
from tests.conftest import REPO, LoggedProcess

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
LOCAL_CONF = Path("/etc/slurm-2node/slurm.conf")


def _slurm_env() -> dict:
    env = dict(os.environ)
    if "SLURM_CONF" not in env and LOCAL_CONF.is_file():
        env["SLURM_CONF"] = str(LOCAL_CONF)
    return env


def _submit(slurm: dict, options: list[str], script: list[str], cwd: Path = REPO, env: dict | None = None) -> str:
    """sbatch without --wait (a requeued job passes through PENDING again) from ``cwd``, with ``env``
    added to the Slurm environment; returns the job id."""
    done = subprocess.run(["sbatch", "--parsable", *options, *script], cwd=cwd, env={**slurm["env"], **(env or {})},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _job(slurm: dict, job: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode...); {} once Slurm forgot it."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm["env"], capture_output=True,
                         text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def _wait_final(slurm: dict, jobs: list[str], timeout_s: float, on_poll=None) -> dict:
    """Poll until every job is in a final state (a requeued job is PENDING again, not final). However the
    wait ends short of that (its deadline, a failed check in ``on_poll``, pytest's own timeout), the
    jobs are cancelled: a failing test leaves no job holding the nodes the next tests need."""
    deadline, states = time.time() + timeout_s, {}
    try:
        while time.time() < deadline:
            states = {j: _job(slurm, j) for j in jobs}
            if on_poll:
                on_poll(states)
            if all(s.get("JobState") in FINAL for s in states.values()):
                return states
            time.sleep(2)
        raise AssertionError(f"jobs {jobs} not finished in {timeout_s:.0f} s: {states}")
    except BaseException:
        subprocess.run(["scancel", *jobs], env=slurm["env"])
        raise


def _run_seconds(state: dict) -> int:
    """A job's ``RunTime`` ([D-]HH:MM:SS) in seconds."""
    days, _, clock = state.get("RunTime", "0:0:0").rpartition("-")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def _start_requeued_now(slurm: dict, job: str, state: dict) -> None:
    """A requeued job waits PENDING (Reason=BeginTime) about a minute before Slurm starts it again;
    the tests need not wait for that (`StartTime` is what `scontrol update` calls the begin time)."""
    if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm["env"], capture_output=True)


def _assert_private_ray_state(log: str) -> None:
    """Every Ray node ran in a fresh private temp root (mode 700, ours), removed at the end; the job's
    private folder (token, address) was mode 700 too; every start's batch shell got to the end of its
    clean-up (a shell still busy at Slurm's KillWait, 30 s after a requeue or a scancel, is SIGKILLed
    and logs nothing more)."""
    starts = re.split(r"(?=\[ray-cluster [0-9:]+\] job \d+: restart \d+ of job )", log)[1:]
    unfinished = [start for start in starts if "stopped: Ray's steps ended" not in start]
    assert starts and not unfinished, (f"{len(unfinished)} of {len(starts)} starts did not end their clean-up; "
                                       f"the end of the first:\n{(unfinished or [log])[0][-4000:]}")
    user = getpass.getuser()
    roots = re.findall(r"temp root (\S+) \((\d+) (\S+)\), Ray temp dir (\S+)", log)
    assert roots, log[-3000:]
    for root, mode, owner, ray_dir in roots:
        assert (mode, owner) == ("700", user) and ray_dir.startswith(root + "/"), (root, mode, owner, ray_dir)
        assert not Path(root).exists(), f"{root} left behind"
    assert re.search(rf"private folder 700 {user} ", log) and "token -rw-------" in log


@pytest.fixture(scope="module")
def slurm() -> dict:
    """Nodes of a reachable Slurm cluster, or a loud skip saying how to get one."""
    env = _slurm_env()
    reason = None
    if not shutil.which("sbatch"):
        reason = "sbatch not installed"
    else:
        found = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t %G"], env=env, capture_output=True, text=True)
        nodes = [line.split()[0] for line in found.stdout.splitlines()
                 if line.split()[1].rstrip("*") in ("idle", "mix") and not line.split()[1].endswith("*")]
        gpus = {line.split()[0]: sum(gpus_in(line.split()[2]).values()) for line in found.stdout.splitlines()}
        if found.returncode or not nodes:
            reason = f"no usable Slurm nodes (sinfo rc {found.returncode}: {found.stderr.strip()[:200]})"
    if reason:
        message = (f"SLURM ABSENT: {reason}; the Slurm tests are SKIPPED. Start the local test cluster with "
                   "`sudo slurm/dev/local-cluster-up.sh` (CI does this in .ci/run).")
        warnings.warn(message)
        print(f"\n*** {message} ***\n", file=sys.stderr)
        pytest.skip(message)
    queued = subprocess.run(["squeue", "-h", "-o", "%i %j %T %M %N"], env=env, capture_output=True, text=True).stdout
    if queued.strip():   # they would hold the CPUs the tests count on, and fail them in confusing ways
        pytest.fail(f"jobs already in the queue before the Slurm tests:\n{queued}end them first (the local "
                    "cluster: slurm/dev/local-cluster-down.sh, then local-cluster-up.sh)")
    return {"env": env, "nodes": nodes, "gpus": gpus}


def _two_gpus_per_node(slurm: dict) -> bool:
    """Two nodes or more, each with 2 GPUs or more (the local cluster's fake ones)."""
    return len(slurm["nodes"]) >= 2 and all(slurm["gpus"].get(n, 0) >= 2 for n in slurm["nodes"])


def two_trial_grid(path: Path) -> Path:
    """The CI grid (configs/sweep/ci_tiny.yaml) cut to two trials, one optimizer: one trial per 2-CPU
    node, and the whole Slurm suite fits CI's time."""
    text = (REPO / "configs/sweep/ci_tiny.yaml").read_text()
    assert "optim.name: [adam, sgd]" in text
    path.write_text(text.replace("optim.name: [adam, sgd]", "optim.name: [adam]"))
    return path


def test_sbatch_sweep_requeued_mid_trial_finishes_every_trial_across_two_nodes(slurm, ray_local, real_manifest, tmp_path):
    """The CI grid (two trials) on two nodes; once a trial has checkpointed its first epoch (of two), `scontrol
    requeue` kills the job (SIGTERM everywhere) and puts it back in the queue: the restart resumes and
    every planned trial finishes. Also checks the private Ray state of both starts, and (where the nodes
    have 2 GPUs each: the local cluster's fake ones) that `--gpus=3`, which Slurm splits 2 + 1, gives
    each node's Ray its own share (the trials themselves use none)."""
    nodes = min(2, len(slurm["nodes"]))
    experiment = tmp_path / "sweep"
    log = tmp_path / "job.out"
    config = two_trial_grid(tmp_path / "sweep.yaml")
    split_gpus = nodes == 2 and _two_gpus_per_node(slurm)
    if not split_gpus:
        warnings.warn("no 2 GPUs per node on this Slurm: the --gpus=3 split is not checked "
                      "(slurm/dev/local-cluster-up.sh gives each node 2 fake ones)")
    # --log-level debug (through the environment): Ray's own worker output reaches the log unfiltered
    job = _submit(slurm, [f"--nodes={nodes}", "--cpus-per-task=2", "--mem=4G", "--time=00:25:00", f"--output={log}",
                          "--export=ALL,ALLCLUSTER_LOG_LEVEL=debug", *(["--gpus=3"] if split_gpus else [])],
                  ["slurm/sweep.sh", str(config), "--set", f"train.data.manifest={real_manifest}",
                   "--set", f"experiment_dir={experiment}"])
    requeued = []

    def requeue_mid_trial(states):
        if not requeued and states[job].get("JobState") == "RUNNING" and any((experiment / "trials").rglob("checkpoint_*")):
            done = subprocess.run(["scontrol", "requeue", job], env=slurm["env"], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            requeued.append(time.time())
        elif requeued:
            _start_requeued_now(slurm, job, states[job])

    final = _wait_final(slurm, [job], 1800, requeue_mid_trial)[job]
    logs = log.read_text(errors="replace")
    assert requeued, f"no trial checkpointed before the job ended: {final}\n{logs[-4000:]}"
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", f"{final}\n{logs[-6000:]}"
    assert int(final["Restarts"]) >= 1
    assert f"restart 0 of job {job}" in logs and f"restart 1 of job {job}" in logs, logs[-4000:]
    assert "requeueing job" not in logs   # requeued from outside: the job must not requeue itself again
    assert logs.count(f"all {nodes} nodes joined") >= 2, logs[-4000:]
    if split_gpus:   # each start: one node's Ray with 2 GPUs, the other's with 1 (Slurm picks which)
        per_node = re.findall(r"\[ray-cluster\] node \S+ \(\S+\): \S+ CPUs, (\d+) GPUs", logs)
        assert len(per_node) >= 4 and sorted(per_node[:2]) == sorted(per_node[2:4]) == ["1", "2"], per_node
        assert logs.count(f"all {nodes} nodes joined: 4 CPUs, 3 GPUs") >= 2, logs[-4000:]
    assert logs.count("token check: a client with another token is refused") >= 2
    _assert_private_ray_state(logs)
    # this test's own local Ray (ray_local) runs on the same machine: Ray Train's helpers must still
    # find the job's cluster (RAY_ADDRESS, exported by ray-node.sh), not stop at two candidates
    assert "(PlacementGroupCleaner" in logs or "(TrainController" in logs, "debug level shows Ray's worker output"
    assert "Found multiple active Ray instances" not in logs, logs[-4000:]
    trials = pd.read_parquet(experiment / "trials.parquet")
    assert len(trials) == 2 and trials["trial_id"].is_unique
    assert (trials["status"] == "finished").all(), trials[["trial_id", "status", "error"]].to_string()
    for column in ("val_accuracy", "test_accuracy", "val_macro_f1", "test_macro_f1", "test_auc"):
        assert trials[column].between(0, 1).all(), column
    card = json.loads((experiment / "best_model" / "model_card.json").read_text())
    ranked = trials.sort_values(["val_macro_f1", "val_loss", "trial_id"], ascending=[False, True, True])  # ties: loss, id
    assert card["sweep"]["trial_id"] == ranked.iloc[0]["trial_id"]
    assert "2 trials: 2 finished" in logs
    _assert_the_driver_ended_before_killwait(logs.split(f"restart 1 of job {job}")[0])
    last_start = logs.split(f"restart 1 of job {job}")[1]   # its Ray steps stopped on request: exit 0, no srun error
    assert last_start.count("Ray stopped on ") == nodes and "Exited with exit code" not in last_start, last_start[-3000:]
    if nodes == 2:
        hosts = {line.split(" on ")[1].split()[0] for line in logs.splitlines() if "[ray-node" in line and " on n" in line}
        assert len(hosts) == 2, f"Ray nodes should run on two hosts, saw {hosts}"
    leftover = subprocess.run(["squeue", "-h"], env=slurm["env"], capture_output=True, text=True).stdout
    assert not leftover.strip(), f"jobs left in the queue: {leftover}"


def test_a_sweep_warned_before_its_first_epoch_at_every_start_stops_requeueing_itself(slurm, real_manifest, tmp_path):
    """The requeue-loop guard on the real cluster: each start of a sweep gets the time-limit warning
    (SIGUSR1 to the batch shell, what --signal=B:USR1 sends) before any epoch ends, as when an epoch
    outlasts the time limit. With ALLCLUSTER_MAX_STALLED_STARTS=2 the job requeues itself once, then
    ends (exit 75) instead of returning to the queue forever, and leaves no count behind."""
    experiment, log = tmp_path / "sweep", tmp_path / "job.out"
    config = two_trial_grid(tmp_path / "sweep.yaml")
    # --time 30 minutes: Slurm's own warning (sweep.sh's B:USR1@900) stays 15 minutes away
    job = _submit(slurm, ["--nodes=1", "--cpus-per-task=2", "--mem=3G", "--time=30", f"--output={log}",
                          "--export=ALL,ALLCLUSTER_MIN_RUN_BEFORE_REQUEUE_S=0,ALLCLUSTER_MAX_STALLED_STARTS=2"],
                  ["slurm/sweep.sh", str(config), "--set", f"train.data.manifest={real_manifest}",
                   "--set", f"experiment_dir={experiment}"])
    warned = set()

    def warn_each_start(states):   # once this start's driver runs (its first line: it holds its handlers)
        starts = log.read_text(errors="replace").count("trials (2 grid cells) in") if log.exists() else 0
        if starts and starts not in warned and states[job].get("JobState") == "RUNNING":
            subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm["env"], check=True)
            warned.add(starts)
        _start_requeued_now(slurm, job, states[job])

    final = _wait_final(slurm, [job], 900, warn_each_start)[job]
    text = log.read_text(errors="replace")
    assert not list(experiment.glob("trials/*/metrics.parquet")), "an epoch ended: the starts were not stalled"
    assert final["JobState"] == "FAILED" and final["ExitCode"] == "75:0", f"{final}\n{text[-4000:]}"
    assert int(final["Restarts"]) == 1 and text.count(f"requeueing job {job}") == 1, text[-4000:]
    assert text.count("driver exited with 75: interrupted") == 2
    assert "no progress this start (1 of 2 in a row" in text
    assert "no progress in 2 starts in a row" in text and "not requeueing" in text, text[-3000:]
    assert not (Path.home() / ".ray-slurm" / f"{job}.stalls").exists()
    _assert_private_ray_state(text)


def test_ray_on_slurm_gives_each_node_its_share_of_a_job_asked_per_gpu(slurm, tmp_path):
    """A batch script of one's own that sources ray-cluster.sh, with the job asked for in per-GPU terms:
    `--gpus=3 --cpus-per-gpu=1 --mem-per-gpu=1G` on two nodes. Slurm splits it 2 + 1, and each node's Ray
    gets that node's GPUs, CPUs and memory (70% of the GPUs x 1 GiB; no SLURM_MEM_PER_NODE is set)."""
    if not _two_gpus_per_node(slurm):
        pytest.skip("needs 2 nodes with 2 GPUs each (slurm/dev/local-cluster-up.sh gives each node 2 fake ones)")
    script, log = tmp_path / "start.sh", tmp_path / "job.out"
    script.write_text(f'#!/bin/bash\nset -euo pipefail\nsource "{REPO}/slurm/ray-cluster.sh"\nray_cluster_start\n')
    job = _submit(slurm, ["--nodes=2", "--gpus=3", "--cpus-per-gpu=1", "--mem-per-gpu=1G", "--time=10",
                          f"--output={log}"], [str(script)])
    final = _wait_final(slurm, [job], 300)[job]
    text = log.read_text(errors="replace")
    assert final["JobState"] == "COMPLETED", f"{final}\n{text[-4000:]}"
    nodes = sorted(re.findall(r"\[ray-cluster\] node \S+ \(\S+\): (\d+) CPUs, (\d+) GPUs, (\S+) GiB memory", text))
    assert nodes == [("1", "1", "0.7"), ("2", "2", "1.4")], text[-4000:]
    assert "all 2 nodes joined: 3 CPUs, 3 GPUs" in text and "Exited with exit code" not in text, text[-4000:]


def test_sweep_script_refuses_to_run_outside_a_job(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", "slurm/sweep.sh", "configs/sweep/ci_tiny.yaml"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not inside a Slurm job" in done.stderr


def test_a_ray_head_whose_port_another_process_takes_first_starts_again_before_publishing_its_address_and_outlives_a_usr1(
        tmp_path):
    """The race ray-node.sh leaves: a port checked free is bound by another process (another job's Ray
    on a shared node) before Ray binds it. Here a socket of this test takes the head's dashboard port
    as soon as the step prints it; the head must start again on fresh ports and publish only the
    address of the Ray that runs. Then a SIGUSR1 to every process of the step (`scancel --signal=USR1`
    without --batch) leaves Ray running and is passed on to the batch shell. No Slurm needed: the node
    script runs as its srun step would."""
    import socket
    import signal

    job_dir = tmp_path / "job"
    job_dir.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_ADDRESS"))}
    (job_dir / "token").write_text("a-token-of-this-job\n")                    # as ray-cluster.sh sets it up
    env.update(ALLCLUSTER_PYTHON=sys.executable, RAY_JOB_DIR=str(job_dir), SLURM_CPUS_ON_NODE="1",
               RAY_WORKER_PORTS="50", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(job_dir / "token"))
    calls = tmp_path / "scancel.calls"                  # a stand-in scancel on PATH, logging its arguments
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (tmp_path / "bin" / "scancel").chmod(0o755)
    # an array task whose own id is the array's: ray-cluster.sh hands the step its ARRAYID_TASK form
    env.update(SLURM_JOB_ID="4242", ALLCLUSTER_SLURM_SELF="4242_3", PATH=f"{tmp_path / 'bin'}:{env['PATH']}")
    ports = re.compile(r"ports: gcs (\d+), dashboard (\d+),")
    with LoggedProcess(["bash", "slurm/ray-node.sh", "head", "127.0.0.1"], env) as head, socket.socket() as thief:
        head.wait_until(lambda: ports.search(head.printed()), 60, "the head picked its ports")
        first_gcs, taken = ports.search(head.printed()).groups()
        thief.bind(("", int(taken)))
        thief.listen()
        _signal_session(head.pid, signal.SIGUSR1)   # while the head waits to publish: ignored by all of it
        head.wait_until(lambda: (job_dir / "address").is_file(), 120, "the head published its address")
        printed = head.printed()
        assert "retrying ray start" in printed and f"{taken} because it's already occupied" in printed, printed
        second_gcs = ports.findall(printed)[1][0]
        assert (job_dir / "address").read_text() == f"127.0.0.1:{second_gcs}\n" and second_gcs != first_gcs, printed
        joined = subprocess.run([sys.executable, "-m", "allcluster.ray_utils", "wait", "1", "60"], cwd=REPO,
                                env={**env, "RAY_ADDRESS": f"127.0.0.1:{second_gcs}"}, capture_output=True, text=True,
                                timeout=120)         # what ray-cluster.sh runs next, at the published address
        assert "all 1 nodes joined: 1 CPUs" in joined.stdout, joined
        # `scancel --signal=USR1 JOB` (no --batch): Slurm signals every process of the step. Ray ignores
        # it (it ended the head's `ray start`) and the head's shell passes it on to the batch shell
        assert not calls.exists(), "a signal before the address is published is not passed on"
        assert _signal_session(head.pid, signal.SIGUSR1) > 3, "the step's processes: its shell, Ray's"
        head.wait_until(lambda: "passed on to job 4242_3's batch shell" in head.printed(), 30, "the warning passed on")
        _signal_session(head.pid, signal.SIGUSR1)
        head.wait_until(lambda: "passed on once already" in head.printed(), 30, "the second warning")
        assert calls.read_text() == "--batch --signal=USR1 4242_3\n", calls.read_text()
        again = subprocess.run([sys.executable, "-m", "allcluster.ray_utils", "wait", "1", "30"], cwd=REPO,
                               env={**env, "RAY_ADDRESS": f"127.0.0.1:{second_gcs}"}, capture_output=True, text=True,
                               timeout=60)
        assert "all 1 nodes joined: 1 CPUs" in again.stdout and head.poll() is None, (again, head.printed())
        head.send_signal(signal.SIGTERM)            # what srun sends the step when ray-cluster.sh stops it
        printed = head.printed_by_exit(60)
    assert head.returncode == 0 and "Ray stopped on" in printed, printed
    for private in re.findall(r"temp root (\S+) ", printed):
        assert not Path(private).exists(), f"{private} left behind"


def _signal_session(sid: int, signum: int) -> int:
    """Send ``signum`` to every process of session ``sid`` (as Slurm signals every process of a step);
    how many there were."""
    members = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        with contextlib.suppress(OSError):               # gone meanwhile
            if os.getsid(pid) == sid:
                members.append(pid)
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return len(members)


def test_jobs_whose_arguments_are_refused_end_before_ray_starts(slurm, real_manifest, tmp_path):
    """A sweep job with a misspelt config key and a scoring job with a model folder that does not exist:
    the driver's own check (`--check`) refuses each in the batch shell, before Ray starts on any node:
    exit 2, the error naming the key or the folder, no Ray node started, nothing written."""
    experiment, scored, no_model = tmp_path / "sweep", tmp_path / "scored", tmp_path / "no-model"
    logs = {name: tmp_path / f"{name}.out" for name in ("sweep", "score")}
    common = ["--nodes=1", "--cpus-per-task=1", "--mem=1G", "--time=5"]
    sweep = _submit(slurm, [*common, f"--output={logs['sweep']}"],
                    ["slurm/sweep.sh", str(two_trial_grid(tmp_path / "sweep.yaml")), "--set", "train.fit.epochz=3",
                     "--set", f"train.data.manifest={real_manifest}", "--set", f"experiment_dir={experiment}"])
    score = _submit(slurm, [*common, f"--output={logs['score']}"],
                    ["slurm/score.sh", "--model", str(no_model), "--input", str(real_manifest), "--out", str(scored)])
    setting = _submit(slurm, [*common, f"--output={tmp_path / 'setting.out'}", "--export=ALL,RAY_PORT_RANGE=80-90"],
                      ["slurm/score.sh", "--model", str(no_model), "--input", str(real_manifest), "--out", str(scored)])
    final = _wait_final(slurm, [sweep, score, setting], 300)
    for name, job, message in [("sweep", sweep, "train.fit.epochz"), ("score", score, str(no_model))]:
        log = logs[name].read_text(errors="replace")
        assert final[job]["JobState"] == "FAILED" and final[job]["ExitCode"] == "2:0", f"{final[job]}\n{log[-3000:]}"
        assert message in log and "the driver refused its arguments (exit 2): Ray not started" in log, log[-3000:]
        assert "restart 0 of job" not in log and "[ray-node" not in log, log[-3000:]
    # a job script setting of the wrong form: refused by name before the driver's own check
    log = (tmp_path / "setting.out").read_text(errors="replace")
    assert final[setting]["ExitCode"] == "2:0" and "RAY_PORT_RANGE=80-90 is not LOW-HIGH" in log, log[-3000:]
    assert str(no_model) not in log and "[ray-node" not in log, log[-3000:]
    assert not experiment.exists() and not scored.exists()


def _assert_the_driver_ended_before_killwait(start: str) -> None:
    """After Slurm's SIGTERM to the whole job, the log of that start says how the driver ended: by
    its own handler (75; the batch shell sends the second SIGTERM once the head's Ray has stopped)
    or by Ray under it (the line names the signal). No line would mean it outlived Slurm's KillWait,
    whose SIGKILL takes the batch shell too, before it logs or cleans up."""
    ends = re.findall(r"driver exited with (\d+.*)", start)
    assert len(ends) == 1 and (ends[0].startswith("75: interrupted") or re.match(r"\d+ after SIGTERM: ", ends[0])), \
        start[-4000:]


def _ray_up(log: Path) -> bool:
    """The job's Ray cluster is up now (its current start joined all nodes and has not stopped)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return text.count(" nodes joined") > text.count("stopping Ray (")


def test_two_score_jobs_share_node_n1_and_one_finishes_through_time_limit_requeues(
        slurm, tiny_model_dir, real_data_dir, tmp_path):
    """Two scoring jobs with Ray heads on n1 at the same time (`-w`): both finish (every Ray port is
    picked free at start, the client server's too). Job "slow" scores Score-CAM and LIME on every image; once it
    has rows, its time limit is cut to end mid-archive: Slurm's --signal=B:USR1 warning makes the driver
    write and exit 75, the job requeues itself and resumes, with exactly one row per file in the end.
    Job "fast" spans n1 and n2: a two-node scoring run; a SIGUSR1 to its batch shell in its first minute
    (what Slurm sends at once when the time limit is shorter than the --signal offset) is ignored and
    the job runs to the end."""
    if len(slurm["nodes"]) < 2 or "n1" not in slurm["nodes"]:
        pytest.skip("needs the local cluster's nodes n1 and n2")
    per_class = {c.name: sorted(c.glob("*.jpg")) for c in sorted(real_data_dir.iterdir())}
    fast_files = [p for files in per_class.values() for p in files[:6]]
    # 108, 0.7-2 s each (ci_slow.yaml). The warning comes up to ~40 s after the first rows (when the
    # time limit is cut): 72 files were all scored by then on a fast hour of this machine (1.4 img/s),
    # and the first start ended without a requeue, so about twice what a fast hour scores by then
    slow_files = [p for files in per_class.values() for p in files[10:37]]
    lists = {}
    for name, files in (("fast", fast_files), ("slow", slow_files)):
        lists[name] = tmp_path / f"{name}.txt"
        lists[name].write_text("\n".join(map(str, files)) + "\n")
    out = {name: tmp_path / f"scored-{name}" for name in lists}
    logs = {name: tmp_path / f"{name}.out" for name in lists}
    common = ["--cpus-per-task=2", "--mem=3G"]
    # the first-minute guard would ignore a warning that a fast start brings within 60 s: 20 s here
    slow = _submit(slurm, ["-w", "n1", "--nodes=1", *common, "--time=15", "--signal=B:USR1@110",
                           "--export=ALL,ALLCLUSTER_MIN_RUN_BEFORE_REQUEUE_S=20", f"--output={logs['slow']}"],
                   ["slurm/score.sh", "--config", "configs/score/ci_slow.yaml", "--model", str(tiny_model_dir),
                    "--input", str(lists["slow"]), "--out", str(out["slow"])])
    fast = _submit(slurm, ["-w", "n1,n2", "--nodes=2", *common, "--time=15", f"--output={logs['fast']}"],
                   ["slurm/score.sh", "--config", "configs/score/ci_tiny.yaml", "--model", str(tiny_model_dir),
                    "--input", str(lists["fast"]), "--out", str(out["fast"])])
    seen = {"both_up": False, "cut": False, "restored": False, "early_warning": False}

    def steer(states):
        seen["both_up"] |= _ray_up(logs["slow"]) and _ray_up(logs["fast"])
        started = logs["fast"].exists() and "[ray-cluster" in logs["fast"].read_text(errors="replace")
        if not seen["early_warning"] and started:      # its traps are set: the batch shell alone gets it
            subprocess.run(["scancel", "--batch", "--signal=USR1", fast], env=slurm["env"], check=True)
            seen["early_warning"] = True
        state = states[slow]
        if (not seen["cut"] and state.get("JobState") == "RUNNING" and _run_seconds(state) >= 25
                and any((out["slow"] / "rows").glob("*.parquet"))):
            # rows are on disk, many files to go. Limits are whole minutes: the new one ends 60-120 s
            # from now, and its warning (110 s before the end) is due at once, so Slurm sends it at
            # its next time-limit check (every 30 s): the job must outlast ~30 s, not ~2.5 minutes.
            # Not before 25 s: a warning inside the job's first 20 s would be ignored (the guard above)
            used_min = _run_seconds(state) // 60
            subprocess.run(["scontrol", "update", f"JobId={slow}", f"TimeLimit={used_min + 2}"], env=slurm["env"], check=True)
            seen["cut"] = True
        if seen["cut"] and not seen["restored"] and int(state.get("Restarts", 0)) >= 1:
            subprocess.run(["scontrol", "update", f"JobId={slow}", "TimeLimit=15"], env=slurm["env"], check=True)
            seen["restored"] = True
        _start_requeued_now(slurm, slow, state)

    final = _wait_final(slurm, [slow, fast], 1500, steer)
    text = {name: path.read_text(errors="replace") for name, path in logs.items()}
    for job, name in ((slow, "slow"), (fast, "fast")):
        assert final[job]["JobState"] == "COMPLETED", f"{name}: {final[job]}\n{text[name][-6000:]}"
    assert seen["both_up"], "the two jobs' Ray clusters never ran at the same time"
    heads = {name: re.search(r"head on n1 .*\n.*\n.*ports: gcs (\d+), dashboard (\d+), client server (\d+)", t)
             for name, t in text.items()}
    assert all(heads.values()) and heads["slow"].groups() != heads["fast"].groups()

    # the slow job: the time limit's warning, a clean stop, a self-requeue, and a resume
    assert seen["cut"] and int(final[slow]["Restarts"]) >= 1, final[slow]
    log = text["slow"]
    assert f"restart 0 of job {slow}" in log and f"restart 1 of job {slow}" in log, log[-4000:]
    assert "SIGUSR1 (time limit or preemption ahead): asking the driver" in log
    assert "driver exited with 75: interrupted" in log and f"requeueing job {slow} (scontrol requeue)" in log
    assert re.search(r"this start's progress: [1-9]\d* final rows", log), "the driver's rows reach the requeue decision"
    rows = pd.read_parquet(out["slow"] / "rows")
    assert rows["path"].is_unique and sorted(rows["path"]) == sorted(map(str, slow_files))
    assert (rows["status"] == "ok").all() and rows["heatmap_scorecam"].notna().all() and rows["heatmap_lime"].notna().all()

    # the fast job: two-node scoring, through a warning in its first minute
    log = text["fast"]
    assert seen["early_warning"] and re.search(r"SIGUSR1 only \d+ s after the start: .*ignoring it", log), log[-4000:]
    assert "asking the driver" not in log and "requeueing" not in log and int(final[fast]["Restarts"]) == 0
    assert "all 2 nodes joined" in log and "token auth on; token -rw-------" in log
    rows = pd.read_parquet(out["fast"] / "rows")
    assert sorted(rows["path"]) == sorted(map(str, fast_files)) and (rows["status"] == "ok").all()
    assert all(load_heatmap(out["fast"] / r.heatmap_gradcam, r.sha256, "gradcam").size for r in rows.itertuples())
    summary = json.loads((out["fast"] / "summary.json").read_text())
    assert summary["rows"] == len(fast_files) and f"[score] {len(fast_files)} rows: {len(fast_files)} ok" in log
    for t in text.values():
        _assert_private_ray_state(t)


def _submit_slow_scoring(slurm: dict, model_dir: Path, files: list[Path], tmp_path: Path, *sets: str):
    """`sbatch slurm/score.sh` of ``files`` (a list file) with the slow CI config (Score-CAM and LIME on
    every image: 1-2 s each) on one 2-CPU node, progress shown every second, plus ``--set`` items ``sets``.
    Returns the job id, its OUT and its log."""
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(map(str, files)) + "\n")
    out, log = tmp_path / "scored", tmp_path / "job.out"
    job = _submit(slurm, ["-w", slurm["nodes"][0], "--nodes=1", "--cpus-per-task=2", "--mem=3G", "--time=20",
                          f"--output={log}"],
                  ["slurm/score.sh", "--config", "configs/score/ci_slow.yaml", "--model", str(model_dir),
                   "--input", str(listing), "--out", str(out), "--set", "progress_seconds=1",
                   *(item for s in sets for item in ("--set", s))])
    return job, out, log


def test_a_scoring_job_requeued_from_outside_keeps_every_row_it_had_scored(slurm, tiny_model_dir, real_data_dir,
                                                                            tmp_path):
    """`scontrol requeue` (as preemption or an admin's requeue) sends SIGTERM to every process of the job
    at once: the head's raylet stops with the driver, and Ray's core worker then ends the driver before
    it can write the rows it holds (no shard yet: flush_seconds is an hour here). The requeued start
    recovers them from the driver's journal: it starts with at least every row the first start had
    shown as scored, and the job ends with exactly one row per file."""
    files = [p for c in sorted(real_data_dir.iterdir()) for p in sorted(c.glob("*.jpg"))[:10]]   # 40, 1-2 s each
    job, out, log = _submit_slow_scoring(slurm, tiny_model_dir, files, tmp_path,
                                         "flush_seconds=3600", "rows_per_shard=100000")
    shown = []

    def requeue_once_rows_are_scored(states):
        scored = re.findall(r"\[score\] (\d+)/40 ", log.read_text(errors="replace") if log.exists() else "")
        if not shown and states[job].get("JobState") == "RUNNING" and scored and 0 < int(scored[-1]) < 32:
            shown.append(int(scored[-1]))
            subprocess.run(["scontrol", "requeue", job], env=slurm["env"], check=True)
        elif shown:
            _start_requeued_now(slurm, job, states[job])

    final = _wait_final(slurm, [job], 900, requeue_once_rows_are_scored)[job]
    text = log.read_text(errors="replace")
    assert shown, f"the job never showed rows part way: {final}\n{text[-4000:]}"
    assert final["JobState"] == "COMPLETED" and int(final["Restarts"]) == 1, f"{final}\n{text[-6000:]}"
    first, second = re.split(r"restart 1 of job", text)               # slurm/ray-cluster.sh's lines per start
    _assert_the_driver_ended_before_killwait(first)
    assert re.findall(r"driver exited with (\d+.*)", second) == ["0"], second[-4000:]
    kept = int(re.findall(r"\[score\] 40 inputs, (\d+) already scored", text)[1])
    assert kept >= shown[0], f"{shown[0]} rows shown before the requeue, {kept} kept:\n{text[-6000:]}"
    _assert_private_ray_state(text)
    rows = pd.read_parquet(out / "rows")
    assert rows["path"].is_unique and sorted(rows["path"]) == sorted(map(str, files)) and (rows["status"] == "ok").all()
    assert rows["run_id"].nunique() == 2 and not list((out / "rows").glob(".journal-*"))


def _kill_raylet_of(address: str) -> int:
    """SIGKILL the raylet of the Ray cluster at ``address`` (GCS host:port) on this machine (the local
    cluster's nodes are processes here), as when a node's Ray crashes; returns its pid."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if args[0].endswith("/raylet") and f"--gcs-address={address}" in args:
            os.kill(int(proc.name), 9)
            return int(proc.name)
    raise AssertionError(f"no raylet of the Ray at {address} found")


def test_a_ray_that_dies_under_the_scoring_driver_restarts_in_the_allocation_and_the_job_completes(
        slurm, tiny_model_dir, real_data_dir, tmp_path):
    """The head's raylet is SIGKILLed while the driver scores (a Ray crash: seen once in CI, a head's
    runtime_env_agent failing). The head's `ray start --block` ends its step, Ray ends the driver; the
    batch shell sees Ray's step ended under it, starts a fresh Ray in the same allocation (no requeue,
    no queue wait) and runs the driver again, which resumes: the job completes with one row per file."""
    files = [p for c in sorted(real_data_dir.iterdir()) for p in sorted(c.glob("*.jpg"))[40:46]]   # 24, 1-2 s each
    job, out, log = _submit_slow_scoring(slurm, tiny_model_dir, files, tmp_path)
    shown = []

    def kill_the_raylet_once_rows_are_scored(states):
        text = log.read_text(errors="replace") if log.exists() else ""
        scored = re.findall(r"\[score\] (\d+)/24 ", text)
        if not shown and states[job].get("JobState") == "RUNNING" and scored and 0 < int(scored[-1]) < 16:
            _kill_raylet_of(re.search(r"Ray address (\S+) \(published", text).group(1))
            shown.append(int(scored[-1]))

    final = _wait_final(slurm, [job], 900, kill_the_raylet_once_rows_are_scored)[job]
    text = log.read_text(errors="replace")
    assert shown, f"the job never showed rows part way: {final}\n{text[-4000:]}"
    assert final["JobState"] == "COMPLETED" and int(final["Restarts"]) == 0, f"{final}\n{text[-6000:]}"
    before, after = re.split(r"restarting Ray in this allocation \(1 of 1\)", text)
    assert re.search(r"the driver \(exit \d+\) failed after this job's Ray on \S+ ended unasked", before), before[-4000:]
    assert re.search(r"ray start exited with \d+ on ", before), "ray-node.sh says how the head's Ray ended"
    assert re.findall(r"driver exited with (\d+.*)", after) == ["0"] and " nodes joined" in after, after[-4000:]
    assert "requeueing" not in text
    kept = int(re.search(r"\[score\] 24 inputs, (\d+) already scored", after).group(1))
    assert kept >= shown[0], f"{shown[0]} rows shown before the raylet was killed, {kept} kept:\n{after[-4000:]}"
    _assert_private_ray_state(text)
    rows = pd.read_parquet(out / "rows")
    assert rows["path"].is_unique and sorted(rows["path"]) == sorted(map(str, files)) and (rows["status"] == "ok").all()
    assert not list((out / "rows").glob(".journal-*"))


def test_score_script_refuses_to_run_outside_a_job():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", "slurm/score.sh", "--model", "m", "--input", "i", "--out", "o"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not inside a Slurm job" in done.stderr


def test_array_jobs_score_parts_into_one_out(slurm, tiny_model_dir, real_data_dir, tmp_path):
    """`slurm/score-array.sh` as a 2-task array of one-CPU tasks: each scores its --shard part into one shared OUT,
    which then holds exactly one row per file and reads as one result in `allcluster report`. Each task's
    Ray addresses that task alone (`ARRAYID_TASK`), never the whole array. (`slurm/sweep-array.sh` is the
    same bootstrap around `jobs/sweep.py --trial-index $SLURM_ARRAY_TASK_ID`; array trials and `--collect`
    are tested in tests/test_sweep.py without Slurm, to keep CI short.) Submitted from a project folder
    outside the repository (`ALLCLUSTER_HOME` names it), with relative --input and --out: they are the
    project folder's."""
    files = [p for c in sorted(real_data_dir.iterdir()) for p in sorted(c.glob("*.jpg"))[:4]]
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(map(str, files)) + "\n")
    out = tmp_path / "scored"
    # one CPU per scoring task: the model replica must leave the input and decode tasks room (it did not).
    # --time=20: longer than the scripts' B:USR1@900 warning offset (a shorter limit makes Slurm send
    # the warning at once; this Slurm (22.05) delivers it to the batch step's children too)
    score = _submit(slurm, ["--array=0-1", "--cpus-per-task=1", "--mem=3G", "--time=20",
                            f"--output={tmp_path}/score-%A_%a.out"],
                    [str(REPO / "slurm/score-array.sh"), "--config", str(REPO / "configs/score/ci_tiny.yaml"),
                     "--model", str(tiny_model_dir), "--input", listing.name, "--out", out.name],
                    cwd=tmp_path, env={"ALLCLUSTER_HOME": str(REPO)})
    tasks = [f"{score}_0", f"{score}_1"]
    final = _wait_final(slurm, tasks, 1200)
    logs = {path.name: path.read_text(errors="replace") for path in tmp_path.glob("*.out")}
    for task in tasks:
        assert final[task].get("JobState") == "COMPLETED", f"{task}: {final[task]}\n" + "\n".join(
            f"== {name}\n{text[-3000:]}" for name, text in logs.items())

    parts = [logs[f"score-{score}_{k}.out"] for k in (0, 1)]
    for k, log in enumerate(parts):
        assert f"--shard {k}/2" in log and "all 1 nodes joined" in log, log[-3000:]
        assert "requeueing job" not in log and "SIGUSR1" not in log, log[-3000:]
        # scancel/scontrol/squeue address this task (ARRAYID_TASK), never the whole array
        assert re.search(r"time limit 20:00\n\[", log), log[:1500]
        _assert_private_ray_state(log)
    per_part = [int(re.search(r"\[score\] (\d+) inputs, 0 already scored", log).group(1)) for log in parts]
    assert sum(per_part) == len(files) and min(per_part) > 0, per_part
    rows = pd.read_parquet(out / "rows")
    assert rows["path"].is_unique and sorted(rows["path"]) == sorted(map(str, files))
    assert (rows["status"] == "ok").all() and rows["run_id"].nunique() == 2
    report = subprocess.run([str(REPO / ".venv/bin/allcluster"), "report", str(out), "--out", str(tmp_path / "report")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    counts = pd.read_csv(tmp_path / "report" / "tables" / "class_counts.csv")
    assert int(counts["images"].sum()) == len(files), counts.to_string()


def test_array_scripts_refuse_to_run_outside_an_array_task():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for script in (["slurm/sweep-array.sh", "configs/sweep/ci_tiny.yaml"],
                   ["slurm/score-array.sh", "--model", "m", "--input", "i", "--out", "o"]):
        done = subprocess.run(["bash", *script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "usage: sbatch --array=" in done.stderr, (script, done.stderr)


def test_score_array_refuses_an_array_that_is_not_0_to_n_minus_1_unless_n_is_given(tmp_path):
    """`--array=1-8` would make N 9 (part 0 never runs); `--array=0-14:2` leaves odd parts out. The
    script reads N before any Ray or output exists (Slurm's array variables set as sbatch sets them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    script = ["bash", "slurm/score-array.sh", "--model", "m", "--input", "i", "--out", str(tmp_path / "o")]
    for first, last, count in ((1, 8, 8), (0, 14, 8)):
        array = {"SLURM_ARRAY_TASK_ID": str(first), "SLURM_ARRAY_TASK_MIN": str(first),
                 "SLURM_ARRAY_TASK_MAX": str(last), "SLURM_ARRAY_TASK_COUNT": str(count)}
        done = subprocess.run(script, cwd=REPO, env={**env, **array}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "submit --array=0-(N-1)" in done.stderr, (array, done.stderr)
        assert f"tasks are {first}..{last} ({count} of them)" in done.stderr and not (tmp_path / "o").exists()
    # N named: the script goes on to start Ray, which needs a real job (refused there, not here)
    named = subprocess.run(script, cwd=REPO, env={**env, **array, "ALLCLUSTER_SHARDS": "8"}, capture_output=True,
                           text=True, timeout=60)
    assert "submit --array=0-(N-1)" not in named.stderr and "not inside a Slurm job" in named.stderr, named.stderr
    for shards in ("eight", "0", "5"):      # not a number of parts above this task's index (5)
        refused = subprocess.run(script, cwd=REPO, env={**env, **array, "SLURM_ARRAY_TASK_ID": "5",
                                                        "ALLCLUSTER_SHARDS": shards},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and f"ALLCLUSTER_SHARDS={shards} is not a number of parts" in refused.stderr


def _stubbed_slurm(tmp_path: Path, kill_wait_s: int = 30) -> tuple[dict, Path]:
    """An environment for ray-cluster.sh's functions outside Slurm: job 4242, HOME in tmp_path, and
    `scontrol`/`scancel` stubs that log their calls to the returned file (`scontrol show config`
    also prints a KillWait line, as Slurm does)."""
    stubs, calls = tmp_path / "bin", tmp_path / "calls.log"
    stubs.mkdir()
    for tool in ("scontrol", "scancel"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n')
        (stubs / tool).chmod(0o755)
    with (stubs / "scontrol").open("a") as stub:
        stub.write(f'[ "$1 $2" != "show config" ] || echo "KillWait                = {kill_wait_s} sec"\n')
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
           "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "HOME": str(tmp_path)}
    return env, calls


def test_a_job_whose_warned_starts_make_no_progress_stops_requeueing_after_three_in_a_row(tmp_path):
    """Each start ends at the time-limit warning (75). Its driver's progress file says what it completed:
    a start with work resets the count; a start with none (no file, or 0) counts; the third such start
    in a row ends the job (no `scontrol requeue`) saying why, and leaves no count behind."""
    env, calls = _stubbed_slurm(tmp_path)
    jobdir, stalls = tmp_path / ".ray-slurm" / "4242", tmp_path / ".ray-slurm" / "4242.stalls"

    def start(progress: str | None, rc: int = 75) -> str:
        write = f'echo "{progress}" > "$_ray_jobdir/progress"' if progress is not None else ":"
        shell = (f'set -euo pipefail; source slurm/ray-cluster.sh; trap ray_cluster_stop EXIT\n'   # as slurm/*.sh
                 f'_ray_warned=1; _ray_jobdir={jobdir}; mkdir -p "$_ray_jobdir"; {write}\nexit {rc}\n')
        calls.unlink(missing_ok=True)
        done = subprocess.run(["bash", "-c", shell], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == rc and not jobdir.exists(), done.stdout + done.stderr
        assert not done.stderr, done.stderr                    # no "No such file" for a missing progress file
        return done.stdout + ("REQUEUED" if "scontrol requeue 4242" in _text(calls) else "")

    assert "this start's progress: 12 rows" in start("12 rows") and "REQUEUED" in start("12 rows")
    assert not stalls.exists()
    assert "REQUEUED" not in start("12 rows", rc=74), "a full disk (EX_IOERR) is not requeued: it would fail again"
    unwarned = subprocess.run(["bash", "-c", 'source slurm/ray-cluster.sh; trap ray_cluster_stop EXIT\nexit 75\n'],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert unwarned.returncode == 75 and "not requeued by this script: no time-limit warning came first" in unwarned.stdout, \
        unwarned.stdout + unwarned.stderr
    for count, progress in ((1, None), (2, "0 epochs or trial endings")):
        log = start(progress)
        assert "REQUEUED" in log and f"no progress this start ({count} of 3 in a row" in log, log
        assert stalls.read_text().strip() == str(count)
    log = start("3 epochs or trial endings")                # progress: the count starts again
    assert "REQUEUED" in log and not stalls.exists()
    assert "REQUEUED" in start(None)
    stalls.write_text("x")                                  # unreadable count: taken as none
    assert "REQUEUED" in start(None) and stalls.read_text().strip() == "1"
    assert "REQUEUED" in start(None)
    log = start("garbage")
    assert "REQUEUED" not in log and "no progress in 3 starts in a row" in log and "not requeueing" in log, log
    assert not stalls.exists()
    start(None)                                             # a later job with this id starts counting afresh
    assert stalls.read_text().strip() == "1"
    start(None, rc=0)                                       # the job ended: no count is left behind
    assert not stalls.exists()
    for restart, kept in (("1", True), ("0", False), ("", False)):   # a count of another job with this id
        stalls.write_text("2")                              # (it died with its node): void at a first start
        shell = f'SLURM_RESTART_COUNT={restart}; source slurm/ray-cluster.sh; _ray_forget_earlier_jobs_stalls'
        subprocess.run(["bash", "-c", shell], cwd=REPO, env=env, check=True, timeout=60)
        assert stalls.exists() == kept, restart


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def test_a_sigterm_while_ray_stops_after_the_warning_neither_skips_the_requeue_nor_the_cleanup(tmp_path):
    """The time limit's SIGTERM can reach the batch shell while its EXIT trap stops Ray (a driver slow to
    stop after the warning): the job must still requeue, and Ray's steps and the private folder must
    still be seen to. Real signals and a real slow step; Slurm's commands are stubs that log their calls."""
    env, calls = _stubbed_slurm(tmp_path)
    jobdir = tmp_path / "jobdir"
    jobdir.mkdir()
    (jobdir / "progress").write_text("3 rows\n")
    shell = (f'source slurm/ray-cluster.sh; trap ray_cluster_stop EXIT; trap "_ray_on_term TERM" TERM\n'
             f'_ray_warned=1; _ray_jobdir={jobdir}\n'
             'bash -c \'trap "" TERM; sleep 3\' & _ray_steps=($!)   # a Ray step slow to stop\n'
             'exit 75                                                # the driver: interrupted\n')
    batch = subprocess.Popen(["bash", "-c", shell], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in batch.stdout:
        lines.append(line)
        if "stopping Ray (1 srun steps)" in line:
            batch.send_signal(15)       # SIGTERM, while the trap waits for the step
            break
    lines += batch.stdout.readlines()
    assert batch.wait(timeout=60) == 75, "".join(lines)
    # no scancel after the requeue: Slurm SIGTERMs a requeued job's processes itself and refuses (and
    # scancel retries, past KillWait) a signal to a job in that state
    assert "scontrol requeue 4242" in calls.read_text() and "scancel" not in calls.read_text()
    assert not jobdir.exists() and "stopped: Ray's steps ended" in "".join(lines), "".join(lines)


def _batch_shell_killwait_run(tmp_path: Path, driver_code: str, step: str, signal_on: str,
                              env_extra: dict | None = None, give_up_s: float = 60) -> tuple:
    """A batch shell (ray-cluster.sh's run and EXIT trap) with a driver of ``driver_code``, one stand-in
    Ray step (shell code) and stubbed Slurm commands (KillWait 8 s). When a line holding ``signal_on``
    appears, every process of the group gets SIGTERM, as Slurm signals every process of a job. Returns
    the shell's exit code (None: still running ``give_up_s`` later, then killed), the seconds from that
    signal to its end, its output, the private folder and the stub's call log."""
    env, calls = _stubbed_slurm(tmp_path, kill_wait_s=8)
    jobdir = tmp_path / "jobdir"
    jobdir.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(driver_code)
    shell = (f'set -euo pipefail; source slurm/ray-cluster.sh; trap ray_cluster_stop EXIT; _ray_signal_traps\n'
             f'_ray_jobdir={jobdir}; ALLCLUSTER_PYTHON={sys.executable}\n'
             f'bash -c {shlex.quote(step)} & _ray_steps=($!)\n'
             f'ray_cluster_run {driver}\n')
    batch = subprocess.Popen(["bash", "-c", shell], cwd=REPO, env={**env, **(env_extra or {})}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, signalled, code = [], None, None
    try:
        for line in batch.stdout:
            lines.append(line)
            if signal_on in line:
                signalled = time.monotonic()
                os.killpg(batch.pid, 15)
                break
        code = batch.wait(timeout=give_up_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        ended = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(batch.pid, 9)         # whatever is left, the stand-in driver included
        lines += batch.stdout.readlines()
    log = "".join(lines)
    assert signalled is not None, log
    return code, ended - signalled, log, jobdir, calls


def test_a_driver_that_outlives_slurms_sigterm_is_killed_so_the_shell_cleans_up_before_killwait(tmp_path):
    """Slurm SIGTERMs every process of the job (scancel, `scontrol requeue`, the time limit) and SIGKILLs
    them KillWait seconds later, the batch shell included. A driver that does not exit by then (a CI run:
    its trials had just finished when the requeue came) must not take the shell's clean-up with it: the
    shell kills the driver while the clean-up reserve is left, then stops the steps and removes the private
    folder in time. Real signals to a real process group; Slurm's commands are stubs (KillWait 8 s)."""
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('driver running', flush=True)\ntime.sleep(120)\n")
    step = 'trap "sleep 1; exit 0" TERM; while :; do sleep 0.2; done'   # ray-node.sh: stops Ray, then ends
    code, seconds, log, jobdir, calls = _batch_shell_killwait_run(
        tmp_path, stubborn, step, "driver running", {"ALLCLUSTER_CLEANUP_RESERVE_S": "4"})
    assert "killing it so that Ray's steps and this job's folders are seen to before Slurm's KillWait (8 s)" in log, log
    assert "driver killed (exit 137) after SIGTERM" in log and "stopped: Ray's steps ended" in log, log
    assert seconds < 8, f"the shell ended {seconds:.1f} s after the SIGTERM, past KillWait\n{log}"
    assert code == 137 and not jobdir.exists(), (code, log)
    assert "scancel" not in _text(calls), "the step stopped by itself on Slurm's SIGTERM: no scancel needed"


def test_a_site_can_let_the_driver_stop_as_long_as_it_takes_after_a_sigterm(tmp_path):
    """ALLCLUSTER_CLEANUP_RESERVE_S=off (a preemption GraceTime longer than KillWait): the shell waits for the
    driver past KillWait instead of killing it. Same stand-ins as above; given up 12 s after the SIGTERM."""
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('driver running', flush=True)\ntime.sleep(120)\n")
    code, seconds, log, jobdir, _ = _batch_shell_killwait_run(
        tmp_path, stubborn, "trap 'exit 0' TERM; while :; do sleep 0.2; done", "driver running",
        {"ALLCLUSTER_CLEANUP_RESERVE_S": "off"}, give_up_s=12)
    assert code is None and seconds >= 12, (code, seconds, log)
    assert "killing it" not in log and "SIGTERM: waiting for the driver" in log, log


def test_a_sigterm_while_the_shell_stops_ray_bounds_its_wait_for_the_steps_by_killwait(tmp_path):
    """The driver ended (0) and the EXIT trap is stopping Ray's steps when Slurm's SIGTERM comes (a requeue
    or the time limit just then): the trap goes on, but a step slow to stop is waited for only until 4 s
    before KillWait, then cancelled, so the shell still logs its clean-up. Real signals to a real process
    group; Slurm's commands are stubs (KillWait 8 s); the step stands in for srun, which ignores the
    first SIGTERM here (its Ray stopping slowly) and ends on the next."""
    step = 'n=0; trap "n=\$((n + 1)); [ \$n -lt 2 ] || exit 0" TERM; while :; do sleep 0.2; done'
    code, seconds, log, jobdir, _ = _batch_shell_killwait_run(
        tmp_path, "print('driver done', flush=True)\n", step, "stopping Ray (1 srun steps)")
    assert code == 0 and "driver exited with 0" in log and "stopped: Ray's steps ended" in log, (code, log)
    assert seconds < 8, f"the shell ended {seconds:.1f} s after the SIGTERM, past KillWait\n{log}"
    # KillWait counts from the trap's start (a SIGTERM there goes unseen), in whole seconds: about 3-4 s here
    assert seconds > 2, "the step was given until 4 s before KillWait, not cancelled at once"
    assert not jobdir.exists()


def _batch_shell_with_rays(tmp_path: Path, steps: list[str], driver_exits: list[int], env_extra: dict | None = None,
                           warn_after_first_run_s: float | None = None):
    """A batch shell (ray-cluster.sh's start loop, run and EXIT trap; stubbed Slurm commands) whose Ray
    bring-ups start the stand-in steps ``steps`` in turn (shell code; one that ends by itself is a Ray that
    died; a bring-up whose step is gone half a second later fails, as `ray_utils wait` does) and whose
    driver runs exit with ``driver_exits`` in turn (the first run records "5 final rows" of progress and,
    with ``warn_after_first_run_s``, has Slurm's time-limit warning (SIGUSR1) reach the shell that long
    after it ended). Returns the shell's exit code, its output and the stubs' call log. KillWait 8 s: the
    stubbed scancel does not signal the steps, whose stop waits until 4 s before it, then sends SIGTERM."""
    env, calls = _stubbed_slurm(tmp_path, kill_wait_s=8)
    runs, driver = tmp_path / "runs", tmp_path / "driver.py"
    warn = (f"    subprocess.Popen(['sh', '-c', 'sleep {warn_after_first_run_s}; kill -USR1 {{}}'.format(os.getppid())])\n"
            if warn_after_first_run_s is not None else "")
    driver.write_text(f"import os, pathlib, subprocess, sys, time\nruns = pathlib.Path({str(runs)!r})\n"
                      "n = len(runs.read_text()) if runs.exists() else 0\nruns.write_text('x' * (n + 1))\n"
                      "time.sleep(2)\n"
                      "if n == 0:\n    pathlib.Path(os.environ['ALLCLUSTER_PROGRESS_FILE']).write_text('5 final rows\\n')\n"
                      f"{warn}sys.exit({driver_exits!r}[n])\n")
    shell = ("set -euo pipefail; source slurm/ray-cluster.sh; trap ray_cluster_stop EXIT; _ray_signal_traps\n"
             f"_ray_jobdir={tmp_path}/jobdir; ALLCLUSTER_PYTHON={sys.executable}; steps=({' '.join(map(shlex.quote, steps))})\n"
             "_ray_bring_up() {  # stand-in: a fresh private folder and one Ray step\n"
             "  rm -rf \"$_ray_jobdir\"; mkdir \"$_ray_jobdir\"; export ALLCLUSTER_PROGRESS_FILE=$_ray_jobdir/progress\n"
             "  _log \"bring-up of a Ray\"; bash -c \"${steps[0]}\" & _ray_steps=($!) _ray_step_nodes=(n1); steps=(\"${steps[@]:1}\")\n"
             "  sleep 0.5; [ -z \"$(_ray_ended_step_nodes)\" ]\n"
             "}\n"
             f"_ray_up; ray_cluster_run {driver}\n"
             "_ray_made_progress\n")
    done = subprocess.run(["bash", "-c", shell], cwd=REPO, env={**env, "ALLCLUSTER_MIN_RUN_BEFORE_REQUEUE_S": "0",
                                                                **(env_extra or {})},
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr, _text(calls)


DIED, HEALTHY = "sleep 1", "trap 'exit 0' TERM; while :; do sleep 0.2; done"   # stand-ins for a Ray step


@pytest.mark.parametrize("failed", ["the driver", "Ray's start"])
def test_a_ray_that_died_is_started_afresh_once_and_the_driver_runs_on_it(tmp_path, failed):
    """The decision of ray-cluster.sh alone (stubbed Slurm, stand-in steps and driver; the real thing is
    test_a_ray_that_dies_under_the_scoring_driver...): a Ray step that ended unasked before the driver
    failed, or before Ray's start was done, gets one fresh Ray (and one more driver run), whose success is
    the job's; the work a first run recorded still counts as this start's progress (the time-limit
    requeue's loop guard)."""
    steps, exits = {"the driver": ([DIED, HEALTHY], [1, 0]), "Ray's start": (["exit 1", HEALTHY], [0])}[failed]
    code, log, _ = _batch_shell_with_rays(tmp_path, steps, exits)
    assert code == 0 and log.count("bring-up of a Ray") == 2 and log.count("driver exited with") == len(exits), log
    what = "the driver (exit 1)" if failed == "the driver" else "Ray's start"
    assert f"{what} failed after this job's Ray on n1 ended unasked" in log, log
    assert "restarting Ray in this allocation (1 of 1)" in log and "driver exited with 0" in log, log
    assert ("this start's progress: 5 final rows (before Ray restarted)" in log) == (failed == "the driver"), log
    assert log.count("stopping Ray (1 srun steps)") == 2 and "stopped: Ray's steps ended" in log, log


@pytest.mark.parametrize("case", ["ray-dies-again", "no-restarts-allowed", "ray-still-running", "warned-meanwhile"])
def test_a_driver_failure_is_the_jobs_when_no_ray_restart_is_left_or_ray_still_runs(tmp_path, case):
    """Ray died again after its one restart, or ALLCLUSTER_RAY_RESTARTS=0, or the driver failed while its
    Ray ran (its own failure): no (further) restart, the job ends with the driver's code. The time-limit
    warning arriving while the shell waits to see whether Ray died: no restart either; the job requeues
    (a restart would spend the time left before the limit on Ray's start)."""
    steps, exits, env, warn = {
        "ray-dies-again": ([DIED, DIED], [1, 3], None, None),
        "no-restarts-allowed": ([DIED], [3], {"ALLCLUSTER_RAY_RESTARTS": "0"}, None),
        "ray-still-running": ([HEALTHY], [3], None, None),
        "warned-meanwhile": (["sleep 4"], [3], None, 1)}[case]
    code, log, calls = _batch_shell_with_rays(tmp_path, steps, exits, env, warn)
    assert code == 3 and log.count("bring-up of a Ray") == len(steps) and "driver exited with 3" in log, log
    assert ("not again" in log) == (case in ("ray-dies-again", "no-restarts-allowed")), log
    assert log.count("restarting Ray in this allocation") == (case == "ray-dies-again"), log
    assert ("scontrol requeue 4242" in calls) == (case == "warned-meanwhile"), (calls, log)
    assert "stopped: Ray's steps ended" in log, log


def _ephemeral_ports() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


@pytest.mark.parametrize("name, value, accepted", [
    ("ALLCLUSTER_RAY_RESTARTS", "one", False), ("ALLCLUSTER_RAY_RESTARTS", "0", True),
    ("ALLCLUSTER_RAY_RESTARTS", "", True),                  # empty: the default
    ("ALLCLUSTER_MAX_STALLED_STARTS", "0", False), ("ALLCLUSTER_MIN_RUN_BEFORE_REQUEUE_S", "1m", False),
    ("ALLCLUSTER_CLEANUP_RESERVE_S", "08", False), ("ALLCLUSTER_CLEANUP_RESERVE_S", "off", True),
    ("RAY_JOIN_TIMEOUT_S", "0", False), ("RAY_START_TRIES", "two", False),
    ("RAY_START_TRIES", "99999999999", False),              # bash's test would read it as no number
    ("RAY_WORKER_PORTS", "-5", False), ("RAY_WORKER_PORTS", "1", False),   # Ray: max worker port > min
    ("RAY_PORT_RANGE", "30000-20000", False), ("RAY_PORT_RANGE", "20000-70000", False),
    ("RAY_PORT_RANGE", "1023-2000", False), ("RAY_PORT_RANGE", "1024-65535", True),
    ("RAY_PORT_RANGE", "EPHEMERAL", False),                 # inside the ephemeral range: no room for Ray
    ("RAY_PORT_RANGE", "6000-7100", False),                 # cut at Ray's default 6379: no 1000 in a row
    ("RAY_PORT_RANGE", "BELOW_EPHEMERAL", True)])
def test_a_job_script_setting_of_the_wrong_form_is_refused_by_name(tmp_path, name, value, accepted):
    """Each setting of the README's table is checked before anything starts (a bad one used to surface
    as a bash or Python error mid-job, or not at all), in a shell with the job scripts' options."""
    low, high = _ephemeral_ports()
    value = {"EPHEMERAL": f"{low + 10}-{low + 2000}", "BELOW_EPHEMERAL": f"{low - 1009}-{low - 1}"}.get(value, value)
    env, _ = _stubbed_slurm(tmp_path)
    shell = f"set -euo pipefail; ALLCLUSTER_PYTHON={sys.executable}; source slurm/ray-cluster.sh; _ray_check_env"
    done = subprocess.run(["bash", "-c", shell], cwd=REPO, env={**env, name: value},
                          capture_output=True, text=True, timeout=60)
    if accepted:
        assert done.returncode == 0 and not done.stderr, done.stderr
    else:
        assert done.returncode == 2 and done.stderr.startswith(f"ray-cluster.sh: {name}={value} "), done.stderr
