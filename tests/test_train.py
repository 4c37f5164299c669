"""Training as a real Ray Train run on a local Ray (2 CPUs): outputs, DDP, resume, real images."""
from __future__ import annotations

import json
import os
import signal
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from allcluster.cli import main
from allcluster.models.model_dir import file_sha256, load_model_dir
from allcluster.train.run_folder import checkpoint_folders
from tests.conftest import REPO, LoggedProcess, real_images, tiny_train_config, tmpfs, write_yaml

pytestmark = pytest.mark.ray


def _fit(cfg):
    from allcluster.train.ray_train import run_training
    return run_training(cfg)


def test_training_from_a_relative_folder_indexed_as_the_readme_says_exports_model_dir_metrics_and_config(
        ray_local, real_data_dir, tmp_path, monkeypatch):
    """The README's route with relative paths: index a folder, train from a config naming the manifest
    relatively (Ray's workers run elsewhere: the manifest must hold absolute paths), on a stratified
    subset of real images. One Ray Train run checks it all (its start is most of a tiny run's cost)."""
    work = tmp_path / "work"
    for image in real_images(real_data_dir, 36):        # 80% train: about 29 per class, 24 kept
        (work / "data" / "Original" / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, work / "data" / "Original" / image.parent.name / image.name)
    monkeypatch.chdir(work)
    assert main(["index", "data/Original", "--out", "runs/all/manifest.parquet"]) == 0
    paths = pd.read_parquet(work / "runs/all/manifest.parquet")["path"]
    assert all(p.startswith(str(work / "data" / "Original")) for p in paths)
    config = write_yaml(work / "train.yaml", {
        "name": "readme-route", "output_dir": "runs/all/allnet",
        "data": {"manifest": "runs/all/manifest.parquet", "image_size": 64, "max_per_class": 24, "loader_workers": 0},
        "model": {"backbone": "allnet", "head": {"hidden": [32], "dropout": 0.1, "hidden_dropout": 0.1}},
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
        "finetune": {"head_epochs": 0, "unfreeze_blocks": -1},
        "fit": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 0},
        "resources": {"num_workers": 1, "cpus_per_worker": 1.0}})
    assert main(["train", "--config", str(config)]) == 0
    out = work / "runs/all/allnet"
    card = json.loads((out / "model" / "model_card.json").read_text())
    for key in ("classes", "backbone", "input_size", "mean", "std", "temperature", "metrics", "versions",
                "weights_sha256", "config", "cam_layer"):
        assert key in card, key
    assert card["classes"] == ["Benign", "Early", "Pre", "Pro"]
    assert card["split_sizes"]["train"] == 4 * 24, "a stratified subset: max_per_class of each class"
    assert card["weights_sha256"] == file_sha256(out / "model" / "weights.safetensors")
    assert set(card["versions"]) >= {"allcluster", "torch", "timm", "ray"}
    assert card["metrics"]["test"]["n"] == card["split_sizes"]["test"] > 0
    assert 0.0 <= card["metrics"]["test"]["accuracy"] <= 1.0
    assert 0 < card["temperature"] < 100
    history = pq.read_table(out / "metrics.parquet").to_pandas()
    assert history["epoch"].tolist() == [0, 1]
    assert not any(c.startswith("test_") for c in history.columns), "test split must not be looked at per epoch"
    assert history["train_macro_f1"].between(0, 1).all() and history["train_accuracy"].between(0, 1).all()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["head"]["hidden"] == [32] and resolved["data"]["image_size"] == 64
    assert yaml.safe_load((out / "model" / "config.yaml").read_text()) == resolved
    loaded = load_model_dir(out / "model")
    assert loaded.card.backbone == "allnet" and loaded.card.to_dict() == card, "the typed card is the file"


def test_two_ddp_workers_evaluate_every_validation_image_exactly_once(ray_local, synthetic_manifest, tmp_path):
    cfg = tiny_train_config(synthetic_manifest, tmp_path / "ddp", fit={"epochs": 1},
                            resources={"num_workers": 2, "cpus_per_worker": 0.9})
    _fit(cfg)
    card = json.loads((tmp_path / "ddp" / "model" / "model_card.json").read_text())
    manifest = pd.read_parquet(synthetic_manifest)
    for split in ("val", "test"):
        expected = int((manifest["split"] == split).sum())
        assert card["metrics"][split]["n"] == expected
        assert sum(sum(r) for r in card["metrics"][split]["confusion"]) == expected


def test_missing_weight_file_fails_before_ray_starts(synthetic_manifest, tmp_path, capsys):
    config = write_yaml(tmp_path / "cfg.yaml", {
        "output_dir": str(tmp_path / "out"),
        "data": {"manifest": str(synthetic_manifest)},
        "model": {"backbone": "densenet121", "weights": str(tmp_path / "nope.safetensors")}})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "model.weights" in err and "nope.safetensors does not exist" in err and "weights fetch" not in err
    assert not (tmp_path / "out").exists()
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "other.pth")      # another network's file
    assert main(["train", "--config", str(config), "--set", f"model.weights={tmp_path / 'other.pth'}"]) == 2
    err = capsys.readouterr().err
    assert f"model.weights: {tmp_path / 'other.pth'} does not fit backbone densenet121" in err, err[-2000:]
    assert not (tmp_path / "out").exists(), "refused on the driver, before anything is written"


def test_an_empty_val_split_or_an_input_too_small_for_the_backbone_is_refused_before_ray_starts(
        synthetic_manifest, tmp_path, capsys):
    """Both were found by every worker after Ray started: a traceback, exit 1, config.yaml, run.json
    and ray/ written."""
    import pandas as pd

    config = _run_yaml(tmp_path / "cfg.yaml", synthetic_manifest, tmp_path / "out", epochs=1)
    assert main(["train", "--config", str(config), "--set", "data.image_size=8"]) == 2
    assert "data.image_size: backbone allnet cannot take a 8 px input" in capsys.readouterr().err
    frame = pd.read_parquet(synthetic_manifest)
    frame["split"] = frame["split"].replace({"val": "train"})             # indexed with --ratios 1 0 0 or so
    frame.to_parquet(tmp_path / "no-val.parquet")
    assert main(["train", "--config", str(config), "--set", f"data.manifest={tmp_path / 'no-val.parquet'}"]) == 2
    assert "no-val.parquet has no ok image in its val split" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_manifest_names_the_key_and_the_fix(tmp_path, capsys):
    config = write_yaml(tmp_path / "cfg.yaml", {"output_dir": str(tmp_path / "out"),
                                                "data": {"manifest": str(tmp_path / "none.parquet")}})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.manifest" in err and "allcluster index" in err


def _checkpointed_epochs(out: Path, n: int) -> bool:
    """``n`` epochs are in metrics.parquet and Ray Train has registered a checkpoint. Ray resumes only
    from what its snapshot lists, and its controller registers a worker's report a poll later: a kill
    right after the second epoch can come before the first one is registered (seen in CI), and the
    rerun then rightly starts afresh."""
    metrics, snapshot = out / "metrics.parquet", out / "ray" / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and metrics.is_file() and pq.read_metadata(metrics).num_rows >= n


def _run_yaml(path: Path, manifest: Path, out: Path, epochs: int) -> Path:
    """A small ALL-Net run's config file, as a user writes one (registry defaults filled at load)."""
    return write_yaml(path, {
        "output_dir": str(out),
        "data": {"manifest": str(manifest), "image_size": 48, "loader_workers": 0},
        "model": {"backbone": "allnet"},
        "finetune": {"head_epochs": 0, "unfreeze_blocks": -1},
        "fit": {"epochs": epochs, "batch_size": 16, "early_stopping_patience": 0},
        "resources": {"num_workers": 1, "cpus_per_worker": 1.0}})


@pytest.mark.slow
def test_a_stopped_run_ends_at_once_with_75_and_its_rerun_resumes_from_the_latest_checkpoint(
        ray_local, synthetic_manifest, tmp_path):
    """SIGTERM (scancel, Slurm's time limit) ends `allcluster train` at once with 75, the epochs done
    kept (it used to train on to the end, then say it was interrupted); the rerun resumes, also past
    a checkpoint snapshot a kill cut; a finished run is not retrained."""
    out = tmp_path / "killed"
    config = _run_yaml(tmp_path / "cfg.yaml", synthetic_manifest, out, epochs=12)
    command = [sys.executable, "jobs/train.py", "--config", str(config)]      # the driver Slurm scripts run
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    with LoggedProcess(command, env) as first:
        first.wait_until(lambda: _checkpointed_epochs(out, 2), 300, f"2 checkpointed epochs in {out}")
        first.send_signal(signal.SIGTERM)
        log = first.printed_by_exit(60)
    assert first.returncode == 75 and "interrupted by SIGTERM" in log, log[-3000:]
    done_before = pq.read_metadata(out / "metrics.parquet").num_rows
    assert done_before < 12 and not (out / "model").exists(), "stopped, not trained to the end"
    snapshot = out / "ray" / "checkpoint_manager_snapshot.json"     # as a kill or a full disk in Ray's write leaves it
    snapshot.write_bytes(snapshot.read_bytes()[:40])
    forgotten = set(checkpoint_folders(out / "ray"))          # Ray Train no longer lists them
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "unreadable (a full disk, or a kill while Ray Train wrote it): set aside" in log
    kept = set(checkpoint_folders(out / "ray"))
    assert forgotten and not forgotten & kept and len(kept) <= 2, (forgotten, kept)    # num_to_keep=2
    assert "resuming after epoch" in log and "[train] epoch 12 " in log       # workers' lines reach the driver
    ray_noise = re.findall(r".*(?:TrainController|core_worker\.cc|Token authentication|Setting up process group).*", log)
    assert not ray_noise, ray_noise[:5]                                     # Ray's own lines do not
    history = pq.read_table(out / "metrics.parquet").to_pandas()
    assert history["epoch"].tolist() == list(range(12))
    assert (out / "model" / "model_card.json").is_file()

    weights = out / "model" / "weights.safetensors"
    before = (file_sha256(weights), weights.stat().st_mtime_ns)
    assert main(["train", "--config", str(config)]) == 0          # finished: a rerun trains nothing
    assert (file_sha256(weights), weights.stat().st_mtime_ns) == before
    assert pq.read_table(out / "metrics.parquet")["epoch"].to_pylist() == list(range(12))

    written = (out / "config.yaml").read_bytes()         # another recipe into the same folder: refused
    assert main(["train", "--config", str(config), "--set", "fit.epochs=8"]) == 2
    assert (out / "config.yaml").read_bytes() == written
    assert (file_sha256(weights), weights.stat().st_mtime_ns) == before


def test_a_full_disk_ends_training_with_74_naming_the_run_and_the_same_command_then_finishes(
        ray_local, synthetic_manifest, tmp_path, capsys):
    """A real full disk under ``output_dir`` (a 400 KiB tmpfs: no checkpoint fits): exit 74 and one line
    naming where, what was written is kept, and once there is room the same command finishes."""
    out = tmp_path / "small" / "run"
    config = _run_yaml(tmp_path / "cfg.yaml", synthetic_manifest, out, epochs=2)
    with tmpfs(tmp_path / "small", "size=400k") as mount:
        assert main(["train", "--config", str(config)]) == os.EX_IOERR
        err = capsys.readouterr().err
        assert re.search(rf"train: error: {re.escape(str(out))}(/\S+)?: No space left on device; what was written "
                         "before is kept", err), err[-3000:]
        assert (out / "config.yaml").is_file(), "what was written before is kept"
        subprocess.run(["mount", "-o", "remount,size=300m", str(mount)], check=True)
        assert main(["train", "--config", str(config)]) == 0
        assert (out / "model" / "weights.safetensors").is_file()


def test_a_run_folder_whose_ray_snapshot_a_full_disk_cut_resumes_from_its_newest_checkpoint_that_loads(tmp_path):
    """Ray Train writes its snapshot in place: a full disk (seen: 0 bytes) or a kill while it writes
    leaves it unreadable, and Ray then refuses the run for ever. The repair before each fit sets it
    aside and drops checkpoints the same fault cut; the session then finds the newest one left."""
    from allcluster.train.loop import TrainState, UnsafeCheckpointError
    from allcluster.train.ray_train import repair_run_folder
    from allcluster.train.run_folder import RAY_SNAPSHOT, checkpoint_folders, newest_checkpoint

    run = tmp_path / "ray"
    older, newer, cut = (run / f"checkpoint_2026-12-04_13-49-1{i}.000000" for i in range(3))
    for epoch, folder in enumerate((older, newer, cut), 1):
        folder.mkdir(parents=True)
        TrainState(epoch=epoch, model={"w": torch.ones(2)}).save(folder)
    (cut / "state.pt").write_bytes((cut / "state.pt").read_bytes()[:100])       # the full disk's cut copy
    (run / RAY_SNAPSHOT).write_bytes(b"")
    repair_run_folder(run)
    assert not (run / RAY_SNAPSHOT).exists() and (run / f"{RAY_SNAPSHOT}.broken").is_file()
    assert newest_checkpoint(run) == newer and not cut.exists() and older.is_dir()
    assert TrainState.load(newest_checkpoint(run)).epoch == 2

    # Readable: the folders it lists are Ray Train's. Of the others, an orphan older than the newest it
    # lists goes (Ray's num_to_keep never removes it), one cut by a kill goes, and the newest finished
    # epoch that a stop left unrecorded (Tune stopped the trial between Ray's copy and its record) stays
    (run / RAY_SNAPSHOT).write_text(json.dumps({"ray_version": "x", "checkpoint_results": [
        {"checkpoint_dir_name": newer.name, "metrics": {}}]}))
    unrecorded, cut = (run / f"checkpoint_2026-12-04_13-49-1{i}.000000" for i in (3, 4))
    unrecorded.mkdir()
    TrainState(epoch=3, model={"w": torch.ones(2)}).save(unrecorded)
    cut.mkdir()
    (cut / "state.pt").write_bytes((unrecorded / "state.pt").read_bytes()[:100])
    repair_run_folder(run)
    assert (run / RAY_SNAPSHOT).is_file() and checkpoint_folders(run) == [newer, unrecorded]
    assert newest_checkpoint(run) == unrecorded

    (run / RAY_SNAPSHOT).unlink()                                 # never written; a planted checkpoint
    cut.mkdir()
    torch.save({**TrainState().__dict__, "scheduler": _PlainObject()}, cut / "state.pt")
    with pytest.raises(UnsafeCheckpointError, match=rf"{cut / 'state.pt'}: .*_PlainObject"):
        repair_run_folder(run)
    assert cut.is_dir(), "refused as at resume, never deleted"


@pytest.mark.ray
def test_a_checkpoint_ray_copied_but_did_not_record_before_a_stop_is_resumed_from_not_trained_again(
        ray_local, synthetic_manifest, tmp_path, capsys):
    """Tune stopping a trial (the time-limit warning) can come between Ray Train's copy of a checkpoint
    and its record in the snapshot (seen on a real SIGUSR1 sweep): here the run's final checkpoint, as
    such a stop leaves it. The rerun resumes from it, so the finished run is not trained or exported
    again, and the run folder keeps no orphan Ray's num_to_keep would never remove."""
    out = tmp_path / "run"
    config = _run_yaml(tmp_path / "cfg.yaml", synthetic_manifest, out, epochs=2)
    assert main(["train", "--config", str(config)]) == 0
    snapshot = out / "ray" / "checkpoint_manager_snapshot.json"
    listed = json.loads(snapshot.read_text())
    final = listed["checkpoint_results"].pop()            # the record the stop cut short
    listed["checkpoint_report_indices"].pop()
    listed["latest_checkpoint_result"] = listed["checkpoint_results"][-1]
    snapshot.write_text(json.dumps(listed))
    assert (out / "ray" / final["checkpoint_dir_name"]).is_dir()
    weights = out / "model" / "weights.safetensors"
    before = (file_sha256(weights), weights.stat().st_mtime_ns)
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 0
    printed = capsys.readouterr()
    assert "already finished; nothing to do" in printed.out + printed.err
    assert '"run_complete": true' in printed.out, "the final metrics, as Ray Train now lists them"
    assert (file_sha256(weights), weights.stat().st_mtime_ns) == before, "the finished run was trained again"
    assert pq.read_table(out / "metrics.parquet")["epoch"].to_pylist() == [0, 1]
    listed = {r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]}
    assert {f.name for f in checkpoint_folders(out / "ray")} == listed, "a folder Ray Train does not list stays"


def test_a_run_folder_is_not_resumed_under_a_config_that_trains_something_else(synthetic_manifest, tmp_path):
    from dataclasses import replace

    from allcluster.config import ConfigError, write_resolved
    from allcluster.train.ray_train import check_resumable

    out = tmp_path / "run"
    cfg = tiny_train_config(synthetic_manifest, out)
    write_resolved(cfg, out / "config.yaml")
    check_resumable(replace(cfg, fit=replace(cfg.fit, epochs=3)))      # no checkpoint yet: a fresh start
    (out / "ray" / "checkpoint_2026-12-01_10-44-22.415744").mkdir(parents=True)
    check_resumable(cfg)
    check_resumable(replace(cfg, name="renamed", resources=replace(cfg.resources, cpus_per_worker=2.0),
                            data=replace(cfg.data, loader_workers=2)))    # a requeue on another node shape
    changed = replace(cfg, fit=replace(cfg.fit, epochs=3), optim=replace(cfg.optim, lr=0.01))
    with pytest.raises(ConfigError, match=r"fit\.epochs: 2 -> 3; optim\.lr: 0\.003 -> 0\.01.*another output_dir"):
        check_resumable(changed)


def test_demo_generates_indexes_trains_and_reports_where_outputs_are(ray_local, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "fit.epochs=2"]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed
    assert "macro-F1" in printed
    for path in ("manifest.parquet", "train/config.yaml", "train/metrics.parquet", "train/model/model_card.json",
                 "train/model/weights.safetensors"):
        assert (tmp_path / "demo" / path).is_file(), path
        assert str(tmp_path / "demo" / path) in printed
    card = json.loads((tmp_path / "demo" / "train" / "model" / "model_card.json").read_text())
    assert card["split_sizes"]["train"] > card["split_sizes"]["test"] > 0
    # the same --out with other settings: refused before any image is made again, pointing at --out
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*") if p.is_file()}
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "fit.epochs=3"]) == 2
    refusal = capsys.readouterr().err
    assert "fit.epochs: 2 -> 3" in refusal and f"--out {tmp_path / 'demo'}-2" in refusal, refusal
    assert written == {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*") if p.is_file()}


def test_bf16_autocast_path_trains_and_exports_on_cpu(synthetic_manifest, tmp_path):
    # the GPU default (fit.precision auto = bf16 there) forced on the CPU: the same code path runs
    import math

    from allcluster.train.loop import WorkerRun
    from allcluster.train.session import LocalSession

    cfg = tiny_train_config(synthetic_manifest, tmp_path / "bf16", fit={"epochs": 1, "precision": "bf16"})
    run = WorkerRun(cfg, LocalSession(tmp_path / "bf16" / "checkpoints"))
    assert run.bf16 and isinstance(run.autocast(), torch.autocast)
    final = run.run()
    assert math.isfinite(final["val_loss"]) and 0 <= final["test_accuracy"] <= 1
    assert (tmp_path / "bf16" / "model" / "model_card.json").is_file()


def test_a_run_whose_loss_becomes_nan_fails_before_checkpointing_the_nan_weights(synthetic_manifest, tmp_path):
    """A learning rate of 1e12 makes every weight NaN in one epoch; the model then predicts one class for
    every image. The run fails naming why (a sweep records the trial as errored, never its best model)."""
    from allcluster.train.loop import Diverged, WorkerRun
    from allcluster.train.session import LocalSession

    cfg = tiny_train_config(synthetic_manifest, tmp_path / "nan", fit={"epochs": 2},
                            optim={"name": "sgd", "lr": 1e12}, finetune={"head_epochs": 0, "unfreeze_blocks": -1})
    root = tmp_path / "nan" / "checkpoints"
    with pytest.raises(Diverged, match=r"training diverged: train_loss nan.* at epoch 0 .*lower optim\.lr"):
        WorkerRun(cfg, LocalSession(root)).run()
    assert not list(root.glob("checkpoint_*")) and not (tmp_path / "nan" / "model").exists()


def test_a_run_is_not_resumed_on_a_manifest_re_indexed_under_it(synthetic_manifest, tmp_path):
    import shutil

    import pandas as pd

    from allcluster.config import ConfigError
    from allcluster.train.loop import WorkerRun
    from allcluster.train.session import LocalSession

    manifest = tmp_path / "manifest.parquet"
    shutil.copy(synthetic_manifest, manifest)
    root = tmp_path / "run" / "checkpoints"
    WorkerRun(tiny_train_config(manifest, tmp_path / "run", fit={"epochs": 2}), LocalSession(root)).run()
    for late in sorted(root.glob("checkpoint_*"))[1:]:          # killed after epoch 1
        shutil.rmtree(late)
    frame = pd.read_parquet(manifest)
    frame.iloc[:-1].to_parquet(manifest)                           # re-indexed: one image fewer
    with pytest.raises(ConfigError, match=r"manifest.parquet: its content changed since the checkpoints"):
        WorkerRun(tiny_train_config(manifest, tmp_path / "run", fit={"epochs": 2}), LocalSession(root)).run()
    frame.to_parquet(manifest)                                     # restored: the run resumes
    final = WorkerRun(tiny_train_config(manifest, tmp_path / "run", fit={"epochs": 2}), LocalSession(root)).run()
    assert final["best_epoch"] in (0, 1) and len(pd.read_parquet(tmp_path / "run" / "metrics.parquet")) == 2
    frame.iloc[:-1].to_parquet(manifest)             # re-indexed after it finished: not "finished" on it
    with pytest.raises(ConfigError, match=r"manifest.parquet: its content changed since the checkpoints"):
        WorkerRun(tiny_train_config(manifest, tmp_path / "run", fit={"epochs": 2}), LocalSession(root)).run()


def test_a_split_smaller_than_the_worker_count_is_refused_naming_it(synthetic_manifest, tmp_path):
    from allcluster.config import ConfigError
    from allcluster.train.loop import WorkerRun
    from allcluster.train.session import LocalSession

    session = LocalSession(tmp_path / "small" / "checkpoints")
    session.world_size = 1000                      # more DDP workers than validation images
    with pytest.raises(ConfigError, match=r"the val split has \d+ image\(s\), the test split has \d+ image\(s\) "
                                          r"for 1000 workers.*lower resources.num_workers"):
        WorkerRun(tiny_train_config(synthetic_manifest, tmp_path / "small", fit={"epochs": 1}), session).run()


def test_weight_average_is_what_validation_picks_and_export_writes_and_a_resume_keeps_it(synthetic_manifest, tmp_path):
    """Also: every report counts the epochs trained across the restart (what ASHA's rungs count in)."""
    import shutil

    from allcluster.train.loop import TrainState, WorkerRun
    from allcluster.train.session import EPOCHS_DONE, LocalSession

    fit = {"epochs": 2, "ema_decay": 0.99}
    root = tmp_path / "ema" / "checkpoints"
    first = LocalSession(root)
    WorkerRun(tiny_train_config(synthetic_manifest, tmp_path / "ema", fit=fit), first).run()
    assert [r[EPOCHS_DONE] for r in first.reports] == [1, 2, 2], "two epochs, then the final report"
    epochs = [TrainState.load(root / f"checkpoint_00000{i}") for i in (1, 2)]
    steps = epochs[0].weight_average["steps"]
    assert steps > 0 and epochs[1].weight_average["steps"] == 2 * steps
    best = epochs[epochs[1].best_epoch]
    exported = load_model_dir(tmp_path / "ema" / "model").model.state_dict()
    assert all(torch.equal(exported[k], best.weight_average["weights"][k]) for k in exported)
    assert not all(torch.equal(exported[k], best.model[k]) for k in exported), "the raw weights were exported"

    # interrupted after epoch 1: the resumed run goes on averaging from the saved average and count
    resumed = tmp_path / "resumed"
    shutil.copytree(root / "checkpoint_000001", resumed / "checkpoints" / "checkpoint_000001")
    second = LocalSession(resumed / "checkpoints")
    WorkerRun(tiny_train_config(synthetic_manifest, resumed, fit=fit), second).run()
    assert TrainState.load(resumed / "checkpoints" / "checkpoint_000002").weight_average["steps"] == 2 * steps
    assert [r[EPOCHS_DONE] for r in second.reports] == [2, 2], "the resumed run's first report is its epoch 2"
    assert "epoch" in second.reports[0] and EPOCHS_DONE not in pq.read_schema(resumed / "metrics.parquet").names


class _OpensAFile:
    """Unpickling this runs ``open(path, "w")``: what a planted checkpoint could do on resume."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class _PlainObject:
    """An ordinary class instance from this module (pickled by reference to the class)."""

    def __init__(self):
        self.lr = 0.1


def test_a_checkpoint_holding_a_pickled_object_is_refused_naming_the_file(synthetic_manifest, tmp_path):
    from allcluster.train.loop import TrainState, UnsafeCheckpointError, WorkerRun
    from allcluster.train.session import LocalSession

    marker = tmp_path / "code-ran"
    planted = tmp_path / "run" / "checkpoints" / "checkpoint_000001"
    planted.mkdir(parents=True)
    torch.save({**TrainState().__dict__, "epoch": 1, "model": _OpensAFile(marker)}, planted / "state.pt")
    cfg = tiny_train_config(synthetic_manifest, tmp_path / "run", fit={"epochs": 1})
    with pytest.raises(UnsafeCheckpointError, match=rf"{planted / 'state.pt'}: refused to load .*io\.open"):
        WorkerRun(cfg, LocalSession(tmp_path / "run" / "checkpoints")).run()      # the real resume path
    assert not marker.exists(), "the planted object's code ran"
    assert not (tmp_path / "run" / "model").exists()

    other = tmp_path / "other"
    other.mkdir()
    torch.save({**TrainState().__dict__, "scheduler": _PlainObject()}, other / "state.pt")
    with pytest.raises(UnsafeCheckpointError, match=rf"{other / 'state.pt'}: .*_PlainObject"):
        TrainState.load(other)


def test_training_state_is_saved_as_tensors_and_plain_types_and_loads_back(tmp_path):
    import numpy as np

    from allcluster.train.loop import TrainState

    row = {"epoch": 0, "val_macro_f1": np.float64(0.5), "train_images_per_s": np.float32(12.5),
           "confusion": np.eye(2, dtype=np.int64)}
    state = TrainState(epoch=1, best_score=np.float64(0.5), model={"w": torch.ones(2)},
                       optimizer={"state": {0: {"step": torch.tensor(3.0)}},
                                  "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]},
                       history=[row])
    state.save(tmp_path)
    back = TrainState.load(tmp_path)                # weights_only=True accepts it
    assert back.best_score == 0.5 and type(back.best_score) is float
    assert back.history[0]["train_images_per_s"] == 12.5 and type(back.history[0]["val_macro_f1"]) is float
    assert torch.equal(back.history[0]["confusion"], torch.eye(2, dtype=torch.int64))
    assert back.optimizer["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back.model["w"], torch.ones(2))
    with pytest.raises(TypeError, match=r"state\.scheduler: a _PlainObject cannot go into a training checkpoint"):
        TrainState(scheduler=_PlainObject()).save(tmp_path)


@pytest.mark.slow
@pytest.mark.realdata
def test_each_paper_optimizer_learns_at_its_own_default_rate_on_real_images(real_manifest, tmp_path):
    """ALL-Net from scratch on 60 real images per class and split, 48 px, 20 epochs, no Ray: with
    one shared rate only Adam learned; with each optimiser's own default all four beat chance
    (uniform guessing: macro-F1 ~0.25, accuracy 0.25; the constant-class prediction: macro-F1 0.10).
    Measured over seeds 0-2 the weakest, SGD, scores val macro-F1 0.38-0.45 (10 epochs left SGD and
    Adadelta near 0.3 and RMSprop at its old 3e-4 on the constant class for 2 seeds of 3)."""
    from allcluster.train.loop import WorkerRun
    from allcluster.train.optim import OPTIMIZERS
    from allcluster.train.session import LocalSession

    scores = {}
    for name in ("adam", "sgd", "rmsprop", "adadelta"):
        cfg = tiny_train_config(real_manifest, tmp_path / name,
                                data={"image_size": 48, "max_per_class": 60, "cache_dir": str(tmp_path / "cache")},
                                optim={"name": name, "lr": 0.0, "weight_decay": 0.0}, schedule={"name": "constant"},
                                fit={"epochs": 20, "label_smoothing": 0.0})
        assert cfg.optim.lr == OPTIMIZERS[name].lr_fresh
        final = WorkerRun(cfg, LocalSession(tmp_path / name / "checkpoints")).run()
        scores[name] = (round(final["val_macro_f1"], 3), round(final["test_accuracy"], 3))
    assert all(f1 > 0.3 and accuracy > 0.35 for f1, accuracy in scores.values()), scores


def test_a_checkpoint_staging_folder_left_by_a_killed_worker_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """A worker SIGKILLed while it stages a checkpoint (the OOM killer, Slurm's KillWait) leaves its
    folder in the node's temp space; the next staging folder on the node removes it once it is over
    an hour old, and leaves alone the folders of live processes, of other hosts (a shared $TMPDIR)
    and of other kinds."""
    import socket

    import tempfile

    from allcluster.train.session import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stage = ("import sys, time, tempfile; tempfile.tempdir = sys.argv[1]\n"
             "from allcluster.train.session import scratch_dir\n"
             "with scratch_dir('ckpt') as d:\n"
             "    (d / 'state.pt').write_bytes(b'x' * 1000); print(d, flush=True); time.sleep(600)\n")
    workers = [subprocess.Popen([sys.executable, "-c", stage, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    killed, alive = (Path(w.stdout.readline().strip()) for w in workers)
    try:
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(30)
        assert (killed / "state.pt").is_file(), "a SIGKILLed process cannot clean up"
        with scratch_dir("ckpt"):
            assert killed.is_dir(), "under an hour old: perhaps a process in another PID namespace"
        elsewhere = tmp_path / f"allcluster-ckpt-{socket.gethostname()}x-{workers[0].pid}-abc"
        other_kind = tmp_path / f"allcluster-resume-{socket.gethostname()}-{workers[0].pid}-abc"
        for folder in (elsewhere, other_kind):
            folder.mkdir()
        an_hour_ago = time.time() - 3601
        for folder in (killed, alive, elsewhere, other_kind):
            os.utime(folder, (an_hour_ago, an_hour_ago))
        with scratch_dir("ckpt") as mine:
            assert mine.is_dir() and mine.name.startswith(f"allcluster-ckpt-{socket.gethostname()}-{os.getpid()}-")
            assert not killed.exists(), "the killed worker's staging folder is still there"
            assert (alive / "state.pt").is_file() and elsewhere.is_dir() and other_kind.is_dir()
        assert not mine.exists()
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(30)
