"""Writing an activation cache: preallocated memmaps, filled in order, published atomically."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nf_lightning.core.cache.format import (
    ACTIVATIONS_FILE,
    CHUNK_BYTES,
    DATA_FILES,
    LABELS_FILE,
    MANIFEST_FILE,
    SUPPORTED_DTYPES,
    Manifest,
    checksum_file,
)

_SPACE_ERRORS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
OWNER_FILE = "OWNER.json"


class CacheSpaceError(OSError):
    """The disk (or a file-size limit) cannot take a cache; says what was needed, what is free, where."""


class CacheInUse(RuntimeError):
    """Another live run owns this cache directory."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Work directories: ".{name}.tmp-{pid}@{host}" while writing, ".{name}.old-{pid}@{host}" while replacing.
_WORK_DIR = re.compile(r"\..+\.(?:tmp|old)-(?P<pid>\d+)@(?P<host>[^@]+)")
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


class ActivationCacheWriter:
    """Writes the activations of one dataset split, batch by batch, into ``root/name``.

    Nothing appears under ``root/name`` until ``commit()``, which checksums the files, writes
    the manifest and renames the work directory into place (replacing an older cache). Leaving
    the ``with`` block without committing, or by an exception, deletes the work directory; work
    directories left by crashed processes on this host are deleted when a writer is created.

    Example:
        >>> with ActivationCacheWriter(root, "block0-train", len(dataset), (64, 16, 16),
        ...                            fingerprint=block_fingerprint) as writer:
        ...     for x, y in loader:
        ...         writer.write(block(x), y)
        ...     manifest = writer.commit()
    """

    def __init__(
        self,
        root: Path | str,
        name: str,
        num_samples: int,
        sample_shape: tuple[int, ...],
        dtype: str = "float16",
        *,
        fingerprint: str,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"cache name {name!r} must match {_NAME.pattern}")
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"cache dtype {dtype!r} is not supported; use one of {SUPPORTED_DTYPES}")
        if num_samples < 1 or any(d < 1 for d in sample_shape):
            raise ValueError(f"need num_samples >= 1 and positive sample dims, got {num_samples}, {sample_shape}")
        json.dumps(meta or {})  # fail now, not at commit, if meta is not JSON-serialisable
        self.root = Path(root)
        self.name = name
        self.num_samples = num_samples
        self.sample_shape = tuple(sample_shape)
        self.dtype = dtype
        self.fingerprint = fingerprint
        self.meta = dict(meta or {})
        self.path = self.root / name
        self._torch_dtype = getattr(torch, dtype)
        self._written = 0
        self._finished = False

        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_work_dirs(self.root)
        needed = num_samples * (int(np.prod(self.sample_shape)) * np.dtype(dtype).itemsize + 8)
        check_free_space(self.root, needed, what=f"cache {name!r}")
        self._work_dir = self.root / f".{name}.tmp-{os.getpid()}@{_HOST}"
        try:
            self._work_dir.mkdir()
        except FileExistsError:
            raise FileExistsError(f"another writer of cache {name!r} is open in this process") from None
        try:
            self._arrays: tuple[np.memmap, np.memmap] | None = (
                _preallocate(self._work_dir / ACTIVATIONS_FILE, np.dtype(dtype), (num_samples, *self.sample_shape)),
                _preallocate(self._work_dir / LABELS_FILE, np.dtype(np.int64), (num_samples,)),
            )
        except OSError as error:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            if error.errno in _SPACE_ERRORS:
                raise CacheSpaceError(
                    error.errno,
                    f"writing cache {name!r} ({needed / 1e6:.1f} MB) into {self.root} failed: {error.strerror}. "
                    "Free space there (or raise the file-size limit), or point cache_dir at a larger disk, then resume",
                ) from error
            raise
        except BaseException:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            raise

    def write(self, x: Tensor, y: Tensor) -> None:
        """Appends a batch: activations ``x`` [B, *sample_shape] (any device) and labels ``y`` [B]."""
        activations, labels = self._require_arrays()
        batch = x.shape[0]
        if tuple(x.shape[1:]) != self.sample_shape or tuple(y.shape) != (batch,):
            raise ValueError(
                f"expected x [B, {', '.join(map(str, self.sample_shape))}] and y [B], "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if y.is_floating_point() or y.is_complex():
            raise TypeError(f"labels must be integers, got {y.dtype}")
        end = self._written + batch
        if end > self.num_samples:
            raise ValueError(
                f"batch of {batch} overflows cache {self.name!r}: {self._written} of {self.num_samples} written"
            )
        values = x.detach().to(self._torch_dtype)  # convert on the source device: fewer bytes to copy
        if values.numel() and not torch.isfinite(torch.stack(torch.aminmax(values))).all():
            hint = " (float16 overflows above 65504: use dtype='float32')" if self.dtype == "float16" else ""
            raise ValueError(f"non-finite activations in {self.dtype}{hint}")
        activations[self._written : end] = values.cpu().numpy()
        labels[self._written : end] = y.detach().to("cpu", torch.int64).numpy()
        self._written = end

    def commit(self) -> Manifest:
        """Flushes and checksums the files, writes the manifest and publishes ``root/name``."""
        activations, labels = self._require_arrays()
        if self._written != self.num_samples:
            raise RuntimeError(f"cache {self.name!r}: wrote {self._written} of {self.num_samples} samples")
        activations.flush()
        labels.flush()
        del activations, labels
        self._arrays = None  # unmaps the files
        manifest = Manifest(
            name=self.name,
            num_samples=self.num_samples,
            sample_shape=self.sample_shape,
            dtype=self.dtype,
            fingerprint=self.fingerprint,
            files={file: checksum_file(self._work_dir / file, CHUNK_BYTES) for file in DATA_FILES},
            chunk_bytes=CHUNK_BYTES,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            meta=self.meta,
        )
        with open(self._work_dir / MANIFEST_FILE, "w") as stream:
            json.dump(manifest.to_dict(), stream, indent=1)
            stream.flush()
            os.fsync(stream.fileno())
        _publish(self._work_dir, self.path)
        self._finished = True
        return manifest

    def abort(self) -> None:
        """Discards everything written unless committed; the writer is closed afterwards."""
        if not self._finished:
            self._arrays = None
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._finished = True

    def __enter__(self) -> ActivationCacheWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()

    def _require_arrays(self) -> tuple[np.memmap, np.memmap]:
        if self._arrays is None:
            raise RuntimeError(f"writer of cache {self.name!r} is closed")
        return self._arrays


def check_free_space(root: Path, needed: int, what: str = "the cache") -> None:
    """Raise :class:`CacheSpaceError` unless ``root``'s file system has ``needed`` bytes free."""
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CacheSpaceError(
            errno.ENOSPC,
            f"{what} needs {needed / 1e6:.1f} MB in {root}, but only {free / 1e6:.1f} MB are free. "
            "Free space there, or point cache_dir at a larger disk, then resume",
        )


def claim_cache_dir(root: Path, run_id: str) -> None:
    """Make ``root`` belong to run ``run_id`` (this process): a second live run using it is an error.

    A directory owned by a process of this host that is gone is taken over.
    The claim is a file created exclusively, so two runs starting at once cannot both win.
    """
    root.mkdir(parents=True, exist_ok=True)
    owner_file = root / OWNER_FILE
    me = {"run_id": run_id, "pid": os.getpid(), "host": _HOST}
    for _ in range(3):
        try:
            with open(owner_file, "x") as stream:
                json.dump(me, stream)
            return
        except FileExistsError:
            try:
                owner = json.loads(owner_file.read_text())
            except (OSError, ValueError):
                owner = {}
            if owner.get("run_id") == run_id:
                owner_file.write_text(json.dumps(me))  # the same run, resumed (maybe by another process)
                return
            if owner.get("host") == _HOST and not _alive(int(owner.get("pid", 0) or 0)):
                owner_file.unlink(missing_ok=True)  # its process is gone: take it over
                continue
            raise CacheInUse(
                f"the cache directory {root} belongs to another run ({owner.get('run_id')}, process "
                f"{owner.get('pid')} on {owner.get('host')}); give this run its own cache_dir"
            ) from None
    raise CacheInUse(f"could not claim the cache directory {root}")


def release_cache_dir(root: Path, run_id: str) -> None:
    """Give up ``root`` if run ``run_id`` owns it."""
    owner_file = root / OWNER_FILE
    try:
        if json.loads(owner_file.read_text()).get("run_id") == run_id:
            owner_file.unlink()
    except (OSError, ValueError):
        pass


def remove_stale_work_dirs(root: Path) -> list[Path]:
    """Deletes work directories under ``root`` left by dead processes of this host; returns them."""
    removed = []
    for entry in root.iterdir():
        match = _WORK_DIR.fullmatch(entry.name)
        if match and match["host"] == _HOST and entry.is_dir() and not _alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _preallocate(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A writable .npy memmap whose disk blocks are reserved, so a full disk fails here
    rather than as SIGBUS on a later write."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as stream:
            os.posix_fallocate(stream.fileno(), 0, os.fstat(stream.fileno()).st_size)
    return array


def _publish(work_dir: Path, final: Path) -> None:
    """Renames ``work_dir`` to ``final``. An existing ``final`` is first renamed aside (readers see
    the old cache or none, never a partial one) and deleted after; the loop settles races with
    another writer publishing the same name."""
    aside = final.with_name(f".{final.name}.old-{os.getpid()}@{_HOST}")
    while True:
        try:
            os.rename(work_dir, final)
            break
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            pass  # another writer moved it first
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename durable
    finally:
        os.close(directory)
    shutil.rmtree(aside, ignore_errors=True)
