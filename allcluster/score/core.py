"""Stage 2 of scoring (the model replicas): predict and explain decoded batches into result rows.

No Ray here: :mod:`allcluster.score.ray_data` runs :func:`allcluster.score.reading.read_decode` as
Ray Data tasks and :class:`Scorer` as an actor pool; tests and ``bench score`` call both directly.
The rest of a scoring run lives beside it: ``ledger`` (job-wide bookkeeping), ``reading`` (stage 1),
``budget`` (who gets the expensive methods), ``heatmaps`` (map stores), ``rows`` (schema, provenance).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from allcluster.atomic import is_storage_full
from allcluster.data.paths import clean_text
from allcluster.data.preprocess import cell_mask
from allcluster.device import autocast, channels_last, device_is_broken, pick_device, use_bf16
from allcluster.score.budget import budget_reasons, sha_fraction
from allcluster.score.config import ScoreConfig
from allcluster.score.heatmaps import bytes_columns, encode_maps, write_heatmap_files
from allcluster.score.ledger import Reserve
from allcluster.score.rows import (STORAGE_FULL_ROWS, class_columns, empty_columns, method_columns, provenance,
                                   result_columns, row_schema, storage_full_text)
from allcluster.xai.localisation import mass_inside


def unknown_as_null(cols: dict[str, list]) -> None:
    """Reading's placeholders (-1, ``""``: not known for a file that could not be read or decoded) as
    nulls, as the README's row schema says: a -1 would count in ``sum(size_bytes)`` or ``avg(width)``."""
    for name in ("size_bytes", "width", "height"):
        cols[name] = [None if v == -1 else v for v in cols[name]]
    cols["sha256"] = [v or None for v in cols["sha256"]]


def build_explainer(name: str, model: torch.nn.Module, layer: str, cfg: ScoreConfig):
    """An explainer from the registry, with the job's LIME / IG settings."""
    from allcluster.xai import ExplainSettings, make_explainer

    return make_explainer(name, model, layer, ExplainSettings(cfg.explain.lime_samples, cfg.explain.ig_steps))


class DeviceBroken(RuntimeError):
    """The replica's GPU context is unusable (:func:`allcluster.device.device_is_broken`): its batches
    would all become ``model_error`` rows, quickly, and the job would end with exit 0 on an archive of
    error rows. The Ray wrapper ends the replica's process instead; Ray starts a fresh one and runs the
    batch again."""


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
        self.bf16 = use_bf16(cfg.workers.precision, self.device)
        # NHWC on every device: the layout cuDNN's tensor-core kernels want, and oneDNN's on CPU (ALL-Net's
        # forward 40% faster, EfficientNet-Lite0's 50%, DenseNet-121's 15% on this project's 2-core CPU).
        self.model = channels_last(self.model)
        self.classes = loaded.classes
        self.normalize = self.card.normalize().to(self.device)
        self.every = {m: build_explainer(m, self.model, self.card.cam_layer, cfg) for m in cfg.explain.methods}
        self.budgeted = {m: build_explainer(m, self.model, self.card.cam_layer, cfg)
                         for m in cfg.explain.budget.methods}
        self.schema = row_schema(self.classes, list(self.every) + list(self.budgeted), list(extra))
        self.packed = cfg.explain.heatmaps == "packed"     # maps travel to the driver's writer as bytes
        self.batch_schema = self.schema
        if self.packed:
            for method in [*self.every, *self.budgeted]:
                for name in bytes_columns(method):
                    self.batch_schema = self.batch_schema.append(pa.field(name, pa.binary()))
        self.constants = provenance(self.card, cfg, run_id, str(self.device))
        # what an error row must not keep (its prediction, maps, scores; the maps' bytes in a batch)
        self.results = [*result_columns(self.schema), *self.batch_schema.names[len(self.schema.names):]]

    def __call__(self, batch: dict[str, np.ndarray], device_may_be_broken: bool = False) -> pa.Table:
        """The batch's result rows. A CUDA error that breaks this process's context raises
        :class:`DeviceBroken`, unless ``device_may_be_broken`` (a batch whose tries keep meeting one):
        its rows are then ``model_error`` rows like any failure's."""
        n = len(batch["path"])
        cols = empty_columns(self.batch_schema, n)
        for name in self.schema.names:
            if name in batch and name != "pixels":
                cols[name] = [v.item() if isinstance(v, np.generic) else v for v in batch[name]]
        unknown_as_null(cols)
        todo = [i for i in range(n) if cols["status"][i] == "ok" and not cols["duplicate_of"][i]]
        if todo:
            key = cols["sha256"][todo[0]]  # the batch's key in the job's budget: its first content's
            try:
                with autocast(self.device, self.bf16):
                    self.fill(cols, todo, np.asarray(batch["pixels"])[todo], key)
            except Exception as err:       # noqa: BLE001 - any model-side failure becomes error rows
                if device_is_broken(err) and not device_may_be_broken:  # see DeviceBroken
                    raise DeviceBroken(f"{self.device}: {type(err).__name__}: {err}") from err
                self.reserve(0, key)       # error rows spend no budget: what the batch was granted goes back
                self.fail(cols, todo, err)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for key, value in {**self.constants, "scored_at": stamp}.items():
            cols[key] = [value] * n
        return pa.Table.from_pydict(cols, schema=self.batch_schema)

    def fail(self, cols: dict[str, list], todo: list[int], err: Exception) -> None:
        """Rows ``todo`` as ``model_error`` rows (a rerun tries them again), or as
        :data:`STORAGE_FULL_ROWS` when a map found no room."""
        full = is_storage_full(err)
        for i in todo:
            self.error_row(cols, i, STORAGE_FULL_ROWS if full else "model_error",
                           storage_full_text(err) if full else clean_text(f"{cols['path'][i]}: {type(err).__name__}: {err}"))

    def error_row(self, cols: dict[str, list], i: int, error_type: str, error: str) -> None:
        """Row ``i`` as an error row: no prediction, map or score of it stays (none reaches a pack)."""
        cols["status"][i], cols["error_type"][i], cols["error"][i] = "error", error_type, error
        for name in self.results:
            cols[name][i] = None

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def fill(self, cols: dict[str, list], todo: list[int], pixels: np.ndarray, key: str) -> None:
        """Predict and explain the rows ``todo`` (their uint8 ``pixels``) into ``cols`` in place; ``key``
        names the batch to the job's budget."""
        start = self._sync()
        x = self.normalize(torch.from_numpy(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2))
        x = channels_last(x)
        explanations, logits = self.first_pass(x)
        finite = self.drop_non_finite(cols, todo, logits)
        if len(finite) < len(todo):      # nothing of theirs is written: no map file, no budget spent
            if not finite:
                return
            todo, pixels, x, logits = [todo[j] for j in finite], pixels[finite], x[finite], logits[finite]
            explanations = {m: result.rows(finite) for m, result in explanations.items()}
        probs = torch.softmax(logits.float(), 1)
        calibrated = torch.softmax(logits.float() / self.temperature, 1)
        confidence, predicted = calibrated.max(1)
        model_done = self._sync()
        for method, explainer in list(self.every.items())[1:]:
            explanations[method] = explainer.explain(x, predicted)
        shas = [cols["sha256"][i] for i in todo]
        faithful = faithfulness_rows(confidence.cpu().numpy(), shas, self.cfg)
        self.store_explanations(cols, todo, explanations, x, probs, predicted, shas, pixels, faithful)
        every_done = self._sync()
        budget_ms = self.run_budget(cols, todo, x, probs, predicted, confidence, shas, pixels, key)
        self.store_prediction(cols, todo, probs, calibrated, confidence, predicted)
        for j, i in enumerate(todo):
            cols["t_model_ms"][i] = (model_done - start) * 1e3 / len(todo)
            cols["t_explain_ms"][i] = (every_done - model_done) * 1e3 / len(todo) + budget_ms[j]

    def drop_non_finite(self, cols: dict[str, list], todo: list[int], logits: torch.Tensor) -> list[int]:
        """Positions in ``todo`` whose logits are finite; the others become ``non_finite_output`` rows.
        NaN logits have no class: softmax's max would say class 0 at confidence NaN, which is not
        "uncertain" (NaN < t is false), so the image would read as a confident prediction."""
        finite = torch.isfinite(logits.float()).all(1).cpu().tolist()
        for j in (j for j, ok in enumerate(finite) if not ok):
            self.error_row(cols, todo[j], "non_finite_output",
                           f"{cols['path'][todo[j]]}: the model's output for this image is not finite (NaN or "
                           "infinity): no prediction is made; check the image and the model's weights")
        return [j for j, ok in enumerate(finite) if ok]

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

    def store_explanations(self, cols, rows, explanations, x, probs, predicted, shas, pixels,
                           faithful: list[int] | None = None) -> None:
        """Heatmaps (files, or bytes for the writer's pack), raw maxima, share on the cell and
        faithfulness of each method's maps for ``rows`` (faithfulness on the positions ``faithful``
        of them; None: all)."""
        fraction = self.cfg.explain.faithfulness_fraction
        faithful = list(range(len(rows))) if faithful is None else faithful
        cells = np.stack([cell_mask(image) for image in pixels]) if explanations else None
        for method, result in explanations.items():
            self.store_maps(cols, rows, method, (result.maps * 255).round().byte().cpu().numpy(), shas, pixels)
            c = method_columns(method)
            raw_max = result.raw_max.float().cpu().numpy()
            on_cell = mass_inside(result.maps.float().cpu().numpy(), cells)
            for j, i in enumerate(rows):
                cols[c["raw_max"]][i] = float(raw_max[j])
                cols[c["on_cell"]][i] = float(on_cell[j])
                cols["explained_by"][i] = ",".join(filter(None, [cols["explained_by"][i], method]))
            if faithful and fraction > 0:
                at = torch.tensor(faithful, device=x.device)
                drop, kept = faithfulness_scores(self.model, x[at], result.maps[at], predicted[at], fraction, probs[at])
                for k, j in enumerate(faithful):
                    cols[c["drop"]][rows[j]], cols[c["kept"]][rows[j]] = float(drop[k]), float(kept[k])

    def store_maps(self, cols, rows, method, maps_u8, shas, pixels) -> None:
        """PNG-encode one method's maps: into the batch's byte columns (packed store; the writer sets
        ``heatmap_<m>``) or as files named in ``heatmap_<m>`` (files store)."""
        pngs, overlays = encode_maps(maps_u8, pixels if self.cfg.explain.overlays else None)
        if self.packed:
            png, jpg = bytes_columns(method)
            for j, i in enumerate(rows):
                cols[png][i], cols[jpg][i] = pngs[j], overlays[j] if overlays else None
            return
        names = write_heatmap_files(self.out_dir, shas, method, pngs, overlays)
        for j, i in enumerate(rows):
            cols[method_columns(method)["heatmap"]][i] = names[j]

    def run_budget(self, cols, todo, x, probs, predicted, confidence, shas, pixels, key) -> list[float]:
        """Expensive methods on the selected rows (within the job-wide cap); per-row extra ms."""
        names = [self.classes[int(k)] for k in predicted.cpu().numpy()]
        reasons = budget_reasons(confidence.cpu().numpy(), names, shas, self.cfg.explain.budget)
        chosen = [j for j, r in enumerate(reasons) if r]
        granted = self.reserve(len(chosen), key) if chosen else 0
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


def faithfulness_rows(confidence: np.ndarray, shas: list[str], cfg: ScoreConfig) -> list[int]:
    """Positions whose every-image maps get the faithfulness score: the uncertain images and the
    ``explain.faithfulness_sample`` share of the rest (fixed by content, so reruns pick the same)."""
    sample = cfg.explain.faithfulness_sample
    return [j for j, (conf, sha) in enumerate(zip(confidence, shas))
            if conf < cfg.uncertain_below or sha_fraction(sha) < sample]


def faithfulness_scores(model, x, maps, targets, fraction, probs) -> tuple[np.ndarray, np.ndarray]:
    """(drop, kept) per image, from :func:`allcluster.xai.faithfulness.faithfulness`."""
    from allcluster.xai.faithfulness import faithfulness

    scores = faithfulness(model, x, maps.to(x.dtype), targets, fraction, probs=probs)
    return scores["drop"].cpu().numpy(), scores["kept"].cpu().numpy()
