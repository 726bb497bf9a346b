"""An in-memory image dataset that augments and normalises whole batches with tensor ops.

All images live in one uint8 tensor. ``DataLoader`` calls ``__getitems__`` with a
batch of indices; the batch is gathered, randomly pad-cropped and flipped (one
vectorised gather) and normalised in a few tensor ops, then ``collate_batch``
passes it through. No PIL, no per-sample Python work. The batch ops run on
one intra-op thread: they are small and memory-bound, and spreading them over
threads costs more in synchronisation than it saves (10x more on a busy machine).

>>> import torch
>>> from torch.utils.data import DataLoader
>>> images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
>>> ds = ImageTensorDataset(images, torch.arange(10) % 2, mean=(0.5,) * 3, std=(0.25,) * 3)
>>> x, y = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_batch)))
>>> x.shape, x.dtype, y.tolist()
(torch.Size([4, 3, 32, 32]), torch.float32, [0, 1, 0, 1])
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, default_collate


class ImageBatch(Sequence[tuple[Tensor, int]]):
    """A batch as two tensors, still indexable per sample.

    ``collate_batch`` returns the tensors as they are; the per-sample view keeps
    loaders that use torch's ``default_collate`` correct (just slower).
    """

    __slots__ = ("images", "labels")

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:  # type: ignore[override]
        return self.images[index], int(self.labels[index])


def collate_batch(batch: ImageBatch | list) -> tuple[Tensor, Tensor] | list:
    """``collate_fn`` for loaders over ``ImageTensorDataset``: ``(images, labels)`` as built."""
    if isinstance(batch, ImageBatch):
        return batch.images, batch.labels
    return default_collate(batch)


def random_crop_flip(
    images: Tensor, padding: int, generator: torch.Generator | None = None
) -> Tensor:
    """Zero-pad each image by ``padding``, crop it back at a random offset, flip half horizontally.

    Matches torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()``
    per image, for a whole ``(B, C, H, W)`` batch in one gather.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    padded_width = width + 2 * padding
    offset_y = torch.randint(0, 2 * padding + 1, (batch, 1, 1), generator=generator)
    offset_x = torch.randint(0, 2 * padding + 1, (batch, 1, 1), generator=generator)
    flip = torch.rand(batch, 1, 1, generator=generator) < 0.5
    rows = offset_y + torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    cols = offset_x + torch.where(flip, width - 1 - cols, cols)
    flat = (rows * padded_width + cols).view(batch, 1, height * width)
    cropped = padded.flatten(2).gather(2, flat.expand(batch, channels, height * width))
    return cropped.view(batch, channels, height, width)


class ImageTensorDataset(Dataset[tuple[Tensor, int]]):
    """Labelled images from a uint8 ``(N, C, H, W)`` tensor, normalised to float32.

    Args:
        images: all images, uint8 ``(N, C, H, W)``; shared, never copied.
        labels: int64 ``(N,)``.
        mean, std: per-channel statistics in [0, 1] units; outputs are ``(x / 255 - mean) / std``.
        indices: which rows of ``images`` form this dataset, in order (default: all).
        augment: random pad-crop and horizontal flip, drawn from torch's global RNG
            (seeded per worker by ``DataLoader``).
        padding: pad width of the random crop.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        indices: Tensor | None = None,
        augment: bool = False,
        padding: int = 4,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels must be int64 of shape ({len(images)},), got {labels.dtype} {tuple(labels.shape)}"
            )
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(
                f"mean and std need {channels} values each (std > 0), got mean={mean}, std={std}"
            )
        if indices is None:
            indices = torch.arange(len(images))
        if indices.dtype != torch.int64 or indices.ndim != 1:
            raise ValueError(
                f"indices must be a 1-D int64 tensor, got {indices.dtype} {tuple(indices.shape)}"
            )
        if len(indices) and (indices.min() < 0 or indices.max() >= len(images)):
            raise ValueError(f"indices must lie in [0, {len(images)})")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.augment = augment
        self.padding = padding
        self._images = images
        self._labels = labels
        self._indices = indices
        self._shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self._scale = 1 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)

    def __len__(self) -> int:
        return len(self._indices)

    @property
    def indices(self) -> Tensor:
        """Rows of the underlying image tensor that this dataset serves, in order."""
        return self._indices

    @property
    def labels(self) -> Tensor:
        """Labels of this dataset's items, in order."""
        return self._labels[self._indices]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        index = operator.index(index)
        if index < 0:
            index += len(self)
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int] | Tensor) -> ImageBatch:
        positions = torch.as_tensor(indices, dtype=torch.int64)
        if positions.ndim != 1:
            raise IndexError(f"expected a 1-D sequence of indices, got shape {tuple(positions.shape)}")
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)} items")
        with _single_threaded():
            rows = self._indices[positions]
            images = self._images.index_select(0, rows)
            if self.augment:
                images = random_crop_flip(images, self.padding)
            normalised = images.float().sub_(self._shift).mul_(self._scale)
            return ImageBatch(normalised, self._labels.index_select(0, rows))


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread, then restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
