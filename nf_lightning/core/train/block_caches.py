"""``BlockCaches``: a run's activation caches (§5.3): built once per finished block, verified when opened, reused.

When a block ends, its outputs for the train and validation sets are written
under ``directory/block<b>-<split>`` (:mod:`nf_lightning.core.cache`), with a
fingerprint of the data, the split, the block and the weights of every unit up
to it. The next block trains from them; a cache that is missing or fails
verification (a resumed run, a corrupt file) is rebuilt from the one before.

Example (what :class:`~nf_lightning.core.train.run.BlockwiseRun` does)::

    >>> caches = BlockCaches(tmp / "cache", units, blocks, batch_size_of, collective, device)  # doctest: +SKIP
    >>> caches.attach(sources)                                          # doctest: +SKIP
    >>> caches.write(block=0, split="train")                            # doctest: +SKIP
    >>> loader = caches.train_loader(block=1, batch_size=64)            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from nf_lightning.core.cache import (
    ActivationCacheWriter,
    CacheCorrupt,
    CachedActivations,
    CacheMissing,
    cache_loader,
    claim_cache_dir,
    open_cache,
    release_cache_dir,
)
from nf_lightning.core.train.batches import samples_in_order, split_batch
from nf_lightning.core.train.distributed import Collective, LocalCollective, shard_sampler
from nf_lightning.core.train.sources import DataSources
from nf_lightning.core.train.streaming import stream

log = logging.getLogger("nf_lightning")

SPLITS = ("train", "val")


def cache_name(block: int, split: str) -> str:
    """``block3-train``: outputs of block 3 for the training set."""
    return f"block{block}-{split}"


class BlockCaches:
    """The activation caches of one run.

    Args:
        directory: where caches go (a rank's own ``rank<r>-of-<n>`` under it when several train).
        units: the network's units.
        blocks: each block's units (the plan's).
        batch_size_of: a block's batch size (the run's: the plan's, lowered after a shrink).
        collective: the other ranks (a shard's cache is never taken for another shard's).
        device: where blocks run while their outputs are written.
        dtype: ``"float16"`` or ``"float32"``.
        workers: loader worker processes for cached data (0: a background thread).
        seed: base seed of the shuffling of cached training data.
    """

    def __init__(
        self,
        directory: Path,
        units: Sequence[nn.Module],
        blocks: Sequence[tuple[int, ...]],
        batch_size_of: Callable[[int], int],
        collective: Collective | LocalCollective,
        device: torch.device,
        *,
        dtype: str = "float16",
        workers: int = 0,
        seed: int = 0,
    ) -> None:
        world = collective.world_size
        self.directory = Path(directory) / f"rank{collective.rank}-of-{world}" if world > 1 else Path(directory)
        self.units, self.blocks, self.batch_size_of = units, blocks, batch_size_of
        self.collective, self.device = collective, device
        self.dtype, self.workers, self.seed = dtype, workers, seed
        self.manifests: dict[str, dict[str, Any]] = {}  # every cache this run wrote
        self.seconds = 0.0  # spent writing caches
        self.sources: DataSources | None = None
        self._verified: dict[str, CachedActivations] = {}

    def attach(self, sources: DataSources) -> None:
        """The data the caches are written from."""
        self.sources = sources

    def claim(self, run_id: str) -> None:
        """Own the directory for ``run_id`` (a second live run on it is refused)."""
        claim_cache_dir(self.directory, run_id)

    def release(self, run_id: str) -> None:
        release_cache_dir(self.directory, run_id)

    def forget(self) -> None:
        """Verify every cache again before its next use (after a restore)."""
        self._verified.clear()

    def train_loader(self, block: int, batch_size: int) -> DataLoader:
        """``block``'s training input (the block before's outputs), shuffled per epoch, at ``batch_size``."""
        return cache_loader(
            self.inputs_of(block, "train"),
            batch_size,
            shuffle=True,
            seed=self.seed + block,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )

    def inputs_of(self, block: int, split: str) -> CachedActivations:
        """The verified cache feeding ``block`` (outputs of the block before), rebuilt if missing or corrupt."""
        name = cache_name(block - 1, split)
        if name in self._verified:
            return self._verified[name]
        try:
            cache = open_cache(self.directory, name, fingerprint=self.fingerprint(block - 1, split), verify=True)
        except CacheMissing:
            if name in self.manifests:
                warnings.warn(f"activation cache {name} is gone from {self.directory}; rebuilding it", stacklevel=2)
            cache = self.write(block - 1, split)
        except CacheCorrupt as error:
            warnings.warn(f"activation cache {name} failed verification ({error}); rebuilding it", stacklevel=2)
            cache = self.write(block - 1, split)
        self._verified[name] = cache
        return cache

    def write(self, block: int, split: str) -> CachedActivations:
        """Run ``block`` over its whole input of ``split`` once and store the outputs."""
        start = time.perf_counter()
        name = cache_name(block, split)
        source = self._source(block, split, self.batch_size_of(block))
        fingerprint = self.fingerprint(block, split)
        writer: ActivationCacheWriter | None = None
        with contextlib.ExitStack() as stack:
            for batch in source:
                x, y = split_batch(batch)  # the user's loader for block 0: tuples or dicts
                x = self._require_sources().network_input(x) if block == 0 else x
                out = stream([self.units[i] for i in self.blocks[block]], x, self.device).cpu()
                if writer is None:
                    writer = stack.enter_context(
                        ActivationCacheWriter(
                            self.directory, name, num_samples=len(source.sampler), sample_shape=tuple(out.shape[1:]),
                            dtype=self.dtype, fingerprint=fingerprint, meta={"block": block, "split": split},
                        )
                    )  # fmt: skip
                writer.write(out, y)
            if writer is None:
                raise ValueError(f"the {split} data is empty: nothing to cache for block {block}")
            manifest = writer.commit()
        self.manifests[name] = manifest.to_dict()
        cache = open_cache(self.directory, name, fingerprint=fingerprint, verify=True)
        self._verified[name] = cache
        self.seconds += time.perf_counter() - start
        log.info("cached block %d %s outputs: %.1f MB in %s", block, split, cache.nbytes / 1e6, self.directory / name)
        return cache

    def val_rows(self, block: int, y: Tensor, offset: int | None) -> np.ndarray | None:
        """The cached input rows of ``block`` for the validation batch at ``offset`` with labels ``y``,
        or None unless the validation loader runs in order and the rows line up with the batch."""
        if offset is None or self.sources is None:
            return None
        samples = samples_in_order(self.sources.val)
        if samples is None:
            return None
        cache = self.inputs_of(block, "val")
        if len(cache) != samples or offset + len(y) > len(cache):
            return None
        if not torch.equal(cache.labels[offset : offset + len(y)], y.detach().cpu().long()):
            return None
        return np.array(cache.activations[offset : offset + len(y)])

    def fingerprint(self, block: int, split: str) -> str:
        """Identifies data, split, block and the weights of every unit up to the block's last."""
        sources = self._require_sources()
        data_id = sources.data_id or type((sources.train if split == "train" else sources.val).dataset).__name__
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{data_id}|{split}|{block}|{self.dtype}".encode())
        if self.collective.world_size > 1:  # a shard's cache is never taken for another shard's
            digest.update(f"|rank {self.collective.rank} of {self.collective.world_size}".encode())
        for index in range(self.blocks[block][-1] + 1):
            for tensor in self.units[index].state_dict().values():
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _source(self, block: int, split: str, batch: int) -> DataLoader:
        if block > 0:
            return cache_loader(self.inputs_of(block, split), batch, shuffle=False)
        sources = self._require_sources()
        raw = sources.train if split == "train" else sources.val
        dataset = sources.train_set() if split == "train" else raw.dataset
        sampler = shard_sampler(dataset, self.collective, shuffle=False)
        return DataLoader(
            dataset, batch_size=batch, sampler=sampler, num_workers=raw.num_workers, collate_fn=raw.collate_fn
        )

    def _require_sources(self) -> DataSources:
        if self.sources is None:
            raise RuntimeError("no data attached: call attach_data() first")
        return self.sources
