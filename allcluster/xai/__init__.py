"""Explainers by name: ``make_explainer("gradcam", model, layer).explain(images)``.

Every method subclasses :class:`allcluster.xai.base.Explainer`, overrides one method and has the
same constructor ``(model, layer, settings)``.
"""
from allcluster.xai.attribution import IntegratedGradients
from allcluster.xai.base import ExplainSettings, Explainer, Explanation
from allcluster.xai.cams import CAM, GradCAM, GradCAMPlusPlus, ScoreCAM
from allcluster.xai.lime import Lime

EXPLAINERS: dict[str, type[Explainer]] = {
    cls.name: cls for cls in (GradCAM, GradCAMPlusPlus, ScoreCAM, CAM, IntegratedGradients, Lime)}


def get_explainer(name: str) -> type[Explainer]:
    """The explainer class registered under ``name``; a clear error lists the others."""
    if name not in EXPLAINERS:
        raise KeyError(f"unknown explainer {name!r}; registered: {', '.join(sorted(EXPLAINERS))}")
    return EXPLAINERS[name]


def make_explainer(name: str, model, layer: str, settings: ExplainSettings = ExplainSettings()) -> Explainer:
    """The one way to build an explainer: registry name, model, its CAM layer (ignored by methods
    that work on the input) and the settings."""
    return get_explainer(name)(model, layer, settings)


__all__ = ["EXPLAINERS", "ExplainSettings", "Explainer", "Explanation", "get_explainer", "make_explainer"]
