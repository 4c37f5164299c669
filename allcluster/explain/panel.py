"""Per-image explanation panels for `allcluster explain`, like the papers' XAI figures.

Each panel is one PNG: the preprocessed image titled with its file name and the calibrated
prediction, then one axis per method with the heatmap (jet, alpha 0.5) over the image, plus LIME's
paper-002 "positive only" view when LIME runs. Panels go only to ``out_dir``, named
``<stem>-<first 8 hex of the file's sha256>.explain.png`` (deterministic; equal stems from
different folders do not collide unless the files are byte-identical, when the panels are too).

With ``--scores OUT`` the panels show the maps a scoring job stored (:func:`explain_from_scores`)
instead of running the model again.

Images are explained in chunks of :data:`CHUNK` (one batched tensor per method and chunk), so memory
stays bounded however many files one call names. A file that cannot be read or decoded becomes an
error result naming it; the other files are still explained.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from allcluster.atomic import atomic_write, is_storage_full
from allcluster.config import ConfigError, from_dict
from allcluster.console import say
from allcluster.data.paths import clean_text, to_text
from allcluster.device import pick_device
from allcluster.locks import check_writable_folder

DEFAULT_METHODS = ("gradcam", "gradcam++", "scorecam", "lime")
CHUNK = 16                 # images per batched explain call
AXIS_INCHES = 2.6          # each axis is square; the panel's width grows with the number of axes
TITLE_INCHES = 0.6         # room above the axes for two-line titles
DPI = 100
HEAT_ALPHA = 0.5
LIME_VIEW_TITLE = "lime (positive only)"


@dataclass
class _Item:
    """One input file: the preprocessed image (or why there is none) and its content digest."""
    path: Path
    rgb: np.ndarray | None = None       # uint8 (S, S, 3) as the model sees it, before normalisation
    sha256: str = ""                    # the file's content digest (hex)
    error: str = ""

    @property
    def digest(self) -> str:
        """The first 8 hex of the sha256, used in panel names."""
        return self.sha256[:8]


def check_methods(methods: str | Iterable[str]) -> list[str]:
    """Method names as a list (a comma-separated string is split), duplicates dropped.

    Raises ``ValueError`` listing the registered explainers for an unknown or empty selection.
    """
    from allcluster.xai import METHOD_NAMES

    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names:
        what = f"unknown method(s) {', '.join(map(repr, unknown))}" if unknown else "no method given"
        raise ValueError(f"{what}; registered: {', '.join(sorted(METHOD_NAMES))}")
    return names


def check_lime_samples(lime_samples: int) -> None:
    """Raise ``ConfigError`` naming ``--lime-samples`` below the bound a scoring config enforces."""
    from allcluster.score.config import ExplainConfig

    from_dict(ExplainConfig, {"lime_samples": lime_samples}, "--lime-samples")


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path; ``ConfigError`` naming ``--out`` when it (or a folder above it) is a file,
    or this user cannot write there (a read-only mount, another user's folder)."""
    out_dir = Path(out_dir)
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "exists" if existing == out_dir else f"{existing} exists"
        raise ConfigError(f"--out {out_dir}: {what} and is not a folder")
    try:
        check_writable_folder(out_dir, readable=False)      # panels are only written there
    except ConfigError as err:
        raise ConfigError(f"--out {err}") from None
    return out_dir


def panel_name(path: str | Path, digest: str) -> str:
    """``<stem>-<digest>.explain.png`` for an image file and the first hex digits of its sha256 (a stem
    that is not UTF-8 in its escaped table form, so every panel's name is text)."""
    return f"{to_text(Path(path).stem)}-{digest}.explain.png"


def _load(path: str | Path, preprocess) -> _Item:
    """Read, decode and preprocess one file; a bad file becomes an item carrying its error."""
    from allcluster.data.decode import DecodeError, read_bytes
    from allcluster.data.preprocess import decode_preprocessed

    path = Path(path)
    try:
        data = read_bytes(path)
        _, rgb = decode_preprocessed(data, str(path), preprocess)     # the pixels scoring gives the model
    except DecodeError as err:
        return _Item(path, error=f"{err.kind}: {err}")
    return _Item(path, rgb=np.ascontiguousarray(rgb), sha256=hashlib.sha256(data).hexdigest())


def _explainers(model: torch.nn.Module, cam_layer: str, methods: Sequence[str], lime_samples: int) -> dict:
    """One explainer instance per method."""
    from allcluster.xai import ExplainSettings, make_explainer

    settings = ExplainSettings(lime_samples=int(lime_samples))
    explainers = {name: make_explainer(name, model, cam_layer, settings) for name in methods}
    if "cam" in explainers:
        explainers["cam"].check_head()      # else refused only after a chunk ran every other method
    return explainers


def _normalised_batch(items: Sequence[_Item], normalize: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Stack the items' uint8 images, move them to ``device`` as uint8, normalise there (NCHW)."""
    stacked = torch.from_numpy(np.stack([item.rgb for item in items]))        # (N, S, S, 3) uint8
    return normalize(stacked.to(device).permute(0, 3, 1, 2))                 # NHWC-strided NCHW view


def _explain_chunk(model, explainers: dict, batch: torch.Tensor, temperature: float) -> dict:
    """Predicted classes, their calibrated probabilities, every method's maps (N, H, W) and LIME's
    superpixels, for one normalised batch."""
    with torch.no_grad():
        logits = model(batch).float()
    targets = logits.argmax(1)
    probs = torch.softmax(logits / temperature, dim=1).gather(1, targets[:, None])[:, 0]
    maps = {name: ex.explain(batch, targets).maps.float().cpu().numpy() for name, ex in explainers.items()}
    lime = explainers.get("lime")
    return {"targets": targets.cpu().tolist(), "probs": probs.cpu().tolist(), "maps": maps,
            "superpixels": lime.superpixels if lime is not None else None}


def _axes_for(item: _Item, index: int, found: dict) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(title, image, heatmap or None) for every method axis of one image's panel."""
    from allcluster.xai.lime import lime_views

    axes = [(name, item.rgb, maps[index]) for name, maps in found["maps"].items()]
    if found["superpixels"] is not None:
        segments, weights = found["superpixels"][index]
        axes.append((LIME_VIEW_TITLE, lime_views(item.rgb, segments, weights)["positive_only"], None))
    return axes


def prediction_title(name: str, class_name: str, probability: float, calibrated: bool = True) -> str:
    """Two-line axis title: the file name, then e.g. ``Pre  p=0.91 (calibrated)``."""
    name = to_text(name)                # a non-UTF-8 name as its escaped table form: matplotlib takes only text
    name = name if len(name) <= 32 else name[:14] + "..." + name[-15:]
    return f"{name}\n{class_name}  p={probability:.2f} ({'calibrated' if calibrated else 'uncalibrated'})"


def draw_panel(out_path: str | Path, title: str, rgb: np.ndarray,
               axes: Sequence[tuple[str, np.ndarray, np.ndarray | None]]) -> Path:
    """Write one PNG: ``rgb`` titled ``title``, then each (title, image, heatmap) side by side, the
    heatmap (values in [0, 1]) overlaid in jet at alpha 0.5. Written atomically (temp file, rename)."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:       # switching an imported pyplot would close its figures
        matplotlib.use("Agg")
    from matplotlib.figure import Figure              # no pyplot: no global state, never displayed

    spec = [(title, rgb, None), *axes]
    fig = Figure(figsize=(AXIS_INCHES * len(spec), AXIS_INCHES + TITLE_INCHES), dpi=DPI)
    for ax, (name, image, heat) in zip(fig.subplots(1, len(spec), squeeze=False)[0], spec):
        ax.imshow(image, interpolation="nearest")
        if heat is not None:
            ax.imshow(heat, cmap="jet", alpha=HEAT_ALPHA, vmin=0.0, vmax=1.0, interpolation="bilinear")
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=AXIS_INCHES / (AXIS_INCHES + TITLE_INCHES),
                        wspace=0.04)
    return atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _result(item: _Item, panel: str = "", class_name: str = "", confidence: float = 0.0, error: str = "") -> dict:
    """The per-image result row (errors carry no panel, no class and confidence 0)."""
    error = error or item.error
    return {"image": to_text(item.path), "panel": panel, "status": "error" if error else "ok",
            "error": clean_text(error) if error else error,
            "predicted_class": class_name, "confidence": float(confidence)}


def _explain_items(loaded, items: list[_Item], explainers: dict, normalize, device, out_dir: Path) -> list[dict]:
    """Explain the decoded items of one chunk and draw their panels; one result per item."""
    found = _explain_chunk(loaded.model, explainers, _normalised_batch(items, normalize, device),
                           loaded.temperature)
    calibrated = True                       # every card carries its fitted temperature (1.0: none fitted)
    results = []
    for index, item in enumerate(items):
        class_name, prob = loaded.classes[found["targets"][index]], found["probs"][index]
        title = prediction_title(item.path.name, class_name, prob, calibrated)
        try:
            panel = draw_panel(out_dir / panel_name(item.path, item.digest), title, item.rgb,
                               _axes_for(item, index, found))
        except OSError as err:
            if is_storage_full(err):            # no image's fault: the command stops (exit 74)
                raise
            results.append(_result(item, class_name=class_name, confidence=prob,
                                   error=f"write_failed: {item.path}: panel not written: {err}"))
            continue
        results.append(_result(item, str(panel), class_name, prob))
    return results


def explain_images(model_dir: str | Path, images: Sequence[str | Path], out_dir: str | Path,
                   methods: str | Iterable[str] = DEFAULT_METHODS, device: str = "auto",
                   lime_samples: int = 1000) -> list[dict]:
    """Explain each image's predicted class with every method and write one PNG panel per image.

    Returns one dict per input, in input order: ``image``, ``panel`` (path, or "" on error),
    ``status`` ("ok"/"error"), ``error`` (naming the file), ``predicted_class`` and ``confidence``
    (the calibrated probability softmax(logits / temperature) of that class; 0 on error).
    Unknown methods, an unavailable device, too few ``lime_samples``, an ``out_dir`` that is a
    file or cannot be written and CAM on a head with hidden layers raise ``ValueError`` before any
    work is done; a full disk while writing a panel raises its ``OSError`` (the CLI: exit 74).
    """
    from allcluster.models.model_dir import load_model_dir

    methods = check_methods(methods)
    check_lime_samples(lime_samples)
    out_dir = check_out_dir(out_dir)
    torch_device = pick_device(device, "--device")
    loaded = load_model_dir(model_dir, torch_device)
    card = loaded.card
    preprocess = card.preprocess()
    normalize = card.normalize().to(torch_device)
    explainers = _explainers(loaded.model, card.cam_layer, methods, lime_samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict] = {}
    paths = list(images)
    for start in range(0, len(paths), CHUNK):
        items = [_load(path, preprocess) for path in paths[start:start + CHUNK]]
        good = [(start + i, item) for i, item in enumerate(items) if item.rgb is not None]
        results.update({start + i: _result(item) for i, item in enumerate(items) if item.rgb is None})
        if good:
            done = _explain_items(loaded, [item for _, item in good], explainers, normalize, torch_device, out_dir)
            results.update({index: row for (index, _), row in zip(good, done)})
    return [results[i] for i in range(len(paths))]


def explain_from_scores(scores: str | Path, images: Sequence[str | Path], out_dir: str | Path,
                        methods: str | Iterable[str] | None = None) -> list[dict]:
    """Panels of each image's *stored* maps in scoring output ``scores`` (no model runs): the image's
    row is found by its content (sha256), its ``heatmap_<m>`` columns give the axes (packed or loose
    maps alike; only ``methods``, if given) and its calibrated prediction the title. Same results as
    :func:`explain_images`; an image the output holds no ok row for is an error naming it.
    ``ValueError`` if ``scores`` is not a scoring output or stores no map of a method asked for."""
    import pyarrow.dataset as pads

    from allcluster.data.preprocess import Preprocess
    from allcluster.models.card import ModelInfo
    from allcluster.score.output import parquet_files, shard_footers
    from allcluster.score.rows import methods_of

    scores, out_dir = Path(scores), check_out_dir(out_dir)
    info = ModelInfo.read(scores)
    shards = parquet_files(scores / "rows")
    if not info.input_size or not shards:
        raise ValueError(f"{scores}: not a scoring output (no model.json and rows/*.parquet)")
    readable, damaged = shard_footers(shards)
    if damaged:                             # a copy cut short: its images are "not scored", said below
        say(f"[explain] {len(damaged)} of {scores}'s row shards are no readable Parquet (e.g. {damaged[0]}): "
            "their rows are left out", logging.WARNING)
    if not readable:
        raise ValueError(f"{scores}: none of its row shards is a readable Parquet file; rerun its `allcluster "
                         "score` command, which sets them aside and scores their files again")
    rows = pads.dataset([str(shard) for shard in readable], format="parquet")
    stored = methods_of(rows.schema)
    asked = stored if methods is None else check_methods(methods)
    missing = [m for m in asked if m not in stored]
    if missing:
        raise ValueError(f"--methods: {scores} stores no {', '.join(missing)} maps; it stores: "
                         f"{', '.join(stored) or 'none'}")
    methods = asked
    preprocess = Preprocess(info.input_size, info.roi_crop, info.roi_margin)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    images = list(images)
    for start in range(0, len(images), LOOKUP_CHUNK):     # one scan of the rows per chunk of images
        items = [_load(path, preprocess) for path in images[start:start + LOOKUP_CHUNK]]
        wanted = [item.sha256 for item in items if item.rgb is not None]
        found = {} if not wanted else {row["sha256"]: row for row in reversed(rows.to_table(
            filter=pads.field("sha256").isin(wanted) & (pads.field("status") == "ok")).to_pylist())}
        results += [_stored_panel(item, found.get(item.sha256), scores, methods, out_dir) for item in items]
    return results


LOOKUP_CHUNK = 64       # images whose rows one scan of a (possibly million-row) output looks up


def _stored_panel(item: "_Item", row: dict | None, scores: Path, methods: list[str], out_dir: Path) -> dict:
    """One image's result from its ok row in ``scores`` (None: not scored)."""
    from allcluster.score.heatmaps import load_heatmap
    from allcluster.score.rows import method_columns

    if item.rgb is None or row is None:
        return _result(item, error=item.error or f"not_scored: {item.path}: {scores} holds no ok row "
                                                 f"for this content (sha256 {item.sha256})")
    try:
        axes = [(m, item.rgb, load_heatmap(scores / row[c], item.sha256, m) / 255.0)
                for m in methods if (c := method_columns(m)["heatmap"]) in row and row[c]]
        title = prediction_title(item.path.name, row["predicted_class"], row["confidence"])
        panel = draw_panel(out_dir / panel_name(item.path, item.digest), title, item.rgb, axes)
    except OSError as err:
        if is_storage_full(err):
            raise
        return _result(item, error=f"map_unreadable: {item.path}: {err}")
    return _result(item, str(panel), row["predicted_class"], row["confidence"])


def format_results(results: Sequence[dict]) -> str:
    """One line per image for the CLI: ``ok  Pre  p=0.91  image -> panel`` or ``error  message``."""
    lines = []
    for row in results:
        if row["status"] == "ok":
            lines.append(f"ok     {row['predicted_class']:<8} p={row['confidence']:.2f}  "
                         f"{row['image']} -> {row['panel']}")
        else:
            lines.append(f"error  {row['error'] or row['image']}")
    return "\n".join(lines)
