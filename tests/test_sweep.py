"""Sweeps: planning (pure), and real Ray Tune runs of Ray Train trials on a local Ray (2 CPUs)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from allcluster.cli import main
from allcluster.config import ConfigError, from_dict
from allcluster.sweep.config import SweepConfig
from allcluster.sweep.plan import expand, plan_trials
from tests.conftest import REPO, LoggedProcess, run_then_sigkill, tmpfs, write_yaml

TRAIN = {
    "data": {"image_size": 32, "loader_workers": 0},
    "model": {"backbone": "allnet", "head": {"hidden": [16]}},
    "finetune": {"head_epochs": 0, "unfreeze_blocks": -1},
    "optim": {"lr": 0.003, "weight_decay": 0.0},
    "fit": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 0},
    "resources": {"num_workers": 1, "cpus_per_worker": 0.9},
}


def sweep_yaml(path: Path, manifest: Path, experiment: Path, **keys) -> Path:
    train = json.loads(json.dumps(TRAIN))
    train["data"]["manifest"] = str(manifest)
    data = {"name": "t", "experiment_dir": str(experiment), "train": train,
            "grid": {"augment.name": ["mixup", "cutmix"], "optim.name": ["adam", "sgd"]}}
    data.update(keys)
    return write_yaml(path, data)


def _sweep(data: dict) -> SweepConfig:
    return from_dict(SweepConfig, data, "sweep.yaml")


# ---- planning (no Ray) ---------------------------------------------------------------------------
def test_grid_expands_to_every_combination_with_stable_ids(tmp_path):
    sweep = _sweep({"experiment_dir": str(tmp_path), "train": {"data": {"manifest": "m.parquet"}},
                    "grid": {"model.backbone": ["allnet", "resnet18"], "augment.name": ["mixup", "augmix", "cutmix"],
                             "optim.name": ["adam", "sgd"]}})
    trials = plan_trials(sweep, "sweep.yaml")
    assert len(trials) == 12
    assert {(t.config.model.backbone, t.config.augment.name, t.config.optim.name) for t in trials} == {
        (b, a, o) for b in ("allnet", "resnet18") for a in ("mixup", "augmix", "cutmix") for o in ("adam", "sgd")}
    assert [t.trial_id for t in trials] == [t.trial_id for t in plan_trials(sweep, "sweep.yaml")]
    assert len({t.trial_id for t in trials}) == 12
    assert all(t.dir == tmp_path.resolve() / "trials" / t.trial_id for t in trials)
    assert trials[0].config.data.image_size == 224       # filled from the registry per trial


def test_a_worker_larger_than_every_node_is_refused_though_the_cluster_total_fits(tmp_path):
    from allcluster.sweep.ray_tune import concurrency

    sweep = _sweep({"experiment_dir": str(tmp_path), "train": {"data": {"manifest": "m.parquet"}},
                    "grid": {"resources.cpus_per_worker": [4, 8]}})
    trials = plan_trials(sweep, "sweep.yaml")
    two_nodes = [{"CPU": 4.0}, {"CPU": 4.0}]
    total = {"CPU": 8.0}
    assert concurrency(trials[:1], total, 0, two_nodes) == 1
    with pytest.raises(ConfigError, match=rf"trial {trials[1].trial_id}: train.resources: one worker needs 8 CPUs "
                                          r"on one node, but no node has that \(nodes: 4 CPUs, 4 CPUs\)"):
        concurrency(trials, total, 0, two_nodes)
    assert concurrency(trials, {"CPU": 9.0}, 0, [{"CPU": 9.0}]) == 1, "one 9-CPU node fits both, one at a time"
    with pytest.raises(ConfigError, match=r"one trial needs 8\.01 CPUs \(8 for its workers, 0\.01 for the Tune "
                                          r"actor that drives them\).*e\.g\. 0\.9 of a whole CPU"):
        concurrency(trials, {"CPU": 8.0}, 0, [{"CPU": 8.0}])          # its workers fit, its driver does not

    gpu = _sweep({"experiment_dir": str(tmp_path), "train": {"data": {"manifest": "m.parquet"},
                                                             "resources": {"use_gpu": True}},
                  "grid": {"resources.gpus_per_worker": [2, 3]}})
    gpu_trials = plan_trials(gpu, "sweep.yaml")
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert concurrency(gpu_trials[:1], {"CPU": 16.0, "GPU": 3.0}, 0, nodes) == 1
    with pytest.raises(ConfigError, match=r"needs 1 CPUs and 3 GPUs on one node.*gpus_per_worker"):
        concurrency(gpu_trials, {"CPU": 16.0, "GPU": 3.0}, 0, nodes)


def test_a_second_writer_of_a_run_folder_or_an_experiment_is_refused_naming_the_holder(synthetic_manifest, tmp_path,
                                                                                       capsys):
    """One writer per output: `allcluster train` holds its run folder, a Tune sweep its experiment, an
    array task the experiment shared plus its own trial, `--collect` the experiment (so not while
    tasks run). Here this test process is the other writer; every refusal comes before Ray or writes."""
    from allcluster.locks import lock_folder

    def refused(args: list[str], what: str, holder: str = f"pid {os.getpid()}") -> None:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert what in err and "in use by another run" in err and holder in err, err

    def released(locks) -> None:
        for lock in locks:
            lock.release()

    run = tmp_path / "run"
    train = write_yaml(tmp_path / "train.yaml", {**TRAIN, "output_dir": str(run),
                                                 "data": {**TRAIN["data"], "manifest": str(synthetic_manifest)}})
    held = lock_folder(run, "another training run")
    refused(["train", "--config", str(train)], f"training run folder {run}")
    assert [p.name for p in run.iterdir()] == [".lock"], "nothing written"
    released(held)

    exp = tmp_path / "exp"
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, exp)
    from allcluster.config import read_yaml

    trials = plan_trials(_sweep(read_yaml(config)), str(config))
    held = lock_folder(exp, "another sweep")
    refused(["sweep", "--config", str(config)], f"sweep experiment {exp}")
    refused(["sweep", "--config", str(config), "--check"], f"sweep experiment {exp}")    # as the run, Ray or not
    refused(["sweep", "--config", str(config), "--check", "--trial-index", "1"], f"sweep experiment {exp}")
    released(held)
    task = lock_folder(exp, "an array task", f"trial-{trials[0].trial_id}")
    refused(["sweep", "--config", str(config), "--collect"], f"sweep experiment {exp}", f"Slurm array tasks: see {exp}/.lock-*")
    refused(["sweep", "--config", str(config), "--trial-index", "0"], f"trial 0 ({trials[0].trial_id}) of {exp}")
    refused(["sweep", "--config", str(config), "--check", "--trial-index", "0"], f"trial 0 ({trials[0].trial_id}) of {exp}")
    assert main(["sweep", "--config", str(config), "--check", "--trial-index", "1"]) == 0, "tasks run side by side"
    released(task)
    assert sorted(p.name for p in exp.iterdir()) == [".lock", f".lock-trial-{trials[0].trial_id}"], "nothing written"


def test_a_best_model_of_another_grid_is_moved_aside_when_no_trial_of_this_grid_finished(synthetic_manifest, tmp_path,
                                                                                         capsys):
    """The grid changed since best_model/ was exported, and none of its trials has finished: the old
    best_model/ (a trial of the old grid) must not stay where a scoring config points, nor be lost."""
    from allcluster.sweep.driver import collect, load_sweep

    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, tmp_path / "exp", grid={"optim.name": ["adam", "sgd"]})
    sweep, trials = load_sweep(str(config))
    old = tmp_path / "exp" / "best_model"
    old.mkdir(parents=True)
    (old / "model_card.json").write_text(json.dumps({"sweep": {"trial_id": "of-the-old-grid"}}))
    table = collect(sweep, trials)
    assert len(table) == 2 and not (table["status"] == "finished").any()
    assert not old.exists()
    [moved] = (tmp_path / "exp").glob("best_model.stale-*")
    assert json.loads((moved / "model_card.json").read_text())["sweep"]["trial_id"] == "of-the-old-grid"
    assert f"the earlier best_model/, a trial of another grid, moved to {moved}" in capsys.readouterr().err


def test_random_samples_are_seeded_and_inside_their_ranges():
    data = {"train": {"data": {"manifest": "m"}}, "grid": {"optim.name": ["adam", "sgd"]}, "num_samples": 5,
            "sample": {"optim.lr": {"loguniform": [1e-4, 1e-2]}, "fit.batch_size": {"choice": [16, 32]},
                       "fit.epochs": {"randint": [3, 6]}}}
    first = expand(_sweep(data), "s")
    assert len(first) == 10 and first == expand(_sweep(data), "s")
    assert all(1e-4 <= p["optim.lr"] <= 1e-2 and p["fit.batch_size"] in (16, 32) and 3 <= p["fit.epochs"] < 6
               for p in first)
    assert first != expand(_sweep({**data, "seed": 1}), "s")


def test_a_grid_over_whole_sections_varies_coupled_keys_together():
    sweep = _sweep({"train": {"data": {"manifest": "m"}, "optim": {"weight_decay": 0.001}},
                    "grid": {"augment.name": ["mixup", "randaug"],
                             "optim": [{"name": "sgd", "lr": 0.05, "momentum": 0.8}, {"name": "adadelta"}]}})
    trials = plan_trials(sweep, "sweep.yaml")
    assert len(trials) == 4
    sgd = [t for t in trials if t.config.optim.name == "sgd"]
    assert {(t.config.optim.lr, t.config.optim.momentum) for t in sgd} == {(0.05, 0.8)}
    assert all(t.config.optim.weight_decay == 0.001 for t in trials), "keys the grid leaves alone keep the base"
    adadelta = [t for t in trials if t.config.optim.name == "adadelta"]
    assert {t.config.optim.lr for t in adadelta} == {1.0}, "no rate given: the optimiser's own default"
    assert trials[0].params == {"augment.name": "mixup", "optim.name": "sgd", "optim.lr": 0.05, "optim.momentum": 0.8}
    assert trials[0].trial_id.startswith("mixup-sgd-0.05-0.8-")
    with pytest.raises(ConfigError, match=r"grid\.optim: an empty mapping"):
        plan_trials(_sweep({"train": {"data": {"manifest": "m"}}, "grid": {"optim": [{}]}}), "s")


def test_bad_grid_value_names_the_trial_and_the_key():
    sweep = _sweep({"train": {"data": {"manifest": "m"}}, "grid": {"optim.name": ["adam", "nadam"]}})
    with pytest.raises(ConfigError, match=r"optim\.name: 'nadam' is not allowed; allowed values: .*'adam'"):
        plan_trials(sweep, "sweep.yaml")


def test_unknown_grid_key_and_bad_distribution_are_clear_errors():
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key; allowed keys here: .*lr"):
        plan_trials(_sweep({"train": {"data": {"manifest": "m"}}, "grid": {"optim.learning_rate": [1e-3]}}), "s")
    with pytest.raises(ConfigError, match=r"sample\.optim\.lr: expected one of \{choice, uniform"):
        plan_trials(_sweep({"train": {"data": {"manifest": "m"}}, "sample": {"optim.lr": {"normal": [0, 1]}}}), "s")
    with pytest.raises(ConfigError, match=r"unknown key; allowed keys here: .*experiment_dir"):
        _sweep({"experiment": "x"})


def test_a_key_varied_in_two_places_is_refused_naming_both():
    """One would silently win over the other (the grid's values, even invalid ones, never trained)."""
    base = {"train": {"data": {"manifest": "m"}}}
    with pytest.raises(ConfigError, match=r"s: sample\.optim\.lr: varies train\.optim\.lr, which grid\.optim\.lr "
                                          r"varies too; give each key in one place"):
        plan_trials(_sweep({**base, "grid": {"optim.lr": [1e-3, "abc"]},
                            "sample": {"optim.lr": {"uniform": [0.1, 0.2]}}}), "s")
    with pytest.raises(ConfigError, match=r"grid\.fit\.epochs: varies train\.fit\.epochs, which grid\.fit varies"):
        plan_trials(_sweep({**base, "grid": {"fit": [{"epochs": 1}, {"epochs": 2}], "fit.epochs": [3]}}), "s")
    with pytest.raises(ConfigError, match=r"sample\.optim: varies train\.optim\.lr, which grid\.optim\.lr varies"):
        plan_trials(_sweep({**base, "grid": {"optim.lr": [1e-3]},
                            "sample": {"optim": {"choice": [{"name": "sgd", "lr": 0.01}, {"name": "adam"}]}}}), "s")
    coupled = plan_trials(_sweep({**base, "grid": {"optim": [{"name": "sgd", "lr": 0.01}, {"name": "adam"}]},
                                  "sample": {"optim.weight_decay": {"uniform": [0.0, 0.1]}}}), "s")
    assert len(coupled) == 2, "keys of one section varied apart are fine"
    for key in ("output_dir", "name"):           # the sweep sets them for each trial: the axis vanished
        with pytest.raises(ConfigError, match=rf"grid\.{key}: varies train\.{key}, which the sweep sets for each trial"):
            plan_trials(_sweep({**base, "grid": {key: ["a", "b"]}}), "s")


def test_a_base_file_beside_the_sweep_is_found_whatever_the_overrides_and_its_typo_named_in_it(tmp_path, monkeypatch):
    """The base was looked up beside a path parsed from the error source, which an override holding a
    '/' cut elsewhere ("base: ... not found"); a typo in the base file was blamed on the sweep file."""
    from allcluster.sweep.driver import load_sweep

    (tmp_path / "conf").mkdir()
    write_yaml(tmp_path / "conf" / "base.yaml", {"data": {"manifest": str(tmp_path / "m.parquet")}, "fit": {"epochs": 3}})
    write_yaml(tmp_path / "conf" / "s.yaml", {"experiment_dir": str(tmp_path / "exp"), "base": "base.yaml",
                                              "grid": {"optim.name": ["adam", "sgd"]}})
    monkeypatch.chdir(tmp_path)                               # not the sweep file's folder
    sweep, trials = load_sweep("conf/s.yaml", [f"train.data.manifest={tmp_path / 'other' / 'm.parquet'}"])
    assert len(trials) == 2 and all(t.config.fit.epochs == 3 for t in trials)
    assert trials[0].config.data.manifest == str(tmp_path / "other" / "m.parquet")
    write_yaml(tmp_path / "conf" / "base.yaml", {"data": {"manifest": "m.parquet", "image_sise": 64}})
    with pytest.raises(ConfigError, match=r"conf/base\.yaml \(base of conf/s\.yaml\): data\.image_sise"):
        load_sweep("conf/s.yaml")


def test_grid_values_that_train_the_same_config_make_one_trial():
    """1 and 1.0 epochs, or lr 0 (the optimiser's default) and that default written out, train the same."""
    from allcluster.train.optim import default_lr

    base = {"train": {"data": {"manifest": "m"}}}
    same = plan_trials(_sweep({**base, "grid": {"fit.epochs": [1, 1.0, 2]}}), "s")
    assert [t.config.fit.epochs for t in same] == [1, 2] and [t.index for t in same] == [0, 1]
    default = default_lr("adam", fresh=True)
    assert len(plan_trials(_sweep({**base, "grid": {"optim.lr": [0, default, default * 2]}}), "s")) == 2


def test_dry_run_prints_grid_states_and_measured_estimates(synthetic_manifest, tmp_path, capsys):
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, tmp_path / "exp")
    assert main(["sweep", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "grid: 4 cells, 4 trials; states: 4 pending" in out
    assert "estimates measured on cpu" in out and "GPU-hours" in out
    assert "est_hours" in out and "mixup" in out and "cutmix" in out
    assert "Ray's start-up come on top" in out, "the estimate says what it leaves out"
    assert not (tmp_path / "exp").exists(), "a dry run schedules and writes nothing"
    # a 2-pixel input passes validation but no ALL-Net step: refused naming the trial, no traceback
    assert main(["sweep", "--config", str(config), "--dry-run", "--set", "grid.data.image_size=[32, 2]"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"trial \d+ \(\S+: .*data\.image_size=2\): its model cannot take one training step: "
                     r"RuntimeError: ", err), err
    assert not (tmp_path / "exp").exists()


def test_a_sigterm_while_ray_starts_is_named_as_the_signal_not_as_lost_ray_processes(synthetic_manifest, tmp_path,
                                                                                    monkeypatch, capsys):
    """ray.init puts its own SIGTERM handler in place while it starts (a sys.exit that
    ray_utils._ray_start_guarded turns into Interrupted): ours never ran, and the exit-75 line blamed
    lost Ray processes "(see above)" where nothing above said so. Injected: no Ray starts here."""
    from allcluster.interrupt import Interrupted
    from allcluster.sweep import driver

    def ray_start_signalled(*args, **kwargs):
        raise Interrupted("SIGTERM")
    monkeypatch.setattr(driver, "_join_ray", ray_start_signalled)
    monkeypatch.setattr(driver, "_run_array_on_ray", ray_start_signalled)
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, tmp_path / "exp")
    assert main(["sweep", "--config", str(config)]) == 75
    assert "[sweep] interrupted by SIGTERM: 4 of 4 trials unfinished" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "exp").iterdir()] == [".lock"], "stopped before anything ran: nothing written"
    assert main(["sweep", "--config", str(config), "--trial-index", "1"]) == 75
    assert "[sweep] interrupted by SIGTERM: trial 1" in capsys.readouterr().err


@pytest.mark.ray
def test_a_trial_the_ray_cluster_cannot_hold_is_refused_before_anything_is_written_or_moved(
        ray_local, synthetic_manifest, tmp_path, capsys):
    """Resources are checked against the cluster once Ray runs; the refusal must still come before the
    run records its base or sweep.yaml, and before --new-config moves the old outputs aside."""
    from allcluster.config import config_source
    from allcluster.sweep.driver import load_sweep
    from allcluster.sweep.experiment import resolved_base, store_base

    exp = tmp_path / "exp"
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, exp)
    too_big = ["--set", "train.resources.cpus_per_worker=64"]
    assert main(["sweep", "--config", str(config), *too_big]) == 2
    assert "train.resources: 1 workers x 64 CPUs = 64 CPUs, but the Ray cluster has" in capsys.readouterr().err
    assert [p.name for p in exp.iterdir()] == [".lock"], "a new experiment: only the run's lock"
    sweep, _ = load_sweep(str(config))
    store_base(exp, {**resolved_base(sweep, config_source(str(config))), "fit.epochs": 99})   # an older base
    (exp / "trials" / "old").mkdir(parents=True)
    before = _listing(exp)
    assert main(["sweep", "--config", str(config), *too_big, "--new-config"]) == 2
    after = _listing(exp)
    assert after.pop(".lock") and before.pop(".lock"), "the run's lock (it records the holder)"
    assert after == before, "--new-config moved nothing aside for a run that was then refused"


def test_a_second_signal_while_ray_shuts_down_still_leaves_the_tables_written(synthetic_manifest, tmp_path,
                                                                             monkeypatch):
    """Ctrl-C twice, the second while the driver leaves its local Ray (a second or so): the tables are
    still written. Injected: the signals are real, Ray and Tune are stand-ins."""
    from allcluster.sweep import driver

    def join(sweep, to_run, address, scope):
        scope.callback(os.kill, os.getpid(), signal.SIGTERM)          # the second signal, as Ray shuts down
        return 1

    def run(sweep, to_run, exp, stop, limit):
        stop.graceful()
        os.kill(os.getpid(), signal.SIGTERM)                            # the first: a graceful stop
    monkeypatch.setattr(driver, "_join_ray", join)
    monkeypatch.setattr(driver, "_run_on_ray", run)
    exp = tmp_path / "exp"
    assert main(["sweep", "--config", str(sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, exp))]) == 75
    assert (exp / "trials.parquet").is_file() and (exp / "epochs.parquet").is_file()


def test_trial_ids_stay_as_first_written_so_existing_experiments_keep_their_trials():
    from allcluster.sweep.plan import trial_id

    assert trial_id({"optim.lr": 1e-4, "data.image_size": 32}) == "0.0001-32-ae1d5529"
    assert trial_id({"optim.lr": 1e12}).startswith("1e-12-")   # a '+' read as '-': the hash and tables are exact


# ---- real Tune runs ------------------------------------------------------------------------------
@pytest.mark.ray
def test_sweep_runs_every_trial_and_exports_the_best_by_validation(ray_local, real_sweep):
    exp = real_sweep["experiment"]               # 2 backbones, sampled augmentation and optimizer (conftest)
    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 2 and trials["trial_id"].is_unique
    assert (trials["status"] == "finished").all(), trials[["trial_id", "status", "error"]]
    assert sorted(trials["model.backbone"]) == ["allnet", "test_efficientnet"]
    assert set(trials["augment.name"]) <= {"none", "mixup"} and set(trials["optim.name"]) <= {"adam", "adamw"}, \
        "the sampled keys, drawn per trial"
    for column in ("train_accuracy", "train_macro_f1", "val_accuracy", "test_accuracy", "val_macro_f1",
                   "test_macro_f1", "test_auc", "test_macro_specificity", "test_ece"):
        assert trials[column].between(0, 1).all(), column
    assert (trials["wall_seconds"] > 0).all() and (trials["images_per_s"] > 0).all()
    assert (trials["gpu_hours"] == 0).all() and (trials["epochs_trained"] == 3).all()
    assert trials["config_hash"].str.len().eq(16).all() and (trials["ray_version"] != "").all()
    epochs = pd.read_parquet(exp / "epochs.parquet")
    assert len(epochs) == 6 and set(epochs["trial_id"]) == set(trials["trial_id"])
    best = trials.sort_values(["val_macro_f1", "val_loss", "trial_id"], ascending=[False, True, True]).iloc[0]  # ties: loss, id
    card = json.loads((exp / "best_model" / "model_card.json").read_text())
    assert card["sweep"]["trial_id"] == best["trial_id"]
    assert card["sweep"]["val_macro_f1"] == pytest.approx(trials["val_macro_f1"].max())
    assert (card["sweep"]["finished_trials"], card["sweep"]["planned_trials"]) == (2, 2)
    assert (exp / "best_model" / "weights.safetensors").is_file()
    assert "2 trials: 2 finished" in real_sweep["printed"] and "val_macro_f1" in real_sweep["printed"]
    assert _cpus_free_soon(ray_local, 2.0) == pytest.approx(2.0), "finished trials must release their CPUs"
    from ray.util.state import list_actors

    started = {actor.class_name for actor in list_actors(address=ray_local.get_runtime_context().gcs_address,
                                                         limit=10_000, raise_on_missing_output=False)}
    assert "RayTrainWorker" in started and "PreemptionWatcher" not in started, \
        "Ray Train's drain watcher is off in every job (ray_utils.RAY_TRAIN_DEFAULTS)"


def test_a_trial_error_of_several_failed_workers_is_rank_0s_own_exception():
    """Ray Train's WorkerGroupError carries each failed rank's exception; the trial's row quotes rank 0's,
    not Ray's wrapper nor an exception Ray's own code raised while wrapping (the wrapper's Python chain)."""
    from allcluster.sweep.plan import _exception_text

    wrapper = type("WorkerGroupError", (RuntimeError,), {"__module__": "ray.train.v2.api.exceptions"})
    failed = wrapper("\x1b[31mTraining failed on 2 workers\x1b[0m")
    failed.worker_failures = {0: ValueError("rank 0: bad batch"), 1: ValueError("rank 1: bad batch")}
    failed.__context__ = KeyError("raised inside Ray while wrapping")
    outer = type("TrainingFailedError", (RuntimeError,), {"__module__": "ray.tune.error"})("trial failed")
    outer.__cause__ = failed
    assert _exception_text(outer) == "ValueError: rank 0: bad batch"


@pytest.mark.ray
def test_errored_trial_is_recorded_and_retried_only_when_asked(ray_local, synthetic_manifest, tmp_path):
    # a 2-pixel input passes validation but cannot go through ALL-Net's pooling: a runtime error
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, tmp_path / "exp",
                        grid={"data.image_size": [32, 2]}, train={**TRAIN, "fit": {**TRAIN["fit"], "epochs": 1},
                                                                  "data": {**TRAIN["data"], "manifest": str(synthetic_manifest)}})
    assert main(["sweep", "--config", str(config)]) == 0
    trials = pd.read_parquet(tmp_path / "exp" / "trials.parquet").set_index("data.image_size")
    assert trials.loc[32, "status"] == "finished"
    assert trials.loc[2, "status"] == "errored"
    error = trials.loc[2, "error"]       # the trial's own exception, not Ray's wrappers in terminal colours
    assert error.startswith("RuntimeError: ") and "input size" in error and "\x1b" not in error, error
    assert "Traceback" not in error and len(error) < 600, error
    weights = Path(trials.loc[32, "model_dir"]) / "weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    errored_dir = tmp_path / "exp" / "trials" / trials.loc[2, "trial_id"]
    first_error_time = json.loads((errored_dir / "error.json").read_text())["time"]

    assert main(["sweep", "--config", str(config)]) == 0          # nothing to do: no retry asked
    assert json.loads((errored_dir / "error.json").read_text())["time"] == first_error_time
    assert main(["sweep", "--config", str(config), "--retry-errored"]) == 0
    assert json.loads((errored_dir / "error.json").read_text())["time"] > first_error_time
    assert weights.stat().st_mtime_ns == stamp, "a finished trial must not be rerun"


@pytest.mark.ray
@pytest.mark.parametrize("asha", [False, True], ids=["fifo", "asha"])
def test_a_full_disk_stops_the_sweep_with_74_naming_the_trial_and_the_same_command_then_finishes_every_trial(
        ray_local, synthetic_manifest, tmp_path, capsys, asha):
    """A real full disk (the experiment on a 400 KiB tmpfs: no checkpoint fits). No trial is at fault,
    so none is errored (Tune's own error file would not fit either): the trial that met it reports it
    and is left to resume, the sweep's stopper ends the others and it exits 74 naming where. The
    trial meets it before its first report (nothing fits), the case where Tune checks the last result
    for the metric (and ASHA for its rung keys); an array task's trial (no Tune) exits 74 the same way. Once there is room
    the same command, without --retry-errored, finishes every trial."""
    exp = tmp_path / "small" / "exp"
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, exp, grid={"optim.name": ["adam", "sgd"]},
                        asha={"enabled": asha})       # grace period 3 > 2 epochs: ASHA stops nothing here
    with tmpfs(tmp_path / "small", "size=400k") as mount:
        assert main(["sweep", "--config", str(config)]) == os.EX_IOERR
        err = capsys.readouterr().err
        assert re.search(rf"sweep: error: {re.escape(str(exp))}/trials/\S+: No space left on device; what was written "
                         "before is kept: .* rerun the same command", err), err[-3000:]
        assert not list(exp.glob("trials/*/error.json")), "no trial is at fault"
        assert not list(exp.glob("trials/*/stopped.json")), "no trial is recorded as stopped by ASHA"
        if not asha:                                      # an array task (no Tune) meets it the same way
            assert main(["sweep", "--config", str(config), "--trial-index", "1"]) == os.EX_IOERR
            err = capsys.readouterr().err
            assert re.search(rf"sweep: error: {re.escape(str(exp))}/trials/\S+: No space left on device", err), err[-3000:]
        subprocess.run(["mount", "-o", "remount,size=300m", str(mount)], check=True)
        assert main(["sweep", "--config", str(config)]) == 0
        trials = pd.read_parquet(exp / "trials.parquet")
        assert (trials["status"] == "finished").all(), trials[["trial_id", "status", "error"]]
        assert (exp / "best_model" / "weights.safetensors").is_file()


def test_a_full_disk_behind_rays_and_tunes_wrappers_is_named_by_its_file_or_else_by_the_experiment(tmp_path):
    """Tune's own writes into a full experiment folder can fail before any trial reports the full disk,
    and Ray Train's checkpoint copies (pyarrow) name no file: the sweep still raises the OSError (exit
    74 in the CLI) naming the file, or the experiment where none is named. A trial's report comes first."""
    import errno

    from allcluster.sweep.ray_tune import STORAGE_FULL_MET, raise_if_storage_full

    def wrapped(inner: OSError) -> Exception:
        outer = RuntimeError("Tune's own error")
        outer.__cause__ = inner
        return outer

    STORAGE_FULL_MET.clear()
    raise_if_storage_full(tmp_path, wrapped(OSError(errno.EACCES, "Permission denied", "x")))    # not ours
    for inner, named in [(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path)),
                         (OSError(errno.EDQUOT, "Disk quota exceeded", "/exp/state.json"), "/exp/state.json")]:
        with pytest.raises(OSError) as raised:
            raise_if_storage_full(tmp_path, wrapped(inner))
        assert (raised.value.errno, raised.value.filename) == (inner.errno, named)
    STORAGE_FULL_MET.append((errno.ENOSPC, "/exp/trials/t/metrics.parquet"))
    try:
        with pytest.raises(OSError, match="trials/t/metrics.parquet"):
            raise_if_storage_full(tmp_path, wrapped(OSError(errno.ENOSPC, "No space left on device", "/exp/x")))
    finally:
        STORAGE_FULL_MET.clear()


@pytest.mark.ray
def test_a_full_node_disk_under_the_image_cache_ends_the_sweep_with_74_naming_the_cache(
        ray_local, synthetic_manifest, tmp_path, capsys):
    """The decoded-image cache is written through a memory map: on a full disk a write into a sparse
    file is a SIGBUS that killed Ray's task three times over (WorkerCrashedError, exit 1). Allocated
    first, it is an ENOSPC that names the cache, and the sweep exits 74 before any trial starts."""
    with tmpfs(tmp_path / "node-tmp", "size=200k,mode=700") as cache_root:
        config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, tmp_path / "exp",
                            train={**TRAIN, "data": {**TRAIN["data"], "manifest": str(synthetic_manifest),
                                                     "cache_dir": str(cache_root)}})
        assert main(["sweep", "--config", str(config)]) == os.EX_IOERR
        err = capsys.readouterr().err
        assert re.search(rf"sweep: error: {re.escape(str(cache_root))}/s32-\S+: No space left on device", err), err[-3000:]
        assert [p.name for p in cache_root.iterdir() if not p.name.endswith(".lock")] == [], "no half-built cache"
    assert not list((tmp_path / "exp").glob("trials/*/ray")), "no trial started"


def _cpus_free_soon(ray, expected: float, timeout: float = 30.0) -> float:
    deadline = time.time() + timeout
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= expected - 1e-6 or time.time() > deadline:
            return free
        time.sleep(0.5)


@pytest.mark.ray
def test_the_sweeps_asha_stops_a_trial_which_is_recorded_as_stopped_frees_its_resources_and_is_not_rerun(
        ray_local, synthetic_manifest, tmp_path, monkeypatch):
    """The sweep's own ASHA (``build_scheduler`` from the config's ``asha`` section: rungs on the epochs
    a trial has trained, which its reports carry) with one rule added so that the stop is known in
    advance: ASHA's own choice depends on the metrics, and of two trials it may stop neither. So
    Tune's real stop path (killing a running Ray Train trial) is exercised. The stopped trial is given
    40 epochs: a result reaches the driver seconds after the worker reports it, and a 3-epoch trial on
    synthetic images can finish inside that delay (CI of stop 20); the other ends before ASHA's first
    rung (grace period 5), so ASHA itself stops nothing."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    import allcluster.sweep.ray_tune as ray_tune
    from allcluster.train.session import EPOCHS_DONE

    class LongTrialRule(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            if trial.config["trial"]["train"]["fit"]["epochs"] == 40 and "epoch" in result:
                return TrialScheduler.STOP
            return super().on_trial_result(tune_controller, trial, result)

    class StopLongTrial(ray_tune.RecordsStops, LongTrialRule):
        stopped_by = "long-trial-rule"

    built, build = [], ray_tune.build_scheduler

    def build_and_keep(sweep, trials):
        built.append(build(sweep, trials))
        return built[-1]

    monkeypatch.setattr(ray_tune, "_asha_class", lambda: StopLongTrial)
    monkeypatch.setattr(ray_tune, "build_scheduler", build_and_keep)
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, tmp_path / "exp",
                        train={**TRAIN, "data": {**TRAIN["data"], "manifest": str(synthetic_manifest)}},
                        grid={"fit.epochs": [3, 40]}, asha={"enabled": True, "grace_period": 5, "reduction_factor": 2})
    assert main(["sweep", "--config", str(config)]) == 0
    (asha,) = built
    assert (asha._time_attr, asha._reduction_factor, asha._max_t) == (EPOCHS_DONE, 2, 42)   # max_t: past the last report
    assert [rung for rung, _ in asha._brackets[0]._rungs][-1] == 5, "the first rung at the grace period"
    trials = pd.read_parquet(tmp_path / "exp" / "trials.parquet").set_index("fit.epochs")
    assert trials.loc[3, "status"] == "finished"
    assert trials.loc[40, "status"] == "stopped"
    assert trials.loc[40, "epochs_trained"] >= 1 and trials.loc[40, "epochs_trained"] < 40
    assert trials.loc[40, "model_dir"] == "" and pd.isna(trials.loc[40, "test_accuracy"])
    marker = tmp_path / "exp" / "trials" / trials.loc[40, "trial_id"] / "stopped.json"
    assert json.loads(marker.read_text())["by"] == "long-trial-rule", "the scheduler that stopped it is named"
    assert not (tmp_path / "exp" / "trials" / trials.loc[3, "trial_id"] / "stopped.json").exists()
    # ASHA's milestones count the epochs a trial has trained (across restarts), which its reports carry:
    # without them ASHA silently stops nothing
    results = [json.loads(line) for path in (tmp_path / "exp").glob("tune-*/*/result.json")
               for line in path.read_text().splitlines()]
    assert results and all(r[EPOCHS_DONE] >= 1 for r in results)
    assert _cpus_free_soon(ray_local, 2.0) == pytest.approx(2.0), "the stopped trial's CPUs must be freed"
    assert main(["sweep", "--config", str(config)]) == 0          # a stopped trial is not rerun
    again = pd.read_parquet(tmp_path / "exp" / "trials.parquet").set_index("fit.epochs")
    assert again.loc[40, "status"] == "stopped" and again.loc[40, "epochs_trained"] < 40


# ---- stop signals and config changes --------------------------------------------------------------
def test_each_stop_signal_is_caught_deferred_while_graceful_and_handlers_are_restored():
    import signal

    from allcluster.interrupt import STOP_REQUESTED, StopSignals, Interrupted

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        with StopSignals() as stop:
            with pytest.raises(Interrupted, match=sig.name):      # before Tune: ends at once
                signal.raise_signal(sig)
        with StopSignals() as stop:
            assert not stop.requested
            stop.graceful()
            signal.raise_signal(sig)                                     # Tune running: only asks to stop
            assert stop.requested and STOP_REQUESTED.is_set() and stop.signal_name == sig.name
            with pytest.raises(Interrupted):                        # a second one: at once
                signal.raise_signal(signal.SIGTERM)
        with StopSignals() as stop:
            stop.hold()                                                  # writing the tables
            signal.raise_signal(sig)
            signal.raise_signal(signal.SIGTERM)                          # nothing raises
            assert stop.requested and stop.signal_name == sig.name
    assert {s: signal.getsignal(s) for s in before} == before


def test_the_fit_thread_a_signal_leaves_running_is_known_until_it_ends():
    """A second signal ends the driver's wait on ``Tuner.fit`` but not the fit's thread, which is
    still inside Ray: ``left_running`` tells ``ray_connected`` not to shut Ray down under it."""
    import threading

    from allcluster.interrupt import Interrupted, StopSignals, call_in_thread, left_running

    release = threading.Event()
    with StopSignals():
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        with pytest.raises(Interrupted):
            call_in_thread(lambda: release.wait(30))
    assert left_running()
    release.set()
    deadline = time.time() + 10
    while left_running() and time.time() < deadline:
        time.sleep(0.05)
    assert not left_running()


def test_a_sigterm_while_ray_starts_is_the_drivers_interrupted_and_its_handler_is_put_back(monkeypatch):
    """``ray.init`` replaces the SIGTERM handler with ``sys.exit(15)``, a local head's node with one that
    exits with 1: a SIGTERM during Ray's start becomes the driver's Interrupted (exit 75, not 15 or 1),
    the half-made connection is taken down, and the driver's handler is in force after."""
    import sys

    import ray

    from allcluster.interrupt import Interrupted, StopSignals
    from allcluster.ray_utils import _ray_start_guarded

    taken_down = []          # recorded, not done: the session's Ray (ray_local) may be up in this process
    monkeypatch.setattr(ray, "shutdown", lambda: taken_down.append(True))

    def like_ray_init(exit_code):
        # ray._private.worker.init: sys.exit(signum); ray._private.node (local head): sys.exit(1)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(exit_code(signum)))
        signal.raise_signal(signal.SIGTERM)

    with StopSignals() as stop:
        ours = signal.getsignal(signal.SIGTERM)
        for exit_code in (lambda signum: signum, lambda signum: 1):
            with pytest.raises(Interrupted, match="SIGTERM"):
                with _ray_start_guarded():
                    like_ray_init(exit_code)
            assert signal.getsignal(signal.SIGTERM) == ours
        assert len(taken_down) == 2, "each interrupted start is taken down at once"
        with _ray_start_guarded():                                       # a start that succeeds
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        assert signal.getsignal(signal.SIGTERM) == ours and len(taken_down) == 2
        stop.graceful()
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested


def test_work_done_counts_recorded_epochs_and_finished_or_stopped_trials_and_progress_goes_to_the_named_file(
        tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from allcluster.interrupt import PROGRESS_FILE_ENV, report_progress
    from allcluster.sweep.results import work_done

    sweep = _sweep({"experiment_dir": str(tmp_path / "exp"), "train": {"data": {"manifest": "m.parquet"}},
                    "grid": {"optim.name": ["adam", "sgd", "rmsprop"]}})
    running, stopped, pending = plan_trials(sweep, "sweep.yaml")
    assert work_done([running, stopped, pending]) == 0
    for trial, epochs in ((running, 3), (stopped, 2)):
        trial.dir.mkdir(parents=True)
        pq.write_table(pa.table({"epoch": list(range(epochs))}), trial.dir / "metrics.parquet")
    (stopped.dir / "stopped.json").write_text("{}")
    assert work_done([running, stopped, pending]) == 3 + 2 + 1      # a trial that ended counts once more
    pending.dir.mkdir(parents=True)
    (pending.dir / "error.json").write_text("{}")
    assert work_done([pending]) == 0                                 # an error is no progress

    report_progress(5, "rows")                     # no file named (not under Slurm): nothing written
    assert not list(tmp_path.glob("progress*"))
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(tmp_path / "progress"))
    report_progress(0, "epochs or trial endings")
    assert (tmp_path / "progress").read_text() == "0 epochs or trial endings\n"


def test_trials_whose_ray_processes_died_resume_twice_their_own_errors_never_and_finished_stays_finished(
        tmp_path, capsys):
    """Slurm's SIGTERM (requeue, preemption, scancel) stops the Ray node under a running trial before the
    driver stops that trial: Tune reports ActorDiedError. Such an error must not make the trial errored
    (never rerun). Nor, twice, with no signal: a node lost (Ray sees it in seconds, Slurm minutes later)
    or a worker killed for memory. A third such run, and a trial's own exception at once, are recorded.
    A trial that exported its model is finished."""
    from types import SimpleNamespace

    from ray.exceptions import ActorDiedError

    from allcluster.sweep.plan import clear_error, trial_status
    from allcluster.sweep.ray_tune import record_errors

    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    sweep = _sweep({"experiment_dir": str(tmp_path / "exp"), "train": {"data": {"manifest": "m.parquet"}},
                    "grid": {"optim.name": ["adam", "sgd", "rmsprop", "adadelta"]}})
    running, worker_lost, buggy, exported = trials = plan_trials(sweep, "sweep.yaml")
    (exported.dir / "model").mkdir(parents=True)
    (exported.dir / "model" / "model_card.json").write_text("{}")
    died = ActorDiedError()            # what Tune hands back for a trial actor whose node went down
    # a Train worker's death, as Ray Train 2.60 reports it (seen with a real SIGKILL, test below)
    worker_died = WorkerGroupError("a worker died", {0: WorkerHealthCheckFailedError("health check failed", died)})
    errors = [died, worker_died, ValueError("the trial's own bug"), died]
    grid = [SimpleNamespace(config={"trial": {"trial_id": t.trial_id}}, error=e) for t, e in zip(trials, errors)]
    by_id = {t.trial_id: t for t in trials}

    record_errors(grid, by_id, stopped_by="SIGTERM")
    assert [trial_status(t.dir) for t in trials] == ["pending", "pending", "errored", "finished"]
    assert f"{running.trial_id} ended with ActorDiedError while SIGTERM stopped the run" in capsys.readouterr().err
    assert not (running.dir / "lost.json").exists(), "a signal's casualties are not counted as lost"
    for run in (1, 2):                                           # no signal: lost, resumed by the rerun
        record_errors(grid, by_id)
        assert [trial_status(t.dir) for t in trials] == ["pending", "pending", "errored", "finished"]
        err = capsys.readouterr().err
        assert f"{worker_lost.trial_id}: its Ray processes died (WorkerGroupError) with no stop signal" in err
        assert f"the rerun resumes it ({run} of 2 such runs in a row allowed)" in err
    # the second trial records an epoch before it is lost again: its count starts again
    pd.DataFrame({"epoch": [0]}).to_parquet(worker_lost.dir / "metrics.parquet")
    record_errors(grid, by_id)                                   # the first trial, a third time: errored
    assert [trial_status(t.dir) for t in trials] == ["errored", "interrupted", "errored", "finished"]
    assert "(1 of 2 such runs in a row allowed)" in capsys.readouterr().err
    assert json.loads((running.dir / "error.json").read_text())["error"].startswith(
        "its Ray processes died in 3 runs in a row: ray.exceptions.ActorDiedError")
    assert not (exported.dir / "error.json").exists()
    clear_error(running.dir)                                     # --retry-errored: a fresh count
    assert trial_status(running.dir) == "pending" and not (running.dir / "lost.json").exists()
    clear_error(worker_lost.dir)                                 # not errored: its count stays
    assert json.loads((worker_lost.dir / "lost.json").read_text())["runs"] == 1


def test_base_config_diff_names_changed_keys_and_skips_the_varied_ones(tmp_path):
    from allcluster.sweep.experiment import base_diff, resolved_base, varied_keys

    data = {"experiment_dir": str(tmp_path), "train": {"data": {"manifest": "m"}, "fit": {"epochs": 2}},
            "grid": {"optim.lr": [0.1, 0.01]}}
    old = resolved_base(_sweep(data), "s")
    assert old["fit.epochs"] == 2 and "output_dir" not in old and "name" not in old
    changed = {**data, "train": {"data": {"manifest": "m"}, "fit": {"epochs": 3}, "optim": {"lr": 5.0}}}
    new_sweep = _sweep(changed)
    assert base_diff(old, resolved_base(new_sweep, "s"), varied_keys(new_sweep)) == ["train.fit.epochs: 2 -> 3"]
    assert base_diff(old, old) == []
    assert base_diff({"a.b": [1, 2]}, {"a.c": 1}) == ["train.a.b: [1, 2] -> (absent)", "train.a.c: (absent) -> 1"]
    # where and how fast trials run is not what they train: a requeue onto nodes of another shape, or a
    # run refused because its resources did not fit the cluster (after the base was stored), goes on
    moved = {**data, "train": {"data": {"manifest": "m", "cache_dir": str(tmp_path / "c"), "loader_workers": 5},
                               "fit": {"epochs": 2}, "resources": {"cpus_per_worker": 4, "num_workers": 2}}}
    assert base_diff(old, resolved_base(_sweep(moved), "s"), varied_keys(_sweep(moved))) == []


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_rerun_with_a_changed_base_config_is_refused_naming_the_key_and_writes_nothing(
        synthetic_manifest, tmp_path, capsys):
    from allcluster.config import config_source
    from allcluster.sweep.driver import load_sweep
    from allcluster.sweep.experiment import resolved_base, store_base

    exp = tmp_path / "exp"
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, exp)
    sweep, _ = load_sweep(str(config))
    store_base(exp, resolved_base(sweep, config_source(str(config))))        # as the first run left it
    before = _listing(exp)
    assert main(["sweep", "--config", str(config), "--set", "train.fit.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "train.fit.epochs: 2 -> 3" in err and "--new-config" in err and str(exp) in err
    assert _listing(exp) == before, "a refused rerun must write nothing"
    assert main(["sweep", "--config", str(config), "--set", "train.fit.epochs=3", "--dry-run", "--no-probe"]) == 0
    assert "a run needs --new-config): train.fit.epochs: 2 -> 3" in capsys.readouterr().out
    assert _listing(exp) == before
    assert main(["sweep", "--config", str(config), "--set", "train.fit.epochs=3", "--check"]) == 2   # as the run
    assert "train.fit.epochs: 2 -> 3" in capsys.readouterr().err
    assert main(["sweep", "--config", str(config), "--set", "train.fit.epochs=3", "--check", "--new-config"]) == 0
    assert "a run would train 4 of 4 planned trials (--new-config: train.fit.epochs: 2 -> 3)" in capsys.readouterr().out
    assert _listing(exp) == before


def test_a_manifest_re_indexed_at_the_same_path_is_refused_like_a_changed_base(synthetic_manifest, tmp_path, capsys):
    """The config names the manifest by path: one re-indexed there (another seed or ratios) put trials
    trained and compared on two different splits into one table and one best_model."""
    from allcluster.config import config_source
    from allcluster.sweep.driver import load_sweep
    from allcluster.sweep.experiment import (CONTENT_KEY, manifest_content, read_stored_base, record_base,
                                             resolved_base, store_base)

    manifest, exp = tmp_path / "manifest.parquet", tmp_path / "exp"
    shutil.copy(synthetic_manifest, manifest)
    config = sweep_yaml(tmp_path / "s.yaml", manifest, exp)
    sweep, _ = load_sweep(str(config))
    base = resolved_base(sweep, config_source(str(config)))
    store_base(exp, base)                                                    # as the first run left it
    frame = pd.read_parquet(manifest)
    frame["split"] = frame["split"].iloc[::-1].to_numpy()                    # re-indexed: other splits
    frame.to_parquet(manifest)
    before = _listing(exp)
    assert main(["sweep", "--config", str(config), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"the content of data.manifest {manifest} (re-indexed since" in err and "--new-config" in err
    assert _listing(exp) == before
    manifest.rename(tmp_path / "away.parquet")                              # not here: said so, not "re-indexed"
    assert main(["sweep", "--config", str(config), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"data.manifest: {manifest} does not exist" in err and "re-indexed" not in err, err
    (tmp_path / "away.parquet").rename(manifest)
    older = {k: v for k, v in base.items() if k != CONTENT_KEY}
    store_base(exp, older)                                                   # an older allcluster's experiment
    assert main(["sweep", "--config", str(config), "--check"]) == 0
    assert not record_base(exp, resolved_base(sweep, config_source(str(config))))
    assert read_stored_base(exp) == {**older, CONTENT_KEY: manifest_content(str(manifest))}, "recorded from now on"


def test_check_refuses_what_the_run_would_and_writes_nothing(synthetic_manifest, tmp_path, capsys):
    """`--check` (what the Slurm scripts run before Ray starts): the run's own refusals, nothing written."""
    exp = tmp_path / "exp"
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, exp)
    assert main(["sweep", "--config", str(config), "--check"]) == 0
    assert "a run would train 4 of 4 planned trials" in capsys.readouterr().out
    assert main(["sweep", "--config", str(config), "--check", "--trial-index", "3"]) == 0
    assert "a run would train 1 of 4 planned trials" in capsys.readouterr().out
    for args, message in [(["--trial-index", "4"], "--trial-index 4: "),
                          (["--set", "train.fit.epochz=3"], "train.fit.epochz"),
                          (["--set", f"train.data.manifest={tmp_path / 'nowhere.parquet'}"],
                           f"data.manifest: {tmp_path / 'nowhere.parquet'} does not exist"),
                          (["--set", "train.model.backbone=efficientnet_b0", "--set", "train.model.pretrained=true"],
                           "efficientnet_b0"),
                          (["--collect"], "--collect runs none")]:
        assert main(["sweep", "--config", str(config), "--check", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not exp.exists()


def test_the_start_up_checks_parse_the_manifest_once_and_a_rewrite_again(synthetic_manifest, tmp_path, monkeypatch):
    """The content fingerprint and the split check of each backbone read one manifest: a million-row
    manifest costs seconds a parse, so the checks share one; a file rewritten in between is parsed again."""
    from allcluster.data import manifest as manifest_module

    parsed = []
    parse = manifest_module._read_manifest_file
    monkeypatch.setattr(manifest_module, "_read_manifest_file", lambda path: parsed.append(path) or parse(path))
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, tmp_path / "exp",
                        grid={"model.backbone": ["allnet", "resnet18"], "optim.name": ["adam", "sgd"]})
    assert main(["sweep", "--config", str(config), "--check"]) == 0
    assert parsed == [synthetic_manifest]
    with manifest_module.shared_manifest_reads():
        first = manifest_module.read_manifest(synthetic_manifest)
        first.loc[0, "label"] = "changed by a caller"
        assert manifest_module.read_manifest(synthetic_manifest).loc[0, "label"] != "changed by a caller"
        copy = tmp_path / "m.parquet"
        shutil.copy(synthetic_manifest, copy)
        manifest_module.read_manifest(copy)
        shutil.copy(synthetic_manifest, tmp_path / "m2.parquet")
        (tmp_path / "m2.parquet").replace(copy)                              # an atomic rewrite: a new file
        manifest_module.read_manifest(copy)
    assert parsed == [synthetic_manifest] * 2 + [copy] * 2
    manifest_module.read_manifest(copy)
    assert len(parsed) == 5, "outside the checks every read parses (nothing held)"
    with manifest_module.shared_manifest_reads():
        manifest_module.read_manifest(copy)
        with manifest_module.shared_manifest_reads():
            manifest_module.read_manifest(copy)
        manifest_module.read_manifest(copy)
    assert len(parsed) == 6, "a nested block shares the outer block's reads, and the outer keeps them after it"


@pytest.mark.ray
def test_new_config_moves_the_old_outputs_aside_and_runs_every_trial_afresh(ray_local, synthetic_manifest, tmp_path):
    exp = tmp_path / "exp"
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, exp, grid={"optim.name": ["adam"]},
                        train={**TRAIN, "fit": {**TRAIN["fit"], "epochs": 1},
                               "data": {**TRAIN["data"], "manifest": str(synthetic_manifest)}})
    assert main(["sweep", "--config", str(config)]) == 0
    old = pd.read_parquet(exp / "trials.parquet").iloc[0]
    assert old["status"] == "finished" and old["epochs_trained"] == 1
    before = _listing(exp)
    assert main(["sweep", "--config", str(config), "--set", "train.fit.epochs=2"]) == 2
    assert _listing(exp) == before
    assert main(["sweep", "--config", str(config), "--set", "train.fit.epochs=2", "--new-config"]) == 0
    new = pd.read_parquet(exp / "trials.parquet").iloc[0]
    assert new["trial_id"] == old["trial_id"] and new["status"] == "finished" and new["epochs_trained"] == 2
    assert new["config_hash"] != old["config_hash"]
    (archive,) = exp.glob("superseded-*")
    kept = pd.read_parquet(archive / "trials.parquet").iloc[0]
    assert kept["config_hash"] == old["config_hash"] and kept["epochs_trained"] == 1
    assert Path(kept["model_dir"]) == archive / "trials" / old["trial_id"] / "model"
    assert (Path(kept["model_dir"]) / "weights.safetensors").is_file()
    assert (archive / "best_model" / "model_card.json").is_file() and (archive / "base_config.yaml").is_file()
    assert "epochs: 2" in (exp / "base_config.yaml").read_text()
    assert main(["sweep", "--config", str(config), "--set", "train.fit.epochs=2"]) == 0     # same config now


# Enough epochs that a signal sent at the first checkpoint lands mid-trial even on an idle machine
# (with 2 tiny epochs the trials finished before the stop took effect, and nothing was left to resume).
EPOCHS_TO_INTERRUPT = 6


@pytest.mark.slow
def test_a_sweep_stopped_by_sigint_then_killed_resumes_and_runs_each_trial_once(synthetic_manifest, tmp_path):
    """Three runs of one sweep (one Ray start each, shared so CI stays short): SIGINT ends the first
    cleanly with exit 75; the second resumes the interrupted trials and is SIGKILLed (a lost node)
    once a trial has finished; the third finishes the rest. No trial runs twice, no epoch is repeated."""
    import signal

    exp = tmp_path / "exp"       # 3 trials, 2 at a time: at the signal 2 are running and 1 never started
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, exp,
                        grid={"augment.name": ["mixup", "cutmix", "none"], "optim.name": ["adam"]},
                        train={**TRAIN, "fit": {**TRAIN["fit"], "epochs": EPOCHS_TO_INTERRUPT},
                               "data": {**TRAIN["data"], "manifest": str(synthetic_manifest)}})
    command = [sys.executable, "jobs/sweep.py", "--config", str(config)]   # the Slurm job's driver
    progress = tmp_path / "progress"        # what slurm/ray-cluster.sh reads to tell progress from a loop
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO), "ALLCLUSTER_PROGRESS_FILE": str(progress)}
    with LoggedProcess(command, env) as first:
        log, stop_seconds = _signal_once_checkpointed(first, exp, signal.SIGINT, 180)   # the driver only, as Slurm does
    assert first.returncode == 75, log[-3000:]
    epochs = len(pd.read_parquet(exp / "epochs.parquet")) + len(list(exp.glob("trials/*/model/model_card.json")))
    assert progress.read_text() == f"{epochs} epochs or trial endings\n" and epochs > 0
    assert "SIGINT received: stopping" in log
    assert "interrupted by SIGINT:" in log and "rerun the same command to resume (exit 75)" in log
    assert stop_seconds < 120
    assert not list(exp.glob("trials/*/stopped.json")), "a signal is not a scheduler stop"
    assert not list(exp.glob("trials/*/error.json")), "a signal is not an error"
    states = pd.read_parquet(exp / "trials.parquet")["status"]
    assert len(states) == 3 and set(states) <= {"finished", "interrupted", "pending"}, states
    assert (states == "interrupted").any(), \
        f"the stop came after the running trials' last epoch: nothing to resume; raise EPOCHS_TO_INTERRUPT\n{states}"

    done_before = len(list(exp.glob("trials/*/model/model_card.json")))
    log = run_then_sigkill(command, lambda: len(list(exp.glob("trials/*/model/model_card.json"))) > done_before,
                           600, "a trial finished after the resume")
    assert "resuming after epoch" in log, "an interrupted trial restarted instead of resuming"
    finished = {p.parent.parent.name: (p.parent / "weights.safetensors").stat().st_mtime_ns
                for p in exp.glob("trials/*/model/model_card.json")}
    assert 1 <= len(finished) < 3

    third = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 3 and (trials["status"] == "finished").all(), trials[["trial_id", "status"]]
    for trial_id, stamp in finished.items():
        weights = exp / "trials" / trial_id / "model" / "weights.safetensors"
        assert weights.stat().st_mtime_ns == stamp, f"{trial_id} finished before the kill and was rerun"
    epochs = pd.read_parquet(exp / "epochs.parquet")
    assert sorted(epochs.groupby("trial_id")["epoch"].apply(list).tolist()) == [list(range(EPOCHS_TO_INTERRUPT))] * 3


@pytest.mark.slow
def test_a_trial_whose_train_worker_is_killed_with_no_signal_is_resumed_by_the_rerun_not_errored(
        synthetic_manifest, tmp_path):
    """A real fault with no signal to the driver: the trial's Ray Train worker is SIGKILLed (as the
    kernel's OOM killer does, or as a lost node takes it). The run ends with exit 75, the trial counted
    in lost.json but not errored; the rerun resumes it from its checkpoint and finishes it."""
    import uuid

    exp, marker = tmp_path / "exp", f"ALLCLUSTER_TEST_RUN={uuid.uuid4().hex}"
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, exp, grid={"optim.name": ["adam"]},
                        train={**TRAIN, "fit": {**TRAIN["fit"], "epochs": EPOCHS_TO_INTERRUPT},
                               "data": {**TRAIN["data"], "manifest": str(synthetic_manifest)}})
    command = [sys.executable, "jobs/sweep.py", "--config", str(config)]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO), marker.split("=")[0]: marker.split("=")[1]}
    with LoggedProcess(command, env) as first:
        first.wait_until(lambda: _checkpoint_registered(exp), 400, "an epoch checkpoint")
        workers = _train_workers(marker)
        assert len(workers) == 1, f"expected the trial's one Ray Train worker, found {workers}"
        os.kill(workers[0], signal.SIGKILL)
        log = first.printed_by_exit(300)
    (trial_dir,) = exp.glob("trials/*")
    assert first.returncode == 75, log[-4000:]
    assert f"{trial_dir.name}: its Ray processes died (" in log and "(1 of 2 such runs in a row allowed)" in log, log[-4000:]
    assert "trials lost their Ray processes (see above): 1 of 1 trials unfinished" in log
    assert not (trial_dir / "error.json").exists() and json.loads((trial_dir / "lost.json").read_text())["runs"] == 1
    assert pd.read_parquet(exp / "trials.parquet")["status"].tolist() == ["interrupted"]

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "resuming after epoch" in log
    assert pd.read_parquet(exp / "trials.parquet")["status"].tolist() == ["finished"]
    assert pd.read_parquet(exp / "epochs.parquet")["epoch"].tolist() == list(range(EPOCHS_TO_INTERRUPT))


def test_a_run_that_leaves_trials_unfinished_without_a_signal_exits_75_but_collect_does_not(
        synthetic_manifest, tmp_path, monkeypatch, capsys):
    """The exit code after the run (injected outcomes; the real fault is the test above): trials left
    interrupted or pending with no signal were lost and the rerun resumes them (75), in Tune mode and
    in array mode; `--collect` over array tasks still running or unstarted is not a lost run."""
    from allcluster.sweep import driver

    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, tmp_path / "exp", grid={"optim.name": ["adam", "sgd"]})
    table = pd.DataFrame({"trial_id": ["a", "b"], "status": ["finished", "interrupted"]})
    monkeypatch.setattr(driver, "run_sweep", lambda *args, **kwargs: (table, ""))
    monkeypatch.setattr(driver, "collect_only", lambda *args, **kwargs: table)
    monkeypatch.setattr("allcluster.sweep.results.summary_text", lambda table: "")
    assert main(["sweep", "--config", str(config)]) == 75
    assert "trials lost their Ray processes (see above): 1 of 2 trials unfinished" in capsys.readouterr().err
    assert main(["sweep", "--config", str(config), "--collect"]) == 0
    for status, code in (("interrupted", 75), ("pending", 75), ("errored", 1), ("finished", 0)):
        monkeypatch.setattr(driver, "run_array_task", lambda *args, status=status, **kwargs: (status, ""))
        assert main(["sweep", "--config", str(config), "--trial-index", "1"]) == code, status
    assert "its Ray processes died: trial 1 (" in capsys.readouterr().err
    # the collect hint repeats the task's own --set: the same experiment (it was refused without them)
    assert main(["sweep", "--config", str(config), "--set", "train.fit.epochs=1", "--trial-index", "1"]) == 0
    assert f"allcluster sweep --config {config} --set train.fit.epochs=1 --collect" in capsys.readouterr().out
    # a stop signal (the time-limit warning) is 75 while trials are left, but one that came after the
    # last trial ended is not: 75 would have Slurm requeue a finished sweep
    for statuses, code in ((["finished", "interrupted"], 75), (["finished", "errored"], 0), (["errored"], 1)):
        ended = pd.DataFrame({"trial_id": list("ab"[:len(statuses)]), "status": statuses})
        monkeypatch.setattr(driver, "run_sweep", lambda *args, ended=ended, **kwargs: (ended, "SIGUSR1"))
        assert main(["sweep", "--config", str(config)]) == code, statuses
    for status, code in (("interrupted", 75), ("finished", 0), ("errored", 1)):
        monkeypatch.setattr(driver, "run_array_task", lambda *args, status=status, **kwargs: (status, "SIGTERM"))
        assert main(["sweep", "--config", str(config), "--trial-index", "1"]) == code, status
    assert "SIGUSR1 came after every trial had ended: nothing to resume" in capsys.readouterr().err


@pytest.mark.ray
def test_a_signal_while_the_sweep_waits_on_ray_before_any_trial_still_writes_the_tables_and_exits_75(
        ray_local, synthetic_manifest, tmp_path, monkeypatch, capsys):
    """A time-limit warning while the driver waits in ``ray.get`` for the nodes' image caches: the
    handler's Interrupted comes out of Ray's compiled code as a SystemError (seen on this machine
    when a sweep is warned about a second after it starts). The sweep still ends its own way: trials
    table written, all pending, its "interrupted" line, exit 75."""
    import threading

    from allcluster.sweep import ray_tune

    @ray_local.remote
    def slow_cache_build() -> str:
        time.sleep(5)
        return "node"

    def prebuild_caches(trials) -> None:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        ray_local.get(slow_cache_build.remote())

    monkeypatch.setattr(ray_tune, "prebuild_caches", prebuild_caches)
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, tmp_path / "exp", grid={"optim.name": ["adam", "sgd"]})
    assert main(["sweep", "--config", str(config)]) == 75
    err = capsys.readouterr().err
    assert "[sweep] interrupted by SIGUSR1: 2 of 2 trials unfinished" in err, err[-2000:]
    assert "outside a graceful stop" not in err
    assert set(pd.read_parquet(tmp_path / "exp" / "trials.parquet")["status"]) == {"pending"}


def _train_workers(marker: str) -> list[int]:
    """PIDs of Ray Train worker processes whose environment holds ``marker`` (``NAME=value``): the
    ones of the Ray a test's driver started, not any other Ray on the machine."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes()
                    and marker.encode() + b"\0" in (proc / "environ").read_bytes()):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


# ---- array mode: one trial per task, then --collect ----------------------------------------------
def test_trial_index_out_of_range_or_with_new_config_is_refused_and_writes_nothing(synthetic_manifest, tmp_path,
                                                                                   capsys):
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, tmp_path / "exp")
    assert main(["sweep", "--config", str(config), "--trial-index", "4"]) == 2
    err = capsys.readouterr().err
    assert "--trial-index 4: " in err and "plans 4 trials, indices 0 to 3" in err
    assert main(["sweep", "--config", str(config), "--trial-index", "0", "--new-config"]) == 2
    assert "--collect --new-config` first" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_array_tasks_run_one_trial_each_a_sigterm_rerun_resumes_and_collect_writes_the_tables(
        ray_local, synthetic_manifest, tmp_path, capsys):
    """Array mode (one trial per task, no Tune): SIGTERM (what scancel and the time limit send) ends
    task 1 with exit 75 and its rerun resumes the trial; a finished task's rerun does nothing;
    `--collect` while task 0 still waits in the queue writes the tables (task 0 pending) and the best
    model of what finished."""
    exp = tmp_path / "exp"
    config = sweep_yaml(tmp_path / "s.yaml", synthetic_manifest, exp, grid={"optim.name": ["adam", "sgd"]},
                        train={**TRAIN, "fit": {**TRAIN["fit"], "epochs": EPOCHS_TO_INTERRUPT},
                               "data": {**TRAIN["data"], "manifest": str(synthetic_manifest)}},
                        asha={"enabled": True, "grace_period": 1})
    command = [sys.executable, "jobs/sweep.py", "--config", str(config), "--trial-index", "1"]
    progress = tmp_path / "progress"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO), "ALLCLUSTER_PROGRESS_FILE": str(progress)}
    with LoggedProcess(command, env) as first:
        log, _ = _signal_once_checkpointed(first, exp, signal.SIGTERM, 120)
    assert first.returncode == 75, log[-3000:]
    (trial_dir,) = exp.glob("trials/*")
    epochs = len(pd.read_parquet(trial_dir / "metrics.parquet"))
    assert progress.read_text() == f"{epochs} epochs or trial endings\n" and epochs > 0
    assert "interrupted by SIGTERM: trial 1 (" in log and "rerun the same command to resume (exit 75)" in log
    assert "asha is a Tune-only feature, ignored here" in log
    assert trial_dir.name.startswith("sgd-") and not (trial_dir / "model").exists()
    assert not (trial_dir / "stopped.json").exists() and not (trial_dir / "error.json").exists()

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "resuming after epoch" in log and "sgd-" in log and ": finished;" in log
    assert pd.read_parquet(trial_dir / "metrics.parquet")["epoch"].tolist() == list(range(EPOCHS_TO_INTERRUPT))

    assert not list(exp.glob("tune-*")) and not (exp / "trials.parquet").exists(), "array tasks use no Tune"
    (weights,) = exp.glob("trials/*/model/weights.safetensors")
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sweep", "--config", str(config), "--trial-index", "1"]) == 0
    assert "is finished: nothing to do" in capsys.readouterr().err
    assert weights.stat().st_mtime_ns == stamp

    assert main(["sweep", "--config", str(config), "--collect"]) == 0, "tasks not started yet are not lost"
    trials = pd.read_parquet(exp / "trials.parquet").set_index("trial_index")
    assert sorted(trials["optim.name"]) == ["adam", "sgd"] and sorted(trials.index) == [0, 1]
    assert trials.loc[1, "status"] == "finished" and trials.loc[0, "status"] == "pending"
    assert len(pd.read_parquet(exp / "epochs.parquet")) == EPOCHS_TO_INTERRUPT
    card = json.loads((exp / "best_model" / "model_card.json").read_text())
    assert card["sweep"]["trial_id"] == trials.loc[1, "trial_id"]
    assert (card["sweep"]["finished_trials"], card["sweep"]["planned_trials"]) == (1, 2), "a best so far says so"
    printed = capsys.readouterr()
    assert "2 trials: 1 finished, 1 pending" in printed.out
    assert "(best of 1 finished trials so far, 1 still to run: a later run may replace it)" in printed.err


def _checkpoint_registered(exp: Path) -> bool:
    """A trial's first epoch checkpoint is registered: Ray Train resumes from what its snapshot lists;
    metrics.parquet is written just before that, and a stop in between loses that epoch."""
    return bool(list(exp.glob("trials/*/ray/checkpoint_manager_snapshot.json")))


def _signal_once_checkpointed(process: LoggedProcess, exp: Path, signum: int, timeout_s: float) -> tuple[str, float]:
    """Send ``signum`` to the driver once a first epoch checkpoint is registered; returns the driver's
    output and its seconds from signal to exit."""
    process.wait_until(lambda: _checkpoint_registered(exp), 400, "an epoch checkpoint")
    signalled = time.time()
    process.send_signal(signum)
    log = process.printed_by_exit(timeout_s)
    return log, time.time() - signalled


def test_one_best_trial_rule_for_the_sweep_and_the_report():
    from allcluster.report import tables
    from allcluster.sweep import driver
    from allcluster.sweep.schema import best_trial, ranked

    trials = pd.DataFrame({"trial_id": ["c", "b", "a", "d"], "status": ["finished", "finished", "finished", "errored"],
                           "val_macro_f1": [0.8, 0.9, 0.9, 1.0], "val_loss": [0.1, 0.5, 0.5, 0.0],
                           "test_macro_f1": [0.99, 0.1, 0.2, 1.0]})
    assert best_trial(trials)["trial_id"] == "a", "val macro-F1, then val loss, then id; never test, never unfinished"
    assert ranked(trials)["trial_id"].tolist() == ["a", "b", "c"]
    assert tables.ranked is ranked and driver.best_trial is best_trial
    assert best_trial(trials[trials["status"] == "errored"]) is None


def test_trials_table_has_the_schema_columns_in_order_with_varied_keys_after_the_index(tmp_path):
    from allcluster.sweep.results import trials_table
    from allcluster.sweep.schema import TRIAL_COLUMNS

    sweep = _sweep({"experiment_dir": str(tmp_path), "train": {"data": {"manifest": "m.parquet"}},
                    "grid": {"augment.name": ["mixup"], "optim": [{"name": "sgd", "lr": 0.01}]}})
    table = trials_table(plan_trials(sweep, "sweep.yaml"), "t")       # nothing ran: every trial pending
    varied = ["augment.name", "optim.name", "optim.lr"]
    assert list(table.columns) == TRIAL_COLUMNS[:2] + varied + TRIAL_COLUMNS[2:]
    assert table.loc[0, "status"] == "pending" and table.loc[0, "optimizer"] == "sgd" and table.loc[0, "lr"] == 0.01
