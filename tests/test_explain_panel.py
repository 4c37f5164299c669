"""`allcluster explain` library: one PNG panel per image, every method, calibrated prediction, bad files
as error rows. Real ALL images, an untrained 64 px ALL-Net model dir (tests/conftest.py)."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allcluster.data.paths import to_text
from allcluster.xai import EXPLAINERS
from allcluster.explain.panel import explain_images, format_results

METHODS = ("gradcam", "gradcam++", "scorecam", "lime")
CLASSES = ["Benign", "Early", "Pre", "Pro"]


def _first_jpeg(real_data_dir: Path, label: str) -> Path:
    return sorted((real_data_dir / label).glob("*.jpg"))[0]


def _same_stem_pair(real_data_dir: Path, root: Path) -> list[Path]:
    """Two different real images, both named cell.jpg, in two folders."""
    pair = []
    for folder, label in (("a", "Pre"), ("b", "Benign")):
        (root / folder).mkdir(parents=True)
        pair.append(Path(shutil.copy(_first_jpeg(real_data_dir, label), root / folder / "cell.jpg")))
    return pair


def _aspect(path: str) -> float:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.width / im.height


def test_explain_writes_one_panel_per_image_with_every_method(tiny_model_dir, real_data_dir, tmp_path):
    images = _same_stem_pair(real_data_dir, tmp_path / "in")
    before = sorted(p for p in (tmp_path / "in").rglob("*"))
    out = tmp_path / "out"
    results = explain_images(tiny_model_dir, images, out, methods=METHODS, device="cpu", lime_samples=50)

    assert [r["image"] for r in results] == [str(p) for p in images]
    for row, image in zip(results, images):
        assert row["status"] == "ok" and row["error"] == "", row
        assert row["predicted_class"] in CLASSES
        assert 0.0 <= row["confidence"] <= 1.0
        panel = Path(row["panel"])
        assert panel.parent == out and panel.is_file()
        digest = hashlib.sha256(image.read_bytes()).hexdigest()[:8]
        assert panel.name == f"cell-{digest}.explain.png"
    assert len({r["panel"] for r in results}) == 2, "equal stems from different folders must not collide"
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(r["panel"]).name for r in results)
    assert sorted(p for p in (tmp_path / "in").rglob("*")) == before, "nothing may be written next to the inputs"

    # image + 4 methods + LIME's positive-only view = 6 square axes side by side; with one method, 2
    one = explain_images(tiny_model_dir, images[:1], tmp_path / "one", methods=("gradcam",), device="cpu")
    wide, narrow = _aspect(results[0]["panel"]), _aspect(one[0]["panel"])
    assert wide > 3 and narrow > 1
    assert wide / narrow == pytest.approx(6 / 2, rel=0.02)


def test_panel_overlays_a_heatmap_on_the_image(tiny_model_dir, real_data_dir, tmp_path):
    # the method axis shows the same image tinted by the jet heatmap: it differs from the plain axis
    image = _first_jpeg(real_data_dir, "Pro")
    [row] = explain_images(tiny_model_dir, [image], tmp_path, methods=("gradcam",), device="cpu")
    with Image.open(row["panel"]) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    middle = pixels[pixels.shape[0] // 2 + 10]                # a row through both axes, below the titles
    left, right = middle[: len(middle) // 2], middle[len(middle) // 2:]
    assert (left < 250).any() and (right < 250).any(), "both axes must show pixels, not blank space"
    assert np.abs(np.sort(left.sum(1)) - np.sort(right.sum(1))).mean() > 20


def test_confidence_is_the_temperature_calibrated_probability(tiny_model_dir, real_data_dir, tmp_path):
    from allcluster.data.decode import load
    from allcluster.data.normalize import Normalize
    from allcluster.data.preprocess import Preprocess
    from allcluster.models.model_dir import load_model_dir

    images = [_first_jpeg(real_data_dir, label) for label in CLASSES]
    results = explain_images(tiny_model_dir, images, tmp_path, methods=("gradcam",), device="cpu")

    loaded = load_model_dir(tiny_model_dir)
    card = loaded.card
    assert loaded.temperature == 1.5
    prep = Preprocess(card.input_size, card.roi_crop, card.roi_margin)
    batch = torch.from_numpy(np.stack([prep(load(p).array) for p in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = loaded.model(Normalize(tuple(card.mean), tuple(card.std))(batch))
    calibrated, raw = torch.softmax(logits / 1.5, 1), torch.softmax(logits, 1)
    for row, cal, unc in zip(results, calibrated, raw):
        assert row["predicted_class"] == CLASSES[int(cal.argmax())]
        assert row["confidence"] == pytest.approx(float(cal.max()), abs=1e-5)
        assert abs(row["confidence"] - float(unc.max())) > 1e-4   # temperature was applied


def test_corrupt_image_gets_error_result_and_others_still_explained(tiny_model_dir, real_data_dir, tmp_path):
    good = _first_jpeg(real_data_dir, "Early")
    data = good.read_bytes()
    broken = tmp_path / "in" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(data[: len(data) // 2])
    missing = tmp_path / "in" / "missing.jpg"
    out = tmp_path / "out"

    results = explain_images(tiny_model_dir, [broken, good, missing], out, methods=("gradcam", "lime"),
                             device="cpu", lime_samples=50)

    bad, ok, gone = results
    assert bad["status"] == "error" and bad["panel"] == "" and bad["predicted_class"] == ""
    assert "broken.jpg" in bad["error"] and "truncated" in bad["error"]
    assert gone["status"] == "error" and "missing.jpg" in gone["error"]
    assert ok["status"] == "ok" and Path(ok["panel"]).is_file() and ok["image"] == str(good)
    assert [p.name for p in out.iterdir()] == [Path(ok["panel"]).name]

    lines = format_results(results).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("error") and "broken.jpg" in lines[0]
    assert lines[1].startswith("ok") and ok["predicted_class"] in lines[1] and ok["panel"] in lines[1]
    assert lines[2].startswith("error") and "missing.jpg" in lines[2]


def test_unknown_method_is_refused_with_the_registered_names(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        explain_images(tiny_model_dir, [tmp_path / "x.jpg"], out, methods=("gradcam", "shap"))
    message = str(info.value)
    assert "'shap'" in message
    assert all(name in message for name in EXPLAINERS)
    assert not out.exists(), "refused before doing any work"
    # checked before the model is even loaded
    with pytest.raises(ValueError, match="registered"):
        explain_images(tmp_path / "no-model", [], out, methods="gradcam,nope")


def test_explain_command_prints_one_line_per_image_and_fails_on_a_bad_one(tiny_model_dir, real_data_dir, tmp_path,
                                                                         capsys):
    from allcluster.cli import main

    good = tmp_path / os.fsdecode(b"latin\xe9 \xff.jpg")      # a name that is not UTF-8 is drawn and printed
    good.write_bytes(sorted((real_data_dir / "Pro").glob("*.jpg"))[0].read_bytes())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:500])
    args = ["explain", str(good), "--model", str(tiny_model_dir), "--out", str(tmp_path / "panels"),
            "--methods", "gradcam,gradcam++"]
    assert main(args) == 0
    assert len(list((tmp_path / "panels").glob("*.explain.png"))) == 1
    assert to_text(good) in capsys.readouterr().out
    assert main(args[:1] + [str(broken)] + args[1:]) == 1
    assert str(broken) in capsys.readouterr().out
    assert main(args[:-1] + ["gradcam,shap"]) == 2 and "shap" in capsys.readouterr().err


@pytest.mark.parametrize("samples", ["0", "-5", "9"])
def test_explain_command_refuses_too_few_lime_samples_before_any_work(tiny_model_dir, real_data_dir, tmp_path,
                                                                      capsys, samples):
    from allcluster.cli import main

    out = tmp_path / "panels"
    code = main(["explain", str(_first_jpeg(real_data_dir, "Pro")), "--model", str(tiny_model_dir),
                 "--out", str(out), "--methods", "lime", "--lime-samples", samples])
    err = capsys.readouterr().err
    assert code == 2 and "--lime-samples" in err and ">= 10" in err and "Traceback" not in err
    assert not out.exists(), "refused before any work"


def test_explain_command_refuses_an_out_that_is_a_file(tiny_model_dir, real_data_dir, tmp_path, capsys):
    from allcluster.cli import main

    image = str(_first_jpeg(real_data_dir, "Pro"))
    taken = tmp_path / "panels.png"
    taken.write_bytes(b"not a folder")
    for out in (taken, taken / "sub"):
        for source in (["--model", str(tiny_model_dir)], ["--scores", str(tmp_path / "no-scores")]):
            assert main(["explain", image, *source, "--out", str(out), "--methods", "gradcam"]) == 2
            err = capsys.readouterr().err
            assert "--out" in err and str(taken) in err and "Traceback" not in err
    assert taken.read_bytes() == b"not a folder"


def test_explain_refuses_a_read_only_out_and_stops_with_74_on_a_full_disk(tiny_model_dir, real_data_dir, tmp_path,
                                                                           capsys):
    """A read-only --out was a traceback (exit 1); a full disk made every image a write_failed error, as
    if the images were at fault (exit 1), where score and report stop with 74."""
    from allcluster.cli import main
    from conftest import tmpfs

    image = str(_first_jpeg(real_data_dir, "Pro"))
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        assert main(["explain", image, "--model", str(tiny_model_dir), "--out", str(mount / "panels")]) == 2
        assert f"--out {mount / 'panels'}: cannot write into this folder" in capsys.readouterr().err
    with tmpfs(tmp_path / "full", "size=4k") as mount:
        (mount / "filler").write_bytes(b"x" * 4096)                  # the disk is full
        assert main(["explain", image, "--model", str(tiny_model_dir), "--out", str(mount),
                     "--methods", "gradcam"]) == 74
        err = capsys.readouterr().err
        assert f"error: {mount}/" in err and ".explain.png: No space left on device" in err, err


def test_a_model_card_with_an_unknown_backbone_is_refused_naming_it(tiny_model_dir, real_data_dir, tmp_path, capsys):
    import json

    from allcluster.cli import main

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    card = json.loads((model / "model_card.json").read_text())
    (model / "model_card.json").write_text(json.dumps({**card, "backbone": "tomorrows_net"}))
    code = main(["explain", str(_first_jpeg(real_data_dir, "Pro")), "--model", str(model),
                 "--out", str(tmp_path / "panels"), "--methods", "gradcam"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(model) in err and "'tomorrows_net'" in err and "allnet" in err and "resnet50" in err


def test_cam_on_a_head_with_hidden_layers_is_refused_before_any_image_is_explained(tiny_model_dir, real_data_dir,
                                                                                  tmp_path, monkeypatch):
    import allcluster.explain.panel as panel

    loaded, load = [], panel._load
    monkeypatch.setattr(panel, "_load", lambda path, preprocess: loaded.append(path) or load(path, preprocess))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="CAM needs a head with no hidden layer"):
        explain_images(tiny_model_dir, [_first_jpeg(real_data_dir, "Pro")], out, methods=("gradcam", "cam"),
                       device="cpu")
    assert loaded == [] and not out.exists(), "refused before any work"
