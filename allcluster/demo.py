"""``allcluster demo``: the whole foundation path on SYNTHETIC images, with no data and no downloads.

Generates a small synthetic 4-class smear-like image set (it is synthetic: it shows the pipeline
works, it says nothing medical), indexes it, trains ALL-Net for a few epochs as a Ray Train run on a
local Ray (CPU), and prints the metrics and where everything was written.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

# The embedded default; configs/demo.yaml is the same config as a file (a test keeps them equal).
DEMO_CONFIG = {
    "name": "demo",
    "output_dir": "runs/demo/train",
    "data": {"manifest": "runs/demo/manifest.parquet", "image_size": 64, "loader_workers": 0},
    "model": {"backbone": "allnet", "pretrained": False},
    "augment": {"name": "classic"},
    "optim": {"name": "adam", "lr": 0.002, "weight_decay": 0.0},
    "schedule": {"name": "cosine", "warmup_epochs": 1},
    "finetune": {"head_epochs": 0, "unfreeze_blocks": -1},
    "fit": {"epochs": 30, "batch_size": 32, "label_smoothing": 0.1, "early_stopping_patience": 0},
    "resources": {"num_workers": 1, "cpus_per_worker": 1.0},
}
SYNTHETIC = {"n_per_class": 150, "size": 64, "seed": 0}


def demo_config(out: Path, overrides: list[str] = ()):
    """The demo's TrainConfig with its paths moved under ``out``."""
    from allcluster.config import apply_overrides, from_dict
    from allcluster.train.config import TrainConfig, resolve

    data = json.loads(json.dumps(DEMO_CONFIG))
    data["output_dir"] = str(out / "train")
    data["data"]["manifest"] = str(out / "manifest.parquet")
    data = apply_overrides(data, overrides, TrainConfig)
    return resolve(from_dict(TrainConfig, data, "demo config"), "demo config")


def run_demo(out: Path, overrides: list[str] = ()) -> dict:
    """Generate -> index -> train; prints a summary and returns the final metrics."""
    from allcluster.config import ConfigError, from_dict
    from allcluster.data.manifest import IndexConfig, format_summary, run_index
    from allcluster.data.synthetic import generate
    from allcluster.train.ray_train import check_resumable, run_training

    start = time.time()
    out = out.resolve()
    cfg = demo_config(out, overrides)       # a bad --set, or one an earlier demo in --out was not trained
    try:                                    # with, is refused before a single image is made
        check_resumable(cfg)
    except ConfigError as err:
        raise ConfigError(f"{err}. For the demo: give it another --out, e.g. --out {out}-2") from None
    print("allcluster demo: these images are SYNTHETIC (generated smear-like cells); the numbers below "
          "show the pipeline works and mean nothing medically.\n")
    images = generate(out / "synthetic", **SYNTHETIC)
    print(f"[demo] generated {4 * SYNTHETIC['n_per_class']} synthetic images in {images}")
    index_cfg = from_dict(IndexConfig, {"source": str(images), "out": str(out / "manifest.parquet")})
    _, summary = run_index(index_cfg)
    print(format_summary(summary))

    final = run_training(cfg)
    card = final["model_card"]
    test = card.test_metrics
    print("\n[demo] test split (synthetic, evaluated once with the best-validation weights):")
    print(f"  accuracy {test.get('accuracy', float('nan')):.3f}  macro-F1 {test.get('macro_f1', float('nan')):.3f}  "
          f"AUC {test.get('auc', float('nan')):.3f}  ECE {test.get('ece', float('nan')):.3f} -> "
          f"{card.metrics.get('test_ece_calibrated', float('nan')):.3f} after temperature "
          f"{card.temperature:.2f}")
    print("  per class F1: " + ", ".join(f"{c} {m['f1']:.2f}" for c, m in test.get("per_class", {}).items()))
    print(f"\n[demo] outputs under {out}:")
    for path, what in [("manifest.parquet", "manifest (one row per image, with splits)"),
                       ("train/config.yaml", "resolved training config"),
                       ("train/metrics.parquet", "per-epoch metrics"),
                       ("train/model/model_card.json", "exported best model: card"),
                       ("train/model/weights.safetensors", "exported best model: weights")]:
        print(f"  {out / path}  ({what})")
    print(f"[demo] done in {time.time() - start:.0f} s")
    return final
