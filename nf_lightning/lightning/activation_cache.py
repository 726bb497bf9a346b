"""``ActivationCache``: each finished block's outputs on disk, the next block's data.

What the cache holds: the block's outputs for the *un-augmented* training set
(the data module's ``train_dataset(augment=False)`` where it offers one, else
whatever its training set yields in one ordered pass) and for the validation
set, in data-set order, with their labels. Later blocks therefore see no
random crops or flips: augmentation acts on the first block only. The
benchmark in ``experiments/`` measures what that costs.

Example:
    >>> import lightning.pytorch as pl
    >>> from nf_lightning import ActivationCache, NeuroFluxStrategy
    >>> trainer = pl.Trainer(strategy=NeuroFluxStrategy("300MB"), callbacks=[ActivationCache()],
    ...                      accelerator="cpu", logger=False, enable_progress_bar=False)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from nf_lightning.core.cache import (
    ActivationCacheWriter,
    CacheCorrupt,
    CachedActivations,
    CacheMissing,
    cache_loader,
    open_cache,
)

if TYPE_CHECKING:
    from nf_lightning.lightning.strategy import NeuroFluxStrategy

SPLITS = ("train", "val")


class ActivationCache(pl.Callback):
    """Writes, verifies and serves the on-disk activation caches of NeuroFlux.

    Args:
        num_workers: loader worker processes; 0 reads in a background thread.
        seed: base seed of the per-epoch shuffling of cached training data.
    """

    def __init__(self, num_workers: int = 0, seed: int = 0) -> None:
        self.num_workers = num_workers
        self.seed = seed
        self.manifests: dict[str, dict[str, Any]] = {}
        self._verified: dict[str, CachedActivations] = {}

    # ------------------------------------------------------------- lightning
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        if not getattr(strategy, "cache", False) or strategy.active_block is None:
            return
        plan = strategy.plan
        block = strategy.active_block
        if block < len(plan.blocks) - 1 and trainer.current_epoch == plan.epochs_of(block)[-1]:
            for split in SPLITS:
                self._write(strategy, block, split)

    def state_dict(self) -> dict[str, Any]:
        return {"manifests": dict(self.manifests)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.manifests = dict(state_dict.get("manifests", {}))

    # ------------------------------------------------------------- serving
    def loader(self, strategy: NeuroFluxStrategy, block: int, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        """Inputs of ``block`` (outputs of the block before it) re-batched to ``batch_size``."""
        return cache_loader(
            self.inputs_of(strategy, block, split),
            batch_size,
            shuffle=shuffle,
            seed=self.seed + block,
            num_workers=self.num_workers,
            pin_memory=strategy.root_device.type == "cuda",
        )

    def inputs_of(self, strategy: NeuroFluxStrategy, block: int, split: str) -> CachedActivations:
        """The verified cache feeding ``block``, rebuilt from the block before if missing or corrupt."""
        name = cache_name(block - 1, split)
        if name in self._verified:
            return self._verified[name]
        root = cache_root(strategy)
        fingerprint = self._fingerprint(strategy, block - 1, split)
        try:
            cache = open_cache(root, name, fingerprint=fingerprint, verify=True)
        except CacheMissing:
            if name in self.manifests:
                rank_zero_warn(f"activation cache {name} is gone from {root}; rebuilding it from block {block - 1}")
            cache = self._write(strategy, block - 1, split)
        except CacheCorrupt as error:
            rank_zero_warn(f"activation cache {name} failed verification ({error}); rebuilding it from block {block - 1}")
            cache = self._write(strategy, block - 1, split)
        self._verified[name] = cache
        return cache

    # ------------------------------------------------------------- writing
    def _write(self, strategy: NeuroFluxStrategy, block: int, split: str) -> CachedActivations:
        root = cache_root(strategy)
        name = cache_name(block, split)
        batch = strategy.plan.batch_size(block)
        source = self._source(strategy, block, split, batch)
        modules = strategy.block_modules(block)
        was_training = [m.training for m in modules]
        devices = {p.device for m in modules for p in m.parameters()}
        for module in modules:
            module.eval().to(strategy.root_device)
        writer = None
        try:
            for x, y in source:
                out = strategy.forward_block(block, x.to(strategy.root_device, non_blocking=True)).cpu()
                if writer is None:
                    writer = ActivationCacheWriter(
                        root,
                        name,
                        num_samples=_num_samples(source),
                        sample_shape=tuple(out.shape[1:]),
                        dtype=strategy.cache_dtype,
                        fingerprint=self._fingerprint(strategy, block, split),
                        meta={"block": block, "split": split},
                    )
                    writer.__enter__()
                writer.write(out, y)
            assert writer is not None, f"the {split} data is empty"
            manifest = writer.commit()
            writer.__exit__(None, None, None)
        except BaseException as error:
            if writer is not None:
                writer.__exit__(type(error), error, error.__traceback__)
            raise
        finally:
            for module, training in zip(modules, was_training):
                module.train(training)
            if devices == {torch.device("cpu")}:
                for module in modules:
                    module.to("cpu")
        self.manifests[name] = manifest.to_dict()
        cache = open_cache(root, name, verify=False)
        self._verified[name] = cache
        rank_zero_info(f"cached block {block} {split} outputs: {cache.nbytes / 1e6:.1f} MB in {root / name}")
        return cache

    def _source(self, strategy: NeuroFluxStrategy, block: int, split: str, batch: int) -> Iterable[tuple[Tensor, Tensor]]:
        if block > 0:
            return cache_loader(self.inputs_of(strategy, block, split), batch, shuffle=False)
        raw = strategy.raw_loader(split)
        dataset = raw.dataset
        datamodule = strategy.trainer.datamodule
        if split == "train" and hasattr(datamodule, "train_dataset"):
            dataset = datamodule.train_dataset(augment=False)
        return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=raw.num_workers, collate_fn=raw.collate_fn)

    def _fingerprint(self, strategy: NeuroFluxStrategy, block: int, split: str) -> str:
        """Identifies data, split, block and the weights of every unit up to the block."""
        digest = hashlib.blake2b(digest_size=16)
        datamodule = strategy.trainer.datamodule
        data_id = getattr(datamodule, "fingerprint", None) or f"{type(strategy.raw_loader(split).dataset).__name__}"
        digest.update(f"{data_id}|{split}|{block}|{strategy.cache_dtype}".encode())
        assert strategy.decomposition is not None
        for index in range(strategy.plan.blocks[block].units[-1] + 1):
            for tensor in strategy.decomposition.units[index].state_dict().values():
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def cache_root(strategy: NeuroFluxStrategy) -> Path:
    """Directory holding the caches of this run."""
    return strategy.cache_dir or Path(strategy.trainer.default_root_dir) / "neuroflux_cache"


def cache_name(block: int, split: str) -> str:
    """``block3-train``: outputs of block 3 for the training set."""
    return f"block{block}-{split}"


def _num_samples(source: Iterable[Any]) -> int:
    dataset = getattr(source, "dataset", None)
    if dataset is None:
        raise TypeError("cannot size the activation cache: its source has no dataset")
    return len(dataset)
