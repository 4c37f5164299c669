"""The model card: the one contract between training, sweeps, scoring, explain, benchmarks and reports.

``model/model_card.json`` is written only through :meth:`ModelCard.write` and read only through
:meth:`ModelCard.read`; every reader gets typed fields instead of dict keys, and the preprocessing and
normalisation a model expects are derived here (timm's ``PretrainedCfg`` / ``resolve_data_config``
habit), so training, scoring and explain cannot disagree on them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allcluster.atomic import atomic_write_text

CARD_FILE = "model_card.json"
CARD_VERSION = 1
MODEL_INFO_FILE = "model.json"        # in a scoring OUT: what the report needs of the model (ModelInfo)
# What shapes a scoring job's rows besides the weights: a rerun into its OUT must keep them all (a
# re-calibrated or re-sized export of the same weights would mix two models' rows in one table).
SCORING_KEYS = ("weights_sha256", "classes", "input_size", "mean", "std", "roi_crop", "roi_margin", "cam_layer",
                "temperature", "logits_precision")


class CardError(ValueError):
    """A model card that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelCard:
    """What an exported model is and how to feed it (fields = the JSON keys)."""
    classes: list[str]
    backbone: str
    input_size: int
    mean: list[float]
    std: list[float]
    cam_layer: str
    head: dict                                   # hidden, dropout, hidden_dropout
    timm_name: str = ""
    roi_crop: bool = False
    roi_margin: float = 0.1
    temperature: float = 1.0                     # calibration: softmax(logits / temperature)
    logits_precision: str = "fp32"               # the model ran in this when the temperature was fitted
    best_epoch: int = -1
    epochs_trained: int = 0
    metrics: dict = field(default_factory=dict)  # val, test (classification_metrics), *_ece_calibrated
    split_sizes: dict = field(default_factory=dict)
    manifest: str = ""
    run_id: str = ""
    config_hash: str = ""
    config: dict = field(default_factory=dict)   # the resolved training config
    untrained: bool = False
    backbone_weights: dict | None = None         # where the starting weights came from (source, sha256)
    weights_sha256: str = ""                     # of weights.safetensors, set when written
    versions: dict = field(default_factory=dict)
    created: str = ""
    sweep: dict | None = None                    # set on a sweep's best_model: trial_id, chosen_by
    format_version: int = CARD_VERSION

    # ---- files ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "model card") -> "ModelCard":
        """Validate plain data (unknown keys of newer versions are ignored, missing required ones named)."""
        if not isinstance(data, dict):
            raise CardError(f"{source}: expected a JSON object")
        if int(data.get("format_version", 1)) > CARD_VERSION:
            raise CardError(f"{source}: card format {data['format_version']} is newer than this allcluster "
                            f"reads ({CARD_VERSION}); upgrade allcluster")
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise CardError(f"{source}: missing {', '.join(missing)}")
        card = cls(**{k: v for k, v in data.items() if k in names})
        if not card.classes or card.input_size <= 0 or len(card.mean) != 3 or len(card.std) != 3:
            raise CardError(f"{source}: needs classes, a positive input_size and 3-value mean/std")
        return card

    @classmethod
    def read(cls, model_dir: str | Path) -> "ModelCard":
        """The card of an exported model directory; a clear error when it is not one."""
        path = Path(model_dir) / CARD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir}: not a model directory (no {CARD_FILE}); "
                                    "export one with `allcluster train` or `allcluster sweep`")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise CardError(f"{path}: not valid JSON: {err}") from err
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, model_dir: str | Path) -> Path:
        """Write ``model_dir/model_card.json`` atomically."""
        return atomic_write_text(Path(model_dir) / CARD_FILE, json.dumps(self.to_dict(), indent=2, default=float))

    def scoring_settings(self) -> dict:
        """``{"model.KEY": value}`` for :data:`SCORING_KEYS`: what a scoring job records in ``job.json``."""
        return {f"model.{k}": getattr(self, k) for k in SCORING_KEYS}

    def write_model_info(self, out: str | Path) -> Path:
        """``OUT/model.json``: the card fields a scoring output's readers need (:class:`ModelInfo`: the
        report's overlays and ``explain --scores`` crop as the model did), so they never walk back to a
        model folder that may be gone."""
        info = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelInfo)}
        return atomic_write_text(Path(out) / MODEL_INFO_FILE, json.dumps(info, indent=2, default=float))

    def replace(self, **changes: Any) -> "ModelCard":
        return dataclasses.replace(self, **changes)

    # ---- what a model expects ------------------------------------------------------------------
    def head_spec(self):
        """The head as the registry's ``HeadSpec`` (what ``build_model`` takes)."""
        from allcluster.models.registry import HeadSpec

        return HeadSpec(tuple(self.head["hidden"]), self.head["dropout"], self.head["hidden_dropout"])

    def preprocess(self):
        """Decoded RGB -> the model's uint8 input (ROI crop as trained, resize to ``input_size``)."""
        from allcluster.data.preprocess import Preprocess

        return Preprocess(self.input_size, self.roi_crop, self.roi_margin)

    def normalize(self):
        """The on-device normalisation of uint8 batches (the backbone's mean and std)."""
        from allcluster.data.normalize import Normalize

        return Normalize(tuple(self.mean), tuple(self.std))

    @property
    def test_metrics(self) -> dict:
        return self.metrics.get("test", {})

    @property
    def val_metrics(self) -> dict:
        return self.metrics.get("val", {})


def versions() -> dict[str, str]:
    """Versions of everything that shapes a result (provenance for every output), read without
    importing torch or timm (the scoring driver never imports them): torch's full version, local
    build label included (``2.14.1+cu130``), comes from its ``version.py`` as ``torch.__version__`` does."""
    import platform

    import allcluster

    return {"allcluster": allcluster.__version__, "torch": _package_version("torch"),
            "timm": _package_version("timm"), "python": platform.python_version(), "ray": _package_version("ray")}


def _package_version(name: str) -> str:
    """``name.__version__`` as the package's own ``version.py`` states it; else its distribution's
    version; "" when it is not installed."""
    import importlib.metadata
    import importlib.util
    import re

    spec = importlib.util.find_spec(name)
    if spec is None:
        return ""
    version_py = Path(spec.origin).with_name("version.py")
    if version_py.is_file():
        found = re.search(r"^__version__\s*(?::\s*str)?\s*=\s*['\"]([^'\"]+)['\"]", version_py.read_text(), re.M)
        if found:
            return found.group(1)
    return importlib.metadata.version(name)


@dataclass(frozen=True)
class ModelInfo:
    """``OUT/model.json`` of a scoring output: the fields of its model's card that readers of the output
    need. ``ModelInfo()`` (input size 0) stands for an output that has none (an older allcluster's)."""
    input_size: int = 0
    classes: list[str] = field(default_factory=list)
    backbone: str = ""
    roi_crop: bool = ModelCard.roi_crop
    roi_margin: float = ModelCard.roi_margin
    cam_layer: str = ""
    temperature: float = ModelCard.temperature
    weights_sha256: str = ""
    run_id: str = ""

    @classmethod
    def read(cls, out: str | Path) -> "ModelInfo":
        """What :meth:`ModelCard.write_model_info` wrote in ``out`` (``ModelInfo()`` when absent); a
        :class:`CardError` naming the file when it is no such record."""
        path = Path(out) / MODEL_INFO_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in names})
        except (ValueError, TypeError, AttributeError) as err:
            raise CardError(f"{path}: not a model record of a scoring output ({err})") from err
