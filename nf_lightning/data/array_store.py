"""A directory of named numpy arrays, written atomically and verified on load.

Each array is one ``.npy`` file; ``manifest.json`` is written last and records
every array's shape, dtype, file size and sha256. A crash mid-write therefore
leaves either no manifest or one whose checks fail, and a truncated or altered
file is caught on load, so a reader never gets half an array.

>>> import numpy as np, tempfile
>>> store = ArrayStore(tempfile.mkdtemp())
>>> store.save({"x": np.arange(3)}, meta={"classes": ["a"]})
>>> arrays, meta = store.load()
>>> arrays["x"].tolist(), meta
([0, 1, 2], {'classes': ['a']})
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_ENTRY_KEYS = {"shape", "dtype", "bytes", "sha256"}


class ArrayStore:
    """Named arrays saved under ``directory`` (created on first save)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def is_complete(self) -> bool:
        """Cheap check (no reading of array data): manifest present and every file the recorded size."""
        manifest = self._read_manifest()
        return manifest is not None and all(
            self._file(name).is_file() and self._file(name).stat().st_size == entry["bytes"]
            for name, entry in manifest["arrays"].items()
        )

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """Arrays and meta data, or None (with a warning saying why) if missing, incomplete or corrupt."""
        manifest = self._read_manifest()
        if manifest is None:
            return None
        arrays = {}
        for name, entry in manifest["arrays"].items():
            try:
                array = np.load(self._file(name), allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                log.warning("cached array %s is unreadable (%s)", self._file(name), err)
                return None
            if (
                list(array.shape) != entry["shape"]
                or str(array.dtype) != entry["dtype"]
                or _sha256(array) != entry["sha256"]
            ):
                log.warning("cached array %s does not match %s", self._file(name), MANIFEST)
                return None
            arrays[name] = array
        return arrays, manifest["meta"]

    def save(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Write every array, then the manifest; each file appears atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        entries = {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            with _atomic_write(self._file(name)) as f:
                np.save(f, array, allow_pickle=False)
            entries[name] = {
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "bytes": self._file(name).stat().st_size,
                "sha256": _sha256(array),
            }
        with _atomic_write(self.directory / MANIFEST) as f:
            f.write(json.dumps({"arrays": entries, "meta": dict(meta)}, indent=1).encode())

    def load_or_build(
        self, build: Callable[[], tuple[Mapping[str, np.ndarray], Mapping[str, Any]]]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``load()``, or call ``build()``, save its result and return it."""
        loaded = self.load()
        if loaded is not None:
            return loaded
        arrays, meta = build()
        self.save(arrays, meta)
        return dict(arrays), dict(meta)

    def _file(self, name: str) -> Path:
        return self.directory / f"{name}.npy"

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            manifest = json.loads((self.directory / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("unreadable %s in %s (%s)", MANIFEST, self.directory, err)
            return None
        if not (
            isinstance(manifest, dict)
            and isinstance(manifest.get("meta"), dict)
            and isinstance(manifest.get("arrays"), dict)
            and all(isinstance(e, dict) and _ENTRY_KEYS <= e.keys() for e in manifest["arrays"].values())
        ):
            log.warning("malformed %s in %s", MANIFEST, self.directory)
            return None
        return manifest


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


@contextmanager
def _atomic_write(path: Path) -> Iterator[IO[bytes]]:
    """Write to a temporary file next to ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
