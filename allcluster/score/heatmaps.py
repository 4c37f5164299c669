"""Heatmaps of a scoring output: where they are stored and how to read one back.

Two stores (``explain.heatmaps``):

* ``packed`` (default): each row shard's maps go into one Parquet *pack* beside it,
  ``heatmaps/part-<run>-<n>.parquet`` with columns :data:`PACK_COLUMNS` (sorted by sha256, small
  row groups), so the number of files grows with the shards, not the images (scratch filesystems
  cap inodes). A row's ``heatmap_<m>`` names its pack; the pack is written before the rows that
  point at it, so a row never names a map that is not there.
* ``files``: one 8-bit PNG per image and method, ``heatmaps/ab/<sha256>.<m>.png`` (and JPEG
  overlays under ``overlays/``), written by the model replicas.

:func:`load_heatmap` reads either from a row's ``heatmap_<m>`` value; :func:`find_heatmap` finds an
image's map by its sha256 alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from allcluster.atomic import atomic_write, atomic_write_bytes, damaged_parquet
from allcluster.score.rows import method_columns, slug
from allcluster.xai.overlay import jet_overlay

STORES = ("packed", "files")
# method: the column-safe name (``gradcam++`` -> ``gradcampp``, as in ``heatmap_gradcampp``)
PACK_COLUMNS = [("sha256", pa.string()), ("method", pa.string()), ("png", pa.binary()), ("overlay_jpg", pa.binary())]
PACK_ROW_GROUP = 128          # maps per row group: a lookup by sha256 reads about one group (~1 MB)
BYTES_PREFIX = "_png_"        # in-flight column of a batch: one method's PNG bytes (packed store only)
OVERLAY_PREFIX = "_jpg_"


def heatmap_relpath(sha: str, method: str, suffix: str = ".png") -> str:
    """Deterministic name of one image's map in the ``files`` store: ``heatmaps/ab/<sha256>.gradcam.png``."""
    return f"heatmaps/{sha[:2]}/{sha}.{slug(method)}{suffix}"


def encode_maps(maps_u8: np.ndarray, pixels: np.ndarray | None = None) -> tuple[list[bytes], list[bytes] | None]:
    """8-bit maps as PNG bytes, plus colour overlays over ``pixels`` as JPEG bytes when given."""
    import cv2

    pngs = [cv2.imencode(".png", m)[1].tobytes() for m in maps_u8]
    if pixels is None:
        return pngs, None
    blends = [jet_overlay(p, m)[..., ::-1] for p, m in zip(pixels, maps_u8)]       # RGB -> cv2's BGR
    return pngs, [cv2.imencode(".jpg", b, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes() for b in blends]


def write_heatmap_files(out_dir: Path, shas: list[str], method: str, pngs: list[bytes],
                        overlays: list[bytes] | None) -> list[str]:
    """The ``files`` store: one PNG per map (and JPEG overlay), atomically; their relative paths."""
    names = []
    for i, sha in enumerate(shas):
        rel = heatmap_relpath(sha, method)
        atomic_write_bytes(out_dir / rel, pngs[i])
        if overlays is not None:
            atomic_write_bytes(out_dir / heatmap_relpath(sha, method, ".jpg").replace("heatmaps/", "overlays/", 1),
                               overlays[i])
        names.append(rel)
    return names


def bytes_columns(method: str) -> tuple[str, str]:
    """The in-flight (PNG, JPEG overlay) columns of ``method`` in a packed-store batch."""
    return BYTES_PREFIX + slug(method), OVERLAY_PREFIX + slug(method)


def pack_of(batch: pa.Table, methods: list[str]) -> pa.Table:
    """The maps a batch carries (``_png_<m>`` columns) as pack rows."""
    parts = []
    for method in methods:
        png, jpg = bytes_columns(method)
        if png not in batch.column_names:
            continue
        has = batch.filter(batch[png].is_valid())
        if has.num_rows:
            overlay = has[jpg] if jpg in has.column_names else pa.nulls(has.num_rows, pa.binary())
            parts.append(pa.table([has["sha256"], pa.array([slug(method)] * has.num_rows, pa.string()),
                                   has[png].cast(pa.binary()), overlay.cast(pa.binary())],
                                  schema=pa.schema(PACK_COLUMNS)))
    return pa.concat_tables(parts) if parts else pa.schema(PACK_COLUMNS).empty_table()


def point_rows_at_pack(batch: pa.Table, methods: list[str], rel: str) -> pa.Table:
    """Set ``heatmap_<m>`` to the pack's relative path on the rows whose ``_png_<m>`` it holds."""
    import pyarrow.compute as pc

    for method in methods:
        png, column = bytes_columns(method)[0], method_columns(method)["heatmap"]
        if png in batch.column_names and column in batch.column_names:
            where = batch[png].is_valid()
            batch = batch.set_column(batch.column_names.index(column), column,
                                     pc.if_else(where, pa.scalar(rel), batch[column].cast(pa.string())))
    return batch


def write_pack(path: Path, pack: pa.Table) -> Path:
    """One pack, sorted by (sha256, method) in small row groups so a lookup reads one group; atomic."""
    import pyarrow.parquet as pq

    pack = pack.sort_by([("sha256", "ascending"), ("method", "ascending")])
    return atomic_write(path, lambda tmp: pq.write_table(pack, tmp, row_group_size=PACK_ROW_GROUP,
                                                         compression="none"))


def _from_pack(packs: list[Path], sha256: str, method: str) -> bytes | None:
    """The PNG under (sha256, method) in the first of ``packs`` holding it. Each pack is sorted by
    sha256, so its footer's row-group statistics rule out all groups but one; of that group only the
    key columns are read, then the one PNG column chunk. A damaged pack (no readable Parquet) is an
    ``OSError`` naming it, unless another pack holds the map."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    method = slug(method)
    damaged = None
    for pack in packs:
        try:
            file = pq.ParquetFile(pack)
            meta = file.metadata
            key = meta.schema.to_arrow_schema().get_field_index("sha256")
            for group in range(meta.num_row_groups):
                stats = meta.row_group(group).column(key).statistics
                if stats is not None and stats.has_min_max and not stats.min <= sha256 <= stats.max:
                    continue
                keys = file.read_row_group(group, columns=["sha256", "method"])
                hit = pc.and_(pc.equal(keys["sha256"], sha256), pc.equal(keys["method"], method))
                index = pc.index(hit, True).as_py()
                if index >= 0:
                    return file.read_row_group(group, columns=["png"])["png"][index].as_py()
        except (pa.ArrowInvalid, OSError) as err:
            if not damaged_parquet(err):
                raise
            damaged = OSError(f"{pack}: not a readable heatmap pack ({err})")     # another may hold the map
    if damaged is not None:
        raise damaged
    return None


def heatmap_png(ref: str | Path, sha256: str, method: str) -> bytes:
    """The PNG bytes of one map from a row's ``heatmap_<m>`` value made absolute (``OUT/<value>``):
    a loose PNG file, or a pack holding it under (sha256, method). ``FileNotFoundError`` if absent."""
    ref = Path(ref)
    if ref.suffix != ".parquet":
        return ref.read_bytes()
    found = _from_pack([ref], sha256, method)
    if found is None:
        raise FileNotFoundError(f"{ref}: holds no {method} map for sha256 {sha256}")
    return found


def load_heatmap(ref: str | Path, sha256: str, method: str) -> np.ndarray:
    """One map as a uint8 array (H, W) from a row's ``heatmap_<m>`` value made absolute; an
    ``OSError`` naming it when it is missing or not a readable PNG."""
    import cv2

    data = np.frombuffer(heatmap_png(ref, sha256, method), np.uint8)
    heat = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if heat is None:
        raise OSError(f"{ref}: the {method} map of sha256 {sha256} is not a readable PNG")
    return heat


def find_heatmap(out: str | Path, sha256: str, method: str) -> bytes:
    """The PNG bytes of the map of the image with content ``sha256`` in scoring output ``out``, in
    either store (no row needed: each pack's footer rules out all but one of its row groups)."""
    out = Path(out)
    loose = out / heatmap_relpath(sha256, method)
    if loose.is_file():
        return loose.read_bytes()
    packs = sorted((out / "heatmaps").glob("*.parquet"))
    found = _from_pack(packs, sha256, method) if packs else None
    if found is None:
        raise FileNotFoundError(f"{out}: no {method} map for sha256 {sha256}")
    return found
