"""Explainers by name: ``EXPLAINERS["gradcam"](model, layer).explain(images)``.

Every method subclasses :class:`allcluster.xai.base.Explainer` and overrides one method.
"""
from allcluster.xai.attribution import IntegratedGradients
from allcluster.xai.base import Explainer, Explanation
from allcluster.xai.cams import CAM, GradCAM, GradCAMPlusPlus, ScoreCAM
from allcluster.xai.lime import Lime

EXPLAINERS: dict[str, type[Explainer]] = {
    cls.name: cls for cls in (GradCAM, GradCAMPlusPlus, ScoreCAM, CAM, IntegratedGradients, Lime)}


def get_explainer(name: str) -> type[Explainer]:
    """The explainer class registered under ``name``; a clear error lists the others."""
    if name not in EXPLAINERS:
        raise KeyError(f"unknown explainer {name!r}; registered: {', '.join(sorted(EXPLAINERS))}")
    return EXPLAINERS[name]


__all__ = ["EXPLAINERS", "Explainer", "Explanation", "get_explainer"]
