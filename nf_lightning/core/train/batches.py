"""Batches as users give them: finding inputs and targets, re-batching a loader.

Example:
    >>> import torch
    >>> split_batch({"image": torch.zeros(2, 3), "label": torch.ones(2)})[1].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

_KEY_PAIRS = (("x", "y"), ("image", "label"), ("input", "target"), ("inputs", "targets"))


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of a batch given as a tuple/list or a dict; integer targets as int64, which
    the local losses take (a data set's int32 or uint8 labels).

    >>> import torch
    >>> split_batch((torch.zeros(2, 3), torch.ones(2)))[1].tolist()
    [1.0, 1.0]
    >>> split_batch((torch.zeros(2, 3), torch.tensor([1, 2], dtype=torch.int32)))[1].dtype
    torch.int64
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], _as_index(batch[1])
    if isinstance(batch, dict):
        for x_key, y_key in _KEY_PAIRS:
            if x_key in batch and y_key in batch:
                return batch[x_key], _as_index(batch[y_key])
    raise TypeError(
        f"cannot find inputs and targets in a batch of type {type(batch).__name__}; NeuroFlux expects "
        "(inputs, targets, ...) tuples or dicts with keys x/y, image/label, input/target or inputs/targets"
    )


def require_map_style(loader: DataLoader, role: str) -> None:
    """A clear error for a loader over an ``IterableDataset``: the run re-batches, shuffles and caches by sample index.

    >>> import torch
    >>> from torch.utils.data import IterableDataset
    >>> class Stream(IterableDataset):
    ...     def __iter__(self):
    ...         return iter([(torch.zeros(3), 0)])
    >>> require_map_style(DataLoader(Stream()), "training")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: the training loader reads an IterableDataset (Stream), but NeuroFlux needs a map-style data set...
    """
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"the {role} loader reads an IterableDataset ({type(dataset).__name__}), but NeuroFlux needs a map-style "
            "data set (__len__ and __getitem__): it re-batches the training data to each block's batch size and "
            "caches each block's outputs sample by sample. Load the samples into one (for example a TensorDataset)"
        )


def _as_index(y: Any) -> Any:
    integer = isinstance(y, Tensor) and not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool
    return y.long() if integer and y.dtype != torch.int64 else y


def rebatch(loader: DataLoader, batch_size: int, shuffle: bool) -> DataLoader:
    """The same data as ``loader`` at another batch size.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> len(rebatch(DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=2), 5, shuffle=False))
    2
    """
    sharded = loader.sampler if isinstance(loader.sampler, DistributedSampler) else None
    if sharded is not None:  # one rank's shard (Lightning's DDP): keep it, reshuffled as asked
        if loader.batch_size == batch_size and sharded.shuffle == shuffle:
            return loader
        sampler: DistributedSampler | None = DistributedSampler(
            loader.dataset, sharded.num_replicas, sharded.rank, shuffle=shuffle, seed=sharded.seed,
            drop_last=sharded.drop_last,
        )  # fmt: skip
    elif loader.batch_size == batch_size and isinstance(loader.sampler, RandomSampler) == shuffle:
        return loader
    else:
        sampler = None
    return DataLoader(
        loader.dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
    )


def samples_in_order(loader: Any) -> int | None:
    """How many samples ``loader`` yields in a fixed order an unshuffled cache can line up with: the whole
    data set in order, or one rank's unshuffled shard; None if it shuffles or drops samples.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.zeros(5, 1))
    >>> shard = DistributedSampler(data, num_replicas=2, rank=1, shuffle=False)
    >>> samples_in_order(DataLoader(data, batch_size=2)), samples_in_order(DataLoader(data, sampler=shard))
    (5, 3)
    """
    if is_in_order(loader):
        return len(loader.dataset)
    sampler = getattr(loader, "sampler", None)
    if isinstance(loader, DataLoader) and isinstance(sampler, DistributedSampler) and not sampler.shuffle:
        return len(sampler) if not loader.drop_last else None
    return None


def is_in_order(loader: Any) -> bool:
    """Whether ``loader`` yields its data set's samples in order, each once (no shuffling, no dropping).

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.zeros(4, 1))
    >>> is_in_order(DataLoader(data, batch_size=2)), is_in_order(DataLoader(data, batch_size=2, shuffle=True))
    (True, False)
    """
    return (
        isinstance(loader, DataLoader)
        and isinstance(loader.sampler, SequentialSampler)
        and not loader.drop_last
        and loader.batch_size is not None
    )


def chunk_batch(batch: Any, pieces: int) -> list[Any]:
    """``batch`` cut into ``pieces`` consecutive, near-equal parts along its first dimension (fewer if it is
    smaller), so no part is much smaller than the others (a lone sample would fail BatchNorm).

    Tensors in tuples, lists and dicts are cut alike; anything else is repeated in every part.

    >>> import torch
    >>> parts = chunk_batch((torch.arange(5), torch.arange(5) * 10, "tag"), 2)
    >>> [p[1].tolist() for p in parts], parts[1][2]
    ([[0, 10, 20], [30, 40]], 'tag')
    >>> [len(p) for p in chunk_batch(torch.arange(10), 4)]
    [3, 3, 2, 2]
    """
    if pieces < 1:
        raise ValueError(f"pieces must be >= 1, got {pieces}")
    size = _leading_size(batch)
    if size is None:
        raise TypeError(f"cannot cut a batch of type {type(batch).__name__}: it holds no tensor")
    count = min(pieces, size)
    bounds = [0]
    for index in range(count):
        bounds.append(bounds[-1] + size // count + (1 if index < size % count else 0))
    return [_slice(batch, start, end) for start, end in zip(bounds, bounds[1:])]


def batch_size_of(batch: Any) -> int | None:
    """Samples in ``batch``: the first dimension of its first tensor (None if it holds none).

    >>> import torch
    >>> batch_size_of({"image": torch.zeros(3, 2), "label": torch.zeros(3)})
    3
    """
    return _leading_size(batch)


def batch_tensors(batch: Any) -> list[Tensor]:
    """Every tensor in ``batch``, through tuples, lists and dicts.

    >>> import torch
    >>> [t.shape[0] for t in batch_tensors({"image": torch.zeros(3, 2), "meta": [torch.zeros(1), "tag"]})]
    [3, 1]
    """
    if isinstance(batch, Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    return [t for item in values for t in batch_tensors(item)]


def _leading_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return len(batch) if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    return next((s for s in map(_leading_size, values) if s is not None), None)


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, start, stop) for v in batch) if not hasattr(batch, "_fields") else type(batch)(
            *(_slice(v, start, stop) for v in batch)
        )
    return batch
