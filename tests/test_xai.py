"""Explainers: the Grad-CAM family equals pytorch-grad-cam; CAM and IG satisfy their definitions."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from allcluster.models import build_model, get_spec, resolve_module
from allcluster.models.registry import HeadSpec
from allcluster.xai import EXPLAINERS, ExplainSettings, get_explainer


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
    ig = get_explainer("ig")(model, layer, ExplainSettings(ig_steps=128))
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


class TopLeftTexture(torch.nn.Module):
    """A 'model' whose class 1 depends only on the texture of the image's top-left quadrant."""
    normalization = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))     # its inputs are the raw 0..1 pixels

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        texture = x[:, :, :h, :w].flatten(1).std(dim=1)
        return torch.stack([torch.zeros_like(texture), 40 * (texture - 0.05)], dim=1)


def _real_image(real_data_dir, size: int = 224) -> np.ndarray:
    from allcluster.data.decode import load
    from allcluster.data.preprocess import resize

    path = sorted((real_data_dir / "Pro").glob("*.jpg"))[0]
    return resize(load(path).array, size).astype(np.float64) / 255.0


def _share_in_top_left(mask: np.ndarray) -> float:
    h, w = mask.shape[0] // 2, mask.shape[1] // 2
    return mask[:h, :w].sum() / max(mask.sum(), 1)


def test_lime_and_the_lime_package_both_find_the_region_the_model_uses(real_data_dir):
    from lime import lime_image

    rgb = _real_image(real_data_dir)
    model = TopLeftTexture()

    def classify(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(batch, dtype=torch.float32).permute(0, 3, 1, 2)
            return torch.softmax(model(x), dim=1).numpy()

    reference = lime_image.LimeImageExplainer(random_state=0).explain_instance(
        rgb, classify, labels=(1,), top_labels=None, num_samples=500, hide_color=None, random_seed=0)
    _, their_mask = reference.get_image_and_mask(1, positive_only=True, num_features=5, hide_rest=False)

    ours = get_explainer("lime")(model, "", ExplainSettings(lime_samples=500))
    image = torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)
    result = ours.explain(image[None], torch.tensor([1]))
    segments, weights = ours.superpixels[0]
    top = [s for s in np.argsort(-weights)[:5] if weights[s] > 0]
    our_mask = np.isin(segments, top)

    assert _share_in_top_left(their_mask) > 0.8, "the lime package should find the top-left region"
    assert _share_in_top_left(our_mask) > 0.8, "our LIME should find the top-left region"
    assert _share_in_top_left(result.maps[0].numpy() > 0.5) > 0.8


def test_lime_is_seeded_and_gives_the_three_views(real_data_dir):
    from allcluster.xai.lime import lime_views

    rgb = _real_image(real_data_dir, 128)
    image = torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None]
    settings = ExplainSettings(lime_samples=200)
    first, second = (get_explainer("lime")(TopLeftTexture(), "", settings) for _ in range(2))
    a, b = first.explain(image, torch.tensor([1])), second.explain(image, torch.tensor([1]))
    assert torch.equal(a.maps, b.maps)
    segments, weights = first.superpixels[0]
    views = lime_views((rgb * 255).astype(np.uint8), segments, weights, top=3)
    assert set(views) == {"positive_only", "hide_rest", "pros_cons"}
    assert all(v.shape == (128, 128, 3) and v.dtype == np.uint8 for v in views.values())
    hidden = views["hide_rest"].sum(axis=2) == 0
    assert 0 < hidden.mean() < 1      # some superpixels shown, the rest blacked out


class NormalisedTopLeftTexture(TopLeftTexture):
    """The same function of the pixels, for inputs normalised with a card's own mean and std."""
    normalization = ((0.6, 0.5, 0.4), (0.2, 0.25, 0.3))

    def forward(self, x):
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in self.normalization)
        return super().forward(x * std + mean)


def test_lime_sees_the_pixels_of_inputs_normalised_with_the_models_own_mean_and_std(real_data_dir, tiny_model_dir,
                                                                                     tmp_path):
    """LIME segments the image in pixel space: an input normalised with the card's mean and std (which
    scoring uses, and which may differ from the backbone registry's) is turned back with those, so the
    superpixels and the map are those of the same model on the raw pixels. A loaded model carries its
    card's values."""
    rgb = _real_image(real_data_dir, 128)
    raw = torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None]
    model = NormalisedTopLeftTexture()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in model.normalization)
    settings = ExplainSettings(lime_samples=100)
    on_raw, on_normalised = get_explainer("lime")(TopLeftTexture(), "", settings), get_explainer("lime")(model, "", settings)
    expected, got = on_raw.explain(raw, torch.tensor([1])), on_normalised.explain((raw - mean) / std, torch.tensor([1]))
    assert np.array_equal(on_raw.superpixels[0][0], on_normalised.superpixels[0][0])
    assert torch.allclose(expected.maps, got.maps, atol=1e-3)

    from allcluster.models.model_dir import load_model_dir

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    card.update(mean=[0.6, 0.5, 0.4], std=[0.2, 0.25, 0.3])
    (tmp_path / "model" / "model_card.json").write_text(json.dumps(card))
    assert load_model_dir(tmp_path / "model").model.normalization == ((0.6, 0.5, 0.4), (0.2, 0.25, 0.3))


def test_weighted_ridge_matches_scikit_learn():
    from sklearn.linear_model import Ridge

    from allcluster.xai.lime import weighted_ridge

    rng = np.random.default_rng(0)
    x, y, w = rng.integers(0, 2, (200, 12)).astype(float), rng.random(200), rng.random(200)
    expected = Ridge(alpha=1.0).fit(x, y, sample_weight=w).coef_
    got = weighted_ridge(torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(w)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-8)


def test_faithfulness_rewards_the_map_that_points_at_what_the_model_uses(real_data_dir):
    from allcluster.xai.faithfulness import faithfulness

    rgb = _real_image(real_data_dir, 64)
    image = torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    right, wrong = torch.zeros(64, 64), torch.zeros(64, 64)
    right[:32, :32] = 1                     # the region TopLeftTexture reads
    wrong[32:, 32:] = 1
    scores = faithfulness(TopLeftTexture(), image, torch.stack([right, wrong]), torch.tensor([1, 1]),
                          fraction=0.25)
    assert scores["drop"][0] > 0.5 > scores["drop"][1]
    assert scores["kept"][0] > scores["kept"][1]
    assert torch.allclose(scores["confidence"][0], scores["confidence"][1])


def test_on_cell_score_is_near_one_for_a_map_on_the_cell_and_near_zero_off_it():
    from allcluster.data.preprocess import cell_mask
    from allcluster.xai.localisation import mass_inside

    size, yy, xx = 96, *np.mgrid[0:96, 0:96]
    image = np.full((size, size, 3), (232, 228, 236), np.uint8)          # bright, unsaturated slide
    on_cell = (yy - 40) ** 2 + (xx - 56) ** 2 < 18 ** 2
    image[on_cell] = (120, 40, 150)                                      # a stained (saturated) cell
    image[(yy - 80) ** 2 + (xx - 12) ** 2 < 3 ** 2] = (200, 120, 160)   # a small stained speck
    mask = cell_mask(image)
    assert (mask == on_cell).mean() > 0.98, "the mask is the cell's filled region, not the speck"

    def blob(cy, cx, r):
        return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))
    maps = np.stack([blob(40, 56, 6), blob(10, 10, 6), np.ones((size, size)), np.zeros((size, size))])
    scores = mass_inside(maps, np.stack([mask] * 4))
    assert scores[0] > 0.95 and scores[1] < 0.05
    assert scores[2] == pytest.approx(mask.mean()), "an even map scores the cell's area share"
    assert np.isnan(scores[3])
    with pytest.raises(ValueError, match="differ in shape"):
        mass_inside(maps, mask)


def test_bench_on_cell_figure_comes_with_its_chance_level(tiny_model_dir, real_data_dir):
    from PIL import Image

    from allcluster.bench.train import on_cell_mean
    from allcluster.data.preprocess import cell_mask, resize

    paths = sorted(str(p) for p in real_data_dir.glob("*/*.jpg"))[::400][:6]
    on_cell, area = on_cell_mean(tiny_model_dir, paths, batch_size=4)
    expected_area = np.mean([cell_mask(resize(np.array(Image.open(p).convert("RGB")), 64)).mean() for p in paths])
    assert area == pytest.approx(expected_area, abs=1e-3) and 0 < area < 0.5
    assert 0 <= on_cell <= 1


def test_every_explainer_is_built_the_same_way_and_input_methods_need_no_layer():
    from allcluster.xai import make_explainer

    model, layer = _model("allnet")
    settings = ExplainSettings(lime_samples=40, ig_steps=4)
    for name, cls in EXPLAINERS.items():
        assert cls.name == name                   # the registry's key is the class's own name
        explainer = make_explainer(name, model, layer, settings)
        assert type(explainer) is cls and explainer.settings is settings
        if not cls.uses_layer:
            assert make_explainer(name, model, "no.such.layer", settings).layer == "input"
    assert make_explainer("lime", model, layer, settings).num_samples == 40
    assert make_explainer("ig", model, layer, settings).steps == 4
    with pytest.raises(Exception, match="no.such.layer"):
        make_explainer("gradcam", model, "no.such.layer")


def test_the_readme_library_example_runs_as_written(tiny_model_dir, capsys):
    from conftest import REPO

    text = (REPO / "README.md").read_text()
    section = text[text.index("### Explainers (library)"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]
    assert '"runs/demo/train/model"' in code
    exec(compile(code.replace('"runs/demo/train/model"', repr(str(tiny_model_dir))), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "torch.Size([2, 4])" in printed and "torch.Size([2, 64, 64])" in printed


def test_bench_reference_loops_predict_every_file_and_the_grad_cam_loop_writes_one_png_each(
        tiny_model_dir, real_data_dir, tmp_path):
    """`allcluster bench score`'s references (the loops it compares the job with) do the work they claim."""
    from PIL import Image

    from allcluster.bench.reference import run
    from allcluster.bench.score import _last_json

    files = [str(p) for p in sorted(next(real_data_dir.iterdir()).glob("*.jpg"))[:5]]
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(files) + "\n")
    assert run("bare", str(tiny_model_dir), str(listing))["images"] == 5
    assert run("gradcam", str(tiny_model_dir), str(listing), str(tmp_path / "maps"))["images"] == 5
    maps = sorted((tmp_path / "maps").glob("*.png"))
    assert len(maps) == 5 and all(Image.open(m).size == (64, 64) for m in maps)
    assert _last_json('[score --dry-run] a line {x}\n{\n  "estimated_total_s": 12.5\n}') == {"estimated_total_s": 12.5}


def _scorecam_maps_all_at_once(model, images, targets, activations, batch_size):
    """Score-CAM as computed before its masks were chunked: every channel of the batch upsampled at once."""
    from allcluster.xai.base import to_input_size

    with torch.no_grad():
        up = torch.nn.functional.interpolate(activations, size=images.shape[-2:], mode="bilinear", align_corners=True)
        lo, hi = up.flatten(2).min(-1).values[..., None, None], up.flatten(2).max(-1).values[..., None, None]
        masks = (up - lo) / (hi - lo + 1e-8)
        scores = torch.stack([torch.cat([model(masks[n, s:s + batch_size, None] * images[n][None])[:, targets[n]]
                                         for s in range(0, masks.shape[1], batch_size)]) for n in range(len(images))])
        weights = torch.softmax(scores.float(), dim=-1)
        return to_input_size((weights[:, :, None, None] * activations).sum(1), tuple(images.shape[-2:]))


def test_scorecam_upsamples_one_image_and_one_chunk_of_channels_at_a_time(monkeypatch):
    # the whole batch's channels at input resolution took ~10-20 GB for 16 images of 224 px
    model, layer = _model("allnet")
    images, targets = _images(3), torch.tensor([0, 2, 3])
    scorecam = get_explainer("scorecam")(model, layer)
    scorecam.batch_size = 8
    with torch.no_grad():
        _, activations = scorecam.forward(images)
    assert activations.shape[1] > 3 * scorecam.batch_size, "a model with many channels"
    expected = _scorecam_maps_all_at_once(model, images, targets, activations, scorecam.batch_size)

    shapes, interpolate = [], torch.nn.functional.interpolate

    def recording(x, *args, **kwargs):
        out = interpolate(x, *args, **kwargs)
        shapes.append(tuple(out.shape))
        return out
    monkeypatch.setattr(torch.nn.functional, "interpolate", recording)
    maps = scorecam.explain(images, targets).maps

    assert (1, scorecam.batch_size, 64, 64) in shapes
    assert max(int(np.prod(s)) for s in shapes) <= scorecam.batch_size * 64 * 64, shapes
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=0)
