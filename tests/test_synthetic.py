"""The synthetic smear-like image generator: layout, determinism, sane images, learnable classes."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from allcluster.data.synthetic import CLASSES, generate, render_cell


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _colour_histogram(image: np.ndarray) -> np.ndarray:
    """A 4x4x4-bin RGB histogram (square-rooted shares): no position, no shape, just colour."""
    q = image.astype(np.int64) // 64
    counts = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64)
    return np.sqrt(counts / counts.sum())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "set", n_per_class=6, size=48, seed=3)


@pytest.fixture(scope="module")
def separability_set(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("separability"), n_per_class=60, size=48, seed=11)


def test_generate_writes_one_folder_per_class_with_the_requested_count(small_set):
    assert small_set.is_dir()
    assert sorted(p.name for p in small_set.iterdir()) == sorted(CLASSES)
    for cls in CLASSES:
        files = sorted((small_set / cls).iterdir())
        assert [f.name for f in files] == [f"synthetic-{cls.lower()}-{i:04d}.jpg" for i in range(6)]


def test_generate_returns_the_output_folder_and_accepts_strings(tmp_path):
    out = generate(str(tmp_path / "as-string"), n_per_class=1, size=32, seed=0)
    assert Path(out) == tmp_path / "as-string"
    assert all((Path(out) / cls / f"synthetic-{cls.lower()}-0000.jpg").is_file() for cls in CLASSES)


def test_files_are_jpegs_that_decode_to_the_requested_size(small_set):
    for path in small_set.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.size == (48, 48) and image.mode == "RGB"


def test_png_format_is_supported_and_unknown_formats_are_refused(tmp_path):
    generate(tmp_path / "png", n_per_class=1, size=24, seed=0, fmt="png")
    with Image.open(tmp_path / "png" / "Pro" / "synthetic-pro-0000.png") as image:
        assert image.format == "PNG" and image.size == (24, 24)
    with pytest.raises(ValueError, match="fmt"):
        generate(tmp_path / "gif", n_per_class=1, size=24, fmt="gif")


def test_same_seed_writes_byte_identical_files(small_set, tmp_path):
    again = generate(tmp_path / "again", n_per_class=6, size=48, seed=3)
    assert _tree_digest(again) == _tree_digest(small_set)


def test_different_seed_writes_different_images(small_set, tmp_path):
    other = _tree_digest(generate(tmp_path / "other", n_per_class=6, size=48, seed=4))
    assert other.keys() == _tree_digest(small_set).keys()
    assert not set(other.values()) & set(_tree_digest(small_set).values())


def test_render_cell_is_deterministic_given_the_generator_state():
    for cls in CLASSES:
        a = render_cell(np.random.default_rng(5), cls, 40)
        b = render_cell(np.random.default_rng(5), cls, 40)
        assert a.dtype == np.uint8 and a.shape == (40, 40, 3)
        np.testing.assert_array_equal(a, b)


def test_render_cell_rejects_unknown_classes_and_tiny_sizes():
    with pytest.raises(ValueError, match="class"):
        render_cell(np.random.default_rng(0), "Mature", 32)
    with pytest.raises(ValueError, match="size"):
        render_cell(np.random.default_rng(0), "Pro", 4)


@pytest.mark.parametrize("size", [16, 64, 224])
def test_render_cell_works_across_sizes(size):
    image = render_cell(np.random.default_rng(1), "Pre", size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_images_are_not_blank_and_look_like_a_stained_smear(small_set):
    for path in small_set.rglob("*.jpg"):
        image = _load(path).astype(np.float64)
        assert image.std() > 15, f"{path.name} is nearly blank"
        # a bright background and a strongly stained (green-absorbing), blue-violet nucleus
        assert np.percentile(image.mean(axis=2), 75) > 170
        green = image[..., 1]
        nucleus = image[green < 0.5 * np.percentile(green, 90)]
        assert len(nucleus) > 20, f"{path.name} has no stained nucleus"
        assert nucleus[:, 2].mean() > nucleus[:, 1].mean() + 60, f"{path.name}: nucleus is not blue-violet"


def test_no_two_images_of_a_class_are_identical(separability_set):
    for cls in CLASSES:
        digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (separability_set / cls).iterdir()]
        assert len(set(digests)) == len(digests)
        pixels = np.stack([_load(p) for p in sorted((separability_set / cls).iterdir())[:10]]).astype(np.int16)
        for i in range(len(pixels)):
            for j in range(i + 1, len(pixels)):
                assert np.abs(pixels[i] - pixels[j]).mean() > 3, f"{cls} images {i} and {j} nearly equal"


def _dataset(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hists, means, labels = [], [], []
    for k, cls in enumerate(CLASSES):
        for path in sorted((root / cls).iterdir()):
            image = _load(path)
            hists.append(_colour_histogram(image))
            means.append(image.reshape(-1, 3).mean(axis=0))
            labels.append(k)
    return np.array(hists), np.array(means), np.array(labels)


def test_classes_are_learnable_from_colour_alone_on_held_out_images(separability_set):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, _, y = _dataset(separability_set)
    held_out = np.arange(len(y)) % 3 == 0
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    accuracy = model.fit(x[~held_out], y[~held_out]).score(x[held_out], y[held_out])
    assert accuracy > 0.6, f"held-out accuracy {accuracy:.2f}; chance is 0.25"


def test_classes_are_not_separated_by_the_mean_colour_alone(separability_set):
    """Stain and illumination jitter make the whole-image mean colour a weak cue on its own."""
    from sklearn.neighbors import NearestCentroid

    _, x, y = _dataset(separability_set)
    held_out = np.arange(len(y)) % 3 == 0
    accuracy = NearestCentroid().fit(x[~held_out], y[~held_out]).score(x[held_out], y[held_out])
    assert accuracy < 0.9, f"mean colour alone separates the classes ({accuracy:.2f}): too trivial"
