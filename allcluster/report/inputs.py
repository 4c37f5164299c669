"""What ``allcluster report`` reads: sweep experiment folders and scoring output folders, or their Parquet.

Each INPUT is classified without reading its rows (only Parquet footers):

* a folder with ``trials.parquet`` is a sweep experiment (``epochs.parquet`` next to it is used when present);
* a folder with ``rows/*.parquet`` is a scoring output folder (``OUT``; heatmap paths are relative to it);
* a folder of Parquet files, or one ``.parquet`` file, is classified by its columns: trials, epochs or
  scoring rows (rows inside ``OUT/rows/`` keep ``OUT`` as their root); a folder of row files must hold
  nothing else.

A scoring output's shard that is no readable Parquet file (empty, torn: a run killed while a copy was
cut short) is left out and named in the report's notes, as a scoring run leaves it out (and sets it
aside, scoring its files again). Anything else is a :class:`ConfigError` naming the path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from allcluster.config import ConfigError
from allcluster.score.output import parquet_files, shard_footers

TRIALS_COLUMNS = {"trial_id", "status", "val_macro_f1", "backbone"}
EPOCHS_COLUMNS = {"trial_id", "epoch", "val_macro_f1"}
ROWS_COLUMNS = {"path", "status", "predicted_class", "confidence"}


@dataclass
class SweepSource:
    """One sweep experiment: its folder and the tables found there."""
    dir: Path
    trials: Path | None = None
    epochs: Path | None = None


@dataclass
class ScoreSource:
    """One scoring output folder ``root`` and the row shards read from it, each with its footer's
    schema (read once, here)."""
    root: Path
    schemas: dict[Path, pa.Schema] = field(default_factory=dict)
    damaged: list[Path] = field(default_factory=list)      # shards left out: no readable Parquet

    @property
    def files(self) -> list[Path]:
        return sorted(self.schemas)


@dataclass
class Inputs:
    sweeps: list[SweepSource] = field(default_factory=list)
    scorings: list[ScoreSource] = field(default_factory=list)

    def describe(self) -> list[dict]:
        """One plain dict per source, for report.yaml / report.json."""
        sweeps = [{"kind": "sweep", "folder": str(s.dir),
                   "read": ", ".join(p.name for p in (s.trials, s.epochs) if p)} for s in self.sweeps]
        return sweeps + [{"kind": "scoring", "folder": str(s.root), "read": f"{len(s.files)} row shard(s)"
                          + (f" ({len(s.damaged)} damaged, left out)" if s.damaged else "")} for s in self.scorings]


def kind_of(schema: pa.Schema) -> str | None:
    """``trials``, ``epochs`` or ``rows`` from a Parquet schema's columns; None for another kind."""
    names = set(schema.names)
    for kind, needed in (("trials", TRIALS_COLUMNS), ("epochs", EPOCHS_COLUMNS), ("rows", ROWS_COLUMNS)):
        if needed <= names:
            return kind
    return None


def parquet_kind(path: Path) -> tuple[str, pa.Schema]:
    """The kind (:func:`kind_of`) and schema of one named Parquet file; a ConfigError naming it when it
    does not read or is none of the kinds."""
    try:
        schema = pq.read_schema(path)
    except Exception as err:   # pyarrow raises several types for a file that is not Parquet
        raise ConfigError(f"{path}: cannot read as Parquet ({err})") from err
    kind = kind_of(schema)
    if kind is None:
        raise ConfigError(f"{path}: a Parquet file with neither sweep columns ({', '.join(sorted(TRIALS_COLUMNS))}) "
                          f"nor scoring-row columns ({', '.join(sorted(ROWS_COLUMNS))})")
    return kind, schema


def scoring_source(root: Path, files: list[Path]) -> ScoreSource:
    """The row shards ``files`` of the scoring output ``root``, those whose footer does not read left
    out (:func:`~allcluster.score.output.shard_footers`)."""
    readable, damaged = shard_footers(files)
    if not readable:
        raise ConfigError(f"{root}: none of its {len(files)} row shard(s) is a readable Parquet file (e.g. "
                          f"{min(files)}); rerun its `allcluster score` command, which sets them aside and "
                          "scores their files again")
    return ScoreSource(root, readable, damaged)


def _rows_root(path: Path) -> Path:
    """The scoring OUT folder of a row shard (heatmap paths are relative to it)."""
    return path.parent.parent if path.parent.name == "rows" else path.parent


def _sibling(path: Path, name: str) -> Path | None:
    return path.parent / name if (path.parent / name).is_file() else None


def classify_file(path: Path) -> SweepSource | ScoreSource:
    """A single ``.parquet`` INPUT as a sweep or scoring source."""
    kind, schema = parquet_kind(path)
    if kind == "trials":
        return SweepSource(path.parent, path, _sibling(path, "epochs.parquet"))
    if kind == "epochs":
        return SweepSource(path.parent, _sibling(path, "trials.parquet"), path)
    return ScoreSource(_rows_root(path), {path: schema})


def _refuse_an_output_without_shards(path: Path) -> None:
    """A scoring output with no row shard yet: say why (a killed run's rows waiting in its journal, a
    run writing it now) and what to do, rather than that it is no output at all. Reads only: the
    report never writes into a scoring output (one writer per output)."""
    from allcluster.score.output import unfinished

    why = unfinished(path)
    raise ConfigError(f"{path}: a scoring output with no row shard in rows/ yet ({why or 'no run wrote one'}); "
                      "rerun its `allcluster score` command, which writes a killed run's journaled rows "
                      "first (or wait for the run writing it), then report")


def classify_folder(path: Path) -> SweepSource | ScoreSource:
    """A folder INPUT: sweep experiment, scoring OUT, or a folder of row shards."""
    if (path / "trials.parquet").is_file():
        return SweepSource(path, path / "trials.parquet", _sibling(path / "trials.parquet", "epochs.parquet"))
    if (path / "rows").is_dir() and parquet_files(path / "rows"):
        return scoring_source(path, parquet_files(path / "rows"))
    if (path / "rows").is_dir():
        _refuse_an_output_without_shards(path)
    files = parquet_files(path)
    if path.name == "rows" and files:          # OUT/rows named itself
        return scoring_source(path.parent, files)
    # a torn file is left out like one in OUT/rows; any other kind of file refuses the folder
    readable, damaged = shard_footers(files)
    kinds = {f: kind_of(schema) for f, schema in readable.items()}
    if "rows" in kinds.values():
        others = [f for f, kind in kinds.items() if kind != "rows"]
        if others:
            raise ConfigError(f"{path}: a folder of scoring rows that also holds {others[0].name}, which is no "
                              "rows file; name the row files themselves, or move the others out")
        return ScoreSource(path, readable, damaged)
    raise ConfigError(f"{path}: not a sweep experiment folder (no trials.parquet) nor a scoring output folder "
                      "(no rows/*.parquet)")


def classify(path: str | Path) -> SweepSource | ScoreSource:
    """One INPUT; a clear error naming it when it is none of the known kinds."""
    path = Path(path)
    if path.is_dir():
        return classify_folder(path.resolve())
    if path.is_file() and path.suffix.lower() == ".parquet":
        return classify_file(path.resolve())
    if path.exists():
        raise ConfigError(f"{path}: expected a folder or a .parquet file")
    raise FileNotFoundError(f"{path}: report input not found")


def collect_inputs(paths: list[str | Path]) -> Inputs:
    """Classify every INPUT; sources naming the same folder are merged (no row is read twice)."""
    if not paths:
        raise ConfigError("no INPUT given: name sweep experiment folders and/or scoring output folders")
    sweeps: dict[Path, SweepSource] = {}
    scorings: dict[Path, ScoreSource] = {}
    for path in paths:
        source = classify(path)
        if isinstance(source, SweepSource):
            known = sweeps.setdefault(source.dir, SweepSource(source.dir))
            known.trials = known.trials or source.trials
            known.epochs = known.epochs or source.epochs
        else:
            known = scorings.setdefault(source.root, ScoreSource(source.root))
            known.schemas.update(source.schemas)
            known.damaged = sorted(set(known.damaged) | set(source.damaged))
    return Inputs(list(sweeps.values()), list(scorings.values()))


def model_info(root: Path):
    """The :class:`~allcluster.models.card.ModelInfo` of the model a scoring job used (its
    ``OUT/model.json``); ``ModelInfo()``, the card's defaults, when it is gone or unreadable."""
    from allcluster.models.card import ModelInfo

    try:
        return ModelInfo.read(root)
    except (OSError, ValueError):
        return ModelInfo()
