"""Thin Ray wrapper: one training run as a Ray Train ``TorchTrainer`` (used by train and sweep)."""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from allcluster.config import ConfigError, config_diff, flatten, from_dict, read_yaml, to_dict, write_resolved
from allcluster.console import say
from allcluster.atomic import atomic_write_text
from allcluster.interrupt import behind, call_in_thread, storage_full_at
from allcluster.locks import holding
from allcluster.models.card import CARD_FILE, ModelCard
from allcluster.models.weights import worker_env
from allcluster.train.config import RESUME_FREE_KEYS, TrainConfig, frozen_random_layers
from allcluster.train.run_folder import RAY_RUN_FOLDER, RAY_SNAPSHOT, checkpoint_folders




def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    _quiet_per_report_logs()
    from allcluster.train.loop import run_worker
    from allcluster.train.session import RaySession

    cfg = from_dict(TrainConfig, loop_config["train"], "train config")
    run_worker(cfg, RaySession(Path(cfg.output_dir).resolve() / RAY_RUN_FOLDER), loop_config.get("run_id", ""))


def _quiet_per_report_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO; our one line per epoch says it shorter.

    Only those two loggers: the parent ``ray.train`` logger also carries the workers' stdout.
    """
    import logging

    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:       # private modules: a later Ray may move them; the logs are only noise
        return
    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_id_for(output_dir: Path) -> str:
    """A run id that survives restarts: created once, stored in ``<output_dir>/run.json``."""
    marker = output_dir / "run.json"
    if marker.is_file():
        return json.loads(marker.read_text())["run_id"]
    output_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(marker, json.dumps({"run_id": run_id}))     # a kill mid-write must not cut it
    return run_id


def scaling_config(cfg: TrainConfig):
    from ray.train import ScalingConfig

    res = cfg.resources
    per_worker = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    return ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker)


def build_trainer(cfg: TrainConfig, run_id: str, callbacks: list | None = None, env: dict | None = None):
    """A ``TorchTrainer`` whose run folder is ``<output_dir>/ray``: rerunning resumes from it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    storage = Path(cfg.output_dir).resolve()
    repair_run_folder(storage / RAY_RUN_FOLDER)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "run_id": run_id},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=RAY_RUN_FOLDER, storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": {**worker_env(), **(env or {})}}))


def repair_run_folder(run_folder: Path) -> None:
    """Make a run resumable from the checkpoints it holds, whatever Ray Train's list of them (its
    snapshot, ``RAY_SNAPSHOT``) says. Ray Train writes that file in place, so a full disk or a kill
    while it wrote leaves it empty or cut, and Ray then refuses the run for ever
    (``CheckpointManagerInitializationError``): an unreadable one is set aside (``.broken``). A kill
    before its first write leaves none (Ray would start afresh), and a stop between Ray's copy of a
    checkpoint and its record of it (Tune stopping a trial at a time-limit warning) leaves the newest
    finished epoch unlisted. So every folder the snapshot does not list is checked: one older than
    the newest it lists is an orphan Ray's ``num_to_keep`` never removes, and goes; one that does not
    load (cut by the full disk or the kill) goes; the others stay, and the run resumes from the newest
    (:class:`allcluster.train.session.RaySession` finds it). A checkpoint holding pickled objects is
    refused (:class:`UnsafeCheckpointError`), as at resume, and never deleted."""
    import shutil

    from allcluster.train.loop import TrainState, UnsafeCheckpointError

    listed = _listed_checkpoints(run_folder / RAY_SNAPSHOT)
    newest_listed = max(listed, default="")
    for folder in checkpoint_folders(run_folder):
        if folder.name in listed:
            continue
        if folder.name < newest_listed:
            shutil.rmtree(folder, ignore_errors=True)
            say(f"[train] {folder}: removed, Ray Train does not list it and holds a newer checkpoint")
            continue
        try:
            TrainState.load(folder)
        except UnsafeCheckpointError:         # not cut but planted: refused as at resume, never deleted
            raise
        except Exception as err:              # noqa: BLE001 - a checkpoint we cannot resume from, whatever broke it
            shutil.rmtree(folder, ignore_errors=True)
            say(f"[train] {folder}: removed, it does not load ({type(err).__name__}: {err})")


def _listed_checkpoints(snapshot: Path) -> set[str]:
    """The checkpoint folder names Ray Train's snapshot lists (none when it is missing); an unreadable
    snapshot is set aside as ``.broken`` first."""
    from allcluster.console import say

    try:
        data = json.loads(snapshot.read_bytes())
    except FileNotFoundError:
        return set()
    except ValueError:
        os.replace(snapshot, snapshot.with_name(f"{RAY_SNAPSHOT}.broken"))
        say(f"[train] {snapshot}: unreadable (a full disk, or a kill while Ray Train wrote it): set aside "
            f"as {RAY_SNAPSHOT}.broken")
        return set()
    results = data.get("checkpoint_results", []) if isinstance(data, dict) else []
    return {r["checkpoint_dir_name"] for r in results if isinstance(r, dict) and "checkpoint_dir_name" in r}


def check_fits_cluster(cfg: TrainConfig) -> None:
    """Refuse a request the cluster can never satisfy (Ray Train would otherwise wait forever)."""
    import ray

    check_fits(cfg.resources, ray.cluster_resources(), node_resources())


def node_resources() -> list[dict[str, float]]:
    """The resources of each live node of the connected Ray cluster."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def check_fits(res, total: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Raise a :class:`ConfigError` when ``res`` (``resources``) can never run on this cluster: its
    workers together need more than ``total``, or one worker more than any one node has. A worker's
    CPUs and GPUs are one placement-group bundle, which Ray places on a single node: 8 CPUs per worker
    on two 4-CPU nodes fit the total yet never start (Ray Train waits for them until the time limit)."""
    if res.cpus > total.get("CPU", 0) + 1e-9:
        raise ConfigError(f"resources: {res.num_workers} workers x {res.cpus_per_worker:g} CPUs = {res.cpus:g} CPUs, "
                          f"but the Ray cluster has {total.get('CPU', 0):g}; lower resources.num_workers "
                          "or resources.cpus_per_worker")
    if res.gpus > total.get("GPU", 0) + 1e-9:
        raise ConfigError(f"resources: {res.num_workers} workers x {res.gpus_per_worker:g} GPUs requested, "
                          f"but the Ray cluster has {total.get('GPU', 0):g} GPUs; set resources.use_gpu: false "
                          "or fewer workers")
    gpus = res.gpus_per_worker if res.use_gpu else 0.0
    if nodes and not any(node.get("CPU", 0) + 1e-9 >= res.cpus_per_worker and node.get("GPU", 0) + 1e-9 >= gpus
                         for node in nodes):
        sizes = ", ".join(sorted(f"{n.get('CPU', 0):g} CPUs" + (f" + {n.get('GPU', 0):g} GPUs" if gpus else "")
                                 for n in nodes))
        raise ConfigError(f"resources: one worker needs {res.cpus_per_worker:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
                          + f" on one node, but no node has that (nodes: {sizes}); lower resources.cpus_per_worker"
                          + (" or gpus_per_worker" if gpus else "") + " and raise resources.num_workers instead")


def preflight(cfg: TrainConfig) -> None:
    """Cheap checks on the driver, before any Ray worker starts: manifest and weights on disk."""
    from allcluster.models import check_weights_available, get_spec
    from allcluster.models.classifier import build_backbone

    if not Path(cfg.data.manifest).is_file():
        raise ConfigError(f"data.manifest: {cfg.data.manifest} does not exist; build it with "
                          "`allcluster index SOURCE --out MANIFEST.parquet`")
    check_splits(cfg)
    if kept := frozen_random_layers(cfg):
        say(f"[train] warning: backbone {cfg.model.backbone} starts from random init, yet under finetune it stays "
            f"random where it is not trained ({kept}); to train from scratch set finetune.head_epochs: 0 and "
            "finetune.unfreeze_blocks: -1 (or start from model.pretrained / model.weights)", logging.WARNING)
    spec = get_spec(cfg.model.backbone)
    check_weights_available(spec, cfg.model.pretrained, cfg.model.weights)
    if cfg.model.weights:         # every tensor checked here, in seconds, not in each worker after Ray starts
        build_backbone(spec, cfg.model.pretrained, cfg.model.weights)


def check_splits(cfg: TrainConfig) -> None:
    """A fold the manifest lacks, an empty train or val split: refused here, not by every worker after
    Ray starts (a traceback after config.yaml, run.json and ray/ were written)."""
    from allcluster.data.manifest import read_manifest
    from allcluster.data.splits import splits_for_fold

    manifest = read_manifest(cfg.data.manifest)
    ok = manifest[manifest["status"] == "ok"]
    sizes = splits_for_fold(ok, cfg.data.fold, cfg.data.manifest).value_counts()
    empty = [name for name in ("train", "val") if not sizes.get(name, 0)]
    if empty:
        raise ConfigError(f"data.manifest: {cfg.data.manifest} has no ok image in its {' and '.join(empty)} split "
                          f"(splits: {', '.join(f'{k} {v}' for k, v in sorted(sizes.items())) or 'none'}); "
                          "index it again with ratios that give every split images (allcluster index --ratios)")


def check_input_size(cfg: TrainConfig) -> None:
    """One forward pass of a randomly initialised model at ``data.image_size`` (milliseconds to a few
    seconds on CPU): an input too small for the backbone's pooling is refused naming the key."""
    import torch

    from allcluster.models import build_model
    from allcluster.train.config import head_spec

    model = build_model(cfg.model.backbone, 2, head_spec(cfg)).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size))
    except torch.OutOfMemoryError:
        raise                                  # this node's memory, not the setting
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"data.image_size: backbone {cfg.model.backbone} cannot take a {cfg.data.image_size} px "
                          f"input (too small for its pooling?): {type(err).__name__}: {str(err).splitlines()[0]}") from None


def check_resumable(cfg: TrainConfig) -> None:
    """Refuse to continue a run folder's checkpoints under a config that trains something else.

    Ray Train resumes from ``<output_dir>/ray`` whatever the new config says, so a rerun with another
    ``fit.epochs`` or ``optim.lr`` would silently mix two trainings in one model. Reads only.
    """
    output_dir = Path(cfg.output_dir)
    written = output_dir / "config.yaml"
    if not written.is_file() or not checkpoint_folders(output_dir / RAY_RUN_FOLDER):
        return
    stored = to_dict(from_dict(TrainConfig, read_yaml(written), str(written)))
    diffs = config_diff(flatten(stored), flatten(to_dict(cfg)), skip=RESUME_FREE_KEYS)
    if diffs:
        raise ConfigError(
            f"{output_dir} holds checkpoints of a run started with another config ({written}): "
            f"{'; '.join(diffs)}. Refusing to continue it under a changed config: rerun with the original "
            "config, or set another output_dir (or delete this one) to train afresh")


def run_training(cfg: TrainConfig, address: str | None = None) -> dict:
    """Fit one run on the connected Ray cluster; returns the final metrics (from the model card)."""
    from allcluster.ray_utils import ray_connected

    preflight(cfg)
    check_input_size(cfg)     # a sweep's trial records it as its own error instead (its dry run refuses it)
    output_dir = Path(cfg.output_dir)
    with holding(output_dir, f"training run folder {output_dir}"):     # one writer per run folder
        check_resumable(cfg)
        with ray_connected(address):
            check_fits_cluster(cfg)
            run_id = run_id_for(output_dir)
            write_resolved(cfg, output_dir / "config.yaml", f"allcluster train, run {run_id}")
            try:
                # in a thread, so that a stop signal (Slurm's SIGTERM, Ctrl-C) ends the command now: the
                # main thread blocked in fit() ran no handler until the whole run had finished
                result = call_in_thread(build_trainer(cfg, run_id).fit)
                if result.error:
                    raise result.error
            except Exception as err:          # Train V2 raises a failed run (TrainingFailedError)
                if full := storage_full_at(err, output_dir):     # exit 74 naming where, not "writing"
                    raise full from err
                if refused := next((f for f in behind(err) if isinstance(f, ConfigError)), None):
                    raise ConfigError(str(refused)) from err     # a worker's refusal: its line, not a traceback
                raise
    final = dict(result.metrics or {})
    if (output_dir / "model" / CARD_FILE).is_file():
        final["model_card"] = ModelCard.read(output_dir / "model")
    return final
