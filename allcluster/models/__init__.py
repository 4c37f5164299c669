"""Models: the backbone registry (timm names + ALL-Net) and the classifier built from it.

The names below load on first use (PEP 562), so importing a light submodule such as
``allcluster.models.weights`` (the CLI does, for every command) does not import torch and timm.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "REGISTRY": "registry", "BackboneSpec": "registry", "HeadSpec": "registry", "get_spec": "registry",
    "Classifier": "classifier", "Head": "classifier", "WeightsNotFoundError": "classifier",
    "build_model": "classifier", "check_weights_available": "classifier", "resolve_module": "classifier",
    "LoadedModel": "model_dir", "load_model_dir": "model_dir", "save_model_dir": "model_dir",
}
__all__ = sorted(_EXPORTS)


_SUBMODULES = ("allnet", "classifier", "model_dir", "pretrained", "registry", "weights")


def __getattr__(name: str):
    if name in _SUBMODULES:              # `import allcluster.models as m; m.registry` as before
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
