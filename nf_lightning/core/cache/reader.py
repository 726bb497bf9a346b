"""Reading an activation cache: validation and a torch Dataset over the read-only memmap."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from nf_lightning.core.cache.format import (
    ACTIVATIONS_FILE,
    DATA_FILES,
    LABELS_FILE,
    MANIFEST_FILE,
    CacheCorrupt,
    CacheMissing,
    Manifest,
    checksum_file,
    damaged_chunks,
)


class CachedActivations(Dataset[tuple[Tensor, int]]):
    """The samples of a committed cache as float32 tensors, read from a read-only memmap.

    ``__getitems__`` reads a whole batch at once (the DataLoader calls it with a batch's
    indices), so a batch costs one numpy gather instead of one call per sample. Pickling
    (for DataLoader worker processes) drops the memmap; each process maps the file itself.

    Example:
        >>> cache = open_cache(root, "block0-train", fingerprint=block_fingerprint)
        >>> x, y = cache.__getitems__([7, 3, 9])   # x: [3, *cache.sample_shape] float32, y: [3] int64
    """

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self._labels = torch.from_numpy(np.load(path / LABELS_FILE))
        self._activations: np.memmap | None = None

    @property
    def activations(self) -> np.memmap:
        """The stored array [num_samples, *sample_shape], mapped read-only on first use."""
        if self._activations is None:
            self._activations = np.load(self.path / ACTIVATIONS_FILE, mmap_mode="r")
        return self._activations

    @property
    def labels(self) -> Tensor:
        """All labels, int64 [num_samples] (in memory; shared, do not modify)."""
        return self._labels

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.manifest.sample_shape

    @property
    def dtype(self) -> str:
        """Storage dtype ("float16" or "float32"); samples are returned as float32."""
        return self.manifest.dtype

    @property
    def nbytes(self) -> int:
        """Size of the data files on disk."""
        return self.manifest.nbytes

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return torch.from_numpy(self.activations[index].astype(np.float32)), int(self._labels[index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """One batch (x [B, *sample_shape] float32, y [B] int64) in the order of ``indices``.

        The rows are read in ascending index order (sequential disk access, so the kernel's
        read-ahead helps), put back in the requested order, then cast by torch (whose float16
        cast is several times faster than numpy's).
        """
        wanted = np.asarray(indices, dtype=np.int64)
        order = np.argsort(wanted, kind="stable")
        rows = np.empty((len(wanted), *self.sample_shape), dtype=self.activations.dtype)
        rows[order] = self.activations[wanted[order]]
        return torch.from_numpy(rows).float(), self._labels[torch.from_numpy(wanted)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_activations": None}


def verify_cache(root: Path | str, name: str, fingerprint: str | None = None, *, checksums: bool = True) -> Manifest:
    """Checks ``root/name`` and returns its manifest, or raises CacheMissing / CacheCorrupt.

    Checks the manifest, the fingerprint (when given), every file's size and, with
    ``checksums``, every chunk's CRC-32 (reads the whole cache once).

    Example:
        >>> verify_cache(root, "block0-train", fingerprint=block_fingerprint).num_samples
        50000
    """
    path = Path(root) / name
    if not path.is_dir():
        raise CacheMissing(f"no activation cache {path}")
    try:
        manifest = Manifest.from_dict(json.loads((path / MANIFEST_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CacheCorrupt(path, f"manifest unreadable: {error!r}") from error
    if fingerprint is not None and manifest.fingerprint != fingerprint:
        raise CacheCorrupt(path, f"fingerprint mismatch: cache has {manifest.fingerprint!r}, expected {fingerprint!r}")
    for file in DATA_FILES:
        try:
            _check_file(path / file, manifest, checksums)
        except OSError as error:
            raise CacheCorrupt(path, f"{file} unreadable: {error!r}") from error
    return manifest


def open_cache(
    root: Path | str, name: str, fingerprint: str | None = None, verify: bool = True
) -> CachedActivations:
    """Opens a committed cache as a Dataset after ``verify_cache`` (checksums only when ``verify``).

    Example:
        >>> try:
        ...     cache = open_cache(root, "block0-train", fingerprint=block_fingerprint)
        ... except CacheError:
        ...     cache = None   # (re)build it
    """
    manifest = verify_cache(root, name, fingerprint, checksums=verify)
    path = Path(root) / name
    try:
        cache = CachedActivations(path, manifest)
        stored = cache.activations
    except (OSError, ValueError) as error:
        raise CacheCorrupt(path, f"arrays unreadable: {error!r}") from error
    expected_shape = (manifest.num_samples, *manifest.sample_shape)
    labels_shape = tuple(cache.labels.shape)
    if stored.shape != expected_shape or stored.dtype != np.dtype(manifest.dtype) or labels_shape != expected_shape[:1]:
        raise CacheCorrupt(
            path,
            f"stored arrays {stored.shape} {stored.dtype} and labels {labels_shape} "
            f"do not match the manifest {expected_shape} {manifest.dtype}",
        )
    return cache


def _check_file(file: Path, manifest: Manifest, checksums: bool) -> None:
    expected = manifest.files[file.name]
    size = file.stat().st_size
    if size != expected.size:
        raise CacheCorrupt(file.parent, f"{file.name} has {size} bytes, manifest says {expected.size} (truncated?)")
    bad = damaged_chunks(expected, checksum_file(file, manifest.chunk_bytes)) if checksums else []
    if bad:
        chunk = manifest.chunk_bytes
        ranges = ", ".join(f"{i} (bytes {i * chunk}-{min((i + 1) * chunk, size) - 1})" for i in bad[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise CacheCorrupt(file.parent, f"{file.name}: checksum mismatch in chunk {ranges}{more}")


def cache_size_report(root: Path | str) -> dict[str, int]:
    """Bytes on disk per committed cache under ``root`` (work directories excluded).

    Example:
        >>> cache_size_report(root)
        {'block0-train': 819200256, 'block0-val': 163840256}
    """
    root = Path(root)
    if not root.is_dir():
        return {}
    return {
        entry.name: sum(file.stat().st_size for file in entry.iterdir() if file.is_file())
        for entry in sorted(root.iterdir())
        if entry.is_dir() and (entry / MANIFEST_FILE).is_file()
    }
