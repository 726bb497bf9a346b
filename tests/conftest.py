"""Shared fixtures for the project's offline data sets."""

from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets_dir() -> Path:
    """``../shared/datasets`` with the real CIFAR-10 JPEG archive (read-only)."""
    if not (SHARED_DATASETS / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip(f"the shared CIFAR-10 JPEG archive is not in {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``cache_dir`` per test session, so the real archive is decoded at most once."""
    return tmp_path_factory.mktemp("nf_cache")
