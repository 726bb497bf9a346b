"""Image classification data modules for NeuroFlux experiments.

>>> from nf_lightning.data import KNOWN_DATASETS, create
>>> sorted(KNOWN_DATASETS)
['cifar10', 'cifar100', 'cifar10_folder', 'tiny_imagenet']
"""

from nf_lightning.data.base import ImageDataModule
from nf_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from nf_lightning.data.cifar_folder import CIFAR10FolderDataModule
from nf_lightning.data.paths import DatasetNotFoundError
from nf_lightning.data.registry import KNOWN_DATASETS, create
from nf_lightning.data.tensor_dataset import ImageTensorDataset, collate_batch
from nf_lightning.data.tiny_imagenet import TinyImageNetDataModule

__all__ = [
    "KNOWN_DATASETS",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFAR10FolderDataModule",
    "DatasetNotFoundError",
    "ImageDataModule",
    "ImageTensorDataset",
    "TinyImageNetDataModule",
    "collate_batch",
    "create",
]
