"""Tiny ImageNet (200 classes) from the standard ``tiny-imagenet-200/`` folder, resized to 32x32."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nf_lightning.data.base import OfficialSplits
from nf_lightning.data.decoded import DecodableSource, DecodedImageDataModule
from nf_lightning.data.images import decode_images, is_image_name, listing_key
from nf_lightning.data.paths import DatasetNotFoundError

FOLDER_NAME = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2770, 0.2691, 0.2821)

LabelledFiles = list[tuple[Path, int]]


@dataclass(frozen=True)
class TinyImageNetFiles:
    """The labelled image files of a ``tiny-imagenet-200/`` folder (its unlabelled test/ is unused)."""

    classes: tuple[str, ...]
    train: LabelledFiles
    val: LabelledFiles

    @classmethod
    def scan(cls, root: Path) -> TinyImageNetFiles:
        """List ``train/<wnid>/images/*`` and ``val/images/*`` with labels (sorted wnids, as ImageFolder)."""
        wnids = (root / "wnids.txt").read_text().split()
        if not wnids or len(set(wnids)) != len(wnids):
            raise ValueError(f"{root / 'wnids.txt'}: expected distinct class ids (wnids), one per line")
        classes = tuple(sorted(wnids))
        train = []
        for label, wnid in enumerate(classes):
            folder = root / "train" / wnid / "images"
            files = sorted(path for path in folder.glob("*") if is_image_name(path.name))
            if not files:
                raise ValueError(f"{folder}: no training images for class {wnid}")
            train += [(path, label) for path in files]
        return cls(classes, train, _scan_val(root, {wnid: i for i, wnid in enumerate(classes)}))

    def decode(self) -> OfficialSplits:
        """Decode every image, resized 64x64 -> 32x32 as in the NeuroFlux paper."""
        return OfficialSplits(*_decode(self.train), *_decode(self.val), classes=self.classes)


def _scan_val(root: Path, label_of: dict[str, int]) -> LabelledFiles:
    annotations = root / "val" / "val_annotations.txt"
    val = []
    for line_number, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise ValueError(
                f"{annotations}:{line_number}: expected '<file>\\t<wnid>\\t...' with a wnid from "
                f"wnids.txt, got {line!r}"
            )
        val.append((root / "val" / "images" / fields[0], label_of[fields[1]]))
    return val


def _decode(files: LabelledFiles) -> tuple[torch.Tensor, torch.Tensor]:
    images = decode_images([(str(path), path) for path, _ in files], 32, resize=True)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


class TinyImageNetDataModule(DecodedImageDataModule):
    """Tiny ImageNet from ``<data_dir>/tiny-imagenet-200/``, images resized to 32x32.

    Training and validation splits come from ``train/``; the labelled official
    ``val/`` set is the test split (the official test set has no labels). Decoded
    and resized once into ``cache_dir``.

    Example:
        >>> dm = TinyImageNetDataModule("~/data", val_size=10_000)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup()  # doctest: +SKIP
        >>> len(dm.train_dataset(augment=False)), len(dm.test_dataset())  # doctest: +SKIP
        (90000, 10000)
    """

    name = "tiny_imagenet"
    display_name = "Tiny ImageNet"
    num_classes = 200
    mean = TINY_IMAGENET_MEAN
    std = TINY_IMAGENET_STD
    default_val_size = 10_000

    def _find_source(self) -> DecodableSource:
        root = self.data_dir / FOLDER_NAME
        wnids, annotations = root / "wnids.txt", root / "val" / "val_annotations.txt"
        required = [wnids, root / "train", root / "val" / "images", annotations]
        missing = [str(path.relative_to(self.data_dir)) for path in required if not path.exists()]
        if missing:
            raise DatasetNotFoundError(
                f"{self.display_name} not found: missing {', '.join(missing)} in {self.data_dir} "
                f"(data_dir is {self._data_root}). Expected tiny-imagenet-200/ with wnids.txt, "
                f"train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt: "
                f"download {URL} and unzip it into {self.data_dir}."
            )
        files = TinyImageNetFiles.scan(root)
        listed = [wnids, annotations, *(path for path, _ in files.train + files.val)]
        return DecodableSource(key=f"listing:{listing_key(listed)}", location=root, decode=files.decode)
