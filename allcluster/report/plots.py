"""The report's figures: one short function per PNG (matplotlib ``Figure``, Agg; no pyplot state).

Each function takes plain arrays or DataFrames (from :mod:`allcluster.report.tables`) and writes one
file, returning its path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from allcluster.atomic import atomic_write
from allcluster import metrics
from allcluster.report.tables import roc_curve

DPI = 100
HEAT_ALPHA = 0.5


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG atomically (a reader never sees half a file)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))


def confusion_plot(cm: np.ndarray, classes: list[str], path: Path) -> Path:
    """Counts, rows = true class, columns = predicted class."""
    fig = Figure(figsize=(1.2 * len(classes) + 2, 1.1 * len(classes) + 1.5))
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues")
    for (i, j), value in np.ndenumerate(cm):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({int(cm.sum())} labelled images)")
    fig.colorbar(image, ax=ax)
    return save(fig, path)


def roc_plot(y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path) -> Path:
    """One-vs-rest ROC curve per class (classes without positives or negatives are left out)."""
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    auc = metrics.roc_auc_ovr(y, probs)
    for k, name in enumerate(classes):
        if np.isfinite(auc[k]):
            fpr, tpr = roc_curve(y == k, probs[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc[k]:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC per class (one vs rest, calibrated probabilities)")
    if np.isfinite(auc).any():          # none: labels of one class only, no curve to name
        ax.legend(loc="lower right", fontsize=8)
    return save(fig, path)


def reliability_plot(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, path: Path) -> Path:
    """Top-label reliability diagram before (raw softmax) and after temperature calibration."""
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    for name, probs, marker in (("before", raw, "o-"), ("after", calibrated, "s-")):
        bins = metrics.reliability_bins(probs, y)
        ece = metrics.expected_calibration_error(probs, y)
        ax.plot(bins["confidence"], bins["accuracy"], marker, label=f"{name} calibration (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence (15 bins)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability")
    ax.legend(loc="upper left", fontsize=8)
    return save(fig, path)


def metric_heatmap(table: pd.DataFrame, metric: str, path: Path, index: str = "backbone",
                   across: str = "augmentation") -> Path:
    """A pivot (``index`` rows x one column per ``across`` value) as a colour grid, values written in."""
    values = table.drop(columns=[index]).to_numpy(dtype=np.float64)
    rows, cols = table[index].astype(str).tolist(), [str(c) for c in table.columns if c != index]
    fig = Figure(figsize=(1.4 * len(cols) + 3, 0.6 * len(rows) + 2))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        dark = np.isnan(value) or value < np.nanmean(values)
        ax.text(j, i, "-" if np.isnan(value) else f"{value:.3f}", ha="center", va="center",
                color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(f"{metric} ({index} x {across}; best trial of each cell by validation)")
    fig.colorbar(image, ax=ax)
    return save(fig, path)


def training_curves(epochs: pd.DataFrame, trials: pd.DataFrame, path: Path) -> Path:
    """Loss (train and validation) and validation macro-F1 per epoch of ``trials`` (``experiment``,
    ``trial_id``; the sweep's folder name is shown when they come from several)."""
    fig = Figure(figsize=(11, 4))
    loss_ax, f1_ax = fig.subplots(1, 2)
    several = trials["experiment"].nunique() > 1
    for experiment, trial_id in trials[["experiment", "trial_id"]].itertuples(index=False):
        name = f"{Path(experiment).name}/{trial_id}" if several else trial_id
        mine = (epochs["experiment"] == experiment) & (epochs["trial_id"] == trial_id)
        history = epochs[mine].sort_values("epoch")
        line, = loss_ax.plot(history["epoch"], history["train_loss"], "--", label=f"{name} train")
        loss_ax.plot(history["epoch"], history["val_loss"], "-", color=line.get_color(), label=f"{name} val")
        f1_ax.plot(history["epoch"], history["val_macro_f1"], "o-", color=line.get_color(), label=name)
    loss_ax.set_title("loss")
    f1_ax.set_title("validation macro-F1")
    for ax in (loss_ax, f1_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return save(fig, path)


def f1_bars(f1: dict[str, float], path: Path) -> Path:
    """Per-class F1 (labelled rows)."""
    fig = Figure(figsize=(1.1 * len(f1) + 2, 3.5))
    ax = fig.subplots()
    bars = ax.bar(list(f1), list(f1.values()), color="tab:blue")
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title("F1 per class")
    return save(fig, path)


def overlay(image_path: str, heat: np.ndarray, out_path: Path, roi_crop: bool = False,
            roi_margin: float = 0.1) -> Path:
    """The heatmap (uint8 at the model's input size) in jet at alpha 0.5 over the image (its table
    path, :mod:`allcluster.data.paths`), which is preprocessed as the model saw it (same ROI crop, resized to the heatmap's size); JPEG."""
    from PIL import Image

    from allcluster.data import decode
    from allcluster.data.paths import to_fs
    from allcluster.data.preprocess import Preprocess, decode_preprocessed
    from allcluster.xai.overlay import jet_overlay

    data = decode.read_any(to_fs(image_path))[0]
    _, rgb = decode_preprocessed(data, image_path, Preprocess(heat.shape[0], roi_crop, roi_margin))
    if rgb.shape[:2] != heat.shape:
        rgb = np.asarray(Image.fromarray(rgb).resize(heat.shape[::-1], Image.BILINEAR))
    image = Image.fromarray(jet_overlay(rgb, heat, HEAT_ALPHA))
    return atomic_write(out_path, lambda tmp: image.save(tmp, format="JPEG", quality=88))
