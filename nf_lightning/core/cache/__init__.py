"""On-disk activation cache (NeuroFlux §5.3).

When a block finishes training, one pass writes its outputs for the train and validation sets
to ``root/name``; the next block trains on them, so no forward pass over trained blocks runs
again. The cache stores exactly the tensors it is given (the caller decides, e.g., whether
inputs were augmented) plus a ``fingerprint`` that the caller derives from whatever determines
them (block weights, data split, augmentation policy); ``open_cache`` rejects a cache whose
fingerprint differs.

Example:
    >>> with ActivationCacheWriter(root, "block0-train", len(train_set), (64, 16, 16),
    ...                            fingerprint=fp) as writer:
    ...     for x, y in train_loader:
    ...         writer.write(block(x), y)
    ...     writer.commit()
    >>> loader = cache_loader(open_cache(root, "block0-train", fingerprint=fp), batch_size=256)

Format and guarantees: ``format``; writing: ``writer``; reading: ``reader``;
batching and prefetching: ``loader``.
"""

from nf_lightning.core.cache.format import CacheCorrupt, CacheError, CacheMissing, FileEntry, Manifest
from nf_lightning.core.cache.loader import CacheDataLoader, EpochShuffleSampler, cache_loader
from nf_lightning.core.cache.reader import CachedActivations, cache_size_report, open_cache, verify_cache
from nf_lightning.core.cache.writer import (
    ActivationCacheWriter,
    CacheInUse,
    CacheSpaceError,
    check_free_space,
    claim_cache_dir,
    release_cache_dir,
)

__all__ = [
    "ActivationCacheWriter",
    "CacheInUse",
    "CacheSpaceError",
    "CacheCorrupt",
    "CacheDataLoader",
    "CacheError",
    "CacheMissing",
    "CachedActivations",
    "EpochShuffleSampler",
    "FileEntry",
    "Manifest",
    "cache_loader",
    "cache_size_report",
    "check_free_space",
    "claim_cache_dir",
    "open_cache",
    "release_cache_dir",
    "verify_cache",
]
