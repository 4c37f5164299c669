"""Explainers: the Grad-CAM family equals pytorch-grad-cam; CAM and IG satisfy their definitions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from allcluster.models import build_model, get_spec, resolve_module
from allcluster.models.registry import HeadSpec
from allcluster.xai import EXPLAINERS, get_explainer


def _model(backbone: str, hidden=(32,), seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(backbone, 4, HeadSpec(tuple(hidden), 0.0, 0.0)).eval()
    return model, get_spec(backbone).cam_layer


def _images(n: int = 3, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone", ["allnet", "test_efficientnet"])
@pytest.mark.parametrize("ours, theirs", [("gradcam", "GradCAM"), ("gradcam++", "GradCAMPlusPlus"),
                                          ("scorecam", "ScoreCAM")])
def test_cam_family_matches_pytorch_grad_cam(backbone, ours, theirs):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, layer = _model(backbone)
    images = _images()
    targets = torch.tensor([0, 2, 3])
    mine = get_explainer(ours)(model, layer).explain(images, targets)
    with getattr(pytorch_grad_cam, theirs)(model=model, target_layers=[resolve_module(model, layer)]) as cam:
        reference = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    assert mine.maps.shape == reference.shape == (3, 64, 64)
    np.testing.assert_allclose(mine.maps.numpy(), reference, atol=1e-3)


def test_prediction_comes_from_the_same_pass_as_the_heatmap():
    model, layer = _model("allnet")
    images = _images()
    result = EXPLAINERS["gradcam"](model, layer).explain(images)
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(result.logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(result.targets, expected.argmax(1))
    assert result.maps.min() >= 0 and result.maps.max() <= 1 and (result.raw_max >= 0).all()


def test_cam_equals_gradcam_on_a_gap_dense_head():
    # with GAP -> dense, Grad-CAM's weights are the dense row / (h w): the same normalised map (Zhou 2016)
    model, layer = _model("test_efficientnet", hidden=())
    images, targets = _images(), torch.tensor([1, 0, 3])
    cam = get_explainer("cam")(model, "backbone.bn2").explain(images, targets)
    grad = get_explainer("gradcam")(model, "backbone.bn2").explain(images, targets)
    torch.testing.assert_close(cam.maps, grad.maps, atol=1e-4, rtol=0)


def test_cam_refuses_a_head_with_hidden_layers():
    model, layer = _model("allnet")
    with pytest.raises(ValueError, match="CAM needs a head with no hidden layer"):
        get_explainer("cam")(model, layer).explain(_images(1))


def test_integrated_gradients_attributions_sum_to_the_score_difference():
    # completeness (Sundararajan et al. 2017, Prop. 1): sum of attributions = F(x) - F(baseline)
    model, layer = _model("allnet")
    image = _images(1)[0]
    ig = get_explainer("ig")(model, layer)
    ig.steps = 128
    attributions = ig.attributions(image, 2)
    with torch.no_grad():
        scores = model(torch.stack([image, torch.zeros_like(image)]))[:, 2]
    difference = float(scores[0] - scores[1])
    assert float(attributions.sum()) == pytest.approx(difference, rel=0.05, abs=1e-3)
    result = ig.explain(image[None], torch.tensor([2]))
    assert result.maps.shape == (1, 64, 64) and float(result.maps.max()) == pytest.approx(1.0, abs=1e-5)


def test_unknown_explainer_lists_the_registry():
    with pytest.raises(KeyError, match="registered: .*gradcam"):
        get_explainer("shap")
