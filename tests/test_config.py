"""Config loading: frozen dataclasses, clear errors naming file and key, overrides, every YAML valid."""
from __future__ import annotations

import dataclasses
import os
import typing
import warnings
from pathlib import Path

import pytest
import yaml

from allcluster.config import ConfigError, config_hash, from_dict, load, to_dict, write_resolved
from allcluster.train.config import TrainConfig, resolve
from conftest import REPO, write_yaml


def test_unknown_key_names_file_key_path_and_allowed_keys(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"optim": {"nmae": "adam"}})
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path)
    message = str(err.value)
    assert str(path) in message and "optim.nmae" in message
    assert "allowed keys here: name, lr, weight_decay, momentum, nesterov" in message


def test_invalid_choice_lists_allowed_values(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"optim": {"name": "lion"}})
    with pytest.raises(ConfigError, match=r"optim\.name: 'lion' is not allowed; allowed values: 'adam', 'sgd'"):
        load(TrainConfig, path)


def test_wrong_type_is_rejected(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"fit": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"fit\.epochs: expected int, got 'ten'"):
        load(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"model\.pretrained: expected true or false"):
        from_dict(TrainConfig, {"model": {"pretrained": "yes"}})


def test_out_of_range_value_names_the_range(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"fit": {"label_smoothing": 1.5}})
    with pytest.raises(ConfigError, match=r"fit\.label_smoothing: value 1\.5 is out of range; allowed: >= 0 and < 1"):
        load(TrainConfig, path)
    # an optional key ("float or null") names its range too, not only its types
    with pytest.raises(ConfigError, match=r"model\.head\.dropout: value 1\.0 is out of range; allowed: >= 0 and < 1 \(or null\)"):
        load(TrainConfig, path, ["fit.label_smoothing=0", "model.head.dropout=1"])
    with pytest.raises(ConfigError, match=r"model\.head\.dropout: expected float, got 'abc' \(or null\)"):
        load(TrainConfig, path, ["fit.label_smoothing=0", "model.head.dropout=abc"])
    for value in (".inf", "-.inf", ".nan"):
        with pytest.raises(ConfigError, match=r"optim\.lr: expected a finite number"):
            load(TrainConfig, path, ["fit.label_smoothing=0", f"optim.lr={value}"])


def test_section_given_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match=r"augment: expected a section with keys name"):
        from_dict(TrainConfig, {"augment": "mixup"})


def test_set_overrides_apply_and_are_validated(tmp_path):
    path = write_yaml(tmp_path / "ok.yaml", {"optim": {"name": "adam"}})
    cfg = load(TrainConfig, path, ["optim.name=sgd", "optim.lr=0.01", "model.head.hidden=[64, 32]"])
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.01 and cfg.model.head.hidden == (64, 32)
    with pytest.raises(ConfigError, match=r"with --set optim\.lr=-1.*optim\.lr: value -1"):
        load(TrainConfig, path, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load(TrainConfig, path, ["optim.lr"])


def test_a_sweeps_grid_and_sample_keys_are_set_whole_from_the_command_line():
    """``grid`` and ``sample`` map dotted training keys to values: ``--set grid.optim.name=[adam]`` is
    the grid's key ``optim.name``, not sections grid -> optim -> name (which no grid accepts)."""
    from allcluster.sweep.config import SweepConfig
    from allcluster.sweep.driver import load_sweep

    path = REPO / "configs" / "sweep" / "ci_tiny.yaml"
    sweep = load(SweepConfig, path, ["grid.optim.name=[adam]", "sample.optim.lr={uniform: [0.001, 0.01]}",
                                     "train.optim.weight_decay=0.001", "asha.enabled=true"])
    assert sweep.grid["optim.name"] == ["adam"] and sweep.grid["augment.name"] == ["mixup", "cutmix"]
    assert sweep.sample == {"optim.lr": {"uniform": [0.001, 0.01]}} and sweep.asha.enabled
    assert sweep.train["optim"]["weight_decay"] == 0.001
    assert len(load_sweep(str(path), ["grid.optim.name=[adam]"])[1]) == 2
    with pytest.raises(ConfigError, match=r"sample\.optim\.lr\.uniform: expected \[low, high\]"):
        load_sweep(str(path), ["sample.optim.lr={uniform: [2, 1]}"])


def test_exponent_without_a_dot_is_a_number_in_files_and_overrides(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  weight_decay: 1E-5\n")
    cfg = load(TrainConfig, path)
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.weight_decay == pytest.approx(1e-5)
    assert load(TrainConfig, path, ["optim.lr=1e-4"]).optim.lr == pytest.approx(1e-4)
    assert load(TrainConfig, path, ["model.backbone=e5"]).model.backbone == "e5"   # still a string


def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("optim:\n  name: adam\n  lr: 0.001\nfit:\n  epochs: 2\noptim:\n  name: sgd\n")
    with pytest.raises(ConfigError, match=rf"{path}: key 'optim' given twice \(lines 1 and 6\)"):
        load(TrainConfig, path)
    path.write_text("fit:\n  epochs: 2\n  batch_size: 8\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' given twice \(lines 2 and 4\)"):
        load(TrainConfig, path)


def test_version_flag_prints_the_package_version(capsys):
    from allcluster import __version__
    from allcluster.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"allcluster {__version__}"


def test_configs_are_frozen():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"  # type: ignore[misc]


def test_resolve_fills_backbone_defaults_and_writes_them(tmp_path):
    cfg = resolve(from_dict(TrainConfig, {"data": {"manifest": "m.parquet"}, "model": {"backbone": "inception_v3"}}))
    assert cfg.data.image_size == 299
    assert cfg.model.head.hidden == (256,) and cfg.model.head.dropout == 0.3
    written = write_resolved(cfg, tmp_path / "config.yaml")
    reloaded = from_dict(TrainConfig, yaml.safe_load(written.read_text()))
    assert reloaded == cfg and config_hash(reloaded) == config_hash(cfg)


def test_unset_early_stopping_is_off_under_cosine_and_10_otherwise_and_a_set_value_wins():
    from allcluster.train.config import ScheduleConfig
    from allcluster.train.optim import DEFAULT_PATIENCE

    def patience(schedule: str, **fit) -> int:
        data = {"data": {"manifest": "m.parquet"}, "schedule": {"name": schedule}, "fit": fit}
        return resolve(from_dict(TrainConfig, data)).fit.early_stopping_patience

    assert set(DEFAULT_PATIENCE) == set(typing.get_args(typing.get_type_hints(ScheduleConfig)["name"]))
    assert patience("plateau") == patience("constant") == 10 and patience("cosine") == 0
    assert patience("cosine", early_stopping_patience=5) == 5 and patience("plateau", early_stopping_patience=0) == 0
    with pytest.raises(ConfigError, match=r"fit\.early_stopping_patience"):
        from_dict(TrainConfig, {"fit": {"early_stopping_patience": -1}})


def test_a_cosine_warm_up_as_long_as_the_run_is_refused_naming_both_keys():
    def resolved(warmup: int, epochs: int, schedule: str = "cosine"):
        return resolve(from_dict(TrainConfig, {"data": {"manifest": "m.parquet"}, "fit": {"epochs": epochs},
                                               "schedule": {"name": schedule, "warmup_epochs": warmup}}), "my.yaml")

    for warmup, epochs in ((2, 1), (2, 2)):
        with pytest.raises(ConfigError, match=rf"my\.yaml: schedule\.warmup_epochs: {warmup} must be below "
                                              rf"fit\.epochs \({epochs}\)"):
            resolved(warmup, epochs)
    assert resolved(1, 2).schedule.warmup_epochs == 1
    assert resolved(5, 1, "plateau").fit.epochs == 1          # warm-up is a cosine key only
    head_stage = {"data": {"manifest": "m.parquet"}, "fit": {"epochs": 20}, "finetune": {"head_epochs": 2},
                  "schedule": {"name": "cosine", "warmup_epochs": 2}}
    with pytest.raises(ConfigError, match=r"schedule\.warmup_epochs: 2 must be below finetune\.head_epochs \(2\)"):
        resolve(from_dict(TrainConfig, head_stage))


def test_a_backbone_from_random_init_under_the_transfer_recipe_is_named_with_what_stays_random():
    """finetune's defaults are paper 002's transfer recipe: from random init they keep the random backbone
    frozen for 10 head epochs and all but its last 2 blocks random for good. Said before a run starts
    (changing the defaults would change what existing runs and experiments resolve to)."""
    from allcluster.train.config import frozen_random_layers

    def kept(**sections) -> str:
        data = {"data": {"manifest": "m.parquet"}, "model": {"backbone": "densenet121"}}
        for section, keys in sections.items():
            data[section] = {**data.get(section, {}), **keys}
        return frozen_random_layers(resolve(from_dict(TrainConfig, data)))

    assert kept() == "frozen for the 10 head epochs; all but its last 2 blocks never trained"
    assert kept(finetune={"head_epochs": 0}) == "all but its last 2 blocks never trained"
    assert kept(finetune={"head_epochs": 0, "unfreeze_blocks": -1}) == ""
    assert kept(model={"pretrained": True}) == "" == kept(model={"weights": "w.safetensors"})


def test_resolve_rejects_unregistered_backbone():
    cfg = from_dict(TrainConfig, {"data": {"manifest": "m.parquet"}, "model": {"backbone": "resnet9000"}})
    with pytest.raises(ConfigError, match=r"model\.backbone: 'resnet9000' is not registered; allowed values: .*allnet"):
        resolve(cfg, "my.yaml")


def _all_yaml_configs() -> list[Path]:
    return sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", _all_yaml_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_file_loads_and_validates(path):
    text = path.read_text()
    assert text.startswith("# "), f"{path}: must open with a comment giving the exact command that runs it"
    assert "allcluster " in text.splitlines()[0] or "sbatch " in text.splitlines()[0], \
        f"{path}: the first line must be the command that runs it"
    from allcluster.config_registry import check_config
    assert check_config(path) in ("train", "sweep", "score", "demo")


def test_check_config_validates_files_before_a_run_and_names_the_bad_key(tmp_path, capsys):
    from allcluster.cli import main

    shipped = REPO / "configs" / "score" / "ci_tiny.yaml"
    assert main(["check-config", str(shipped)]) == 0
    assert capsys.readouterr().out.strip() == f"{shipped}: valid score config"
    mine = write_yaml(tmp_path / "mine.yaml", {"data": {"manifest": "m.parquet"}, "optim": {"name": "adam", "lr": 3e-4}})
    assert main(["check-config", str(mine)]) == 2
    assert "cannot tell the stage" in capsys.readouterr().err
    assert main(["check-config", "--stage", "train", str(mine)]) == 0
    assert main(["check-config", "--stage", "train", str(mine), "--set", "optim.name=lion"]) == 2
    assert "optim.name: 'lion' is not allowed" in capsys.readouterr().err


def test_configs_folder_is_not_empty():
    assert len(_all_yaml_configs()) >= 3


def test_demo_yaml_equals_the_embedded_demo_default():
    from allcluster.demo import DEMO_CONFIG
    assert yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()) == DEMO_CONFIG
    assert to_dict(from_dict(TrainConfig, DEMO_CONFIG)) == to_dict(load(TrainConfig, REPO / "configs" / "demo.yaml"))


def test_log_level_silences_progress_lines_and_reaches_ray_workers_through_the_environment(capsys, monkeypatch):
    import logging

    from allcluster.cli import main
    from allcluster.console import LOG_LEVEL_ENV, logger, say
    from allcluster.ray_utils import PASSED_TO_WORKERS

    monkeypatch.setattr(logger, "level", logger.level)         # restored after the test
    # setenv, not delenv: pytest restores only what it recorded, and delenv of an unset variable records
    # nothing, so set_level's "warning" leaked into every later test's subprocesses and Slurm jobs
    monkeypatch.setenv(LOG_LEVEL_ENV, "info")
    say("a progress line")
    assert capsys.readouterr().err == "a progress line\n", "plain lines, no prefix (Slurm logs)"
    assert main(["--log-level", "warning", "check-config", str(REPO / "configs" / "demo.yaml")]) == 0
    say("hidden at warning")
    say("a problem", logging.WARNING)
    assert capsys.readouterr().err == "a problem\n"
    assert os.environ[LOG_LEVEL_ENV] == "warning" and LOG_LEVEL_ENV in PASSED_TO_WORKERS


def test_ray_workers_get_offline_hub_huge_pages_and_no_drain_watcher_and_a_users_own_value_wins(monkeypatch):
    # Joining a cluster: a runtime env carries the settings; a local Ray: this process's environment.
    import logging

    import ray

    from allcluster import ray_utils
    from allcluster.ray_utils import ensure_ray

    from allcluster import device

    started = {}
    monkeypatch.setattr(device, "_find_library", lambda name: None)      # a node without tcmalloc
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.update(kwargs))
    monkeypatch.setattr(ray_utils, "_ray_log_level", lambda: logging.INFO)   # nothing quietened around a fake init
    watcher = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
    monkeypatch.delenv(watcher, raising=False)
    ensure_ray("ray://nowhere:1")
    assert started["runtime_env"]["env_vars"]["THP_MEM_ALLOC_ENABLE"] == "1"
    assert started["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert started["runtime_env"]["env_vars"][watcher] == "0", "Slurm's signals tell preemption, not Ray's drains"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    monkeypatch.setenv(watcher, "1")
    ensure_ray("ray://nowhere:1")
    assert started["runtime_env"]["env_vars"]["THP_MEM_ALLOC_ENABLE"] == "0"
    assert started["runtime_env"]["env_vars"][watcher] == "1"
    # A local Ray inherits the driver's environment (so its pre-started workers serve the job).
    for key in ("HF_HUB_OFFLINE", "PYTHONWARNINGS", "THP_MEM_ALLOC_ENABLE", "RAY_ADDRESS", watcher):
        monkeypatch.delenv(key, raising=False)           # restored after the test
    started.clear()
    ensure_ray(None)
    assert "runtime_env" not in started and "address" not in started
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ[watcher] == "0"


def test_workers_preload_tcmalloc_unless_the_user_chose_a_malloc(monkeypatch, tmp_path):
    import logging

    import ray

    from allcluster import device, ray_utils
    from allcluster.device import MALLOC_ENV, allocator_env, malloc_preload

    for key in ("LD_PRELOAD", MALLOC_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setattr(device, "_find_library", lambda name: f"lib{name}.so.4" if name == "tcmalloc" else None)
    assert allocator_env() == {"LD_PRELOAD": "libtcmalloc.so.4"}, "the second name is tried; no huge pages with it"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert allocator_env() == {"LD_PRELOAD": "libtcmalloc.so.4", "THP_MEM_ALLOC_ENABLE": "1"}, "the user's value"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    monkeypatch.setattr(device, "_find_library", lambda name: None)
    assert allocator_env() == {"THP_MEM_ALLOC_ENABLE": "1"}, "no tcmalloc on this node: glibc's malloc, huge pages"
    library = tmp_path / "libmymalloc.so"
    library.write_bytes(b"")
    monkeypatch.setenv(MALLOC_ENV, str(library))
    assert malloc_preload() == {"LD_PRELOAD": str(library)}
    monkeypatch.setenv(MALLOC_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(ConfigError, match=f"{MALLOC_ENV}.*missing.so"):
        malloc_preload()
    monkeypatch.setenv(MALLOC_ENV, "system")
    monkeypatch.setattr(device, "_find_library", lambda name: f"lib{name}.so.4")
    assert malloc_preload() == {}
    monkeypatch.delenv(MALLOC_ENV)
    monkeypatch.setenv("LD_PRELOAD", "/opt/libjemalloc.so.2")
    assert "LD_PRELOAD" not in allocator_env(), "a preload the user set is theirs"
    # A local Ray's processes start with the preload; the driver's own later children do not get it.
    monkeypatch.delenv("LD_PRELOAD")
    during = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: during.update(preload=os.environ.get("LD_PRELOAD")))
    monkeypatch.setattr(ray_utils, "_ray_log_level", lambda: logging.INFO)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_utils.ensure_ray(None)
    assert during["preload"] == "libtcmalloc_minimal.so.4" and "LD_PRELOAD" not in os.environ


def test_a_command_and_its_rays_workers_run_on_tcmalloc_and_what_it_starts_does_not(tmp_path):
    # The command restarts itself in place (same PID) with the preload, then drops it from its
    # environment; a local Ray started afterwards gets it back for its own processes.
    import json
    import subprocess
    import sys

    from allcluster.device import malloc_preload

    if "LD_PRELOAD" in os.environ or not malloc_preload():
        reason = "TCMALLOC ABSENT (or LD_PRELOAD set): install Debian's libtcmalloc-minimal4 (.ci/run does)"
        warnings.warn(reason)
        pytest.skip(reason)
    probe = """
import json, os, subprocess, sys
print("started", os.getpid(), file=sys.stderr, flush=True)
from allcluster.device import restart_on_preferred_malloc
restart_on_preferred_malloc()
import ray
from allcluster.ray_utils import ensure_ray, leave_ray
ensure_ray(num_cpus=1, dashboard=False)
mapped = lambda: any("tcmalloc" in line for line in open("/proc/self/maps"))
child = subprocess.run(["grep", "-c", "tcmalloc", "/proc/self/maps"], capture_output=True, text=True).stdout
print(json.dumps({"worker": ray.get(ray.remote(mapped).remote()), "command": mapped(), "child": int(child),
                  "environment": os.environ.get("LD_PRELOAD")}))
leave_ray()
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    starts = [line for line in done.stderr.splitlines() if line.startswith("started ")]
    assert len(starts) == 2 and starts[0] == starts[1], f"one restart, in place: {starts}"
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"worker": True, "command": True, "child": 0,
                                                                "environment": None}


def test_ray_bookkeeping_lines_are_dropped_and_the_jobs_own_worker_lines_kept():
    from allcluster.ray_utils import job_lines

    controller = {"actor_name": "TrainController", "lines": ["Requesting resources: {'CPU': 1.0} * 1",
                                                             "Traceback (most recent call last):"]}
    assert job_lines(controller) == []
    worker = {"actor_name": "RayTrainWorker", "lines": [
        "Setting up process group for: env:// [rank=0, world_size=1]",
        "[2026-11-30 20:21:58,542 E 2361 2419] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' ...",
        "[train] epoch 1 (finetune) loss 1.3898 acc 0.227",
        "Traceback (most recent call last):", "ValueError: [2026-11-30 12:00:00,1 E 1 2] x.cc:1: in a message"]}
    assert job_lines(worker) == worker["lines"][2:]
    assert job_lines({"task_name": "_read_decode", "lines": ["[score] a line"]}) == ["[score] a line"]


def test_worker_lines_reach_a_log_file_without_colour_codes(monkeypatch):
    """Ray colours each worker line's prefix (ANSI codes) also when the driver's stderr is a Slurm log."""
    import io

    from ray._private.worker import print_worker_logs

    from allcluster.ray_utils import quiet_worker_output

    monkeypatch.setenv("RAY_COLOR_PREFIX", "unset")              # (so that the value set below is undone)
    monkeypatch.delenv("RAY_COLOR_PREFIX")
    monkeypatch.setattr("sys.stderr", io.StringIO())           # not a terminal
    quiet_worker_output()
    log = io.StringIO()
    print_worker_logs({"pid": 4242, "ip": "10.0.0.2", "localhost": "10.0.0.1", "task_name": "_read_decode",
                       "lines": ["[score] a line"], "is_err": False}, log)
    assert "[score] a line" in log.getvalue() and "\x1b[" not in log.getvalue(), repr(log.getvalue())


def test_the_log_level_of_one_test_does_not_leak_into_the_next():
    from allcluster.console import LOG_LEVEL_ENV, logger

    assert os.environ.get(LOG_LEVEL_ENV, "info") == "info" and logger.getEffectiveLevel() <= 20


def test_one_device_choice_refuses_cuda_where_there_is_none_naming_the_setting():
    import torch

    from allcluster.device import pick_device

    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"workers\.device: 'tpu': expected auto, cpu or cuda"):
        pick_device("tpu", "workers.device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--device: 'cuda:1': CUDA is not available here .*--gres=gpu"):
            pick_device("cuda:1", "--device")


@pytest.mark.parametrize("bench", ["train", "sweep", "lime", "score"])
def test_a_bench_without_the_real_images_says_where_to_point_it_and_writes_nothing(bench, tmp_path, capsys):
    from allcluster.cli import main

    empty, out = tmp_path / "no-images", tmp_path / "out"
    empty.mkdir()
    assert main(["bench", bench, "--data", str(empty), *(["--out", str(out)] if bench != "lime" else [])]) == 2
    assert f"{empty}: real ALL images not found (set --data or $ALLCLUSTER_ALL_DATA)" in capsys.readouterr().err
    assert not out.exists()


def _bench_args(command: str):
    import argparse

    from allcluster.bench import add_bench_arguments

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(command.split())


def test_bench_train_overrides_reach_the_recipe_and_a_bad_key_is_named(tmp_path):
    from allcluster.bench.train import _bench_train_config

    cfg = _bench_train_config(_bench_args("train --set data.roi_crop=true --set schedule.name=cosine"), tmp_path, 1)
    assert cfg.data.roi_crop and cfg.schedule.name == "cosine" and cfg.fit.seed == 1
    assert cfg.output_dir == str(tmp_path / "seed1")
    with pytest.raises(ConfigError, match=r"schedule.*nme"):
        _bench_train_config(_bench_args("train --set schedule.nme=cosine"), tmp_path, 0)


def test_bench_score_rounds_count_each_pipelines_median():
    from allcluster.bench.score import median_of

    assert _bench_args("score").repeat == 1 and _bench_args("score --repeat 3").repeat == 3
    rounds = [{"bare_loop": 30.0, "default": 48.0}, {"bare_loop": 27.5, "default": 61.0},
              {"bare_loop": 32.5, "default": 47.0}]
    assert median_of(rounds, "bare_loop") == 30.0 and median_of(rounds, "default") == 48.0
    assert median_of(rounds[:2], "default") == 48.0       # even count: the lower middle
    assert median_of(rounds[:1], "bare_loop") == 30.0


# The README's benchmark commands and the train configs that claim to be their recipe.
BENCHED_RECIPES = {
    "configs/train/allnet_all.yaml":
        ("train --image-size 224 --epochs 60 --set schedule.name=cosine --set schedule.warmup_epochs=2 "
         "--set fit.precision=bf16 --set augment.classic.rotation=0 --set augment.classic.shear=0 "
         "--set augment.classic.zoom=0 --set augment.classic.vflip=true --set fit.early_stopping_patience=0"),
    "configs/train/efficientnet_lite0_all.yaml":
        "train --backbone efficientnet_lite0 --pretrained --image-size 224 --head-epochs 3 --epochs 10",
}


@pytest.mark.parametrize("config", sorted(BENCHED_RECIPES))
def test_the_benchmarked_recipe_is_the_shipped_train_config(config, tmp_path):
    from allcluster.bench.train import _bench_train_config
    from allcluster.config import config_diff, flatten
    from allcluster.train.ray_train import RESUME_FREE_KEYS

    command = BENCHED_RECIPES[config]
    assert f"allcluster bench {command}" in (REPO / "README.md").read_text()

    benched = flatten(to_dict(_bench_train_config(_bench_args(command), tmp_path, seed=0)))
    shipped = flatten(to_dict(resolve(load(TrainConfig, REPO / config))))
    # what is trained must agree; where it runs and how fast need not
    assert config_diff(shipped, benched, skip=(*RESUME_FREE_KEYS, "data.manifest")) == []
