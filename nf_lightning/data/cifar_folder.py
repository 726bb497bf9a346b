"""CIFAR-10 from the ImageFolder-style JPEG copy (``cifar10-jpeg.tar.gz``)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import PurePosixPath

import numpy as np
import torch

from nf_lightning.data.base import OfficialSplits
from nf_lightning.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from nf_lightning.data.decoded import DecodableSource, DecodedImageDataModule
from nf_lightning.data.images import (
    ImageSource,
    decode_images,
    is_image_name,
    listing_key,
    read_tar_images,
    sha256_file,
)
from nf_lightning.data.paths import DatasetNotFoundError

ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
FOLDER_NAME = "cifar10-jpeg"


class CIFAR10FolderDataModule(DecodedImageDataModule):
    """CIFAR-10 from ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` image folders.

    Reads ``<data_dir>/cifar10-jpeg.tar.gz`` (without unpacking it to disk), else an
    unpacked ``<data_dir>/cifar10-jpeg/`` folder, and decodes it once into
    ``cache_dir``. Classes are the sorted folder names. The images are a JPEG
    re-encoding of CIFAR-10, so accuracies are close to, not equal to, published
    CIFAR-10 numbers.

    Example:
        >>> dm = CIFAR10FolderDataModule("../shared/datasets", batch_size=256)  # doctest: +SKIP
        >>> dm.prepare_data()  # decodes once (~10 s), then reuses the cache  # doctest: +SKIP
        >>> dm.classes[:3]  # doctest: +SKIP
        ('airplane', 'automobile', 'bird')
    """

    name = "cifar10_folder"
    display_name = "CIFAR-10 (JPEG folder copy)"
    num_classes = 10
    mean = CIFAR10_MEAN
    std = CIFAR10_STD

    def _find_source(self) -> DecodableSource:
        archive = self.data_dir / ARCHIVE_NAME
        if archive.is_file():
            return DecodableSource(
                key=f"sha256:{sha256_file(archive)}",
                location=archive,
                decode=lambda: decode_image_folder(read_tar_images(archive), str(archive)),
            )
        folder = self.data_dir / FOLDER_NAME
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            files = {
                path.relative_to(folder).as_posix(): path
                for split in ("train", "test")
                for path in sorted(folder.glob(f"{split}/*/*"))
                if is_image_name(path.name)
            }
            return DecodableSource(
                key=f"listing:{listing_key(files.values())}",
                location=folder,
                decode=lambda: decode_image_folder(files, str(folder)),
            )
        raise DatasetNotFoundError(
            f"{self.display_name} not found: looked for {archive} and for {folder}/ with train/ and "
            f"test/ (data_dir is {self._data_root}). Put {ARCHIVE_NAME} (train/<class>/*.jpg, "
            f"test/<class>/*.jpg) in data_dir, e.g. data_dir='../shared/datasets' in this project."
        )


def decode_image_folder(files: Mapping[str, ImageSource], where: str) -> OfficialSplits:
    """Decode ``{"train/<class>/<file>": source, "test/<class>/<file>": source}`` into 32x32 splits.

    Labels follow the sorted class names; within a class, files are in name order.
    """
    by_split: dict[str, dict[str, list[str]]] = {"train": defaultdict(list), "test": defaultdict(list)}
    for name in files:
        parts = PurePosixPath(name).parts
        if len(parts) == 3 and parts[0] in by_split:
            by_split[parts[0]][parts[1]].append(name)
    classes = sorted(by_split["train"])
    if not classes:
        raise ValueError(f"{where}: no images found in train/<class>/")
    if sorted(by_split["test"]) != classes:
        raise ValueError(
            f"{where}: test/ classes {sorted(by_split['test'])} differ from train/ classes {classes}"
        )

    def decode(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        groups = by_split[split]
        names = [name for cls in classes for name in sorted(groups[cls])]
        labels = np.repeat(np.arange(len(classes)), [len(groups[cls]) for cls in classes])
        images = decode_images([(f"{where}:{name}", files[name]) for name in names], 32, resize=False)
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    return OfficialSplits(*decode("train"), *decode("test"), classes=tuple(classes))
