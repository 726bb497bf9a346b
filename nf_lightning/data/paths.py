"""Where data sets are read from, and where decoded copies of them are cached.

Both directories come from a constructor argument, else an environment variable,
else a default under ``~/.cache/nf_lightning``:

>>> str(resolve_data_dir("/data/sets"))
'/data/sets (from the data_dir argument)'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "NF_DATA_DIR"
CACHE_DIR_ENV = "NF_CACHE_DIR"
DEFAULT_DATA_DIR = "~/.cache/nf_lightning/data"
DEFAULT_CACHE_DIR = "~/.cache/nf_lightning"


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not where it was looked for; the message says where and how to get it."""


@dataclass(frozen=True)
class DataDir:
    """A resolved directory and where the choice came from (for error messages)."""

    path: Path
    origin: str

    def __str__(self) -> str:
        return f"{self.path} (from {self.origin})"


def _resolve(
    explicit: str | os.PathLike[str] | None, argument: str, env_var: str, default: str
) -> DataDir:
    if explicit is not None:
        return DataDir(Path(explicit).expanduser(), f"the {argument} argument")
    if os.environ.get(env_var):
        return DataDir(Path(os.environ[env_var]).expanduser(), f"${env_var}")
    return DataDir(Path(default).expanduser(), f"the default; set ${env_var} to change it")


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> DataDir:
    """The directory data sets are read from: ``data_dir``, else ``$NF_DATA_DIR``, else the default."""
    return _resolve(data_dir, "data_dir", DATA_DIR_ENV, DEFAULT_DATA_DIR)


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> DataDir:
    """The writable directory for decoded copies: ``cache_dir``, else ``$NF_CACHE_DIR``, else the default."""
    return _resolve(cache_dir, "cache_dir", CACHE_DIR_ENV, DEFAULT_CACHE_DIR)
