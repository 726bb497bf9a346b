"""``DataSources``: the user's data as a block-wise run needs it.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> data = TensorDataset(torch.zeros(10, 3), torch.zeros(10, dtype=torch.long))
    >>> sources = DataSources(DataLoader(data, batch_size=4), DataLoader(data))
    >>> sources.train_samples(), sources.batches_per_epoch(4), sources.batches_per_epoch(4, world_size=2)
    (10, 3, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor
from torch.utils.data import DataLoader, Dataset


@dataclass
class DataSources:
    """The user's data as the run needs it.

    Args:
        train: the training loader (with augmentation); block 0 trains from it.
        val: the validation loader; exits are scored on it.
        train_unaugmented: the training set without augmentation, which block
            0's cache is written from; ``train.dataset`` if None.
        data_id: identifies the data in cache fingerprints (e.g. a data module's fingerprint).
        inputs: what the model does to a batch's inputs before its network (the part of a
            LightningModule's ``forward`` before ``self.net(...)``); the inputs as they are if None.
    """

    train: DataLoader
    val: DataLoader
    train_unaugmented: Dataset | None = None
    data_id: str = ""
    inputs: Callable[[Tensor], Tensor] | None = None

    def network_input(self, x: Tensor) -> Tensor:
        """The batch inputs ``x`` as the network gets them: what the units train and are scored on."""
        return x if self.inputs is None else self.inputs(x)

    def train_set(self) -> Dataset:
        """The training set block 0's cache is written from (without augmentation when known)."""
        return self.train_unaugmented if self.train_unaugmented is not None else self.train.dataset

    def train_samples(self) -> int:
        """Samples in the whole training set."""
        return len(self.train_set())  # type: ignore[arg-type]

    def batches_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Batches of ``batch_size`` in one epoch of one rank's shard of the training set."""
        return math.ceil(math.ceil(self.train_samples() / world_size) / batch_size)
