"""Tiny ImageNet, or any class subset of it, in the standard ``tiny-imagenet-200/`` layout, resized to 32x32.

The classes are the wnids listed in ``wnids.txt`` (200 in the official set, any
number in a user's subset); labels follow the sorted wnids, as ImageFolder does.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nf_lightning.data.base import OfficialSplits, _Prepared
from nf_lightning.data.decoded import DecodableSource, DecodedImageDataModule
from nf_lightning.data.images import ImageSource, decode_images, listing_key, sha256_file
from nf_lightning.data.paths import DatasetNotFoundError
from nf_lightning.data.tiny_imagenet_tree import (
    ANNOTATIONS,
    FOLDER_NAME,
    VAL_IMAGES,
    WNIDS,
    FolderTree,
    LayoutTree,
    archive_members,
    archive_root,
    archive_tree,
)

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ARCHIVE_PATTERN = "tiny-imagenet*"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
OFFICIAL_NUM_CLASSES = 200
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2770, 0.2691, 0.2821)

LabelledFiles = list[tuple[str, ImageSource, int]]
"""``(name for messages, image file or bytes, label)`` triples."""


# --- the class list and the labelled files -----------------------------------------------------


def parse_wnids(text: str, where: str) -> tuple[str, ...]:
    """The class ids of a ``wnids.txt`` (one per line, blank lines ignored), sorted: label ``i`` is ``classes[i]``.

    >>> parse_wnids("n02\\nn01\\n\\n", "wnids.txt")
    ('n01', 'n02')
    """
    wnids = [line.strip() for line in text.splitlines() if line.strip()]
    if not wnids:
        raise ValueError(
            f"{where} lists no classes: it must hold the class ids (wnids) to use, one per line, "
            f"e.g. n01443537"
        )
    malformed = [wnid for wnid in wnids if len(wnid.split()) != 1 or "/" in wnid]
    if malformed:
        raise ValueError(f"{where}: expected one class id (wnid) per line, got {malformed[0]!r}")
    repeated = sorted(wnid for wnid, count in Counter(wnids).items() if count > 1)
    if repeated:
        raise ValueError(f"{where}: class ids listed more than once: {', '.join(repeated)}")
    return tuple(sorted(wnids))


@dataclass(frozen=True)
class TinyImageNetFiles:
    """The labelled image files of a ``tiny-imagenet-200/`` layout (its unlabelled test/ is unused).

    ``classes`` are the sorted wnids of ``wnids.txt``; ``train`` holds
    ``train/<wnid>/images/*`` of those classes only (other class folders are
    ignored); ``val`` the ``val/images/*`` that ``val/val_annotations.txt``
    labels with one of those classes. Validation images of other classes are
    skipped with a ``UserWarning`` saying how many (so a class subset only needs
    its own ``wnids.txt``); a validation annotation naming a missing image is an error.
    """

    classes: tuple[str, ...]
    train: LabelledFiles
    val: LabelledFiles

    @classmethod
    def scan(cls, tree: LayoutTree) -> TinyImageNetFiles:
        classes = parse_wnids(tree.read_text(WNIDS), tree.describe(WNIDS))
        train: LabelledFiles = []
        for label, wnid in enumerate(classes):
            names = tree.images_in(f"train/{wnid}/images")
            if not names:
                raise ValueError(
                    f"{tree.describe(f'train/{wnid}/images')}: no training images for class {wnid}, "
                    f"which {WNIDS} lists"
                )
            train += [(tree.describe(name), tree.source(name), label) for name in names]
        return cls(classes, train, _scan_val(tree, {wnid: i for i, wnid in enumerate(classes)}))

    def decode(self) -> OfficialSplits:
        """Decode every image, resized 64x64 -> 32x32 as in the NeuroFlux paper."""
        return OfficialSplits(*_decode(self.train), *_decode(self.val), classes=self.classes)


def _scan_val(tree: LayoutTree, label_of: dict[str, int]) -> LabelledFiles:
    where = tree.describe(ANNOTATIONS)
    images = set(tree.images_in(VAL_IMAGES))
    val: LabelledFiles = []
    skipped: Counter[str] = Counter()
    for line_number, line in enumerate(tree.read_text(ANNOTATIONS).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise ValueError(f"{where}:{line_number}: expected '<file>\\t<wnid>\\t...', got {line!r}")
        if fields[1] not in label_of:
            skipped[fields[1]] += 1
            continue
        name = f"{VAL_IMAGES}/{fields[0]}"
        if name not in images:
            raise ValueError(f"{where}:{line_number}: {fields[0]} is not an image in {tree.describe(VAL_IMAGES)}")
        val.append((tree.describe(name), tree.source(name), label_of[fields[1]]))
    if skipped:
        examples = ", ".join(sorted(skipped)[:3]) + (", ..." if len(skipped) > 3 else "")
        warnings.warn(
            f"{where}: skipped {sum(skipped.values())} validation images whose class is not in "
            f"{WNIDS} ({examples}); the test split holds the {len(label_of)} classes of {WNIDS} only",
            UserWarning,
            stacklevel=2,
        )
    if not val:
        raise ValueError(f"{where}: no validation images of the {len(label_of)} classes in {WNIDS}")
    return val


def _decode(files: LabelledFiles) -> tuple[torch.Tensor, torch.Tensor]:
    images = decode_images([(name, source) for name, source, _ in files], 32, resize=True)
    labels = np.array([label for _, _, label in files], dtype=np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


# --- the data module ---------------------------------------------------------------------------


class _NumClasses:
    """``num_classes`` of Tiny ImageNet.

    On an instance: the number of wnids in its ``wnids.txt`` (read without
    decoding anything). On the class, where no data is read (e.g. ``nf-plan``):
    the official 200.
    """

    def __get__(self, instance: TinyImageNetDataModule | None, owner: type | None = None) -> int:
        if instance is None:
            return OFFICIAL_NUM_CLASSES
        return len(instance.wnids)


class TinyImageNetDataModule(DecodedImageDataModule):
    """Tiny ImageNet, or a class subset of it, from ``data_dir``, images resized to 32x32.

    Looks for an unpacked ``<data_dir>/tiny-imagenet-200/`` folder with
    ``wnids.txt`` first (so an edited ``wnids.txt`` there wins), else for one
    archive ``<data_dir>/tiny-imagenet*`` (.zip, or .tar, .tar.gz, .tgz, ...) in the same layout
    (e.g. the official ``tiny-imagenet-200.zip``, or ``tiny-imagenet-100-classes.tar.gz``
    in ``../shared/datasets``), read without unpacking it to disk. Either is
    decoded once into ``cache_dir`` and reused.

    The classes are the wnids in ``wnids.txt`` (any number; ``num_classes`` is their
    count), labelled in sorted order. Training and validation splits come from
    ``train/``; the labelled official ``val/`` set is the test split (the official
    test set has no labels); validation images of classes not in ``wnids.txt`` are
    skipped with a warning. ``val_size`` defaults to a tenth of the training images
    (10,000 of the official 100,000). ``fingerprint`` includes the class list, so
    different class subsets never share caches.

    Example:
        >>> dm = TinyImageNetDataModule("../shared/datasets")  # doctest: +SKIP
        >>> dm.num_classes  # the 100 wnids of tiny-imagenet-100-classes.tar.gz  # doctest: +SKIP
        100
        >>> len(dm.train_dataset(augment=False)), len(dm.val_dataset()), len(dm.test_dataset())  # doctest: +SKIP
        (9000, 1000, 5000)
    """

    name = "tiny_imagenet"
    display_name = "Tiny ImageNet"
    num_classes = _NumClasses()  # type: ignore[assignment]
    mean = TINY_IMAGENET_MEAN
    std = TINY_IMAGENET_STD
    default_val_size = 10_000
    """For the official 100,000 training images; in general ``val_size`` defaults to a tenth of them."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, **options: Any) -> None:
        super().__init__(data_dir, **options)
        self._val_size_given = options.get("val_size") is not None
        self._default_val_size: int | None = None
        self._wnids: tuple[str, ...] | None = None

    @property
    def wnids(self) -> tuple[str, ...]:
        """The class ids of ``wnids.txt``, sorted (label order); read once, without decoding images."""
        if self._prepared is not None:
            return self._prepared.official.classes
        if self._wnids is None:
            location = self._locate()
            if location.is_dir():
                tree: LayoutTree = FolderTree(location)
                self._wnids = parse_wnids(tree.read_text(WNIDS), tree.describe(WNIDS))
            else:
                members = archive_members(location, stop_at_wnids=True)
                root = archive_root(members, location)
                self._wnids = parse_wnids(members[f"{root}{WNIDS}"].decode(), f"{location}:{root}{WNIDS}")
        return self._wnids

    @property
    def val_size(self) -> int:
        """Training images held out for validation: as given, else a tenth of them (needs the data)."""
        if self._val_size_given:
            return self._val_size
        if self._default_val_size is None:
            self._ensure_setup()
        assert self._default_val_size is not None
        return self._default_val_size

    @property
    def fingerprint(self) -> str:
        """The base fingerprint plus the class list (so class subsets never share a cache)."""
        spec = {"base": super().fingerprint, "classes": list(self.wnids)}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def _load_official(self) -> OfficialSplits:
        official = super()._load_official()
        self._wnids = official.classes  # what the data holds, whether just decoded or cached
        return official

    def _split(self, official: OfficialSplits) -> _Prepared:
        self._default_val_size = max(1, len(official.train_labels) // 10)
        return super()._split(official)

    def _locate(self) -> Path:
        """The unpacked ``tiny-imagenet-200/`` folder, else the one archive in ``data_dir``."""
        folder = self.data_dir / FOLDER_NAME
        if (folder / WNIDS).is_file():
            required = [folder / "train", folder / VAL_IMAGES, folder / ANNOTATIONS]
            missing = [str(path.relative_to(self.data_dir)) for path in required if not path.exists()]
            if missing:
                raise DatasetNotFoundError(
                    f"{self.display_name} in {folder} is incomplete: missing {', '.join(missing)} "
                    f"(data_dir is {self._data_root}). Expected {WNIDS}, train/<wnid>/images/*.JPEG, "
                    f"{VAL_IMAGES}/*.JPEG and {ANNOTATIONS}."
                )
            return folder
        archives = sorted(
            path
            for path in self.data_dir.glob(ARCHIVE_PATTERN)
            if path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)
        )
        if len(archives) > 1:
            raise ValueError(
                f"{self.display_name}: several archives in {self.data_dir}: "
                f"{', '.join(path.name for path in archives)}; keep only the one to use there, "
                f"or unpack it into {folder}"
            )
        if archives:
            return archives[0]
        raise DatasetNotFoundError(
            f"{self.display_name} not found: looked for {folder / WNIDS} and for an archive "
            f"{self.data_dir / ARCHIVE_PATTERN}{{{','.join(ARCHIVE_SUFFIXES)}}} (data_dir is "
            f"{self._data_root}). Expected {FOLDER_NAME}/ with {WNIDS}, train/<wnid>/images/*.JPEG, "
            f"{VAL_IMAGES}/*.JPEG and {ANNOTATIONS}: download {URL} into {self.data_dir} "
            f"(it is read without unpacking) or unzip it there."
        )

    def _find_source(self) -> DecodableSource:
        location = self._locate()
        if location.is_dir():
            files = TinyImageNetFiles.scan(FolderTree(location))
            self._wnids = files.classes
            images = [source for _, source, _ in files.train + files.val if isinstance(source, Path)]
            listed = [location / WNIDS, location / ANNOTATIONS, *images]
            return DecodableSource(key=f"listing:{listing_key(listed)}", location=location, decode=files.decode)
        return DecodableSource(
            key=f"sha256:{sha256_file(location)}",
            location=location,
            decode=lambda: TinyImageNetFiles.scan(archive_tree(location)).decode(),
        )
