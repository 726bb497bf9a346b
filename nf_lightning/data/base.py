"""The LightningDataModule base shared by every data set: splits, subsets, loaders, fingerprint."""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader

from nf_lightning.data.paths import resolve_data_dir
from nf_lightning.data.sampling import balanced_choice
from nf_lightning.data.tensor_dataset import ImageTensorDataset, collate_batch

_SPLIT_SCHEME = 1
"""Version of the split/subset algorithm; part of the fingerprint, bump it when they change."""


@dataclass(frozen=True)
class OfficialSplits:
    """A data set as published: uint8 ``(N, 3, 32, 32)`` images, int64 labels, class names."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]


@dataclass(frozen=True)
class _Prepared:
    official: OfficialSplits
    train_rows: Tensor
    val_rows: Tensor


class ImageDataModule(LightningDataModule, ABC):
    """Base of the image classification data modules.

    The official training set is split, class-balanced and seeded, into a training
    split and a held-out validation split of ``val_size`` images (``val_dataloader``);
    ``test_dataloader`` serves the official test set. ``train_subset`` / ``val_subset``
    then take class-balanced, seeded subsets of those splits. Images stay in memory
    as one uint8 tensor; batches are augmented (train only: random crop 32 with
    padding 4, horizontal flip) and normalised with the data set's mean/std by
    ``ImageTensorDataset``.

    Args:
        data_dir: where the data set is looked for; default ``$NF_DATA_DIR``, else
            ``~/.cache/nf_lightning/data``.
        batch_size: loader batch size; a public attribute that may change between loaders.
        num_workers: ``DataLoader`` worker processes.
        val_size: images held out of the training set for validation; default per data set.
        train_subset: use only this many training-split images (class-balanced).
        val_subset: use only this many validation-split images (class-balanced).
        augment: augment the training loader.
        seed: seed of the split and the subsets.

    Example:
        >>> from nf_lightning.data import CIFAR10FolderDataModule
        >>> dm = CIFAR10FolderDataModule("../shared/datasets", train_subset=1000)  # doctest: +SKIP
        >>> x, y = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> x.shape, dm.num_classes  # doctest: +SKIP
        (torch.Size([128, 3, 32, 32]), 10)
    """

    name: ClassVar[str]
    """Registry name, e.g. ``"cifar10"``."""
    display_name: ClassVar[str]
    num_classes: ClassVar[int]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]
    default_val_size: ClassVar[int] = 5000
    input_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | None = None,
        train_subset: int | None = None,
        val_subset: int | None = None,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._data_root = resolve_data_dir(data_dir)
        self.batch_size = _count("batch_size", batch_size, minimum=1)
        self.num_workers = _count("num_workers", num_workers, minimum=0)
        self.augment = augment
        self._val_size = _count(
            "val_size", self.default_val_size if val_size is None else val_size, minimum=1
        )
        self._train_subset = _optional_count("train_subset", train_subset)
        self._val_subset = _optional_count("val_subset", val_subset)
        self._seed = _count("seed", seed, minimum=0)
        self._prepared: _Prepared | None = None

    @abstractmethod
    def _load_official(self) -> OfficialSplits:
        """Read the official train and test sets (raising ``DatasetNotFoundError`` if absent)."""

    # The options below define the data (and the fingerprint), so they are read-only.

    @property
    def data_dir(self) -> Path:
        """Where the data set is looked for; only ever read."""
        return self._data_root.path

    @property
    def val_size(self) -> int:
        return self._val_size

    @property
    def train_subset(self) -> int | None:
        return self._train_subset

    @property
    def val_subset(self) -> int | None:
        return self._val_subset

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def fingerprint(self) -> str:
        """Stable hash of what defines the served data: data set, splits, subsets, seed, normalisation.

        Augmentation, batch size and workers are not part of it: they do not change
        which images, labels and normalisation each split holds.
        """
        spec = {
            "dataset": self.name,
            "input_shape": self.input_shape,
            "val_size": self.val_size,
            "train_subset": self.train_subset,
            "val_subset": self.val_subset,
            "seed": self.seed,
            "mean": self.mean,
            "std": self.std,
            "split_scheme": _SPLIT_SCHEME,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, in label order."""
        return self._ensure_setup().official.classes

    def setup(self, stage: str | None = None) -> None:
        """Load the data set and draw the splits (once; later calls do nothing)."""
        if self._prepared is None:
            official = self._load_official()
            self._check(official)
            self._prepared = self._split(official)

    def train_dataset(self, augment: bool) -> ImageTensorDataset:
        """The training split in a fixed order, with or without augmentation."""
        prepared = self._ensure_setup()
        official = prepared.official
        return self._dataset(official.train_images, official.train_labels, prepared.train_rows, augment)

    def val_dataset(self) -> ImageTensorDataset:
        """The held-out validation split (never augmented)."""
        prepared = self._ensure_setup()
        official = prepared.official
        return self._dataset(official.train_images, official.train_labels, prepared.val_rows, False)

    def test_dataset(self) -> ImageTensorDataset:
        """The official test set (never augmented)."""
        official = self._ensure_setup().official
        return self._dataset(official.test_images, official.test_labels, None, False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(self.augment), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset(), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset(), shuffle=False)

    def _ensure_setup(self) -> _Prepared:
        if self._prepared is None:
            self.setup()
        assert self._prepared is not None
        return self._prepared

    def _dataset(
        self, images: Tensor, labels: Tensor, rows: Tensor | None, augment: bool
    ) -> ImageTensorDataset:
        return ImageTensorDataset(images, labels, self.mean, self.std, indices=rows, augment=augment)

    def _loader(self, dataset: ImageTensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            persistent_workers=self.num_workers > 0,
        )

    def _check(self, official: OfficialSplits) -> None:
        where = f"{self.display_name} in {self._data_root}"
        if len(official.classes) != self.num_classes:
            raise ValueError(f"{where}: found {len(official.classes)} classes, expected {self.num_classes}")
        for split in ("train", "test"):
            images: Tensor = getattr(official, f"{split}_images")
            labels: Tensor = getattr(official, f"{split}_labels")
            if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.input_shape:
                raise ValueError(
                    f"{where}: {split} images must be uint8 (N, {', '.join(map(str, self.input_shape))}), "
                    f"got {images.dtype} {tuple(images.shape)}"
                )
            if labels.shape != images.shape[:1] or len(labels) == 0:
                raise ValueError(f"{where}: {len(images)} {split} images but {len(labels)} labels")
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"{where}: {split} labels must lie in [0, {self.num_classes})")

    def _split(self, official: OfficialSplits) -> _Prepared:
        labels = official.train_labels.numpy()

        def draw(rows: np.ndarray, size: int | None, what: str, stream: int) -> np.ndarray:
            if size is None:
                return rows
            rng = np.random.default_rng([self.seed, stream])
            return rows[balanced_choice(labels[rows], size, self.num_classes, rng, what)]

        if self.val_size >= len(labels):
            raise ValueError(
                f"val_size={self.val_size} leaves no training images: {self.display_name} "
                f"has {len(labels)} training images"
            )
        all_rows = np.arange(len(labels), dtype=np.int64)
        val_rows = draw(all_rows, self.val_size, "val_size", 0)
        train_rows = np.setdiff1d(all_rows, val_rows, assume_unique=True)
        return _Prepared(
            official,
            train_rows=torch.from_numpy(draw(train_rows, self.train_subset, "train_subset", 1)),
            val_rows=torch.from_numpy(draw(val_rows, self.val_subset, "val_subset", 2)),
        )


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _optional_count(name: str, value: object) -> int | None:
    return None if value is None else _count(name, value, minimum=1)
