"""Result tables, pure: DataFrames in, DataFrames out (no files written here).

Sweep tables come from ``trials.parquet`` (small: one row per trial). Scoring tables come from the
result rows through a ``pyarrow.dataset`` read in record batches with only the needed columns: counts
are summed batch by batch and the gallery keeps a few candidates per class, so their memory is
bounded by the batch size and the number of groups, not by the number of rows. Two things are held
whole: the morning list (the flagged rows' few columns, as Arrow, to sort them) and the labelled rows
(label and probabilities, usually an evaluation set).

Every "best trial" is chosen as the sweep chooses its best model: highest validation macro-F1, then
lowest validation loss; the test split never picks.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from allcluster.config import ConfigError
from allcluster.report.inputs import ScoreSource, SweepSource
from allcluster.score.rows import class_columns, classes_of, method_columns, methods_of
from allcluster.sweep.schema import CELL, CONFIG_COLUMNS, KEY_COLUMNS, ranked

LEADERBOARD_COLUMNS = CELL + [
    "trials", "trial_id", "train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss", "test_loss",
    "train_macro_f1", "val_macro_f1", "test_macro_f1", "test_auc", "test_macro_specificity", "test_ece",
    "test_ece_calibrated", "wall_seconds", "gpu_hours", "sweep"]
# swept keys already shown under the names above
SHOWN_KEYS = set(KEY_COLUMNS)
NONE = "(none)"
BATCH_ROWS = 65_536
GALLERY_COLUMNS = ["predicted_class", "kind", "confidence", "path", "heatmap", "heatmap_method", "sha256", "scoring_out",
                   "label"]
TIERS = {1: "malignant, uncertain", 2: "malignant", 3: "uncertain"}
COUNTERS = ["rows", "ok", "errors", "uncertain", "malignant", "duplicates"]   # per group, then one per class
CLASS_COUNT_PREFIX = "predicted:"    # no counter has it, so no class name can take a counter's column


def class_count_column(name: str) -> str:
    """The roll-up column counting the ok rows predicted as class ``name`` (``predicted:Pre``)."""
    return CLASS_COUNT_PREFIX + name


# ---- sweeps -------------------------------------------------------------------------------------------
def load_trials(sources: list[SweepSource]) -> pd.DataFrame:
    """Every sweep's ``trials.parquet`` in one table (``experiment``: the folder it came from)."""
    parts = [pd.read_parquet(s.trials).assign(experiment=str(s.dir)) for s in sources if s.trials]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def load_epochs(sources: list[SweepSource], trials: pd.DataFrame) -> pd.DataFrame:
    """The per-epoch rows of ``trials`` (``experiment``, ``trial_id``) only, each from its own sweep:
    a trial id names the varied values, so two sweeps of one grid share them (read with a Parquet filter)."""
    parts = []
    for source in sources:
        ids = trials.loc[trials["experiment"] == str(source.dir), "trial_id"].tolist()
        if source.epochs and ids:
            table = pq.read_table(source.epochs, filters=[("trial_id", "in", ids)])
            parts.append(table.to_pandas().assign(experiment=str(source.dir)))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def metric_columns(trials: pd.DataFrame) -> list[str]:
    """Numeric columns of ``trials.parquet`` a pivot can show."""
    return [c for c in trials.columns if pd.api.types.is_numeric_dtype(trials[c]) and not c.endswith("index")]


def check_metric(trials: pd.DataFrame, metric: str) -> None:
    if metric not in metric_columns(trials):
        raise ConfigError(f"--metric {metric!r}: not a numeric column of trials.parquet; choose one of "
                          + ", ".join(metric_columns(trials)))


def best_per(trials: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The best finished trial of every combination of ``keys``."""
    return ranked(trials).drop_duplicates(keys).reset_index(drop=True)


def leaderboard(trials: pd.DataFrame) -> pd.DataFrame:
    """Paper 002's Table 10: one row per backbone x augmentation x optimizer, its best trial's numbers,
    best cell first; ``trials`` counts every trial of the cell (any status)."""
    counts = trials.groupby(CELL).size().rename("trials").reset_index()
    table = best_per(trials, CELL).merge(counts, on=CELL, how="left")
    return table[[c for c in LEADERBOARD_COLUMNS if c in table]]


def pivot(trials: pd.DataFrame, columns: str, metric: str, index: str = "backbone") -> pd.DataFrame:
    """``metric`` of the best trial of each ``index`` x ``columns`` cell (empty cells: NaN)."""
    best = best_per(trials, [index, columns])
    table = best.pivot(index=index, columns=columns, values=metric)
    table.columns = [str(c) for c in table.columns]
    return table.reset_index()


def param_columns(trials: pd.DataFrame) -> list[str]:
    """The swept keys (columns named by their dotted training key, e.g. ``optim.lr``) not shown otherwise."""
    return [c for c in trials.columns if "." in c and c not in SHOWN_KEYS]


def best_per_backbone(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The best configuration of each backbone: its swept values and headline numbers."""
    wanted = ["backbone", "trial_id", *CONFIG_COLUMNS, *param_columns(trials), "val_macro_f1", "val_accuracy",
              metric, "test_accuracy", "test_macro_f1", "gpu_hours"]
    table = best_per(trials, ["backbone"])
    return table[[c for c in dict.fromkeys(wanted) if c in table]]


# ---- scoring rows: the dataset ------------------------------------------------------------------------
@dataclass
class ScoreData:
    """The result rows of one or more scoring jobs as one dataset (schemas unified)."""
    dataset: pads.Dataset
    roots: dict[str, Path]          # shard file -> its job's OUT folder (heatmap paths are relative to it)
    classes: list[str]
    methods: list[str]
    superseded: pa.Array | None = None     # keys of rows a newer run replaced: skipped (see stale_row_keys)
    shard_classes: dict[str, list[str]] = field(default_factory=dict)   # shard file -> its model's classes
    shard_heats: dict[str, list[str]] = field(default_factory=dict)     # shard file -> its map columns, in its job's method order

    @property
    def names(self) -> list[str]:
        return self.dataset.schema.names

    def present(self, columns: list[str]) -> list[str]:
        return [c for c in columns if c in self.names]

    @property
    def heatmap_columns(self) -> list[str]:
        """Every shard's map columns (see :func:`_with_heatmap` for the one a row shows)."""
        return self.present(list(dict.fromkeys(c for heats in self.shard_heats.values() for c in heats)))


def _listed(schemas: list[pa.Schema], of: Callable[[pa.Schema], list[str]]) -> list[str]:
    """The union, in first-seen order, of what ``of`` reads from each schema's metadata."""
    seen: dict[str, None] = {}
    for schema in schemas:
        for name in of(schema):
            seen.setdefault(name)
    return list(seen)


# Columns the report reads that a rows table written by other tools may lack: read as nulls (not
# uncertain, not a duplicate, no error type), so that such a table reports instead of failing half way.
OPTIONAL_ROW_COLUMNS = (pa.field("uncertain", pa.bool_()), pa.field("duplicate_of", pa.string()),
                        pa.field("error_type", pa.string()), pa.field("sha256", pa.string()))


def open_scoring(sources: list[ScoreSource]) -> ScoreData:
    """A dataset over every shard of every scoring input. Read here: the Parquet footers, each job's
    ``run_id`` column and, for a job several runs wrote, its ``path`` column (see :func:`~allcluster.score.output.stale_row_keys`)."""
    from allcluster.score.output import stale_row_keys

    files = [f for s in sources for f in s.files]
    schemas = [s.schemas[f] for s in sources for f in s.files]
    has_run_id = {str(f): "run_id" in schema.names for f, schema in zip(files, schemas)}
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    for column in OPTIONAL_ROW_COLUMNS:
        if column.name not in schema.names:
            schema = schema.append(column)
    dataset = pads.dataset([str(f) for f in files], schema=schema, format="parquet")
    roots = {str(f): s.root for s in sources for f in s.files}
    stale = [stale_row_keys(s.files) for s in sources if all(has_run_id[str(f)] for f in s.files)]
    stale = [keys for keys in stale if keys is not None]
    return ScoreData(dataset, roots, _listed(schemas, _shard_classes), _listed(schemas, methods_of),
                     pa.concat_arrays(stale) if stale else None,
                     {str(f): _shard_classes(s) for f, s in zip(files, schemas)},
                     {str(f): _shard_heats(s) for f, s in zip(files, schemas)})


def _shard_classes(schema: pa.Schema) -> list[str]:
    """The classes of the model that wrote a shard: its schema's metadata or, for rows written by
    hand, its ``prob_<class>`` columns."""
    return classes_of(schema) or [n[len("prob_"):] for n in schema.names if n.startswith("prob_")]


def _shard_heats(schema: pa.Schema) -> list[str]:
    """A shard's ``heatmap_<m>`` columns in its job's method order (every-image methods, then budgeted
    ones); for rows written by hand, in column order."""
    ordered = [method_columns(m)["heatmap"] for m in methods_of(schema)]
    return [c for c in ordered if c in schema.names] or [n for n in schema.names if n.startswith("heatmap_")]


def per_model(data: ScoreData) -> Iterator[ScoreData]:
    """The rows split by the classes of the model that scored them: one ScoreData per class list
    (its ``classes``: that model's), over the shards written with it."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for shard, classes in data.shard_classes.items():
        groups.setdefault(tuple(classes), []).append(shard)
    for classes, shards in groups.items():
        dataset = pads.dataset(shards, schema=data.dataset.schema, format="parquet")
        yield replace(data, dataset=dataset, classes=list(classes),
                      shard_classes={f: list(classes) for f in shards})


def batches(data: ScoreData, columns: list[str], where: pc.Expression | None = None,
            with_root: bool = False) -> Iterator[pa.Table]:
    """The rows in record batches (one batch read ahead at a time), as Arrow tables; with ``with_root``,
    ``scoring_out`` (the job's OUT folder) and ``shard_file`` are added from the shard each row comes from."""
    from allcluster.score.output import row_keys

    shown = data.present(columns)
    keys = [c for c in ("path", "run_id") if data.superseded and c not in shown]
    wanted = shown + keys + (["__filename"] if with_root else [])
    scanner = data.dataset.scanner(columns=wanted, filter=where, batch_size=BATCH_ROWS, batch_readahead=1,
                                   fragment_readahead=1)
    files = pa.array(list(data.roots), pa.string())
    roots = pa.array([str(r) for r in data.roots.values()], pa.string())
    for batch in scanner.to_batches():
        table = pa.Table.from_batches([batch])
        if data.superseded:
            table = table.filter(pc.invert(pc.is_in(row_keys(table), data.superseded))).drop_columns(keys)
        if table.num_rows:
            if with_root:
                shard = table.column("__filename")
                table = table.drop_columns(["__filename"]).append_column(
                    "scoring_out", pc.take(roots, pc.index_in(shard, value_set=files))).append_column("shard_file", shard)
            yield table


def scan(data: ScoreData, columns: list[str], where: pc.Expression | None = None,
         with_root: bool = False) -> Iterator[pd.DataFrame]:
    """:func:`batches` as DataFrames."""
    for table in batches(data, columns, where, with_root):
        yield table.to_pandas()


def check_columns(data: ScoreData, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in data.names]
    if missing:
        raise ConfigError(f"{what} {', '.join(missing)}: not a column of the scoring rows; columns: "
                          + ", ".join(n for n in data.names if not n.startswith(("prob_", "cal_prob_"))))


def check_group_keys(keys: list[str]) -> None:
    """A roll-up key must not be named like a column of the roll-up itself (a counter)."""
    clash = [k for k in keys if k in [*COUNTERS, "confidence_sum", "confidence_mean"] or k.startswith(CLASS_COUNT_PREFIX)]
    if clash:
        raise ConfigError(f"--group-by {', '.join(clash)}: a roll-up table counts this itself "
                          f"(its columns: {', '.join(COUNTERS)}, confidence_mean, {CLASS_COUNT_PREFIX}<class>); "
                          "group by another column")


# rows that are no duplicate of another file (a duplicate carries its first copy's map and scores)
FIRST_COPIES = pc.field("duplicate_of").is_null() | (pc.field("duplicate_of") == "")


def explanation_quality(data: ScoreData) -> pd.DataFrame:
    """Per explanation method: maps written and the means, over the rows that have them, of the map's
    share on the cell (``on_cell_<m>``) and of its faithfulness (``faith_drop_<m>``, ``faith_kept_<m>``);
    first copies only (a duplicate's values are its first copy's)."""
    methods = [m for m in data.methods if method_columns(m)["heatmap"] in data.names]
    stats = {"on_cell": "on_cell_mean", "drop": "faith_drop_mean", "kept": "faith_kept_mean"}
    columns = [method_columns(m)[k] for m in methods for k in ("heatmap", *stats)]
    sums = pd.Series(0.0, index=data.present(columns))
    counts = sums.copy()
    for df in scan(data, columns, FIRST_COPIES):
        sums = sums.add(df.select_dtypes("number").sum(), fill_value=0)
        counts = counts.add(df.count(), fill_value=0)
    rows = []
    for m in methods:
        c = method_columns(m)
        row = {"method": m, "maps": int(counts.get(c["heatmap"], 0))}
        row.update({name: sums[c[k]] / counts[c[k]] if counts.get(c[k], 0) else np.nan for k, name in stats.items()})
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", "maps", *stats.values()])


def default_malignant(classes: list[str]) -> list[str]:
    """Every class except one called Benign/benign."""
    return [c for c in classes if c.lower() != "benign"]


def check_classes(data: ScoreData, names: list[str]) -> None:
    unknown = [n for n in names if n not in data.classes]
    if unknown:
        raise ConfigError(f"--malignant {', '.join(unknown)}: not a class of the model; classes: "
                          + ", ".join(data.classes))


# ---- scoring rows: counts and roll-ups (streamed) -----------------------------------------------------
def _indicators(df: pd.DataFrame, classes: list[str], malignant: list[str]) -> pd.DataFrame:
    """Per-row 0/1 counters (and the confidence to average) that sum to a group's counts."""
    ok = df["status"] == "ok"
    predicted = df["predicted_class"]
    frame = pd.DataFrame({
        "rows": 1, "ok": ok, "errors": df["status"] == "error",
        "uncertain": ok & df["uncertain"].fillna(False).astype(bool),
        "malignant": ok & predicted.isin(malignant),
        "duplicates": df["duplicate_of"].fillna("") != "",
        "confidence_sum": df["confidence"].where(ok, 0.0).fillna(0.0).astype("float64")}, index=df.index)
    for name in classes:
        frame[class_count_column(name)] = ok & (predicted == name)
    return frame.astype({c: "int64" for c in frame.columns if c != "confidence_sum"})


def _finish_counts(sums: pd.DataFrame, key: str) -> pd.DataFrame:
    sums = sums.reset_index().rename(columns={"index": key})
    mean = sums.pop("confidence_sum") / sums["ok"].where(sums["ok"] > 0)
    sums["confidence_mean"] = mean
    ints = [c for c in sums.columns if c not in (key, "confidence_mean")]
    return sums.astype({c: "int64" for c in ints}).sort_values(key, kind="mergesort").reset_index(drop=True)


def aggregate(data: ScoreData, keys: list[str], malignant: list[str]) -> dict[str, pd.DataFrame]:
    """Counts per value of each of ``keys`` in one pass over the rows: the :data:`COUNTERS` (rows, ok,
    errors, uncertain, malignant, duplicates), one count per predicted class (:func:`class_count_column`)
    and the mean confidence of ok rows. Null and empty key values are one group, ``(none)``."""
    needed = ["status", "predicted_class", "uncertain", "confidence", "duplicate_of", *keys]
    sums: dict[str, pd.DataFrame | None] = dict.fromkeys(keys)
    for df in scan(data, list(dict.fromkeys(needed))):
        counters = _indicators(df, data.classes, malignant)
        for key in keys:
            group = df[key].astype("string").fillna(NONE).replace("", NONE).rename(key)
            part = counters.groupby(group.to_numpy()).sum()
            sums[key] = part if sums[key] is None else sums[key].add(part, fill_value=0)
    none = _indicators(pd.DataFrame({c: pd.Series(dtype="object") for c in needed}), data.classes, malignant)
    return {key: _finish_counts(none if sums[key] is None else sums[key], key) for key in keys}   # no rows: zeros


def class_counts(per_class: pd.DataFrame) -> pd.DataFrame:
    """Counts per predicted class (ok rows), from ``aggregate(...)["predicted_class"]``."""
    table = per_class[per_class["ok"] > 0]
    return pd.DataFrame({"predicted_class": table["predicted_class"], "images": table["ok"],
                         "share": table["ok"] / max(1, int(table["ok"].sum())), "uncertain": table["uncertain"],
                         "confidence_mean": table["confidence_mean"]}).reset_index(drop=True)


def errors_by_type(per_type: pd.DataFrame) -> pd.DataFrame:
    """Error rows per ``error_type``, from ``aggregate(...)["error_type"]``."""
    table = per_type[per_type["errors"] > 0][["error_type", "errors"]]
    return table.sort_values(["errors", "error_type"], ascending=[False, True]).reset_index(drop=True)


def overview(per_class: pd.DataFrame, morning_rows: int) -> pd.DataFrame:
    """One-row totals of the scoring inputs (any ``aggregate`` table sums to the same totals)."""
    totals = per_class[COUNTERS].sum()
    return pd.DataFrame([{**{k: int(v) for k, v in totals.items()}, "morning_list": int(morning_rows)}])


# ---- the morning list ---------------------------------------------------------------------------------
def _flagged(malignant: list[str]) -> pc.Expression:
    return (pc.field("status") == "ok") & ((pc.field("uncertain") == True)  # noqa: E712 (an Arrow expression)
                                           | pc.field("predicted_class").isin(pa.array(malignant, pa.string())))


def _priority_keys(table: pa.Table, malignant: list[str], malignant_cols: list[str]) -> pa.Table:
    """Adds ``tier`` (1 malignant and uncertain, 2 malignant, 3 uncertain), ``reason`` and
    ``malignant_probability`` (calibrated probabilities of the malignant classes summed)."""
    probability = pa.array(np.zeros(table.num_rows))
    for column in malignant_cols:
        probability = pc.add(probability, pc.fill_null(pc.cast(table[column], pa.float64()), 0.0))
    is_malignant = pc.is_in(table["predicted_class"], pa.array(malignant, pa.string()))
    uncertain = pc.fill_null(table["uncertain"], False)
    tier = pc.if_else(pc.and_(is_malignant, uncertain), 1, pc.if_else(is_malignant, 2, 3)).cast(pa.int8())
    reasons = pa.DictionaryArray.from_arrays(pc.subtract(tier, 1), pa.array([TIERS[t] for t in sorted(TIERS)]))
    return (table.append_column("tier", tier).append_column("reason", reasons)
            .append_column("malignant_probability", probability))


def _with_heatmap(table: pa.Table, data: ScoreData) -> pa.Table:
    """``table`` (from :func:`batches` ``with_root``) with ``heatmap``, the absolute path (``scoring_out``
    / relative path) of each row's first map in its own job's method order (its first every-image
    method's, the one its ``cam_method`` names; else its first budgeted method's), and ``heatmap_method``,
    whose map it is ("" where a row has none); the map and ``shard_file`` columns dropped."""
    path = method = pa.array([""] * table.num_rows, pa.string())
    shards = table["shard_file"]
    for shard in pc.unique(shards).to_pylist():
        mine = pc.equal(shards, shard)
        for column in reversed(data.shard_heats.get(shard, [])):         # the earlier column wins
            rel = pc.fill_null(table[column], "")
            has = pc.and_(mine, pc.not_equal(rel, ""))
            path = pc.if_else(has, pc.binary_join_element_wise(table["scoring_out"], rel, "/"), path)
            method = pc.if_else(has, pa.scalar(column[len("heatmap_"):]), method)
    return (table.drop_columns([*data.heatmap_columns, "shard_file"])
            .append_column("heatmap", path).append_column("heatmap_method", method))


def morning_list(data: ScoreData, malignant: list[str]) -> pa.Table:
    """Flagged images, most urgent first: ok rows predicted malignant or uncertain.

    Priority: 1 malignant and uncertain, 2 malignant, 3 uncertain (benign); inside a tier the higher
    calibrated malignant probability first, then the lower confidence, then the path. ``heatmap`` is
    the absolute path of the row's first map in its job's method order (a PNG, or the pack holding it
    under the row's ``sha256`` and ``heatmap_method``; see :func:`_with_heatmap`). Only the flagged rows' few columns are held, as Arrow (about 320 bytes a row),
    for the sort.
    """
    _, calibrated = class_columns(data.classes)
    malignant_cols = data.present([c for name, c in zip(data.classes, calibrated) if name in malignant])
    heats = data.heatmap_columns
    shown = data.present(["path", "predicted_class", "confidence", "uncertain", "label", "patient"])
    columns = ["reason", *shown, "malignant_probability", "heatmap", "heatmap_method", "sha256", "scoring_out"]
    parts = [_with_heatmap(_priority_keys(t, malignant, malignant_cols), data).select(["tier", *columns])
             for t in batches(data, [*shown, *malignant_cols, *heats, "sha256"], _flagged(malignant), with_root=True)]
    if not parts:
        names = ["priority", *columns]
        return pa.table({n: pa.array([], pa.string()) for n in names})
    table = pa.concat_tables(parts)
    order = pc.sort_indices(table, sort_keys=[("tier", "ascending"), ("malignant_probability", "descending"),
                                              ("confidence", "ascending"), ("path", "ascending")])
    table = table.take(order).drop_columns(["tier"])
    return table.add_column(0, "priority", pa.array(np.arange(1, table.num_rows + 1)))


# ---- labelled rows: predictions against the truth -----------------------------------------------------
@dataclass
class Labelled:
    """The labelled ok rows, each scored against the classes of the model that scored it."""
    rows: pd.DataFrame      # label, y (index in ScoreData.classes), prob_* and cal_prob_* of every class
    unknown: pd.DataFrame   # scoring_out, label, rows: labelled ok rows whose label their model lacks


UNKNOWN_COLUMNS = ["scoring_out", "label", "rows"]


def labelled_rows(data: ScoreData) -> Labelled:
    """ok rows with a non-empty label, in memory (labelled rows are an evaluation set). A row whose
    label is one of its own model's classes goes to ``rows``, its probabilities in the columns of
    every class of ``data`` (0 for a class its model lacks), so jobs of models with other classes
    are scored side by side; a row whose label its model lacks is counted in ``unknown``."""
    known, unknown = [], []
    for model in per_model(data):
        df = _labelled_of(model)
        mine = df["label"].isin(model.classes)
        raw, calibrated = class_columns(model.classes)
        known.append(df[mine].drop(columns="scoring_out").dropna(subset=raw + calibrated))
        unknown.append(df.loc[~mine, ["scoring_out", "label"]])
    return Labelled(_in_all_classes(known, data.classes), _count_unknown(unknown))


def labelled_count(data: ScoreData, ok_only: bool = False) -> int:
    """Rows with a non-empty label (with ``ok_only``, ``ok`` rows only), read from the label column."""
    if "label" not in data.names:
        return 0
    where = pc.field("label").is_valid() & (pc.field("label") != "")
    where = where & (pc.field("status") == "ok") if ok_only else where
    return sum(t.num_rows for t in batches(data, ["label"], where))


def _labelled_of(model: ScoreData) -> pd.DataFrame:
    """One model's ok rows with a label: label, split (the manifest's, "" when the rows have none), its
    probability columns and ``scoring_out``."""
    raw, calibrated = class_columns(model.classes)
    columns = ["label", "split", *raw, *calibrated, "scoring_out"]
    if not model.classes or "label" not in model.names or not set(raw + calibrated) <= set(model.names):
        return pd.DataFrame(columns=columns)
    where = (pc.field("status") == "ok") & pc.field("label").is_valid() & (pc.field("label") != "")
    parts = list(scan(model, ["label", *model.present(["split"]), *raw, *calibrated], where, with_root=True))
    if not parts:
        return pd.DataFrame(columns=columns)
    rows = pd.concat(parts, ignore_index=True)
    return rows.assign(split=rows["split"].fillna("").astype(str) if "split" in rows else "")


def _in_all_classes(parts: list[pd.DataFrame], classes: list[str]) -> pd.DataFrame:
    """Rows of several models in the probability columns of all ``classes`` (0 where a model lacks
    one), with ``y``, the label's index in ``classes``."""
    raw, calibrated = class_columns(classes)
    columns = ["label", "split", *raw, *calibrated]
    parts = [p.reindex(columns=columns, fill_value=0.0) for p in parts if len(p)]
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    rows = rows.astype(dict.fromkeys(raw + calibrated, "float64"))
    rows.insert(1, "y", rows["label"].map({c: i for i, c in enumerate(classes)}).astype("int64"))
    return rows


def _count_unknown(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Rows per (scoring job, label), most first."""
    keys = UNKNOWN_COLUMNS[:2]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "rows" else "object") for c in UNKNOWN_COLUMNS})
    counts = pd.concat(parts, ignore_index=True).groupby(keys).size().rename("rows").reset_index()
    return counts.sort_values(["rows", *keys], ascending=[False, True, True], ignore_index=True)


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct score, from (0, 0) to (1, 1)."""
    positive, scores = np.asarray(positive, bool), np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, hit = scores[order], positive[order]
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])       # one threshold per distinct score
    tps, fps = np.cumsum(hit)[last], np.cumsum(~hit)[last]
    n_pos, n_neg = max(1, int(positive.sum())), max(1, int((~positive).sum()))
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


# ---- the gallery ----------------------------------------------------------------------------------------
def _ends(table: pa.Table, n: int) -> pa.Table:
    """Per predicted class: the ``n`` most confident and ``2n`` least confident rows (enough to pick
    ``n`` uncertain ones that are not among the confident ones); ties broken by path."""
    parts = []
    for name in pc.unique(table["predicted_class"]).to_pylist():
        rows = table.filter(pc.equal(table["predicted_class"], name))
        top = pc.select_k_unstable(rows, n, [("confidence", "descending"), ("path", "ascending")])
        bottom = pc.select_k_unstable(rows, 2 * n, [("confidence", "ascending"), ("path", "ascending")])
        parts.append(rows.take(np.union1d(top.to_numpy(), bottom.to_numpy())))
    return pa.concat_tables(parts)


def gallery_rows(data: ScoreData, n: int) -> pd.DataFrame:
    """Per predicted class, the ``n`` most confident then the ``n`` most uncertain ok rows that have
    a heatmap (first copies only: a duplicate would show the same image twice)."""
    heats = data.heatmap_columns
    if not heats or n <= 0:
        return pd.DataFrame(columns=GALLERY_COLUMNS)
    has_map = functools.reduce(operator.or_, [pc.field(h).is_valid() & (pc.field(h) != "") for h in heats])
    keep = None
    for table in batches(data, ["path", "sha256", "predicted_class", "confidence", "label", *heats],
                         (pc.field("status") == "ok") & has_map & FIRST_COPIES, with_root=True):
        table = _with_heatmap(table, data)
        keep = _ends(table if keep is None else pa.concat_tables([keep, table]), n)
    if keep is None:
        return pd.DataFrame(columns=GALLERY_COLUMNS)
    keep = keep.to_pandas()
    picked = []
    for name, group in keep.groupby("predicted_class", sort=True):
        ordered = group.sort_values(["confidence", "path"], ascending=[False, True], kind="mergesort")
        confident = ordered.head(n).assign(kind="most confident")
        rest = ordered[~ordered["path"].isin(confident["path"])]
        uncertain = rest.sort_values(["confidence", "path"], kind="mergesort").head(n).assign(kind="most uncertain")
        picked += [confident, uncertain]
    return pd.concat(picked, ignore_index=True)[GALLERY_COLUMNS[:-1] + data.present(["label"])]
