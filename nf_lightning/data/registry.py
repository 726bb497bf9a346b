"""Data modules by name, for configs and command lines.

>>> dm = create("cifar10_folder", data_dir="../shared/datasets", batch_size=64)
>>> type(dm).__name__, dm.batch_size
('CIFAR10FolderDataModule', 64)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from nf_lightning.data.base import ImageDataModule
from nf_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from nf_lightning.data.cifar_folder import CIFAR10FolderDataModule
from nf_lightning.data.tiny_imagenet import TinyImageNetDataModule

KNOWN_DATASETS: Mapping[str, type[ImageDataModule]] = MappingProxyType(
    {
        module.name: module
        for module in (
            CIFAR10DataModule,
            CIFAR100DataModule,
            CIFAR10FolderDataModule,
            TinyImageNetDataModule,
        )
    }
)
"""Registry name -> data module class."""


def create(name: str, **kwargs: Any) -> ImageDataModule:
    """Build the data module registered as ``name`` with constructor ``kwargs``."""
    try:
        module = KNOWN_DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}") from None
    return module(**kwargs)
