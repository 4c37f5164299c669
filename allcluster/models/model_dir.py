"""The exported model directory: what `allcluster score` and `allcluster explain` load.

    model/weights.safetensors   the best-validation-macro-F1 weights (no pickle)
    model/model_card.json       classes, backbone, input size, normalisation, CAM layer, metrics,
                                calibration temperature, config, versions, weights sha256, and
                                ``backbone_weights``: where the backbone's starting weights came
                                from (source, file, sha256; ``random-init`` when trained from scratch)
    model/config.yaml           the resolved training config
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from allcluster.atomic import atomic_folder
from allcluster.config import ConfigError
from allcluster.device import cpu_state_dict
from allcluster.models.card import ModelCard, versions
from allcluster.models.classifier import Classifier, build_model
from allcluster.models.registry import HeadSpec, get_spec


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model_dir(out: str | Path, model: Classifier, card: ModelCard, config_yaml: str = "") -> Path:
    """Write weights, card and config atomically (into a temp folder, then renamed); the card gets
    the weights' sha256, the versions, the time and where the backbone's weights came from."""
    from safetensors.torch import save

    # Serialised here, written by Python: safetensors' own file writer reports a full disk as a
    # SafetensorError without errno, which no caller could tell from a broken model.
    weights = save(cpu_state_dict(model))
    with atomic_folder(out) as tmp:
        (tmp / "weights.safetensors").write_bytes(weights)
        card.replace(backbone_weights=card.backbone_weights or getattr(model, "weights_source", None),
                     weights_sha256=hashlib.sha256(weights).hexdigest(), versions=versions(),
                     created=time.strftime("%Y-%m-%dT%H:%M:%S%z")).write(tmp)
        if config_yaml:
            (tmp / "config.yaml").write_text(config_yaml)
    return Path(out)


@dataclass
class LoadedModel:
    model: Classifier
    card: ModelCard

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    @property
    def temperature(self) -> float:
        return float(self.card.temperature)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the classifier from its card (no pretrained download) and load the weights."""
    from safetensors.torch import load_file

    path = Path(path)
    card = ModelCard.read(path)
    weights = path / "weights.safetensors"
    if card.weights_sha256 and file_sha256(weights) != card.weights_sha256:
        raise ValueError(f"{weights}: sha256 does not match model_card.json (corrupt or replaced file)")
    try:
        spec = get_spec(card.backbone)
    except KeyError as err:             # a card from another allcluster version
        raise ConfigError(f"{path}: model_card.json: {err.args[0]}") from None
    model = build_model(card.backbone, len(card.classes), card.head_spec(), pretrained=False)
    # A model exported before one of its backbone's unused modules was dropped from the registry
    # entry (drop_modules) still holds that module's weights, which nothing reads.
    unused = tuple(f"backbone.{name}." for name in spec.drop_modules)
    model.load_state_dict({k: v for k, v in load_file(weights).items() if not k.startswith(unused)})
    model.weights_source = card.backbone_weights or model.weights_source
    model.normalization = (tuple(card.mean), tuple(card.std))     # what scoring normalises with
    return LoadedModel(model.to(device).eval(), card)


def export_untrained(out: str | Path, backbone: str, classes: list[str], input_size: int | None = None,
                     head: HeadSpec | None = None, seed: int = 0, temperature: float = 1.0) -> Path:
    """A model directory holding a randomly initialised classifier (no pretrained download).

    For benchmarks and tests: throughput and the scoring pipeline do not depend on the weights.
    """
    spec = get_spec(backbone)
    head = head or spec.default_head
    torch.manual_seed(seed)
    model = build_model(backbone, len(classes), head, pretrained=False)
    card = ModelCard(classes=list(classes), backbone=backbone, timm_name=spec.timm_name,
                     input_size=input_size or spec.input_size, mean=list(spec.mean), std=list(spec.std),
                     cam_layer=spec.cam_layer, head=head_dict(head), temperature=temperature,
                     run_id=f"untrained-{backbone}-seed{seed}", config_hash="untrained", untrained=True)
    return save_model_dir(out, model, card)


def head_dict(head: HeadSpec) -> dict:
    """A ``HeadSpec`` as the card's ``head`` entry."""
    return {"hidden": list(head.hidden), "dropout": head.dropout, "hidden_dropout": head.hidden_dropout}
