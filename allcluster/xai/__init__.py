"""Explainers by name: ``make_explainer("gradcam", model, layer).explain(images)``.

Every method subclasses :class:`allcluster.xai.base.Explainer`, overrides one method and has the
same constructor ``(model, layer, settings)``. The registry below names each method's class; the
classes (and torch) load on first use (PEP 562), so a config check or the scoring driver, which
only need the names, and the numpy-only submodules (``overlay``, ``localisation``) stay light.
"""
from __future__ import annotations

import importlib

# registry name -> "submodule:Class" (the class's own ``name`` is the key; tests/test_xai.py checks)
_METHODS = {
    "gradcam": "cams:GradCAM", "gradcam++": "cams:GradCAMPlusPlus", "scorecam": "cams:ScoreCAM",
    "cam": "cams:CAM", "ig": "attribution:IntegratedGradients", "lime": "lime:Lime",
}
METHOD_NAMES: tuple[str, ...] = tuple(_METHODS)
_BASE = ("ExplainSettings", "Explainer", "Explanation")


def _load(spec: str):
    module, cls = spec.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def __getattr__(name: str):
    if name == "EXPLAINERS":
        return {method: _load(spec) for method, spec in _METHODS.items()}
    if name in _BASE:
        return getattr(importlib.import_module(f"{__name__}.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_explainer(name: str):
    """The explainer class registered under ``name``; a clear error lists the others."""
    if name not in _METHODS:
        raise KeyError(f"unknown explainer {name!r}; registered: {', '.join(sorted(_METHODS))}")
    return _load(_METHODS[name])


def make_explainer(name: str, model, layer: str, settings=None):
    """The one way to build an explainer: registry name, model, its CAM layer (ignored by methods
    that work on the input) and the settings (default: :class:`ExplainSettings`)."""
    from allcluster.xai.base import ExplainSettings

    return get_explainer(name)(model, layer, settings or ExplainSettings())


__all__ = ["EXPLAINERS", "METHOD_NAMES", "ExplainSettings", "Explainer", "Explanation", "get_explainer",
           "make_explainer"]
