"""Base for data sets stored as image files: decoded once, cached as uint8 ``.npy`` arrays."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from nf_lightning.data.array_store import ArrayStore
from nf_lightning.data.base import ImageDataModule, OfficialSplits
from nf_lightning.data.paths import resolve_cache_dir

log = logging.getLogger(__name__)

_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class DecodableSource:
    """A data set found on disk: a key identifying its contents, and how to decode it."""

    key: str
    location: Path
    decode: Callable[[], OfficialSplits]


class DecodedImageDataModule(ImageDataModule):
    """An ``ImageDataModule`` whose files are decoded once into ``cache_dir`` and reused.

    The cache entry is keyed by the data set's name, ``decode_version`` and the
    source's key, so a changed source never reuses a stale decode. ``data_dir`` is
    only read. A corrupt or truncated cache entry is detected and rebuilt.

    Args:
        cache_dir: writable directory for decoded arrays; default ``$NF_CACHE_DIR``,
            else ``~/.cache/nf_lightning``.
        options: ``data_dir`` and the options of ``ImageDataModule``.
    """

    decode_version: ClassVar[int] = 1
    """Bump when decoding changes (e.g. the resize), so old cache entries are not reused."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(data_dir, **options)
        self._cache_root = resolve_cache_dir(cache_dir)

    @property
    def cache_dir(self) -> Path:
        """The writable directory holding decoded copies (under ``decoded/``)."""
        return self._cache_root.path

    @abstractmethod
    def _find_source(self) -> DecodableSource:
        """Locate the data set in ``data_dir`` (raising ``DatasetNotFoundError`` if absent)."""

    def prepare_data(self) -> None:
        """Decode the data set into the cache unless a complete entry is already there."""
        source = self._find_source()
        store = self._store(source)
        if not store.is_complete():
            with self._cache_write_hint(store):
                store.save(*self._decode(source))

    def _load_official(self) -> OfficialSplits:
        source = self._find_source()
        store = self._store(source)
        with self._cache_write_hint(store):
            arrays, meta = store.load_or_build(lambda: self._decode(source))
        tensors = {name: torch.from_numpy(arrays[name]) for name in _ARRAYS}
        return OfficialSplits(**tensors, classes=tuple(meta["classes"]))

    def _store(self, source: DecodableSource) -> ArrayStore:
        key = f"{self.name}\0{self.decode_version}\0{source.key}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return ArrayStore(self.cache_dir / "decoded" / f"{self.name}-{digest}")

    def _decode(self, source: DecodableSource) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        log.info(
            "decoding %s from %s (once; cached in %s)", self.display_name, source.location, self.cache_dir
        )
        start = time.perf_counter()
        official = source.decode()
        log.info("decoded %s in %.1f s", self.display_name, time.perf_counter() - start)
        arrays = {name: getattr(official, name).numpy() for name in _ARRAYS}
        return arrays, {"classes": list(official.classes), "source": str(source.location)}

    @contextmanager
    def _cache_write_hint(self, store: ArrayStore) -> Iterator[None]:
        """Turn a permission error on the cache into one that says how to choose another cache_dir."""
        try:
            yield
        except PermissionError as err:
            raise PermissionError(
                f"cannot write the decoded {self.display_name} to {store.directory} ({err}); "
                f"cache_dir is {self._cache_root}: pass a writable cache_dir or set $NF_CACHE_DIR"
            ) from err
