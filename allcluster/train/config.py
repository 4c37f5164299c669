"""``TrainConfig``: every key of a training YAML (``allcluster train --config CFG``).

Defaults follow paper 002's recipe (two-stage fine-tuning, label smoothing 0.1, early stopping
patience 10, ReduceLROnPlateau factor 0.1; under a cosine schedule early stopping is off unless
set). ``resolve`` fills what depends on the backbone (input size, normalisation, head) and on the
schedule (early stopping) so the written config says exactly what ran.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from allcluster.config import ConfigError, bounds, replace

from allcluster.train.augment import AUGMENTATIONS, BATCH_MIXING
from allcluster.train.optim import OPTIMIZERS, default_lr, default_patience


@dataclass(frozen=True)
class DataConfig:
    """Which images, at what size."""
    manifest: str = ""                 # manifest Parquet from `allcluster index`
    image_size: int = field(default=0, metadata=bounds(ge=0))   # 0: the backbone's input size
    roi_crop: bool = False             # crop to the largest stained contour first (paper 002)
    roi_margin: float = field(default=0.1, metadata=bounds(ge=0, le=1))
    fold: int = field(default=-1, metadata=bounds(ge=-1))       # k-fold manifests: validation fold
    max_per_class: int = field(default=0, metadata=bounds(ge=0))  # 0: all; else a stratified subset per split
    cache_dir: str = ""                # "": $ALLCLUSTER_CACHE_DIR or node-local $TMPDIR
    loader_workers: int = field(default=2, metadata=bounds(ge=0))


@dataclass(frozen=True)
class HeadConfig:
    """Classifier head; null fields take the backbone's registry default."""
    hidden: Optional[tuple[int, ...]] = None
    dropout: Optional[float] = field(default=None, metadata=bounds(ge=0, lt=1))
    hidden_dropout: Optional[float] = field(default=None, metadata=bounds(ge=0, lt=1))


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "allnet"           # a registry key: `allcluster models` lists them
    pretrained: bool = False           # ImageNet weights from the local timm/HF cache (never downloaded)
    weights: str = ""                  # or a local .safetensors/.pth file with backbone weights
    head: HeadConfig = HeadConfig()


@dataclass(frozen=True)
class ClassicAugConfig:
    """Keras-style affine augmentation; defaults are ALL-Net's Table 3 (paper 000)."""
    rotation: float = field(default=10.0, metadata=bounds(ge=0, le=180))   # degrees
    width_shift: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    height_shift: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    shear: float = field(default=0.2, metadata=bounds(ge=0, le=45))        # degrees, as Keras
    zoom: float = field(default=0.2, metadata=bounds(ge=0, lt=1))
    hflip: bool = True
    vflip: bool = False
    fill_mode: Literal["nearest", "constant", "reflect"] = "nearest"


AugmentationName = Literal[tuple(AUGMENTATIONS)]   # allowed values: the augmentation table's names


@dataclass(frozen=True)
class AugmentConfig:
    """Training-split augmentation, selected by ``name``."""
    name: AugmentationName = "none"
    classic: ClassicAugConfig = ClassicAugConfig()
    randaug_num_ops: int = field(default=2, metadata=bounds(ge=1, le=10))
    randaug_magnitude: int = field(default=9, metadata=bounds(ge=0, le=30))
    augmix_severity: int = field(default=3, metadata=bounds(ge=1, le=10))
    augmix_width: int = field(default=3, metadata=bounds(ge=1, le=10))
    mixup_alpha: float = field(default=0.2, metadata=bounds(gt=0))
    cutmix_alpha: float = field(default=1.0, metadata=bounds(gt=0))


@dataclass(frozen=True)
class ImbalanceConfig:
    # minority: copies of minority-class images (with classic augmentation) up to the largest
    # class (paper 000's benign-class augmentation)
    oversample: Literal["none", "minority"] = "none"
    # balanced: loss weight n / (classes * n_class) (papers 003/004)
    class_weights: Literal["none", "balanced"] = "none"


OptimizerName = Literal[tuple(OPTIMIZERS)]       # allowed values: the optimiser table's names


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser of the fine-tuning stage (stage 2); stage 1 uses the same one at ``finetune.head_lr``."""
    name: OptimizerName = "adam"
    # 0: the optimiser's own default (train/optim.py OPTIMIZERS): its fresh-weights rate when training
    # from scratch, its fine-tuning rate when the model starts from pretrained weights
    lr: float = field(default=0.0, metadata=bounds(ge=0))
    weight_decay: float = field(default=1e-4, metadata=bounds(ge=0))
    momentum: float = field(default=0.9, metadata=bounds(ge=0, lt=1))    # sgd, rmsprop
    nesterov: bool = False                                                # sgd


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["plateau", "cosine", "constant"] = "plateau"
    factor: float = field(default=0.1, metadata=bounds(gt=0, lt=1))       # plateau
    patience: int = field(default=3, metadata=bounds(ge=0))               # plateau, epochs
    warmup_epochs: int = field(default=0, metadata=bounds(ge=0))          # cosine
    min_lr: float = field(default=0.0, metadata=bounds(ge=0))


@dataclass(frozen=True)
class FinetuneConfig:
    """Two-stage fine-tuning (paper 002): stage 1 trains the head only, stage 2 unfreezes blocks."""
    head_epochs: int = field(default=10, metadata=bounds(ge=0))   # stage 1 length; 0 skips it
    head_lr: float = field(default=0.0, metadata=bounds(ge=0))     # 0: the optimiser's fresh-weights rate
    unfreeze_blocks: int = field(default=2, metadata=bounds(ge=-1))  # stage 2: last N blocks, -1 all


@dataclass(frozen=True)
class FitConfig:
    epochs: int = field(default=100, metadata=bounds(ge=1))         # stage 2 maximum
    batch_size: int = field(default=32, metadata=bounds(ge=2))      # per worker
    label_smoothing: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    # epochs without a val macro-F1 gain; 0 disables; null: 10, or 0 under a cosine schedule
    # (train.optim.default_patience)
    early_stopping_patience: Optional[int] = field(default=None, metadata=bounds(ge=0))
    precision: Literal["auto", "fp32", "bf16"] = "auto"              # auto: bf16 on GPU, fp32 on CPU
    # > 0: validate, pick and export an exponential moving average of the weights (per step; the
    # decay ramps up to this cap, see train.optim.WeightAverage); 0: the raw weights
    ema_decay: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    seed: int = 0


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = field(default=1, metadata=bounds(ge=1))       # Ray Train workers (DDP)
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata=bounds(gt=0))
    gpus_per_worker: float = field(default=1.0, metadata=bounds(gt=0))  # fractions share a GPU

    @property
    def gpus(self) -> float:
        """GPUs one run holds (0 on CPU): what GPU-hours are counted in."""
        return self.num_workers * self.gpus_per_worker if self.use_gpu else 0.0

    @property
    def cpus(self) -> float:
        """CPUs one run holds."""
        return self.num_workers * self.cpus_per_worker


# Keys a rerun may change and still continue a run's checkpoints (a run folder, a sweep's trials):
# where and how fast it runs (a requeued Slurm job may land on a node of another shape), not what it trains.
RESUME_FREE_KEYS = ("name", "output_dir", "resources", "data.cache_dir", "data.loader_workers")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``output_dir`` receives config.yaml, metrics.parquet, checkpoints, model/."""
    name: str = "run"
    output_dir: str = "runs/run"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    imbalance: ImbalanceConfig = ImbalanceConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    fit: FitConfig = FitConfig()
    resources: ResourcesConfig = ResourcesConfig()


def resolve(cfg: TrainConfig, source: str = "config") -> TrainConfig:
    """Fill backbone-dependent defaults (image size, head) and check cross-field rules."""
    from allcluster.data.paths import absolute
    from allcluster.models.registry import REGISTRY

    if cfg.model.backbone not in REGISTRY:
        raise ConfigError(f"{source}: model.backbone: {cfg.model.backbone!r} is not registered; allowed "
                          f"values: {', '.join(sorted(REGISTRY))}")
    if not cfg.data.manifest:
        raise ConfigError(f"{source}: data.manifest: required (a manifest from `allcluster index`)")
    spec = REGISTRY[cfg.model.backbone]
    head = cfg.model.head
    head = replace(head,
                   hidden=spec.default_head.hidden if head.hidden is None else head.hidden,
                   dropout=spec.default_head.dropout if head.dropout is None else head.dropout,
                   hidden_dropout=spec.default_head.hidden_dropout if head.hidden_dropout is None
                   else head.hidden_dropout)
    pretrained = cfg.model.pretrained or bool(cfg.model.weights)
    optim = replace(cfg.optim, lr=cfg.optim.lr or default_lr(cfg.optim.name, fresh=not pretrained))
    finetune = replace(cfg.finetune, head_lr=cfg.finetune.head_lr or default_lr(cfg.optim.name, fresh=True))
    fit = cfg.fit
    if fit.early_stopping_patience is None:
        fit = replace(fit, early_stopping_patience=default_patience(cfg.schedule.name))
    # train.optim.EpochScheduler runs each stage's schedule on its own: a stage no longer than the warm-up
    # would be all warm-up, its rate never reaching its own (optim.lr; finetune.head_lr for the head stage)
    for stage_key, epochs in (("fit.epochs", cfg.fit.epochs), ("finetune.head_epochs", cfg.finetune.head_epochs)):
        if cfg.schedule.name == "cosine" and epochs and cfg.schedule.warmup_epochs >= epochs:
            raise ConfigError(f"{source}: schedule.warmup_epochs: {cfg.schedule.warmup_epochs} must be below "
                              f"{stage_key} ({epochs}) under the cosine schedule; otherwise every epoch of that "
                              "stage is warm-up and its learning rate never reaches the rate it is given")
    if cfg.augment.name in BATCH_MIXING and cfg.fit.batch_size % 2:
        raise ConfigError(f"{source}: fit.batch_size: {cfg.fit.batch_size} must be even for {cfg.augment.name}")
    # Ray workers do not share the driver's working directory: every path leaves here absolute.
    return replace(cfg, output_dir=absolute(cfg.output_dir), optim=optim, finetune=finetune, fit=fit,
                   data=replace(cfg.data, image_size=cfg.data.image_size or spec.input_size,
                                manifest=absolute(cfg.data.manifest),
                                cache_dir=absolute(cfg.data.cache_dir) if cfg.data.cache_dir else ""),
                   model=replace(cfg.model, head=head,
                                 weights=absolute(cfg.model.weights) if cfg.model.weights else ""))


def frozen_random_layers(cfg: TrainConfig) -> str:
    """What a backbone from random init (no ``model.pretrained``, no ``model.weights``) keeps random under
    ``finetune`` (paper 002's transfer recipe, the section's defaults), or "" when it trains every block."""
    if cfg.model.pretrained or cfg.model.weights:
        return ""
    kept = ([f"frozen for the {cfg.finetune.head_epochs} head epochs"] if cfg.finetune.head_epochs else []) + \
        ([f"all but its last {cfg.finetune.unfreeze_blocks} blocks never trained"] if cfg.finetune.unfreeze_blocks >= 0 else [])
    return "; ".join(kept)


def head_spec(cfg: TrainConfig):
    """The resolved ``model.head`` section as the registry's ``HeadSpec`` (what ``build_model`` takes)."""
    from allcluster.models.registry import HeadSpec

    head = cfg.model.head
    return HeadSpec(tuple(head.hidden), head.dropout, head.hidden_dropout)
