"""Activation cache: real files under tmp_path, a really crashed writer process, real DataLoaders."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from nf_lightning.core.cache import (
    ActivationCacheWriter,
    CacheCorrupt,
    CacheMissing,
    Manifest,
    cache_loader,
    cache_size_report,
    open_cache,
    verify_cache,
)
from nf_lightning.core.cache.format import ACTIVATIONS_FILE, CHUNK_BYTES, DATA_FILES, LABELS_FILE, MANIFEST_FILE
from nf_lightning.core.cache.loader import ThreadPrefetcher

SHAPE = (4, 3, 3)


def make_data(num_samples: int, shape: tuple[int, ...] = SHAPE, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, *shape, generator=generator)
    return x, torch.randint(0, 10, (num_samples,), generator=generator)


def write_cache(
    root: Path, name: str, x: Tensor, y: Tensor, batch: int = 16, fingerprint: str = "fp", **kwargs: Any
) -> Manifest:
    with ActivationCacheWriter(root, name, len(x), tuple(x.shape[1:]), fingerprint=fingerprint, **kwargs) as writer:
        for start in range(0, len(x), batch):
            writer.write(x[start : start + batch], y[start : start + batch])
        return writer.commit()


def epoch_batches(loader: DataLoader, epoch: int) -> list[tuple[Tensor, Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


@pytest.fixture
def small(tmp_path):
    """A 50-sample cache whose labels are the sample indices, so batches show which samples they hold."""
    x, y = make_data(50)[0], torch.arange(50)
    write_cache(tmp_path, "small", x, y, meta={"block": 0})
    return tmp_path, x, y


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_keeps_values_labels_and_order(tmp_path, dtype):
    x, y = make_data(50)
    manifest = write_cache(tmp_path, "c", x, y, batch=7, dtype=dtype, meta={"block": 2})
    cache = open_cache(tmp_path, "c", fingerprint="fp")

    expected = x.to(getattr(torch, dtype)).float()
    assert (len(cache), cache.sample_shape, cache.dtype) == (50, SHAPE, dtype)
    assert cache.manifest == manifest and manifest.meta == {"block": 2}
    assert cache.nbytes == manifest.nbytes == sum((tmp_path / "c" / f).stat().st_size for f in DATA_FILES)
    assert torch.equal(cache.labels, y)
    assert torch.allclose(expected, x, rtol=1e-3, atol=1e-3)
    sample, label = cache[13]
    assert sample.dtype == torch.float32 and torch.equal(sample, expected[13]) and label == int(y[13])
    indices = [41, 3, 3, 0, 49, 17]
    batch_x, batch_y = cache.__getitems__(indices)
    assert batch_x.dtype == torch.float32 and batch_y.dtype == torch.int64
    assert torch.equal(batch_x, expected[indices]) and torch.equal(batch_y, y[indices])


def test_manifest_survives_a_json_round_trip(small):
    root, _, _ = small
    manifest = verify_cache(root, "small")
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert json.loads((root / "small" / MANIFEST_FILE).read_text()) == manifest.to_dict()


@pytest.mark.parametrize(("batch_size", "drop_last"), [(1, False), (7, False), (7, True), (50, False), (64, False)])
def test_rebatching_covers_every_sample_once_per_epoch(small, batch_size, drop_last):
    root, x, _ = small
    loader = cache_loader(open_cache(root, "small"), batch_size, seed=3, drop_last=drop_last)
    for epoch in range(2):
        batches = epoch_batches(loader, epoch)
        sizes = [len(ids) for _, ids in batches]
        assert len(batches) == len(loader)
        assert all(size == batch_size for size in sizes[:-1]) and 0 < sizes[-1] <= batch_size
        ids = torch.cat([ids for _, ids in batches])
        assert len(set(ids.tolist())) == len(ids) == (50 - 50 % batch_size if drop_last else 50)
        assert torch.equal(torch.cat([batch_x for batch_x, _ in batches]), x.half().float()[ids])


def test_shuffle_differs_across_epochs_and_repeats_for_same_seed_and_epoch(small):
    root, _, _ = small
    cache = open_cache(root, "small")

    def order(seed: int, epoch: int, shuffle: bool = True) -> list[int]:
        loader = cache_loader(cache, 10, shuffle=shuffle, seed=seed)
        return torch.cat([ids for _, ids in epoch_batches(loader, epoch)]).tolist()

    assert order(5, 0) == order(5, 0)
    assert order(5, 0) != order(5, 1)
    assert order(5, 0) != order(6, 0)
    assert order(5, 1, shuffle=False) == list(range(50))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_prefetching_loader_yields_the_same_batches_as_a_plain_one(small, num_workers):
    root, _, _ = small
    cache = open_cache(root, "small")
    plain = cache_loader(cache, 8, seed=1, prefetch=False)
    ahead = cache_loader(cache, 8, seed=1, prefetch=True, num_workers=num_workers)
    assert type(iter(plain)).__name__ == "_SingleProcessDataLoaderIter"
    if num_workers == 0:
        assert isinstance(iter(ahead), ThreadPrefetcher)
    for epoch in range(2):
        expected, actual = epoch_batches(plain, epoch), epoch_batches(ahead, epoch)
        assert len(expected) == len(actual) == 7
        for (want_x, want_y), (got_x, got_y) in zip(expected, actual):
            assert torch.equal(want_x, got_x) and torch.equal(want_y, got_y)


def test_pickled_cache_remaps_the_file_instead_of_copying_it(tmp_path):
    x, y = make_data(50, (64, 8, 8))
    write_cache(tmp_path, "c", x, y)
    cache = open_cache(tmp_path, "c")
    cache.__getitems__([0])  # maps the file
    payload = pickle.dumps(cache)
    assert len(payload) < cache.manifest.files[ACTIVATIONS_FILE].size // 10
    clone = pickle.loads(payload)
    assert all(torch.equal(a, b) for a, b in zip(clone.__getitems__([9, 2]), cache.__getitems__([9, 2])))


def test_prefetcher_reraises_source_errors_and_stops_when_dropped():
    def failing():
        yield 1
        raise OSError("disk gone")

    prefetcher = ThreadPrefetcher(failing(), depth=2)
    assert next(prefetcher) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(prefetcher)
    with pytest.raises(StopIteration):
        next(prefetcher)

    released = threading.Event()

    def endless():
        try:
            yield from itertools.count()
        finally:
            released.set()  # runs once the producer thread has ended and dropped the generator

    prefetcher = ThreadPrefetcher(endless(), depth=1)
    assert next(prefetcher) == 0
    del prefetcher
    assert released.wait(timeout=10)


def test_fingerprint_mismatch_is_corrupt(small):
    root, _, _ = small
    open_cache(root, "small")  # no fingerprint given: not checked
    with pytest.raises(CacheCorrupt, match="fingerprint mismatch"):
        open_cache(root, "small", fingerprint="other")


def test_flipped_byte_is_reported_with_file_and_chunk(tmp_path):
    x, y = make_data(100, (64, 16, 16))  # 3.2 MB of float16 ...
    write_cache(tmp_path, "big", torch.cat([x, x, x]), torch.cat([y, y, y]), batch=64)  # ... 9.8 MB: 3 chunks
    data = tmp_path / "big" / ACTIVATIONS_FILE
    offset = data.stat().st_size // 2
    with open(data, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)[0]
        stream.seek(offset)
        stream.write(bytes([byte ^ 0x10]))

    chunk = offset // CHUNK_BYTES
    with pytest.raises(CacheCorrupt, match=rf"activations.npy: checksum mismatch in chunk {chunk} \(bytes") as error:
        open_cache(tmp_path, "big")
    assert error.value.path == tmp_path / "big"
    with pytest.raises(CacheCorrupt, match=f"chunk {chunk} "):
        verify_cache(tmp_path, "big")
    assert len(open_cache(tmp_path, "big", verify=False)) == 300  # sizes still match


@pytest.mark.parametrize("file", [ACTIVATIONS_FILE, LABELS_FILE])
def test_truncated_file_is_corrupt_even_without_checksums(small, file):
    root, _, _ = small
    path = root / "small" / file
    os.truncate(path, path.stat().st_size - 9)
    with pytest.raises(CacheCorrupt, match=f"{file} has .* bytes.*truncated"):
        open_cache(root, "small", verify=False)


def test_missing_cache(small):
    root, _, _ = small
    with pytest.raises(CacheMissing):
        open_cache(root, "absent")


@pytest.mark.parametrize(
    "edit",
    [
        lambda text: text[: len(text) // 2],  # torn write
        lambda text: text.replace('"format_version": 1', '"format_version": 2'),
        lambda text: json.dumps({**json.loads(text), "files": []}),
        lambda text: json.dumps({**json.loads(text), "chunk_bytes": 1024}),
    ],
)
def test_unreadable_manifest_is_corrupt(small, edit):
    root, _, _ = small
    manifest = root / "small" / MANIFEST_FILE
    manifest.write_text(edit(manifest.read_text()))
    with pytest.raises(CacheCorrupt, match="manifest unreadable"):
        open_cache(root, "small", verify=False)


def test_exception_while_writing_leaves_no_cache_and_no_work_dir(tmp_path):
    x, y = make_data(20)
    with pytest.raises(KeyError):
        with ActivationCacheWriter(tmp_path, "c", 20, SHAPE, fingerprint="fp") as writer:
            writer.write(x[:10], y[:10])
            raise KeyError("crash")
    assert list(tmp_path.iterdir()) == []


def test_commit_before_all_samples_are_written_raises_and_discards(tmp_path):
    x, y = make_data(20)
    with ActivationCacheWriter(tmp_path, "c", 20, SHAPE, fingerprint="fp") as writer:
        writer.write(x[:12], y[:12])
        with pytest.raises(RuntimeError, match="wrote 12 of 20"):
            writer.commit()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(x[:1], y[:1])


def crash_while_writing(root: Path) -> None:
    writer = ActivationCacheWriter(root, "c", 10, (2,), fingerprint="fp")
    writer.write(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))
    os._exit(3)  # dies mid-write: no cleanup handlers run


def test_work_dir_of_a_crashed_process_is_removed_by_the_next_writer(tmp_path):
    crashing = multiprocessing.get_context("fork").Process(target=crash_while_writing, args=(tmp_path,))
    crashing.start()
    crashing.join(timeout=60)
    assert crashing.exitcode == 3
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".c.tmp-")

    x, y = make_data(10, (2,))
    write_cache(tmp_path, "c", x, y)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert torch.equal(open_cache(tmp_path, "c").labels, y)


def test_recommit_replaces_the_cache_and_keeps_open_readers_valid(small):
    root, old_x, _ = small
    old = open_cache(root, "small")
    new_x, new_y = make_data(30, seed=1)
    write_cache(root, "small", new_x, new_y, fingerprint="fp2")

    assert sorted(p.name for p in root.iterdir()) == ["small"]
    replaced = open_cache(root, "small", fingerprint="fp2")
    assert len(replaced) == 30 and torch.equal(replaced.labels, new_y)
    assert torch.equal(old[49][0], old_x[49].half().float())  # the old mapping still reads the old data


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="bfloat16.*not supported"):
        ActivationCacheWriter(tmp_path, "c", 4, SHAPE, "bfloat16", fingerprint="fp")
    with pytest.raises(ValueError, match="cache name"):
        ActivationCacheWriter(tmp_path, "../c", 4, SHAPE, fingerprint="fp")
    with ActivationCacheWriter(tmp_path, "c", 4, SHAPE, fingerprint="fp") as writer:
        with pytest.raises(ValueError, match="expected x"):
            writer.write(torch.zeros(2, 4, 3), torch.zeros(2, dtype=torch.long))
        with pytest.raises(TypeError, match="labels must be integers"):
            writer.write(torch.zeros(2, *SHAPE), torch.zeros(2))
        with pytest.raises(ValueError, match="overflows cache"):
            writer.write(torch.zeros(5, *SHAPE), torch.zeros(5, dtype=torch.long))
        with pytest.raises(ValueError, match="non-finite"):
            writer.write(torch.full((2, *SHAPE), 1e5), torch.zeros(2, dtype=torch.long))
    assert list(tmp_path.iterdir()) == []


def test_size_report_lists_committed_caches_only(small):
    root, _, _ = small
    x, y = make_data(8)
    write_cache(root, "other", x, y)
    with ActivationCacheWriter(root, "pending", 8, SHAPE, fingerprint="fp"):
        report = cache_size_report(root)
    assert set(report) == {"small", "other"}
    assert report["small"] == sum(p.stat().st_size for p in (root / "small").iterdir())
    assert report["small"] > open_cache(root, "small").nbytes > report["other"]
    assert cache_size_report(root / "nowhere") == {}
