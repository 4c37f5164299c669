"""The backbone registry: every entry builds, resolves its CAM layer; ALL-Net is exactly paper 000's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from allcluster.models import REGISTRY, HeadSpec, WeightsNotFoundError, build_model, resolve_module
from allcluster.models.classifier import check_weights_available
from allcluster.models.registry import get_spec

# Small inputs that every network accepts (Inception-style stems need more than 75 px).
SMALL_INPUT = {"inception_v3": 107, "inception_resnet_v2": 107, "legacy_xception": 71, "nasnetalarge": 99}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registry_entry_builds_and_its_cam_layer_resolves(name):
    spec = get_spec(name)
    assert spec.input_size >= 64 and len(spec.mean) == 3 and len(spec.std) == 3
    model = build_model(name, num_classes=4, pretrained=False).eval()
    layer = resolve_module(model, spec.cam_layer)
    seen = {}
    hook = layer.register_forward_hook(lambda module, inputs, output: seen.setdefault("map", output))
    size = SMALL_INPUT.get(name, 64)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size))
        features = model.forward_features(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 4)
    cam_map = seen["map"]
    assert cam_map.ndim == 4, f"{spec.cam_layer} must output a spatial map"
    # The CAM layer feeds the head: same channels as the features the head pools.
    assert cam_map.shape[1] == features.shape[1] == model.backbone.num_features
    # Every trainable parameter gets a gradient: one that forward never uses (a timm head layer the
    # classifier skips) would make DDP fail on its second step and count as an unfrozen "block".
    hook.remove()                 # it returns the first map, which would stand in for later outputs
    model.train().set_trainable(-1)
    model(torch.randn(2, 3, size, size)).sum().backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_allnet_matches_the_keras_summary_of_paper_000():
    model = build_model("allnet", num_classes=4)
    assert sum(p.numel() for p in model.parameters()) == 787_268
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    dense = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert [d.out_features for d in dense] == [256, 512, 1024, 4]
    seen = []
    for conv in convs:
        conv.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
    model(torch.zeros(1, 3, 224, 224))
    assert seen == [(32, 222, 222), (64, 109, 109), (128, 52, 52)]


def test_head_is_gap_dropout_dense_dropout_classes():
    model = build_model("test_efficientnet", 5, HeadSpec(hidden=(64,), dropout=0.3, hidden_dropout=0.4))
    layers = list(model.head.mlp)
    assert isinstance(layers[1], nn.Dropout) and layers[1].p == 0.3
    assert isinstance(layers[2], nn.Linear) and layers[2].out_features == 64
    assert isinstance(layers[-1], nn.Dropout) and layers[-1].p == 0.4
    assert model.head.fc.out_features == 5


def test_two_stage_finetuning_freezes_then_unfreezes_the_last_blocks():
    model = build_model("resnet18", 4)
    head_only = model.set_trainable(0)
    assert head_only == sum(p.numel() for p in model.head.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    last_two = model.set_trainable(2)
    expected = head_only + sum(p.numel() for n in ("layer3", "layer4") for p in getattr(model.backbone, n).parameters())
    assert last_two == expected
    assert not model.backbone.conv1.weight.requires_grad and model.backbone.layer4[0].conv1.weight.requires_grad
    assert model.set_trainable(-1) == sum(p.numel() for p in model.parameters())


def test_frozen_blocks_keep_batchnorm_statistics_in_training_mode():
    model = build_model("resnet18", 4)
    model.set_trainable(1)
    model.train()
    assert not model.backbone.bn1.training and model.backbone.layer4[0].bn1.training
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(before, model.backbone.bn1.running_mean)


def test_weights_load_from_a_local_file(tmp_path):
    source = build_model("test_efficientnet", 4)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = build_model("test_efficientnet", 4, weights=str(tmp_path / "w.safetensors"))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(value, loaded.backbone.state_dict()[key]), key
    allnet = build_model("allnet", 4)
    torch.save(allnet.backbone.state_dict(), tmp_path / "allnet.pth")
    again = build_model("allnet", 4, weights=str(tmp_path / "allnet.pth"))
    assert torch.equal(again.backbone.features.conv1.weight, allnet.backbone.features.conv1.weight)


def test_a_weights_file_is_loaded_whole_or_refused_naming_it_never_half_loaded(tmp_path):
    """timm loads a ``pretrained_cfg`` file without ``strict``: a file of another network left the
    backbone random while the card said its weights came from the file. Every tensor is checked."""
    import timm
    from safetensors.torch import save_file

    from allcluster.models.pretrained import WeightsConversionError

    whole = timm.create_model("test_efficientnet", num_classes=1000)          # with its ImageNet classifier
    torch.save(whole.state_dict(), tmp_path / "whole.pth")
    loaded = build_model("test_efficientnet", 4, weights=str(tmp_path / "whole.pth"))
    assert torch.equal(loaded.backbone.conv_stem.weight, whole.conv_stem.weight)
    assert loaded.weights_source["source"] == "file"
    exported = build_model("test_efficientnet", 4)                            # an allcluster model's file
    save_file({k: v.contiguous() for k, v in exported.state_dict().items()}, tmp_path / "weights.safetensors")
    again = build_model("test_efficientnet", 4, weights=str(tmp_path / "weights.safetensors"))
    assert torch.equal(again.backbone.conv_stem.weight, exported.backbone.conv_stem.weight)

    torch.save(build_model("allnet", 4).backbone.state_dict(), tmp_path / "allnet.pth")
    renamed = {f"encoder.{k}": v for k, v in whole.state_dict().items()}
    torch.save(renamed, tmp_path / "encoder.pth")
    for name in ("allnet.pth", "encoder.pth"):
        with pytest.raises(WeightsConversionError, match=rf"model\.weights: .*{name} does not fit backbone "
                                                          r"test_efficientnet: \d+ tensor\(s\) do not map"):
            build_model("test_efficientnet", 4, weights=str(tmp_path / name))


def test_missing_weight_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"model\.weights: .*nope\.pth does not exist") as err:
        build_model("resnet50", 4, weights=str(tmp_path / "nope.pth"))
    assert "weights fetch" not in str(err.value), "a file of the user's own: no hub to fetch it from"


def test_a_weights_file_that_is_no_state_dict_is_refused_naming_the_key_and_file(tmp_path):
    """An empty, truncated or foreign file was a loader's traceback (KeyError, EOFError, SafetensorError)
    and exit 1, also from the drivers' --check the Slurm scripts rely on (exit 2 there)."""
    from allcluster.config import ConfigError

    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("hello")
    (tmp_path / "text.safetensors").write_text("hello")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "checkpoint.pth")
    (tmp_path / "folder").mkdir()
    for name, says in [("empty.pth", "is not a readable"), ("text.pth", "is not a readable"),
                       ("text.safetensors", "is not a readable"), ("checkpoint.pth", "holds no state dict of tensors \\(keys epoch"),
                       ("folder", "is a folder; give the weights file")]:
        with pytest.raises(ConfigError, match=rf"model\.weights: .*{name} {says}"):
            build_model("allnet", 4, weights=str(tmp_path / name))
    with pytest.raises(ConfigError, match="model.pretrained: backbone allnet has no public pretrained weights"):
        check_weights_available(get_spec("allnet"), pretrained=True)


def test_pretrained_weights_absent_from_the_offline_cache_say_how_to_prestage(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    for name in ("densenet121", "legacy_xception"):    # an HF-hosted and a URL-hosted checkpoint
        with pytest.raises(WeightsNotFoundError) as err:
            build_model(name, 4, pretrained=True)
        assert f"allcluster weights fetch {name}" in str(err.value)


def test_unknown_backbone_lists_the_registry():
    with pytest.raises(KeyError, match="registered: .*allnet.*densenet121"):
        get_spec("resnet9000")


def test_model_card_round_trips_and_bad_cards_name_the_file(tiny_model_dir, tmp_path):
    import json

    from allcluster.models.card import CARD_FILE, CardError, ModelCard

    card = ModelCard.read(tiny_model_dir)
    assert card.classes == ["Benign", "Early", "Pre", "Pro"] and card.input_size == 64 and card.temperature == 1.5
    assert card.preprocess().size == 64 and card.head_spec().hidden == (32,)
    copy = tmp_path / "copy"
    card.replace(sweep={"trial_id": "t"}).write(copy)
    assert ModelCard.read(copy) == card.replace(sweep={"trial_id": "t"})
    data = json.loads((tiny_model_dir / CARD_FILE).read_text())
    for broken, message in [({k: v for k, v in data.items() if k != "cam_layer"}, "missing cam_layer"),
                            ({**data, "format_version": 99}, "newer than this allcluster reads"),
                            ({**data, "mean": [0.5]}, "3-value mean/std")]:
        (copy / CARD_FILE).write_text(json.dumps(broken))
        with pytest.raises(CardError, match=message) as err:
            ModelCard.read(copy)
        assert str(copy / CARD_FILE) in str(err.value)
    (copy / CARD_FILE).write_text(json.dumps({**data, "added_by_a_newer_minor_version": 1}))
    assert ModelCard.read(copy).backbone == "allnet"
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        ModelCard.read(tmp_path)


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet); its stdout."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_allnet_model_loads_without_importing_timm_and_the_registry_still_lists_every_backbone(tiny_model_dir):
    # A scoring replica of an ALL-Net model must not pay timm's import (torchvision, torch._dynamo).
    out = _fresh_python(
        "import sys, torch\n"
        "from allcluster.models.model_dir import load_model_dir\n"
        f"load_model_dir({str(tiny_model_dir)!r}, torch.device('cpu'))\n"
        "print('timm' in sys.modules)\n"
        "from allcluster.models.registry import REGISTRY, get_spec\n"
        "print('resnet18' in REGISTRY, len(REGISTRY), get_spec('efficientnet_lite0').input_size, 'timm' in sys.modules)\n")
    assert out.split() == ["False", "True", str(len(REGISTRY)), "224", "True"]
    assert len(REGISTRY) > 20 and "allnet" in REGISTRY


def test_provenance_versions_are_the_packages_own_without_importing_them():
    import timm

    from allcluster.models.card import versions

    found = versions()
    assert found["torch"] == torch.__version__ and found["timm"] == timm.__version__
    assert _fresh_python("import sys\nfrom allcluster.models.card import versions\nversions()\n"
                         "print('torch' in sys.modules, 'timm' in sys.modules)").split() == ["False", "False"]


def test_an_export_killed_between_its_renames_leaves_nothing_behind_once_rerun(tmp_path):
    from allcluster.models.model_dir import export_untrained, load_model_dir

    out = tmp_path / "run" / "model"
    export_untrained(out, "allnet", ["A", "B"], input_size=64)
    for leftover in ("model.tmp-4194303", "model.old-4194303"):       # SIGKILL between the renames
        (out.parent / leftover).mkdir()
        (out.parent / leftover / "weights.safetensors").write_bytes(bytes(1024))
    export_untrained(out, "allnet", ["A", "B"], input_size=64)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]
    assert load_model_dir(out).card.classes == ["A", "B"]
