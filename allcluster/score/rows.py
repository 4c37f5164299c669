"""The result-row schema of ``allcluster score`` (one row per input file; documented in the README).

Class- and method-dependent columns are named from the model card and the config:
``prob_<class>`` / ``cal_prob_<class>`` per class, and ``heatmap_<m>``, ``raw_max_<m>``,
``faith_drop_<m>``, ``faith_kept_<m>``, ``on_cell_<m>`` (the share of the map's mass on the stained
cell, :mod:`allcluster.xai.localisation`) per explanation method ``m`` (``gradcam++`` -> ``gradcampp``).
Columns a row has no value for (an error row, a method not run on it) are null.
"""
from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from allcluster.atomic import storage_full_error
from allcluster.data.paths import parent_text

if TYPE_CHECKING:
    from allcluster.models.card import ModelCard
    from allcluster.score.config import ScoreConfig

IDENTITY = [("path", pa.string()), ("folder", pa.string()), ("sha256", pa.string()), ("size_bytes", pa.int64()),
            ("width", pa.int32()), ("height", pa.int32()), ("status", pa.string()), ("error_type", pa.string()),
            ("error", pa.string()), ("duplicate_of", pa.string())]
PREDICTION = [("predicted_class", pa.string()), ("predicted_index", pa.int32()), ("confidence", pa.float32()),
              ("uncertain", pa.bool_())]
EXPLANATION = [("cam_method", pa.string()), ("cam_layer", pa.string()), ("explained_by", pa.string()),
               ("budget_reason", pa.string())]
TIMINGS = [("t_read_ms", pa.float32()), ("t_decode_ms", pa.float32()), ("t_model_ms", pa.float32()),
           ("t_explain_ms", pa.float32())]
PROVENANCE = [("model_sha256", pa.string()), ("model_run_id", pa.string()), ("config_hash", pa.string()),
              ("run_id", pa.string()), ("device", pa.string()), ("scored_at", pa.string()),
              ("allcluster_version", pa.string()), ("torch_version", pa.string()), ("timm_version", pa.string()),
              ("ray_version", pa.string())]
# Columns a duplicate keeps as its own (with the input's passed-through columns); all others are
# copied from the row of its first copy.
OWN_COLUMNS = ("path", "folder", "duplicate_of", "t_read_ms", "t_decode_ms", "t_model_ms", "t_explain_ms")
FIXED_NAMES = {name for name, _ in IDENTITY + PREDICTION + EXPLANATION + TIMINGS + PROVENANCE}
DERIVED_PREFIXES = ("prob_", "cal_prob_", "heatmap_", "raw_max_", "faith_drop_", "faith_kept_", "on_cell_")


def result_columns(schema: pa.Schema) -> list[str]:
    """The columns of ``schema`` that scoring fills (prediction, probabilities, maps and their
    scores): what an error row leaves null."""
    filled = {name for name, _ in PREDICTION + EXPLANATION}
    return [name for name in schema.names if name in filled or name.startswith(DERIVED_PREFIXES)]


def input_column_name(name: str) -> str:
    """The row column for an input (manifest) column: its own name, or ``input_<name>`` where that
    would collide with a column scoring computes (e.g. an ``allcluster index`` manifest's ``sha256``)."""
    if name in FIXED_NAMES or name.startswith(DERIVED_PREFIXES):
        return f"input_{name}"
    return name


def slug(name: str) -> str:
    """A column-safe form of a class or method name (``gradcam++`` -> ``gradcampp``)."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", name.replace("++", "pp")).strip("_")


def class_columns(classes: list[str]) -> tuple[list[str], list[str]]:
    """(raw probability columns, calibrated probability columns), in class order."""
    return [f"prob_{slug(c)}" for c in classes], [f"cal_prob_{slug(c)}" for c in classes]


def method_columns(method: str) -> dict[str, str]:
    m = slug(method)
    return {"heatmap": f"heatmap_{m}", "raw_max": f"raw_max_{m}", "drop": f"faith_drop_{m}", "kept": f"faith_kept_{m}",
            "on_cell": f"on_cell_{m}"}


def row_schema(classes: list[str], methods: list[str], extra: list[str] = ()) -> pa.Schema:
    """The Arrow schema of every shard of one job (``extra``: manifest columns passed through)."""
    raw, calibrated = class_columns(classes)
    fields = IDENTITY + [(c, pa.string()) for c in extra] + PREDICTION
    fields += [(c, pa.float32()) for c in raw + calibrated] + EXPLANATION
    for method in methods:
        cols = method_columns(method)
        fields += [(cols["heatmap"], pa.string()), (cols["raw_max"], pa.float32()),
                   (cols["drop"], pa.float32()), (cols["kept"], pa.float32()), (cols["on_cell"], pa.float32())]
    fields += TIMINGS + PROVENANCE
    seen = set()
    for name, _ in fields:
        if name in seen:
            raise ValueError(f"result column {name!r} would appear twice (class or method names collide)")
        seen.add(name)
    return pa.schema(fields, metadata={CLASSES_KEY: ",".join(classes), METHODS_KEY: ",".join(methods)})


CLASSES_KEY, METHODS_KEY = "allcluster.classes", "allcluster.methods"   # the rows schema's metadata


def methods_of(schema: pa.Schema) -> list[str]:
    """The explanation methods a shard's schema was made for (:func:`row_schema`'s metadata)."""
    return _metadata_list(schema, METHODS_KEY)


def classes_of(schema: pa.Schema) -> list[str]:
    """The model's classes a shard's schema was made for (:func:`row_schema`'s metadata)."""
    return _metadata_list(schema, CLASSES_KEY)


def _metadata_list(schema: pa.Schema, key: str) -> list[str]:
    listed = (schema.metadata or {}).get(key.encode(), b"").decode()
    return [name for name in listed.split(",") if name]


def empty_columns(schema: pa.Schema, n: int) -> dict[str, list]:
    """``n`` all-null rows as column lists, to be filled in place."""
    return {name: [None] * n for name in schema.names}


def provenance(card: ModelCard, cfg: ScoreConfig, run_id: str, device: str) -> dict[str, str]:
    """The provenance columns shared by every row of one run."""
    from allcluster.config import config_hash
    from allcluster.models.card import versions

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


# The rows of a batch whose maps found no room (``explain.heatmaps: files``: a replica writes them). They
# carry the error to the driver, which stops the run on them, so they are never written: Ray Data
# re-raises an exception of a replica as a UserCodeException without its cause (no errno, no file).
STORAGE_FULL_ROWS = "storage_full"


def storage_full_text(err: OSError) -> str:
    """The ``error`` of :data:`STORAGE_FULL_ROWS` rows: what :func:`storage_full_in` needs to raise ``err`` again."""
    return f"{err.errno} {err.filename or ''}"


def storage_full_in(batch: pa.Table) -> OSError | None:
    """The full disk or quota a replica met on one of ``batch``'s rows, as the OSError it was (errno
    and file name), to raise in the driver; None if it met none."""
    marked = pc.index(batch["error_type"], STORAGE_FULL_ROWS).as_py()
    if marked < 0:
        return None
    number, _, name = batch["error"][marked].as_py().partition(" ")
    return storage_full_error(int(number), name)
