"""CIFAR-10 and CIFAR-100 from the official Python pickles (torchvision's layout)."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torchvision import datasets

from nf_lightning.data.base import ImageDataModule, OfficialSplits
from nf_lightning.data.paths import DatasetNotFoundError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class PickleLayout:
    """Files and keys of one CIFAR pickle release."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    url: str


CIFAR10_LAYOUT = PickleLayout(
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
)
CIFAR100_LAYOUT = PickleLayout(
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
)


def read_cifar_pickles(folder: Path, layout: PickleLayout) -> OfficialSplits:
    """Read a CIFAR pickle folder (e.g. ``cifar-100-python/``) without torchvision's md5 checks.

    >>> splits = read_cifar_pickles(Path("data/cifar-10-batches-py"), CIFAR10_LAYOUT)  # doctest: +SKIP
    >>> splits.train_images.shape  # doctest: +SKIP
    torch.Size([50000, 3, 32, 32])
    """
    train_images, train_labels = _read_batches(folder, layout.train_files, layout.label_key)
    test_images, test_labels = _read_batches(folder, layout.test_files, layout.label_key)
    names = _unpickle(folder / layout.meta_file).get(layout.names_key)
    if not isinstance(names, list):
        raise ValueError(f"{folder / layout.meta_file}: no {layout.names_key!r} list of class names")
    return OfficialSplits(train_images, train_labels, test_images, test_labels, tuple(names))


def _read_batches(
    folder: Path, files: tuple[str, ...], label_key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in files:
        batch = _unpickle(folder / name)
        data, batch_labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
            raise ValueError(f"{folder / name}: 'data' must be a uint8 array of shape (N, 3072)")
        if batch_labels is None or len(batch_labels) != len(data):
            raise ValueError(f"{folder / name}: needs {len(data)} {label_key!r}, one per image")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _unpickle(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        content = pickle.load(f, encoding="latin1")
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return content


class _CIFARPickleDataModule(ImageDataModule):
    """Shared loading of the CIFAR pickle releases; ``download=True`` fetches them with torchvision."""

    layout: ClassVar[PickleLayout]
    torchvision_dataset: ClassVar[type[datasets.CIFAR10]]

    def __init__(
        self, data_dir: str | os.PathLike[str] | None = None, *, download: bool = False, **options: Any
    ) -> None:
        super().__init__(data_dir, **options)
        self.download = download

    @property
    def folder(self) -> Path:
        """The pickle folder inside ``data_dir``."""
        return self.data_dir / self.layout.folder

    def prepare_data(self) -> None:
        """Download and unpack the release into ``data_dir`` if ``download`` (needs network)."""
        if not self.download:
            self._check_present()
            return
        try:
            self.torchvision_dataset(str(self.data_dir), train=True, download=True)
        except OSError as err:
            raise DatasetNotFoundError(
                f"could not download {self.display_name} from {self.layout.url} "
                f"into {self._data_root}: {err}"
            ) from err

    def _load_official(self) -> OfficialSplits:
        self._check_present()
        return read_cifar_pickles(self.folder, self.layout)

    def _check_present(self) -> None:
        expected = [self.layout.meta_file, *self.layout.train_files, *self.layout.test_files]
        missing = [name for name in expected if not (self.folder / name).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"{self.display_name} not found: looked for {', '.join(missing)} in {self.folder} "
                f"(data_dir is {self._data_root}). Pass download=True to fetch it (needs network), "
                f"or download {self.layout.url} and extract it into {self.data_dir}."
            )


class CIFAR10DataModule(_CIFARPickleDataModule):
    """CIFAR-10 from ``<data_dir>/cifar-10-batches-py`` (the official Python pickles).

    Example:
        >>> dm = CIFAR10DataModule("~/data", download=True, batch_size=256)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup()  # doctest: +SKIP
        >>> len(dm.train_dataset(augment=False)), len(dm.val_dataset())  # doctest: +SKIP
        (45000, 5000)
    """

    name = "cifar10"
    display_name = "CIFAR-10"
    num_classes = 10
    mean = CIFAR10_MEAN
    std = CIFAR10_STD
    layout = CIFAR10_LAYOUT
    torchvision_dataset = datasets.CIFAR10


class CIFAR100DataModule(_CIFARPickleDataModule):
    """CIFAR-100 (fine labels) from ``<data_dir>/cifar-100-python`` (the official Python pickles).

    Example:
        >>> dm = CIFAR100DataModule("~/data", download=True, train_subset=10_000)  # doctest: +SKIP
        >>> dm.num_classes, len(dm.train_dataset(augment=False))  # doctest: +SKIP
        (100, 10000)
    """

    name = "cifar100"
    display_name = "CIFAR-100"
    num_classes = 100
    mean = CIFAR100_MEAN
    std = CIFAR100_STD
    layout = CIFAR100_LAYOUT
    torchvision_dataset = datasets.CIFAR100
