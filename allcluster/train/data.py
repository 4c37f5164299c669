"""Training data: manifest splits over the decoded-image cache, as PyTorch datasets and loaders.

No JPEG is decoded here: images come from the node's memory-mapped cache as uint8, augmentation runs
on uint8 tensors in the loader workers, and normalisation happens on the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from allcluster.train.augment import ImageTransform
from allcluster.console import say
from allcluster.data.cache import ImageCache
from allcluster.data.splits import splits_for_fold
from allcluster.train.config import DataConfig


@dataclass(frozen=True)
class Split:
    """One split: cache rows, integer labels and source paths, in manifest order."""
    name: str
    rows: np.ndarray
    labels: np.ndarray
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.rows)


def class_names(manifest: pd.DataFrame) -> list[str]:
    """Sorted labels of the rows that are in some split."""
    return sorted(manifest.loc[manifest["split"] != "", "label"].unique().tolist())


def stratified_subset(df: pd.DataFrame, max_per_class: int, seed: int) -> pd.DataFrame:
    """At most ``max_per_class`` rows of each label, chosen with a fixed seed (order preserved)."""
    if not max_per_class:
        return df
    picked = df.groupby("label", group_keys=False).apply(
        lambda g: g.sample(n=min(len(g), max_per_class), random_state=seed))
    return df.loc[sorted(picked.index)]


def cached_rows(part: pd.DataFrame, cache: ImageCache, name: str) -> pd.DataFrame:
    """The rows of split ``name`` whose image the cache holds; the others are left out, and said so
    (how many, and the first few errors, which name their files)."""
    valid = np.array([cache.valid[cache.row(s)] for s in part["sha256"]], dtype=bool)
    if not valid.all():
        errors = [cache.errors[cache.row(s)] for s in part.loc[~valid, "sha256"].iloc[:3]]
        say(f"[data] {name}: {int((~valid).sum())} of {len(part)} image(s) left out, not in the decoded-image "
            f"cache: {'; '.join(errors)}", logging.WARNING)
    return part[valid]


def load_splits(manifest: pd.DataFrame, cache: ImageCache, cfg: DataConfig, seed: int) -> tuple[list[str], dict[str, Split]]:
    """Class names and the train/val/test splits (the subset and fold chosen by ``cfg``)."""
    df = manifest[manifest["status"] == "ok"].copy()
    if cfg.fold >= 0:
        df["split"] = splits_for_fold(df, cfg.fold, cfg.manifest)
    classes = class_names(df)
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for name in ("train", "val", "test"):
        part = stratified_subset(df[df["split"] == name], cfg.max_per_class, seed)
        part = cached_rows(part, cache, name)
        splits[name] = Split(name, np.array([cache.row(s) for s in part["sha256"]], dtype=np.int64),
                             np.array([index[l] for l in part["label"]], dtype=np.int64),
                             tuple(part["path"]))
    return classes, splits


def oversample_minority(split: Split, seed: int) -> tuple[Split, np.ndarray]:
    """Copies of minority-class samples until every class matches the largest (paper 000).

    Returns the enlarged split and a flag per sample that is True for the added copies.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(split.labels)
    target = counts.max()
    extra = [rng.choice(np.flatnonzero(split.labels == c), size=target - n, replace=True)
             for c, n in enumerate(counts) if 0 < n < target]
    extra = np.concatenate(extra) if extra else np.zeros(0, dtype=np.int64)
    order = np.concatenate([np.arange(len(split)), extra])
    enlarged = Split(split.name, split.rows[order], split.labels[order], tuple(split.paths[i] for i in order))
    return enlarged, np.r_[np.zeros(len(split), bool), np.ones(len(extra), bool)]


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``n / (classes * n_c)`` (scikit-learn's "balanced"); absent classes get weight 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


class CachedImages(Dataset):
    """uint8 CHW images from the cache, with an optional transform (and another for copies)."""

    def __init__(self, cache_path: Path, size: int, split: Split, transform: ImageTransform | None = None,
                 copy_flags: np.ndarray | None = None, copy_transform: ImageTransform | None = None):
        self.cache_path, self.size, self.split = Path(cache_path), size, split
        self.transform, self.copy_transform = transform, copy_transform
        self.copy_flags = copy_flags if copy_flags is not None else np.zeros(len(split), bool)
        self._images: np.ndarray | None = None     # opened lazily: memmaps must not be pickled

    def _array(self) -> np.ndarray:
        if self._images is None:
            self._images = ImageCache.open(self.cache_path).images
        return self._images

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image = torch.from_numpy(np.array(self._array()[self.split.rows[i]])).permute(2, 0, 1)
        if self.copy_flags[i] and self.copy_transform is not None:
            image = self.copy_transform(image)
        if self.transform is not None:
            image = self.transform(image)
        return image.contiguous(), int(self.split.labels[i]), i


def train_loader(dataset: CachedImages, batch_size: int, rank: int, world: int, seed: int,
                 workers: int, pin: bool) -> tuple[DataLoader, DistributedSampler]:
    """Shuffled, rank-sharded loader (DistributedSampler); full batches only, as mixing needs pairs."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    drop_last = len(dataset) // world >= batch_size
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=pin, drop_last=drop_last, persistent_workers=workers > 0)
    return loader, sampler


def eval_loader(dataset: CachedImages, batch_size: int, rank: int, world: int, workers: int,
                pin: bool) -> DataLoader:
    """This rank's strided share of an evaluation split, unpadded, so every sample counts once."""
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin)
