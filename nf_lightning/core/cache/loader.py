"""Batches from an activation cache: any batch size, reshuffled per epoch, read off the training thread.

The loader is a plain ``torch.utils.data.DataLoader`` over ``CachedActivations`` with a
``sampler`` and a ``batch_size``: the DataLoader's own BatchSampler yields index lists, the
dataset's ``__getitems__`` reads each list as one gather, and ``collate_fn`` passes the already
stacked ``(x, y)`` through. Lightning can therefore inspect and re-instantiate it, and its
``set_epoch`` call reaches the sampler. Reading ahead is done by worker processes when
``num_workers > 0`` (``prefetch_factor``) and by one background thread otherwise: a thread is
enough because the gather (numpy) and the float16 -> float32 cast (torch) release the GIL, and
it spares a worker process per block.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from nf_lightning.core.cache.reader import CachedActivations

T = TypeVar("T")


class EpochShuffleSampler(Sampler[int]):
    """Every index once per epoch; with ``shuffle`` the order depends only on (seed, epoch).

    Lightning calls ``set_epoch`` on a DataLoader's sampler before each epoch, so every
    epoch has a new order and a resumed run replays the same one.

    Example:
        >>> sampler = EpochShuffleSampler(4, seed=0)
        >>> sampler.set_epoch(1)
        >>> sorted(sampler)
        [0, 1, 2, 3]
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        return iter(np.random.default_rng((self.seed, self.epoch)).permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


class CacheDataLoader(DataLoader):
    """A DataLoader that, with ``num_workers=0``, reads up to ``prefetch_batches`` batches ahead
    on a background thread while the current batch trains (0 reads on the calling thread).

    Worker processes (``num_workers > 0``) read ahead by themselves; ``prefetch_batches`` is
    then unused. Build it with ``cache_loader``; the extra argument is kept as an attribute so
    Lightning can re-instantiate the loader (e.g. to inject a DistributedSampler).

    Example:
        >>> loader = cache_loader(cache, batch_size=128)
        >>> type(loader).__name__, loader.prefetch_batches
        ('CacheDataLoader', 2)
    """

    def __init__(self, *args: Any, prefetch_batches: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefetch_batches = prefetch_batches

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        batches = super().__iter__()
        if self.num_workers > 0 or self.prefetch_batches < 1:
            return batches
        return ThreadPrefetcher(batches, self.prefetch_batches)


def cache_loader(
    cache: CachedActivations,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    prefetch: bool = True,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> CacheDataLoader:
    """A loader of ``(x [B, *sample_shape] float32, y [B] int64)`` batches from ``cache``.

    ``prefetch`` reads ahead on a background thread when ``num_workers == 0``; worker
    processes always read ahead and are kept alive across epochs.

    Example:
        >>> loader = cache_loader(open_cache(root, "block0-train"), batch_size=256, seed=7)
        >>> loader.sampler.set_epoch(3)   # Lightning does this before each epoch
        >>> x, y = next(iter(loader))
    """
    return CacheDataLoader(
        cache,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(cache), shuffle=shuffle, seed=seed),
        drop_last=drop_last,
        collate_fn=_collated,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_batches=2 if prefetch else 0,
    )


def _collated(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """collate_fn for batches that ``CachedActivations.__getitems__`` already stacked."""
    return batch


class ThreadPrefetcher(Generic[T]):
    """Iterates ``source`` on a daemon thread, keeping up to ``depth`` items ready.

    An exception raised by ``source`` is re-raised by ``__next__``. Dropping the prefetcher
    (or ``close()``) stops the thread once it finishes the item it is producing. The thread
    starts on the first ``__next__``, not before: Lightning creates a loader's iterator and
    only then sets its sampler's epoch, which must decide the order.

    Example:
        >>> for x, y in ThreadPrefetcher(iter(batches), depth=2):
        ...     train_step(x, y)
    """

    def __init__(self, source: Iterator[T], depth: int) -> None:
        self._queue: queue.Queue[T | _End] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._source: Iterator[T] | None = source

    def _start(self) -> None:
        # The thread must not reference self, or an abandoned prefetcher would never be collected.
        threading.Thread(
            target=_produce, args=(self._source, self._queue, self._stop), name="cache-prefetch", daemon=True
        ).start()
        self._source = None

    def __iter__(self) -> ThreadPrefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        if self._source is not None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _End):
            self._finished = True
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def close(self) -> None:
        self._finished = True
        self._stop.set()

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class _End:
    """Last queue entry: the source is exhausted, or failed with ``error``."""

    error: Exception | None = None


def _produce(source: Iterator[T], out: queue.Queue[T | _End], stop: threading.Event) -> None:
    try:
        for item in source:
            if not _put(out, item, stop):
                return
        end = _End()
    except Exception as error:  # handed to the consumer's thread
        end = _End(error)
    _put(out, end, stop)


def _put(out: queue.Queue[T | _End], item: T | _End, stop: threading.Event) -> bool:
    """Blocks until ``item`` is queued (True) or ``stop`` is set (False)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
