"""On-disk format of an activation cache: file names, manifest, checksums, errors.

A committed cache is a directory ``root/name`` holding::

    activations.npy   # [num_samples, *sample_shape], float16 or float32 (a real .npy file)
    labels.npy        # [num_samples], int64
    manifest.json     # Manifest.to_dict(): shape, dtype, fingerprint, sizes, checksums, meta

Checksums are CRC-32 over fixed-size chunks of each file (``CHUNK_BYTES``), so a damaged
region is reported by chunk; a file's checksum is the CRC-32 of its chunk checksums.
CRC-32 guards against torn writes and bit rot, not against tampering.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
CHUNK_BYTES = 4 << 20
ACTIVATIONS_FILE = "activations.npy"
LABELS_FILE = "labels.npy"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (ACTIVATIONS_FILE, LABELS_FILE)
SUPPORTED_DTYPES = ("float16", "float32")


class CacheError(Exception):
    """Base class of the errors raised when a cache cannot be used."""


class CacheMissing(CacheError):
    """No committed cache exists under that name."""


class CacheCorrupt(CacheError):
    """A committed cache exists but must not be used; ``reason`` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"activation cache {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class FileEntry:
    """Size and CRC-32 checksums of one data file."""

    size: int
    checksum: int
    chunks: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    """Description of a committed cache, stored as ``manifest.json``.

    Example:
        >>> manifest = Manifest.from_dict(json.loads(path.read_text()))
        >>> manifest.num_samples, manifest.sample_shape, manifest.dtype
        (50000, (64, 16, 16), 'float16')
    """

    name: str
    num_samples: int
    sample_shape: tuple[int, ...]
    dtype: str
    fingerprint: str
    files: dict[str, FileEntry]
    chunk_bytes: int
    created: str
    meta: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        """Total size of the data files in bytes."""
        return sum(entry.size for entry in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (also what checkpoints store)."""
        return {
            "format_version": self.format_version,
            "name": self.name,
            "num_samples": self.num_samples,
            "sample_shape": list(self.sample_shape),
            "dtype": self.dtype,
            "fingerprint": self.fingerprint,
            "chunk_bytes": self.chunk_bytes,
            "created": self.created,
            "files": {
                name: {"size": e.size, "checksum": e.checksum, "chunks": list(e.chunks)}
                for name, e in self.files.items()
            },
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Inverse of ``to_dict``; raises KeyError, TypeError, AttributeError or ValueError on malformed input."""
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(f"format version {data['format_version']!r}, this code reads {FORMAT_VERSION}")
        files = {
            str(name): FileEntry(int(e["size"]), int(e["checksum"]), tuple(int(c) for c in e["chunks"]))
            for name, e in data["files"].items()
        }
        if set(files) != set(DATA_FILES):
            raise ValueError(f"manifest lists files {sorted(files)}, expected {sorted(DATA_FILES)}")
        chunk_bytes = int(data["chunk_bytes"])
        if chunk_bytes < 1 or any(len(e.chunks) != -(-e.size // chunk_bytes) for e in files.values()):
            raise ValueError("chunk checksums do not match the file sizes")
        if data["dtype"] not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {data['dtype']!r}")
        if not isinstance(data["meta"], dict):
            raise TypeError("meta must be a JSON object")
        return cls(
            name=str(data["name"]),
            num_samples=int(data["num_samples"]),
            sample_shape=tuple(int(d) for d in data["sample_shape"]),
            dtype=data["dtype"],
            fingerprint=str(data["fingerprint"]),
            files=files,
            chunk_bytes=chunk_bytes,
            created=str(data["created"]),
            meta=data["meta"],
        )


def checksum_file(path: Path, chunk_bytes: int = CHUNK_BYTES) -> FileEntry:
    """Reads ``path`` once and returns its size, chunk CRC-32s and file checksum.

    Example:
        >>> checksum_file(cache_dir / "labels.npy").size
        400128
    """
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    chunks = []
    size = 0
    with open(path, "rb") as stream:  # buffered: readinto fills the chunk unless at end of file
        while read := stream.readinto(buffer):
            chunks.append(zlib.crc32(view[:read]))
            size += read
    return FileEntry(size, zlib.crc32(struct.pack(f"<{len(chunks)}I", *chunks)), tuple(chunks))


def damaged_chunks(expected: FileEntry, actual: FileEntry) -> list[int]:
    """Indices of the chunks whose checksums differ (files of equal size)."""
    return [i for i, (want, got) in enumerate(zip(expected.chunks, actual.chunks)) if want != got]
