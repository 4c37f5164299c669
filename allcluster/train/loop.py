"""The per-worker training loop: two-stage fine-tuning, per-epoch checkpoints, export of the best model.

Runs identically on one CPU process or as one of N DDP workers (see :mod:`allcluster.train.session`):
training data is sharded by a DistributedSampler, evaluation splits are sharded without padding and
gathered, so every metric is computed over each validation image exactly once. The test split is
evaluated once, after training, with the best-validation-macro-F1 weights.
"""
from __future__ import annotations

import math
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import yaml

from allcluster.atomic import atomic_write_parquet
from allcluster import metrics as M
from allcluster.train.augment import BatchMixer, image_transform, minority_transform, soft_cross_entropy
from allcluster.config import ConfigError, config_hash, to_dict
from allcluster.console import say
from allcluster.data.cache import ensure_cache
from allcluster.device import autocast, channels_last, cpu_state_dict, use_bf16
from allcluster.data.manifest import manifest_fingerprint, read_manifest
from allcluster.data.normalize import Normalize
from allcluster.data.preprocess import Preprocess
from allcluster.models import build_model, get_spec
from allcluster.models.card import ModelCard
from allcluster.models.model_dir import head_dict, save_model_dir
from allcluster.train.optim import EarlyStopping, EpochScheduler, WeightAverage, build_optimizer
from allcluster.train.config import TrainConfig, head_spec
from allcluster.train.data import (CachedImages, Split, balanced_class_weights, eval_loader, load_splits,
                                   oversample_minority, train_loader)
from allcluster.train.session import EPOCHS_DONE, Session, scratch_dir


class Diverged(RuntimeError):
    """The loss became NaN or infinite: the weights are no model any more."""


def check_converging(row: dict, stage: str) -> None:
    """Raise :class:`Diverged` for an epoch whose training or validation loss is not finite, before its
    checkpoint is written. Such weights predict one class for every image (macro-F1 of a constant
    guess): left to run, a sweep recorded the trial as finished and could export it as best_model."""
    bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(row[k])]
    if bad:
        raise Diverged(f"training diverged: {' and '.join(f'{k} {row[k]}' for k in bad)} at epoch {row['epoch']} "
                       f"(stage {stage}, lr {row['lr']:g}); lower optim.lr")


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    lr: float
    unfreeze_blocks: int
    early_stopping: bool


def plan_stages(cfg: TrainConfig) -> list[Stage]:
    """Stage 1 (head only, fixed length) when ``finetune.head_epochs`` > 0, then stage 2."""
    stages = []
    if cfg.finetune.head_epochs:
        stages.append(Stage("head", cfg.finetune.head_epochs, cfg.finetune.head_lr, 0, False))
    stages.append(Stage("finetune", cfg.fit.epochs, cfg.optim.lr, cfg.finetune.unfreeze_blocks, True))
    return stages


@dataclass
class TrainState:
    """Everything needed to resume: position, weights, optimiser, best-so-far, history."""
    stage_index: int = 0
    stage_epoch: int = 0          # epochs already completed in the current stage
    epoch: int = 0                # epochs completed overall
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    model: dict | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None
    best_model: dict | None = None
    weight_average: dict | None = None   # WeightAverage.state_dict() when fit.ema_decay > 0
    history: list[dict] = field(default_factory=list)
    final: dict | None = None     # set once the best model is exported (the run is finished)
    data_fingerprint: str = ""    # the manifest's content it trains on (empty in older checkpoints)

    def save(self, directory: Path) -> None:
        """Write ``state.pt`` holding tensors and plain Python types only (what ``load`` accepts)."""
        torch.save(plain_state(self.__dict__, "state"), directory / "state.pt")

    @classmethod
    def load(cls, directory: Path) -> "TrainState":
        """Read ``state.pt`` with ``torch.load(weights_only=True)``: anything but tensors and plain
        types (a pickled object could run code as the sweep's owner) is refused, naming the file."""
        path = directory / "state.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported[^\n]*?allowed global", str(err))
            why = f" ({found.group(0)})" if found else ""
            raise UnsafeCheckpointError(
                f"{path}: refused to load this training checkpoint: it holds objects other than tensors "
                f"and plain types{why}, and unpickling them could run code. allcluster never writes such "
                f"a file: find out who did; to train the run afresh remove {directory.parent}") from None
        return cls(**state)


class UnsafeCheckpointError(ConfigError):
    """A checkpoint that ``torch.load(weights_only=True)`` refuses (a pickled object, not state)."""


def plain_state(value, where: str):
    """``value`` with numpy scalars and arrays turned into Python numbers and tensors; anything that
    is not a tensor or a plain type fails here, at save time, naming its key (not later at resume)."""
    if isinstance(value, np.generic):          # before float: np.float64 subclasses float
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, dict):
        return {k: plain_state(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where}: a {type(value).__name__} cannot go into a training checkpoint (tensors and "
                    "plain types only: checkpoints load with torch.load(weights_only=True))")


class WorkerRun:
    """One worker's view of a training run (state shared by the short methods below)."""

    def __init__(self, cfg: TrainConfig, session: Session, run_id: str = "", log=None):
        self.cfg, self.session, self.run_id = cfg, session, run_id
        self.is_main = session.rank == 0
        self.log = (log or say) if self.is_main else (lambda *a, **k: None)
        self.out = Path(cfg.output_dir)
        self.device = session.device
        self.on_gpu = self.device.type == "cuda"
        self.bf16 = use_bf16(cfg.fit.precision, self.device)

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.fit.seed + self.session.rank)
        manifest = read_manifest(cfg.data.manifest)
        self.data_fingerprint = manifest_fingerprint(manifest)
        self.preprocess = Preprocess(cfg.data.image_size, cfg.data.roi_crop, cfg.data.roi_margin)
        self.cache = ensure_cache(manifest, self.preprocess, cfg.data.cache_dir or None,
                                  manifest_path=cfg.data.manifest, log=self.log)
        self.classes, self.splits = load_splits(manifest, self.cache, cfg.data, cfg.fit.seed)
        if not len(self.splits["train"]) or not len(self.splits["val"]):
            raise ConfigError(f"{cfg.data.manifest}: the train and val splits must not be empty "
                             f"(sizes: { {k: len(v) for k, v in self.splits.items()} })")
        # Every DDP worker evaluates its share of val and test through the DDP model, whose forward
        # is a collective (buffer sync): a worker with no image would leave the others waiting.
        small = {k: len(v) for k, v in self.splits.items() if k != "train" and 0 < len(v) < self.session.world_size}
        if small:
            raise ConfigError(f"{cfg.data.manifest}: {', '.join(f'the {k} split has {n} image(s)' for k, n in small.items())}"
                              f" for {self.session.world_size} workers, which each evaluate a part of it; "
                              "lower resources.num_workers or use a larger split")
        spec = get_spec(cfg.model.backbone)
        self.head_spec = head_spec(cfg)
        self.model = build_model(cfg.model.backbone, len(self.classes), self.head_spec,
                                 cfg.model.pretrained, cfg.model.weights).to(self.device)
        self.model = channels_last(self.model)
        self.average = WeightAverage(self.model, cfg.fit.ema_decay) if cfg.fit.ema_decay > 0 else None
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std).to(self.device)
        self._build_train_data()

    def _build_train_data(self) -> None:
        cfg, train = self.cfg, self.splits["train"]
        copies = None
        if cfg.imbalance.oversample == "minority":
            train, copies = oversample_minority(train, cfg.fit.seed)
        self.train_split = train
        self.class_weights = (balanced_class_weights(train.labels, len(self.classes)).to(self.device)
                              if cfg.imbalance.class_weights == "balanced" else None)
        dataset = CachedImages(self.cache.path, cfg.data.image_size, train, image_transform(cfg.augment),
                               copies, minority_transform(cfg.augment))
        self.train_loader, self.sampler = train_loader(
            dataset, cfg.fit.batch_size, self.session.rank, self.session.world_size, cfg.fit.seed,
            cfg.data.loader_workers, self.on_gpu)
        self.mixer = BatchMixer(cfg.augment, len(self.classes), cfg.fit.label_smoothing)

    def autocast(self):
        return autocast(self.device, self.bf16)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = self.normalize(images.to(self.device, non_blocking=True))
        return channels_last(images)

    # ---- one epoch ---------------------------------------------------------------------------
    def train_epoch(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict:
        net.train()
        self.sampler.set_epoch(epoch)
        loss_sum, seen = 0.0, 0
        n = len(self.classes)
        confusion = torch.zeros(n * n, dtype=torch.long, device=self.device)   # running, on augmented batches
        start = time.perf_counter()
        for images_u8, labels, _ in self.train_loader:
            images = self.to_device(images_u8)
            labels = labels.to(self.device, non_blocking=True)
            images, targets = self.mixer(images, labels)
            with self.autocast():
                logits = net(images)
            loss = soft_cross_entropy(logits, targets, self.class_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if self.average is not None:
                self.average.update(self.model)
            loss_sum += float(loss.detach()) * len(labels)
            confusion += torch.bincount(targets.argmax(1) * n + logits.argmax(1), minlength=n * n)
            seen += len(labels)
        seconds = time.perf_counter() - start
        totals = np.sum(self.session.all_gather([loss_sum, seen, *confusion.tolist()]), axis=0)
        cm = totals[2:].reshape(n, n)
        return {"train_loss": totals[0] / max(totals[1], 1), "train_accuracy": np.trace(cm) / max(totals[1], 1),
                "train_macro_f1": float(M.per_class_prf_specificity(cm)["f1"].mean()),
                "train_images_per_s": totals[1] / max(seconds, 1e-9), "train_seconds": seconds}

    @torch.no_grad()
    def predict(self, net: torch.nn.Module, split: Split) -> np.ndarray:
        """Logits for every sample of ``split`` (sharded over ranks, gathered, in split order)."""
        net.eval()
        dataset = CachedImages(self.cache.path, self.cfg.data.image_size, split)
        loader = eval_loader(dataset, self.cfg.fit.batch_size * 2, self.session.rank, self.session.world_size,
                             self.cfg.data.loader_workers, self.on_gpu)
        chunks, indices = [], []
        for images_u8, _, index in loader:
            with self.autocast():
                chunks.append(net(self.to_device(images_u8)).float().cpu())
            indices.append(index)
        local = (torch.cat(indices).numpy() if indices else np.zeros(0, np.int64),
                 torch.cat(chunks).numpy() if chunks else np.zeros((0, len(self.classes)), np.float32))
        parts = self.session.all_gather(local)
        order = np.concatenate([p[0] for p in parts])
        logits = np.concatenate([p[1] for p in parts])
        result = np.zeros_like(logits)
        result[order] = logits
        return result

    def evaluated(self, net: torch.nn.Module) -> torch.nn.Module:
        """What validation, model selection and export see: the weight average when there is one."""
        return self.average.module if self.average is not None else net

    def evaluate(self, net: torch.nn.Module, split: Split, prefix: str, temperature: float = 1.0) -> tuple[dict, np.ndarray]:
        logits = self.predict(net, split)
        found = M.classification_metrics(split.labels, M.softmax(logits, temperature), self.classes)
        found["loss"] = found["nll"]
        return {f"{prefix}_{k}": v for k, v in found.items()}, logits

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        self.setup()
        with self.session.latest_checkpoint() as resume:
            state = TrainState.load(resume) if resume else TrainState()
        if state.final is not None:
            self.check_same_data(state)       # not "finished" with metrics of a manifest re-indexed since
            self.log(f"[train] {self.out}: already finished; nothing to do")
            if self.session.resumed_unlisted:   # a stop came before Ray Train recorded it: record it now
                self.checkpoint(state, state.final)
            else:
                self.session.report(state.final)
            return state.final
        if resume:
            self.check_same_data(state)
            self.log(f"[train] resuming after epoch {state.epoch} from {resume}")
            self.model.load_state_dict(state.model)
            if self.average is not None and state.weight_average is not None:
                self.average.load_state_dict(state.weight_average)
        state.data_fingerprint = self.data_fingerprint
        for index, stage in enumerate(plan_stages(self.cfg)):
            if index < state.stage_index:
                continue
            if self.run_stage(stage, index, state):
                break
        return self.finish(state)

    def check_same_data(self, state: TrainState) -> None:
        """A run resumes only on the manifest content its checkpoints were trained on: a manifest
        re-indexed at the same path would change the images, splits or classes under the run (the
        config, which names only the path, is checked by ``check_resumable``)."""
        if state.data_fingerprint and state.data_fingerprint != self.data_fingerprint:
            raise ConfigError(f"{self.cfg.data.manifest}: its content changed since the checkpoints in "
                              f"{self.out} were written (re-indexed?); resuming would go on training on other "
                              "images or splits. Restore that manifest, or set another output_dir to train afresh")

    def run_stage(self, stage: Stage, index: int, state: TrainState) -> bool:
        """Train one stage from the state's position; True when early stopping ended the run."""
        trainable = self.model.set_trainable(stage.unfreeze_blocks)
        net = self.session.wrap(self.model)
        optimizer = build_optimizer(self.cfg.optim, self.model.parameters(), stage.lr)
        scheduler = EpochScheduler(self.cfg.schedule, optimizer, stage.epochs)
        resuming = state.stage_index == index and state.stage_epoch > 0
        if resuming:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
        stopper = EarlyStopping(self.cfg.fit.early_stopping_patience if stage.early_stopping else 0,
                                best=state.best_score, bad_epochs=state.bad_epochs if resuming else 0)
        self.log(f"[train] stage {stage.name}: {stage.epochs} epochs at lr {stage.lr:g}, "
                 f"{trainable:,} trainable parameters")
        stopped = False
        for stage_epoch in range(state.stage_epoch if resuming else 0, stage.epochs):
            row = self.epoch_row(net, optimizer, stage, state.epoch)
            if stopper.update(row["val_macro_f1"]):
                state.best_score, state.best_epoch = stopper.best, state.epoch
                state.best_model = cpu_state_dict(self.evaluated(self.model))
            scheduler.step(row["val_macro_f1"])
            stopped = stopper.should_stop
            done = stopped or stage_epoch + 1 == stage.epochs
            state.stage_index, state.stage_epoch = (index + 1, 0) if done else (index, stage_epoch + 1)
            state.epoch += 1
            state.bad_epochs = stopper.bad_epochs
            row.update(best_val_macro_f1=state.best_score, best_epoch=state.best_epoch)
            state.history.append(row)
            state.model, state.optimizer, state.scheduler = cpu_state_dict(self.model), optimizer.state_dict(), scheduler.state_dict()
            state.weight_average = self.average.state_dict() if self.average is not None else None
            self.checkpoint(state, row)
            if stopped:
                self.log(f"[train] early stopping: no val macro-F1 gain for {stopper.patience} epochs")
                break
        del net
        return stopped

    def epoch_row(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, stage: Stage, epoch: int) -> dict:
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        row = {"epoch": epoch, "stage": stage.name, "lr": lr, **self.train_epoch(net, optimizer, epoch)}
        found, _ = self.evaluate(self.evaluated(net), self.splits["val"], "val")
        row.update({f"val_{k}": found[f"val_{k}"] for k in M.EVAL_METRICS})
        row["epoch_seconds"] = time.perf_counter() - start
        self.log(f"[train] epoch {epoch + 1} ({stage.name}) loss {row['train_loss']:.4f} "
                 f"acc {row['train_accuracy']:.3f} | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f} "
                 f"macro-F1 {row['val_macro_f1']:.3f} | {row['train_images_per_s']:.0f} img/s")
        check_converging(row, stage.name)
        return row

    def checkpoint(self, state: TrainState, metrics: dict) -> None:
        """Report metrics (and :data:`EPOCHS_DONE`); rank 0 attaches the full state as this epoch's checkpoint."""
        metrics = {**metrics, EPOCHS_DONE: state.epoch}
        if not self.is_main:
            self.session.report(metrics)
            return
        self.write_history(state.history)
        with scratch_dir("ckpt") as staged:     # Ray Train copies it into the trial's storage
            state.save(staged)
            self.session.report(metrics, staged)

    def write_history(self, history: list[dict]) -> None:
        rows = [{**r, "run_id": self.run_id, "config_hash": config_hash(self.cfg)} for r in history]
        atomic_write_parquet(self.out / "metrics.parquet", pa.Table.from_pylist(rows))

    # ---- final evaluation and export ---------------------------------------------------------
    def finish(self, state: TrainState) -> dict:
        """Best weights -> temperature on val -> the single test evaluation -> model directory."""
        if state.best_model is not None:
            self.model.load_state_dict(state.best_model)
        elif self.average is not None:
            self.model.load_state_dict(self.average.module.state_dict())
        net = self.model
        val_logits = self.predict(net, self.splits["val"])
        temperature = M.fit_temperature(val_logits, self.splits["val"].labels)
        final = {"run_complete": True,   # not "done": Tune reads that key as "stop this trial now"
                 "epoch": state.epoch, "best_epoch": state.best_epoch, "temperature": temperature}
        for name in ("val", "test"):
            split = self.splits[name]
            logits = val_logits if name == "val" else self.predict(net, split)
            raw = M.classification_metrics(split.labels, M.softmax(logits), self.classes)
            calibrated = M.classification_metrics(split.labels, M.softmax(logits, temperature), self.classes)
            final[f"{name}_metrics"] = raw
            final.update({f"{name}_{k}": raw[k] for k in ("accuracy", "macro_f1", "auc", "macro_specificity", "map")})
            final[f"{name}_loss"] = raw["nll"]
            final[f"{name}_ece"] = raw["ece"]
            final[f"{name}_ece_calibrated"] = calibrated["ece"]
        final["train_images_per_s"] = float(np.median([r["train_images_per_s"] for r in state.history])) if state.history else 0.0
        final["train_seconds"] = float(sum(r["train_seconds"] for r in state.history))
        if self.is_main:
            final["model_dir"] = str(self.export(final, state))
        state.final = {k: v for k, v in final.items() if not k.endswith("_metrics")}
        self.checkpoint(state, state.final)
        self.log(f"[train] best epoch {state.best_epoch + 1} (best_epoch {state.best_epoch}: the tables count "
                 f"from 0): val macro-F1 {final['val_macro_f1']:.4f}; "
                 f"test accuracy {final['test_accuracy']:.4f}, macro-F1 {final['test_macro_f1']:.4f}")
        return final

    def export(self, final: dict, state: TrainState) -> Path:
        cfg, spec = self.cfg, self.spec
        card = ModelCard(
            classes=list(self.classes), backbone=cfg.model.backbone, timm_name=spec.timm_name,
            input_size=cfg.data.image_size, mean=list(spec.mean), std=list(spec.std),
            roi_crop=cfg.data.roi_crop, roi_margin=cfg.data.roi_margin, cam_layer=spec.cam_layer,
            head=head_dict(self.head_spec), temperature=final["temperature"],
            logits_precision="bf16" if self.bf16 else "fp32", best_epoch=state.best_epoch,
            epochs_trained=state.epoch,
            metrics={"val": final["val_metrics"], "test": final["test_metrics"],
                     "val_ece_calibrated": final["val_ece_calibrated"],
                     "test_ece_calibrated": final["test_ece_calibrated"]},
            split_sizes={k: len(v) for k, v in self.splits.items()},
            manifest=str(Path(cfg.data.manifest).resolve()), run_id=self.run_id,
            config_hash=config_hash(cfg), config=to_dict(cfg))
        header = f"# allcluster train, run {self.run_id}\n"
        return save_model_dir(self.out / "model", self.model, card,
                              header + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def run_worker(cfg: TrainConfig, session: Session, run_id: str = "", log=None) -> dict:
    """Entry point for one worker (Ray Train's ``train_loop_per_worker`` calls this)."""
    return WorkerRun(cfg, session, run_id, log).run()
