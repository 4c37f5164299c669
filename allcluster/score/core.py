"""The pure core of scoring: read + decode a batch of files, then predict + explain it.

No Ray here: :mod:`allcluster.score.ray_data` runs :func:`read_decode` as Ray Data tasks and
:class:`Scorer` as an actor pool; tests and ``bench score`` can call both directly.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from allcluster.atomic import atomic_write_bytes
from allcluster.data import decode as dec
from allcluster.device import pick_device
from allcluster.models.card import ModelCard
from allcluster.data.paths import clean_text, parent_text, to_fs
from allcluster.data.preprocess import Preprocess, cell_mask
from allcluster.score.config import BudgetConfig, ScoreConfig
from allcluster.score.rows import class_columns, empty_columns, method_columns, row_schema
from allcluster.xai.localisation import mass_inside
from allcluster.xai.overlay import jet_overlay

Claim = Callable[[list[str], list[str]], list[str]]   # (sha256s, paths) -> owner path per file ("" = you)
Reserve = Callable[[int], int]                        # ask for n budgeted explanations -> granted


class Ledger:
    """Job-wide bookkeeping shared by every worker (a Ray actor in a job): which file computes each
    distinct content (sha256), and how many budgeted explanations are left."""

    def __init__(self, budget_cap: int, budget_used: int = 0):
        self.owners: dict[bytes, str] = {}
        self.budget_left = max(0, budget_cap - budget_used)

    def claim(self, shas: list[str], paths: list[str]) -> list[str]:
        owners = []
        for sha, path in zip(shas, paths):
            owner = self.owners.setdefault(bytes.fromhex(sha), path)
            owners.append("" if owner == path else owner)
        return owners

    def reserve(self, n: int) -> int:
        granted = min(n, self.budget_left)
        self.budget_left -= granted
        return granted


# ---- stage 1: read + decode (CPU tasks) ------------------------------------------------------------
def _fail(out: dict, i: int, err: dec.DecodeError) -> None:
    out["status"][i], out["error_type"][i], out["error"][i] = "error", err.kind, clean_text(str(err))


def read_decode(batch: dict[str, np.ndarray], size: int, roi_crop: bool, roi_margin: float, max_pixels: int,
                claim: Claim, max_bytes: int = dec.DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
    """Read, hash and decode a batch of files into uint8 ``pixels`` (N, size, size, 3).

    ``batch["path"]`` holds table paths (:mod:`allcluster.data.paths`). Every file keeps its row: any
    failure while reading, hashing, decoding or preprocessing it gets ``status="error"``; a file whose
    bytes another file of the job already has gets ``duplicate_of`` and is not decoded (it is filled
    in at the end).
    """
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    out = {k: np.asarray(v) for k, v in batch.items()}
    out.update(folder=np.array([parent_text(p) for p in paths], dtype=object),
               sha256=np.full(n, "", dtype=object), size_bytes=np.full(n, -1, np.int64),
               width=np.full(n, -1, np.int32), height=np.full(n, -1, np.int32),
               status=np.full(n, "ok", dtype=object), error_type=np.full(n, "", dtype=object),
               error=np.full(n, "", dtype=object), duplicate_of=np.full(n, "", dtype=object),
               t_read_ms=np.zeros(n, np.float32), t_decode_ms=np.zeros(n, np.float32),
               pixels=np.zeros((n, size, size, 3), np.uint8))
    blobs: list[bytes | None] = []
    for i, path in enumerate(paths):
        start = time.perf_counter()
        try:
            data, out["sha256"][i] = dec.read_any(to_fs(path), max_bytes)
            out["size_bytes"][i] = len(data)
            blobs.append(data)
        except dec.DecodeError as err:
            blobs.append(None)
            _fail(out, i, err)
        out["t_read_ms"][i] = (time.perf_counter() - start) * 1e3
    hashed = [i for i in range(n) if blobs[i] is not None]
    owners = claim([out["sha256"][i] for i in hashed], [paths[i] for i in hashed]) if hashed else []
    preprocess = Preprocess(size, roi_crop, roi_margin)
    for i, owner in zip(hashed, owners):
        if owner:
            out["duplicate_of"][i] = owner
            continue
        start = time.perf_counter()
        try:
            decode_into(out, i, blobs[i], paths[i], preprocess, max_pixels)
        except dec.DecodeError as err:
            _fail(out, i, err)
        blobs[i] = None                       # free the bytes as soon as they are decoded
        out["t_decode_ms"][i] = (time.perf_counter() - start) * 1e3
    return out


def decode_into(out: dict, i: int, data: bytes, path: str, preprocess: Preprocess, max_pixels: int) -> None:
    """Decode + preprocess one file into row ``i`` of ``out``; every failure is a :class:`DecodeError`."""
    image = dec.decode_any(data, path, max_pixels=max_pixels, draft=preprocess.size)
    try:
        out["pixels"][i] = preprocess(image.array)
    except Exception as err:      # noqa: BLE001 - an odd shape or a cv2 failure in the ROI crop
        raise dec.unexpected("decode_error", path, err) from err
    out["width"][i], out["height"][i] = image.width, image.height


# ---- stage 2: predict + explain (actor) ------------------------------------------------------------
def sha_fraction(sha: str) -> float:
    """A uniform number in [0, 1) fixed by the content: the same images are sampled on every rerun."""
    return int(sha[:12], 16) / float(1 << 48)


def budget_reasons(confidence: np.ndarray, predicted: list[str], shas: list[str], budget: BudgetConfig) -> list[str]:
    """Why each image gets the expensive methods ("" when it does not), first matching rule wins."""
    if not budget.methods:
        return [""] * len(shas)
    reasons = []
    for conf, cls, sha in zip(confidence, predicted, shas):
        if conf < budget.low_confidence:
            reasons.append("low_confidence")
        elif cls in budget.classes:
            reasons.append("class")
        elif sha_fraction(sha) < budget.sample_fraction:
            reasons.append("sample")
        else:
            reasons.append("")
    return reasons


def heatmap_relpath(sha: str, method: str, suffix: str = ".png") -> str:
    """Deterministic name of one image's map: ``heatmaps/ab/abcdef....gradcam.png``."""
    return f"heatmaps/{sha[:2]}/{sha}.{method_columns(method)['heatmap'][len('heatmap_'):]}{suffix}"


def write_heatmaps(out_dir: Path, shas: list[str], method: str, maps_u8: np.ndarray,
                   pixels: np.ndarray | None = None) -> list[str]:
    """8-bit maps at the model's resolution (PNG), plus colour overlays (JPEG) when ``pixels`` given."""
    import cv2

    names = []
    for i, sha in enumerate(shas):
        rel = heatmap_relpath(sha, method)
        atomic_write_bytes(out_dir / rel, cv2.imencode(".png", maps_u8[i])[1].tobytes())
        if pixels is not None:
            blend = jet_overlay(pixels[i], maps_u8[i])[..., ::-1]             # RGB -> cv2's BGR
            atomic_write_bytes(out_dir / rel.replace("heatmaps/", "overlays/", 1).replace(".png", ".jpg"),
                          cv2.imencode(".jpg", blend, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
        names.append(rel)
    return names


def provenance(card: ModelCard, cfg: ScoreConfig, run_id: str, device: str) -> dict[str, str]:
    """The provenance columns shared by every row of one run."""
    from allcluster.config import config_hash
    from allcluster.models.model_dir import versions

    v = versions()
    return {"model_sha256": card.weights_sha256, "model_run_id": card.run_id,
            "config_hash": config_hash(cfg), "run_id": run_id, "device": device,
            "allcluster_version": v["allcluster"], "torch_version": v["torch"], "timm_version": v["timm"],
            "ray_version": v["ray"]}


def error_rows(schema: pa.Schema, errors: list[dict], constants: dict[str, str]) -> pa.Table:
    """Rows for files that failed before reading (listing: symlinks, non-files)."""
    cols = empty_columns(schema, len(errors))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for i, err in enumerate(errors):
        cols["path"][i], cols["folder"][i] = err["path"], parent_text(err["path"])
        cols["status"][i], cols["error_type"][i], cols["error"][i] = "error", err["error_type"], err["error"]
        cols["duplicate_of"][i] = ""
    for key, value in {**constants, "scored_at": stamp}.items():
        cols[key] = [value] * len(errors)
    return pa.Table.from_pydict(cols, schema=schema)


def build_explainer(name: str, model: torch.nn.Module, layer: str, cfg: ScoreConfig):
    """An explainer from the registry, with the job's LIME / IG settings."""
    from allcluster.xai import ExplainSettings, make_explainer

    return make_explainer(name, model, layer, ExplainSettings(cfg.explain.lime_samples, cfg.explain.ig_steps))


class Scorer:
    """Loads the model once; turns read/decoded batches into result rows (an Arrow table).

    The first every-image method's pass is also the prediction (Grad-CAM: one forward + a backward
    that stops at the CAM layer). A failure on the model side turns the batch's rows into error
    rows instead of stopping the job.
    """

    def __init__(self, cfg: ScoreConfig, out_dir: str, run_id: str, reserve: Reserve, extra: list[str] = (),
                 device: str | None = None):
        from allcluster.models.model_dir import load_model_dir

        self.cfg, self.out_dir, self.reserve = cfg, Path(out_dir), reserve
        self.device = pick_device(device or cfg.workers.device, "workers.device")
        loaded = load_model_dir(cfg.model, self.device)
        self.model, self.card, self.temperature = loaded.model.requires_grad_(False), loaded.card, loaded.temperature
        self.classes = loaded.classes
        self.normalize = self.card.normalize().to(self.device)
        self.every = {m: build_explainer(m, self.model, self.card.cam_layer, cfg) for m in cfg.explain.methods}
        self.budgeted = {m: build_explainer(m, self.model, self.card.cam_layer, cfg)
                         for m in cfg.explain.budget.methods}
        self.schema = row_schema(self.classes, list(self.every) + list(self.budgeted), list(extra))
        self.constants = provenance(self.card, cfg, run_id, str(self.device))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["path"])
        cols = empty_columns(self.schema, n)
        for name in self.schema.names:
            if name in batch and name != "pixels":
                cols[name] = [v.item() if isinstance(v, np.generic) else v for v in batch[name]]
        todo = [i for i in range(n) if cols["status"][i] == "ok" and not cols["duplicate_of"][i]]
        if todo:
            try:
                self.fill(cols, todo, np.asarray(batch["pixels"])[todo])
            except Exception as err:       # noqa: BLE001 - any model-side failure becomes error rows
                for i in todo:
                    cols["status"][i], cols["error_type"][i] = "error", "model_error"
                    cols["error"][i] = clean_text(f"{cols['path'][i]}: {type(err).__name__}: {err}")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for key, value in {**self.constants, "scored_at": stamp}.items():
            cols[key] = [value] * n
        return pa.Table.from_pydict(cols, schema=self.schema)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def fill(self, cols: dict[str, list], todo: list[int], pixels: np.ndarray) -> None:
        """Predict and explain the rows ``todo`` (their uint8 ``pixels``) into ``cols`` in place."""
        start = self._sync()
        x = self.normalize(torch.from_numpy(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2))
        explanations, logits = self.first_pass(x)
        probs = torch.softmax(logits.float(), 1)
        calibrated = torch.softmax(logits.float() / self.temperature, 1)
        confidence, predicted = calibrated.max(1)
        model_done = self._sync()
        for method, explainer in list(self.every.items())[1:]:
            explanations[method] = explainer.explain(x, predicted)
        shas = [cols["sha256"][i] for i in todo]
        self.store_explanations(cols, todo, explanations, x, probs, predicted, shas, pixels)
        every_done = self._sync()
        budget_ms = self.run_budget(cols, todo, x, probs, predicted, confidence, shas, pixels)
        self.store_prediction(cols, todo, probs, calibrated, confidence, predicted)
        for j, i in enumerate(todo):
            cols["t_model_ms"][i] = (model_done - start) * 1e3 / len(todo)
            cols["t_explain_ms"][i] = (every_done - model_done) * 1e3 / len(todo) + budget_ms[j]

    def first_pass(self, x: torch.Tensor):
        """(explanations so far, logits): the first every-image method's pass, or a plain forward."""
        if not self.every:
            with torch.inference_mode():
                return {}, self.model(x)
        method, explainer = next(iter(self.every.items()))
        result = explainer.explain(x)
        return {method: result}, result.logits

    def store_prediction(self, cols, todo, probs, calibrated, confidence, predicted) -> None:
        raw_cols, cal_cols = class_columns(self.classes)
        probs, calibrated = probs.cpu().numpy(), calibrated.cpu().numpy()
        confidence, predicted = confidence.cpu().numpy(), predicted.cpu().numpy()
        first = next(iter(self.every), "")
        layer = getattr(self.every.get(first), "layer", "")
        for j, i in enumerate(todo):
            cols["predicted_index"][i] = int(predicted[j])
            cols["predicted_class"][i] = self.classes[int(predicted[j])]
            cols["confidence"][i] = float(confidence[j])
            cols["uncertain"][i] = bool(confidence[j] < self.cfg.uncertain_below)
            for k in range(len(self.classes)):
                cols[raw_cols[k]][i], cols[cal_cols[k]][i] = float(probs[j, k]), float(calibrated[j, k])
            cols["cam_method"][i], cols["cam_layer"][i] = first, layer

    def store_explanations(self, cols, rows, explanations, x, probs, predicted, shas, pixels) -> None:
        """Heatmap files, raw maxima and faithfulness of each method's maps for ``rows``."""
        fraction = self.cfg.explain.faithfulness_fraction
        cells = np.stack([cell_mask(image) for image in pixels]) if explanations else None
        for method, result in explanations.items():
            names = write_heatmaps(self.out_dir, shas, method, (result.maps * 255).round().byte().cpu().numpy(),
                                   pixels if self.cfg.explain.overlays else None)
            c = method_columns(method)
            raw_max = result.raw_max.float().cpu().numpy()
            if fraction > 0:
                scores = faithfulness_scores(self.model, x, result.maps, predicted, fraction, probs)
            on_cell = mass_inside(result.maps.float().cpu().numpy(), cells)
            for j, i in enumerate(rows):
                cols[c["heatmap"]][i], cols[c["raw_max"]][i] = names[j], float(raw_max[j])
                cols[c["on_cell"]][i] = float(on_cell[j])
                if fraction > 0:
                    cols[c["drop"]][i], cols[c["kept"]][i] = float(scores[0][j]), float(scores[1][j])
                cols["explained_by"][i] = ",".join(filter(None, [cols["explained_by"][i], method]))

    def run_budget(self, cols, todo, x, probs, predicted, confidence, shas, pixels) -> list[float]:
        """Expensive methods on the selected rows (within the job-wide cap); per-row extra ms."""
        names = [self.classes[int(k)] for k in predicted.cpu().numpy()]
        reasons = budget_reasons(confidence.cpu().numpy(), names, shas, self.cfg.explain.budget)
        chosen = [j for j, r in enumerate(reasons) if r]
        granted = self.reserve(len(chosen)) if chosen else 0
        for j in chosen[granted:]:
            reasons[j] = "over_cap"
        chosen = chosen[:granted]
        for j, i in enumerate(todo):
            cols["budget_reason"][i] = reasons[j]
        extra = [0.0] * len(todo)
        if not chosen:
            return extra
        start = self._sync()
        index = torch.tensor(chosen, device=x.device)
        sub = [todo[j] for j in chosen]
        results = {m: e.explain(x[index], predicted[index]) for m, e in self.budgeted.items()}
        self.store_explanations(cols, sub, results, x[index], probs[index], predicted[index],
                                [shas[j] for j in chosen], pixels[chosen])
        per_image = (self._sync() - start) * 1e3 / len(chosen)
        for j in chosen:
            extra[j] = per_image
        return extra


def faithfulness_scores(model, x, maps, targets, fraction, probs) -> tuple[np.ndarray, np.ndarray]:
    """(drop, kept) per image, from :func:`allcluster.xai.faithfulness.faithfulness`."""
    from allcluster.xai.faithfulness import faithfulness

    scores = faithfulness(model, x, maps.to(x.dtype), targets, fraction, probs=probs)
    return scores["drop"].cpu().numpy(), scores["kept"].cpu().numpy()
