"""``ScoreConfig``: every key of a scoring YAML (``allcluster score --config CFG``).

``model``, ``input`` and ``out`` are usually given on the command line (``--model/--input/--out``);
everything else says what to explain, on which images, and how the work is spread over Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from allcluster.config import ConfigError, bounds


@dataclass(frozen=True)
class BudgetConfig:
    """Which images also get the expensive methods: any image matching one rule, up to a cap."""
    methods: list[str] = field(default_factory=list)    # e.g. [lime, scorecam, ig]; [] = none
    low_confidence: float = field(default=0.6, metadata=bounds(ge=0, le=1))  # calibrated conf below this
    classes: list[str] = field(default_factory=list)    # predicted classes to explain in depth
    sample_fraction: float = field(default=0.0, metadata=bounds(ge=0, le=1))  # deterministic share (by sha256)
    max_images: int = field(default=1000, metadata=bounds(ge=0))   # cap over the whole job, across resumes


@dataclass(frozen=True)
class ExplainConfig:
    """Heatmaps: ``methods`` on every image (default Grad-CAM, from the prediction's own pass)."""
    methods: list[str] = field(default_factory=lambda: ["gradcam"])
    budget: BudgetConfig = BudgetConfig()
    faithfulness_fraction: float = field(default=0.2, metadata=bounds(ge=0, lt=1))  # 0: no score
    # which images' maps get the faithfulness score (two more forward passes each): every uncertain
    # image and this share of the rest, fixed by content hash as the budget's sample; 1.0: every image
    faithfulness_sample: float = field(default=0.05, metadata=bounds(ge=0, le=1))
    lime_samples: int = field(default=1000, metadata=bounds(ge=10))
    ig_steps: int = field(default=32, metadata=bounds(ge=2))
    overlays: bool = False               # also store colour overlays (JPEG) beside the 8-bit maps
    # packed: each row shard's maps in one Parquet pack heatmaps/part-*.parquet (files grow with shards,
    # not images); files: one PNG per image and method, heatmaps/ab/<sha256>.<method>.png
    heatmaps: Literal["packed", "files"] = "packed"


@dataclass(frozen=True)
class WorkersConfig:
    """How the pipeline uses the Ray cluster."""
    actors: int = field(default=0, metadata=bounds(ge=0))   # model replicas; 0: one per GPU, else CPU-sized
    gpus_per_actor: float = field(default=1.0, metadata=bounds(gt=0, le=8))
    cpus_per_actor: float = field(default=1.0, metadata=bounds(gt=0))
    decode_cpus: float = field(default=0.5, metadata=bounds(gt=0))   # per read+decode task
    torch_threads: int = field(default=0, metadata=bounds(ge=0))      # per CPU actor; 0: its share of the node's CPUs
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast (and channels-last) on CUDA, fp32 on CPU, as training; the card's temperature
    # is applied to the fp32 cast of the logits (training fits it the same way, see logits_precision)
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring job: a model directory over an image archive into ``out``."""
    model: str = ""                      # exported model directory (model_card.json + weights)
    input: str = ""                      # folder tree, manifest .parquet, or text file of paths
    out: str = ""                        # output folder (shared filesystem on a cluster)
    batch_size: int = field(default=32, metadata=bounds(ge=1))
    uncertain_below: float = field(default=0.6, metadata=bounds(ge=0, le=1))  # flag: calibrated conf below
    max_pixels: int = field(default=50_000_000, metadata=bounds(ge=64))   # refuse larger images (bombs)
    max_bytes: int = field(default=512 * 2**20, metadata=bounds(ge=1))    # refuse larger files unread (.svs, tar)
    rows_per_shard: int = field(default=5000, metadata=bounds(ge=1))      # rows per Parquet shard
    flush_seconds: float = field(default=60.0, metadata=bounds(gt=0))     # ...or a shard at least this often
    progress_seconds: float = field(default=0.0, metadata=bounds(ge=0))   # 0: 1 s on a terminal, 30 s in a log
    explain: ExplainConfig = ExplainConfig()
    workers: WorkersConfig = WorkersConfig()


def check(cfg: ScoreConfig, source: str, require_paths: bool = True) -> ScoreConfig:
    """Checks that span keys: required paths, method names, no method twice. Shipped YAMLs leave
    the paths to the command line (``require_paths=False`` validates them)."""
    from allcluster.xai import METHOD_NAMES

    for key in ("model", "input", "out"):
        if require_paths and not getattr(cfg, key):
            raise ConfigError(f"{source}: {key} is required (--{key} on the command line, or `{key}:` in the YAML)")
    methods = list(cfg.explain.methods) + list(cfg.explain.budget.methods)
    for i, name in enumerate(methods):
        if name not in METHOD_NAMES:
            key = "explain.methods" if i < len(cfg.explain.methods) else "explain.budget.methods"
            raise ConfigError(f"{source}: {key}: unknown method {name!r}; registered: {', '.join(sorted(METHOD_NAMES))}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"{source}: explain.methods and explain.budget.methods name a method twice: {methods}")
    return cfg


# Row-shaping keys added since the first release, with the value an older job.json implied.
IMPLIED_BEFORE = {"explain.faithfulness_sample": 1.0}


def row_settings(cfg: ScoreConfig) -> dict:
    """The keys that shape result rows: a rerun into the same ``out`` must keep them."""
    return {"explain.methods": list(cfg.explain.methods), "explain.budget.methods": list(cfg.explain.budget.methods),
            "explain.faithfulness_fraction": cfg.explain.faithfulness_fraction,
            "explain.faithfulness_sample": cfg.explain.faithfulness_sample,
            "uncertain_below": cfg.uncertain_below}
