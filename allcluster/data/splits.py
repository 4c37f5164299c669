"""Leak-free stratified splits: every copy of an image, and every image of a patient, in one split.

Rows are first joined into groups (union of "same sha256" and "same patient"); groups, never rows,
are assigned to splits, so a duplicated image or a patient can never straddle train and test
(the leak behind the 96.7% validation / 79.8% test gap reported in paper 004).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from allcluster.config import ConfigError

SPLITS = ("train", "val", "test")


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def leakage_groups(sha256: pd.Series, patient: pd.Series) -> np.ndarray:
    """Group id per row: rows sharing a sha256 or a (non-empty) patient id share a group."""
    uf = _UnionFind(len(sha256))
    for keys in (sha256, patient):
        first_row: dict[str, int] = {}
        for row, key in enumerate(keys.to_numpy()):
            if key is None or key == "" or (isinstance(key, float) and np.isnan(key)):
                continue
            if key in first_row:
                uf.union(first_row[key], row)
            else:
                first_row[key] = row
    roots = np.array([uf.find(i) for i in range(len(sha256))])
    _, dense = np.unique(roots, return_inverse=True)
    return dense


def _group_label_counts(groups: np.ndarray, labels: np.ndarray, classes: list[str]) -> np.ndarray:
    counts = np.zeros((groups.max() + 1, len(classes)), dtype=np.int64)
    class_index = {c: i for i, c in enumerate(classes)}
    np.add.at(counts, (groups, np.array([class_index[l] for l in labels])), 1)
    return counts


def stratified_group_split(labels: np.ndarray, groups: np.ndarray, ratios: tuple[float, ...],
                           seed: int) -> np.ndarray:
    """Assign each group to a split so that every class is split close to ``ratios``.

    Greedy by group size (largest first, ties in seeded random order): each group goes to the split
    whose per-class quota it fills best, i.e. the largest total remaining deficit for its classes.
    Returns a split index per row.
    """
    classes = sorted(set(labels))
    counts = _group_label_counts(groups, labels, classes)
    ratios_arr = np.asarray(ratios, dtype=np.float64) / sum(ratios)
    targets = ratios_arr[:, None] * counts.sum(axis=0)[None, :]
    filled = np.zeros_like(targets)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(counts))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    assignment = np.empty(len(counts), dtype=np.int64)
    for g in order:
        need = (targets - filled) / np.maximum(targets, 1e-9)       # relative deficit per split/class
        score = (need * counts[g][None, :]).sum(axis=1)
        score[ratios_arr == 0] = -np.inf
        choice = int(np.argmax(score))
        assignment[g] = choice
        filled[choice] += counts[g]
    return assignment[groups]


def stratified_group_kfold(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per row (scikit-learn's StratifiedGroupKFold, shuffled with ``seed``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    fold_of = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold_of[held_out] = fold
    return fold_of


def check_folds(folds: int, labels: np.ndarray, groups: np.ndarray, what: str) -> None:
    """Refuse ``folds`` that :func:`stratified_group_kfold` cannot make from these rows (``what``
    names them): more folds than groups, or than images in the largest class."""
    n_groups = len(np.unique(groups))
    largest = int(np.unique(labels, return_counts=True)[1].max()) if len(labels) else 0
    if folds > min(n_groups, largest):
        raise ConfigError(f"--folds {folds}: {what} form only {n_groups} group(s) (copies of one image, or the "
                          f"images of one patient, are one group) and the largest class has {largest} image(s); "
                          f"use at most {min(n_groups, largest)} folds (2 at least), or 0 for a plain split")


def assign_splits(df: pd.DataFrame, ratios: tuple[float, float, float], seed: int,
                  folds: int = 0) -> pd.DataFrame:
    """Fill ``split`` (and ``fold`` for k-fold) for the rows with ``eligible`` True.

    With ``folds`` > 1 the test share is held out first, the rest is divided into folds, and
    ``split`` shows fold 0 as validation; training picks another fold with ``data.fold``.
    """
    df = df.copy()
    df["split"] = ""
    df["fold"] = -1
    eligible = df["eligible"].to_numpy()
    if not eligible.any():
        return df
    sub = df[eligible]
    groups = leakage_groups(sub["sha256"], sub["patient"])
    labels = sub["label"].to_numpy()
    if folds > 1:
        test_ratio = ratios[2]
        holdout = stratified_group_split(labels, groups, (1.0 - test_ratio, test_ratio), seed)
        fold = np.full(len(sub), -1, dtype=np.int64)
        rest = holdout == 0
        check_folds(folds, labels[rest], groups[rest], f"the {int(rest.sum())} decodable images outside the test share")
        fold[rest] = stratified_group_kfold(labels[rest], groups[rest], folds, seed)
        split = np.where(holdout == 1, "test", np.where(fold == 0, "val", "train"))
        df.loc[eligible, "fold"] = fold
    else:
        split = np.array(SPLITS)[stratified_group_split(labels, groups, ratios, seed)]
    df.loc[eligible, "split"] = split
    return df


def splits_for_fold(df: pd.DataFrame, fold: int, manifest: str = "") -> pd.Series:
    """The ``split`` column with fold ``fold`` as validation (k-fold manifests only; -1: the
    manifest's own split); a fold the manifest (its file: ``manifest``) does not have is a
    :class:`ConfigError` naming ``data.fold``."""
    if fold < 0:
        return df["split"].copy()
    folds = int(df["fold"].max()) + 1 if len(df) else 0
    where = f"manifest {manifest}" if manifest else "the manifest"
    if folds < 1:
        raise ConfigError(f"data.fold: {fold}, but {where} has no folds; set data.fold: -1 (its own split), "
                          "or rebuild it with `allcluster index --folds K`")
    if not 0 <= fold < folds:
        raise ConfigError(f"data.fold: {fold} is out of range: {where} has {folds} folds, 0 to {folds - 1} "
                          "(or -1 for its own split)")
    split = df["split"].copy()
    in_folds = df["fold"] >= 0
    split[in_folds] = np.where(df.loc[in_folds, "fold"] == fold, "val", "train")
    return split
