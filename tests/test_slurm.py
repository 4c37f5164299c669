"""`sbatch slurm/sweep.sh` on a real Slurm cluster: the local 2-node one from slurm/dev/.

CI starts it (`.ci/run`); elsewhere start it with `sudo slurm/dev/local-cluster-up.sh` and
`export SLURM_CONF=/etc/slurm-2node/slurm.conf`. Without a reachable Slurm these tests skip loudly.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
LOCAL_CONF = Path("/etc/slurm-2node/slurm.conf")


def _slurm_env() -> dict:
    env = dict(os.environ)
    if "SLURM_CONF" not in env and LOCAL_CONF.is_file():
        env["SLURM_CONF"] = str(LOCAL_CONF)
    return env


@pytest.fixture(scope="module")
def slurm() -> dict:
    """Nodes of a reachable Slurm cluster, or a loud skip saying how to get one."""
    env = _slurm_env()
    reason = None
    if not shutil.which("sbatch"):
        reason = "sbatch not installed"
    else:
        found = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True)
        nodes = [line.split()[0] for line in found.stdout.splitlines()
                 if line.split()[1].rstrip("*") in ("idle", "mix") and not line.split()[1].endswith("*")]
        if found.returncode or not nodes:
            reason = f"no usable Slurm nodes (sinfo rc {found.returncode}: {found.stderr.strip()[:200]})"
    if reason:
        message = (f"SLURM ABSENT: {reason}; the Slurm tests are SKIPPED. Start the local test cluster with "
                   "`sudo slurm/dev/local-cluster-up.sh` (CI does this in .ci/run).")
        warnings.warn(message)
        print(f"\n*** {message} ***\n", file=sys.stderr)
        pytest.skip(message)
    return {"env": env, "nodes": nodes}


def test_sbatch_sweep_runs_the_ci_grid_across_two_nodes(slurm, real_manifest, tmp_path):
    nodes = min(2, len(slurm["nodes"]))
    experiment = tmp_path / "sweep"
    log = tmp_path / "job-%j.out"
    command = ["sbatch", "--wait", f"--nodes={nodes}", "--cpus-per-task=2", "--mem=4G", "--time=00:25:00",
               f"--output={log}", "slurm/sweep.sh", "configs/sweep/ci_tiny.yaml",
               "--set", f"train.data.manifest={real_manifest}", "--set", f"experiment_dir={experiment}"]
    done = subprocess.run(command, cwd=REPO, env=slurm["env"], capture_output=True, text=True, timeout=1800)
    logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("job-*.out"))
    assert done.returncode == 0, f"sbatch rc {done.returncode}: {done.stderr}\n{logs[-6000:]}"
    assert f"all {nodes} nodes joined" in logs, logs[-4000:]
    assert "token auth on; token -rw-------" in logs
    assert "token check: a client with another token is refused" in logs
    trials = pd.read_parquet(experiment / "trials.parquet")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert (trials["status"] == "finished").all(), trials[["trial_id", "status", "error"]].to_string()
    for column in ("val_accuracy", "test_accuracy", "val_macro_f1", "test_macro_f1", "test_auc"):
        assert trials[column].between(0, 1).all(), column
    card = json.loads((experiment / "best_model" / "model_card.json").read_text())
    ranked = trials.sort_values(["val_macro_f1", "val_loss"], ascending=[False, True])  # ties: lower val loss
    assert card["sweep"]["trial_id"] == ranked.iloc[0]["trial_id"]
    assert "4 trials: 4 finished" in logs
    if nodes == 2:
        hosts = {line.split(" on ")[1].split()[0] for line in logs.splitlines() if "[ray-node" in line}
        assert len(hosts) == 2, f"Ray nodes should run on two hosts, saw {hosts}"
    leftover = subprocess.run(["squeue", "-h"], env=slurm["env"], capture_output=True, text=True).stdout
    assert not leftover.strip(), f"jobs left in the queue: {leftover}"


def test_sweep_script_refuses_to_run_outside_a_job(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", "slurm/sweep.sh", "configs/sweep/ci_tiny.yaml"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not inside a Slurm job" in done.stderr


def test_sbatch_score_scores_a_file_list_on_the_two_node_ray_cluster(slurm, tiny_model_dir, real_data_dir, tmp_path):
    nodes = min(2, len(slurm["nodes"]))
    files = [p for c in sorted(real_data_dir.iterdir()) for p in sorted(c.glob("*.jpg"))[:6]]
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(map(str, files)) + "\n")
    out, log = tmp_path / "scored", tmp_path / "job-%j.out"
    command = ["sbatch", "--wait", f"--nodes={nodes}", "--cpus-per-task=2", "--mem=4G", "--time=00:15:00",
               f"--output={log}", "slurm/score.sh", "--config", "configs/score/ci_tiny.yaml", "--model",
               str(tiny_model_dir), "--input", str(listing), "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, env=slurm["env"], capture_output=True, text=True, timeout=900)
    logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("job-*.out"))
    assert done.returncode == 0, f"sbatch rc {done.returncode}: {done.stderr}\n{logs[-6000:]}"
    assert f"all {nodes} nodes joined" in logs and "token auth on; token -rw-------" in logs
    rows = pd.read_parquet(out / "rows")
    assert sorted(rows["path"]) == sorted(map(str, files)) and (rows["status"] == "ok").all()
    assert rows["heatmap_gradcam"].map(lambda rel: (out / rel).is_file()).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == len(files) and f"[score] {len(files)} rows: {len(files)} ok" in logs


def test_score_script_refuses_to_run_outside_a_job():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", "slurm/score.sh", "--model", "m", "--input", "i", "--out", "o"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not inside a Slurm job" in done.stderr
