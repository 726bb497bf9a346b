"""Tests of nf_lightning.data: the real CIFAR-10 and Tiny ImageNet archives, small fixtures in official layouts."""

from __future__ import annotations

import doctest
import io
import logging
import pickle
import tarfile
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from nf_lightning.data import (
    KNOWN_DATASETS,
    CIFAR10DataModule,
    CIFAR10FolderDataModule,
    CIFAR100DataModule,
    DatasetNotFoundError,
    ImageTensorDataset,
    TinyImageNetDataModule,
    collate_batch,
    create,
)
from nf_lightning.data import tiny_imagenet
from nf_lightning.data.array_store import ArrayStore
from nf_lightning.data.sampling import balanced_choice
from nf_lightning.data.tensor_dataset import random_crop_flip

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def to_pixels(normalised: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo the normalisation: back to [0, 255] floats."""
    return (normalised * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) * 255


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_folder_archive(path: Path, per_class: tuple[int, int] = (6, 2), seed: int = 0) -> None:
    """A small cifar10-jpeg.tar.gz: train/<class>/NNNN.jpg and test/<class>/NNNN.jpg of 32x32 noise."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        for split, count in zip(("train", "test"), per_class):
            for name in CIFAR10_CLASSES:
                for i in range(count):
                    data = jpeg_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                    member = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))


def tree(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory`` with its inode and mtime: changes if any file is rewritten."""
    return {
        str(path.relative_to(directory)): (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


# --- the real CIFAR-10 JPEG archive --------------------------------------------------------


@pytest.fixture(scope="module")
def real_cifar(shared_datasets_dir: Path, data_cache_dir: Path) -> CIFAR10FolderDataModule:
    dm = CIFAR10FolderDataModule(shared_datasets_dir, cache_dir=data_cache_dir)
    dm.prepare_data()
    dm.setup()
    return dm


def test_real_archive_splits_are_balanced_and_disjoint(real_cifar: CIFAR10FolderDataModule) -> None:
    train = real_cifar.train_dataset(augment=False)
    val, test = real_cifar.val_dataset(), real_cifar.test_dataset()
    assert real_cifar.classes == tuple(CIFAR10_CLASSES)
    assert (len(train), len(val), len(test)) == (45_000, 5_000, 10_000)
    assert class_counts(train.labels, 10) == [4_500] * 10
    assert class_counts(val.labels, 10) == [500] * 10
    assert class_counts(test.labels, 10) == [1_000] * 10
    train_rows, val_rows = set(train.indices.tolist()), set(val.indices.tolist())
    assert not train_rows & val_rows
    assert train_rows | val_rows == set(range(50_000))


def test_real_archive_pixels_match_the_jpeg(
    real_cifar: CIFAR10FolderDataModule, shared_datasets_dir: Path
) -> None:
    train = real_cifar.train_dataset(augment=False)
    row = int(train.indices[0])  # airplane is class 0, its files are 0000.jpg, 0001.jpg, ... in order
    name = f"train/airplane/{row:04d}.jpg"
    with tarfile.open(shared_datasets_dir / "cifar10-jpeg.tar.gz", "r|gz") as tar:
        member = next(tar.extractfile(m) for m in tar if m.name == name)  # early in the archive
        assert member is not None
        expected = np.array(Image.open(member).convert("RGB")).transpose(2, 0, 1)
    image, label = train[0]
    assert label == 0 and image.dtype == torch.float32
    pixels = to_pixels(image, real_cifar.mean, real_cifar.std)
    torch.testing.assert_close(pixels, torch.from_numpy(expected).float())


def test_real_archive_is_normalised(real_cifar: CIFAR10FolderDataModule) -> None:
    train = real_cifar.train_dataset(augment=False)
    total, total_sq = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(train), 5_000):
        images = train.__getitems__(range(start, start + 5_000)).images.double()
        total += images.sum((0, 2, 3))
        total_sq += images.square().sum((0, 2, 3))
    count = len(train) * 32 * 32
    mean, std = total / count, (total_sq / count - (total / count) ** 2).sqrt()
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(std, torch.ones(3, dtype=torch.float64), atol=0.03, rtol=0)


def test_real_archive_decode_is_reused(
    real_cifar: CIFAR10FolderDataModule, shared_datasets_dir: Path
) -> None:
    before = tree(real_cifar.cache_dir)
    again = CIFAR10FolderDataModule(shared_datasets_dir, cache_dir=real_cifar.cache_dir)
    again.prepare_data()
    again.setup()
    assert tree(real_cifar.cache_dir) == before
    assert torch.equal(again.test_dataset()[123][0], real_cifar.test_dataset()[123][0])


def real_copy(real_cifar: CIFAR10FolderDataModule, **options: int) -> CIFAR10FolderDataModule:
    """Another data module over the same (already decoded) archive."""
    return CIFAR10FolderDataModule(real_cifar.data_dir, cache_dir=real_cifar.cache_dir, **options)


def test_subsets_are_balanced_seeded_and_nested(real_cifar: CIFAR10FolderDataModule) -> None:
    def rows(dm: CIFAR10FolderDataModule) -> tuple[list[int], list[int]]:
        return dm.train_dataset(augment=False).indices.tolist(), dm.val_dataset().indices.tolist()

    full_train, full_val = rows(real_cifar)
    subset = real_copy(real_cifar, train_subset=1_005, val_subset=200)
    train, val = rows(subset)
    train_counts = class_counts(subset.train_dataset(augment=False).labels, 10)
    assert sum(train_counts) == 1_005 and max(train_counts) - min(train_counts) == 1
    assert class_counts(subset.val_dataset().labels, 10) == [20] * 10
    assert set(train) <= set(full_train) and set(val) <= set(full_val)
    assert train == sorted(train)  # deterministic order
    assert rows(real_copy(real_cifar, train_subset=1_005, val_subset=200)) == (train, val)
    assert rows(real_copy(real_cifar, train_subset=1_005, val_subset=200, seed=1)) != (train, val)
    assert rows(real_copy(real_cifar, train_subset=500))[1] == full_val  # the split ignores subsets
    assert rows(real_copy(real_cifar, seed=1))[1] != full_val


def test_subset_larger_than_split_is_rejected(real_cifar: CIFAR10FolderDataModule) -> None:
    with pytest.raises(ValueError, match="val_subset=5001"):
        real_copy(real_cifar, val_subset=5_001).setup()


def test_augmentation_on_and_off(real_cifar: CIFAR10FolderDataModule) -> None:
    plain = real_cifar.train_dataset(augment=False)
    augmented = real_cifar.train_dataset(augment=True)
    batch = list(range(64))
    assert torch.equal(plain.__getitems__(batch).images, plain.__getitems__(batch).images)
    torch.manual_seed(0)
    first = augmented.__getitems__(batch).images
    assert not torch.equal(first, augmented.__getitems__(batch).images)
    assert not torch.equal(first, plain.__getitems__(batch).images)
    torch.manual_seed(0)
    assert torch.equal(first, augmented.__getitems__(batch).images)  # seeded by torch's global RNG
    assert real_cifar.val_dataset().augment is False and real_cifar.test_dataset().augment is False


def test_loaders_follow_batch_size(real_cifar: CIFAR10FolderDataModule) -> None:
    x, y = next(iter(real_cifar.train_dataloader()))
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    real_cifar.batch_size = 32
    try:
        assert next(iter(real_cifar.val_dataloader()))[0].shape == (32, 3, 32, 32)
    finally:
        real_cifar.batch_size = 128


def test_fingerprint(real_cifar: CIFAR10FolderDataModule) -> None:
    def fingerprint(name: str = "cifar10_folder", **options: object) -> str:
        return create(name, data_dir="unused", **options).fingerprint

    base = fingerprint()
    assert base == real_cifar.fingerprint == fingerprint(batch_size=7, augment=False, num_workers=1)
    changed = [
        fingerprint("cifar10"),
        fingerprint(seed=1),
        fingerprint(val_size=4_000),
        fingerprint(train_subset=1_000),
        fingerprint(val_subset=100),
    ]
    assert len({base, *changed}) == 6


# --- caching of the decode (small archive) ---------------------------------------------------


@pytest.fixture
def small_archive(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_folder_archive(data_dir / "cifar10-jpeg.tar.gz")
    return data_dir


def small_folder_dm(data_dir: Path, cache_dir: Path, **options: object) -> CIFAR10FolderDataModule:
    return CIFAR10FolderDataModule(data_dir, cache_dir=cache_dir, val_size=20, **options)


def test_decode_writes_only_to_cache_dir(small_archive: Path, tmp_path: Path) -> None:
    before = tree(small_archive)
    dm = small_folder_dm(small_archive, tmp_path / "cache")
    dm.prepare_data()
    dm.setup()
    assert tree(small_archive) == before
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    assert len(dm.train_dataset(augment=False)) == 40
    assert len(dm.val_dataset()) == len(dm.test_dataset()) == 20


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_manifest"])
@pytest.mark.parametrize("prepare", [True, False], ids=["prepare_data", "setup_only"])
def test_damaged_cache_is_rebuilt(
    small_archive: Path, tmp_path: Path, damage: str, prepare: bool, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    original = small_folder_dm(small_archive, cache)
    original.setup()
    (images,) = cache.rglob("train_images.npy")
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    elif damage == "flip_byte":
        data = bytearray(images.read_bytes())
        data[-100] ^= 0xFF
        images.write_bytes(bytes(data))
    else:
        (images.parent / "manifest.json").unlink()

    rebuilt = small_folder_dm(small_archive, cache)
    with caplog.at_level(logging.INFO, logger="nf_lightning.data"):
        if prepare:
            rebuilt.prepare_data()
        rebuilt.setup()
    assert any("decoding" in record.message for record in caplog.records)
    assert torch.equal(rebuilt.test_dataset()[0][0], original.test_dataset()[0][0])
    assert ArrayStore(images.parent).load() is not None


def test_changed_archive_is_decoded_again(small_archive: Path, tmp_path: Path) -> None:
    first = small_folder_dm(small_archive, tmp_path / "cache")
    first_image = first.test_dataset()[0][0]
    write_folder_archive(small_archive / "cifar10-jpeg.tar.gz", seed=1)
    second = small_folder_dm(small_archive, tmp_path / "cache")
    assert not torch.equal(second.test_dataset()[0][0], first_image)
    assert len(list((tmp_path / "cache" / "decoded").iterdir())) == 2


def test_unpacked_folder_matches_archive(small_archive: Path, tmp_path: Path) -> None:
    unpacked = tmp_path / "unpacked"
    with tarfile.open(small_archive / "cifar10-jpeg.tar.gz") as tar:
        tar.extractall(unpacked / "cifar10-jpeg", filter="data")
    from_archive = small_folder_dm(small_archive, tmp_path / "cache")
    from_folder = small_folder_dm(unpacked, tmp_path / "cache")
    pairs = [
        (from_archive.train_dataset(augment=False), from_folder.train_dataset(augment=False)),
        (from_archive.test_dataset(), from_folder.test_dataset()),
    ]
    for a, b in pairs:
        assert torch.equal(a.__getitems__(range(len(a))).images, b.__getitems__(range(len(b))).images)
        assert torch.equal(a.labels, b.labels)


def test_folder_with_wrong_image_size_is_rejected(tmp_path: Path) -> None:
    for split in ("train", "test"):
        folder = tmp_path / "cifar10-jpeg" / split / "cat"
        folder.mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(folder / "0000.jpg")
    with pytest.raises(ValueError, match=r"0000.jpg: expected a 32x32 image, got 64x64"):
        CIFAR10FolderDataModule(tmp_path, cache_dir=tmp_path / "cache").prepare_data()


def test_lightning_trainer_runs_on_the_datamodule(small_archive: Path, tmp_path: Path) -> None:
    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = small_folder_dm(small_archive, tmp_path / "cache", batch_size=8, num_workers=1)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(Linear(), datamodule=dm)
    assert trainer.global_step == 5  # 40 training images / batch 8
    assert "val_loss" in trainer.callback_metrics


# --- data roots and errors -------------------------------------------------------------------


def test_data_and_cache_dirs_come_from_env_then_default(
    small_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NF_DATA_DIR", str(small_archive))
    monkeypatch.setenv("NF_CACHE_DIR", str(tmp_path / "env_cache"))
    dm = CIFAR10FolderDataModule(val_size=20)
    dm.setup()
    assert (dm.data_dir, dm.cache_dir) == (small_archive, tmp_path / "env_cache")
    assert list((tmp_path / "env_cache").rglob("manifest.json"))

    monkeypatch.delenv("NF_DATA_DIR")
    monkeypatch.delenv("NF_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dm = CIFAR10FolderDataModule()
    assert dm.data_dir == tmp_path / "home" / ".cache" / "nf_lightning" / "data"
    assert dm.cache_dir == tmp_path / "home" / ".cache" / "nf_lightning"


def test_missing_folder_archive_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NF_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as error:
        CIFAR10FolderDataModule(cache_dir=tmp_path / "cache").prepare_data()
    message = str(error.value)
    assert str(tmp_path / "cifar10-jpeg.tar.gz") in message and "$NF_DATA_DIR" in message


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (CIFAR10DataModule, ["cifar-10-batches-py", "download=True", "cifar-10-python.tar.gz"]),
        (CIFAR100DataModule, ["cifar-100-python", "download=True", "cifar-100-python.tar.gz"]),
        (TinyImageNetDataModule, ["tiny-imagenet-200/wnids.txt", "tiny-imagenet-200.zip"]),
    ],
)
def test_missing_dataset_says_where_it_looked_and_how_to_get_it(
    module: type, expected: list[str], tmp_path: Path
) -> None:
    with pytest.raises(DatasetNotFoundError) as error:
        module(tmp_path, batch_size=4).setup()
    message = str(error.value)
    assert str(tmp_path) in message and "data_dir argument" in message
    for text in expected:
        assert text in message


def test_create_knows_every_dataset() -> None:
    assert sorted(KNOWN_DATASETS) == ["cifar10", "cifar100", "cifar10_folder", "tiny_imagenet"]
    for name, module in KNOWN_DATASETS.items():
        dm = create(name, data_dir="unused", batch_size=16)
        assert type(dm) is module and dm.batch_size == 16 and dm.input_shape == (3, 32, 32)
    known = "cifar10, cifar100, cifar10_folder, tiny_imagenet"
    with pytest.raises(ValueError, match=f"unknown dataset 'imagenet'; known: {known}$"):
        create("imagenet")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("batch_size", 0),
        ("batch_size", True),
        ("num_workers", -1),
        ("val_size", 0),
        ("train_subset", 2.5),
        ("seed", -1),
    ],
)
def test_bad_options_are_rejected(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{option} must be an integer >= "):
        CIFAR10DataModule("unused", **{option: value})


# --- CIFAR pickles (fixtures in torchvision's layout) -----------------------------------------


def write_cifar_pickles(
    root: Path, num_classes: int, train_per_class: int, test_per_class: int
) -> np.ndarray:
    """Write the CIFAR-10 or CIFAR-100 python pickles; return the test 'data' array."""
    rng = np.random.default_rng(0)

    def batch(count: int, labels_key: str) -> dict:
        labels = [i % num_classes for i in range(count)]
        content = {"batch_label": "fixture", "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                   labels_key: labels, "filenames": [f"{i}.png" for i in range(count)]}
        if num_classes == 100:
            content["coarse_labels"] = [label // 5 for label in labels]
        return content

    def dump(path: Path, content: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(content, protocol=2))

    names = [f"class_{i:03d}" for i in range(num_classes)]
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        per_batch = num_classes * train_per_class // 5
        for i in range(1, 6):
            dump(folder / f"data_batch_{i}", batch(per_batch, "labels"))
        test = batch(num_classes * test_per_class, "labels")
        dump(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch})
    else:
        folder = root / "cifar-100-python"
        dump(folder / "train", batch(num_classes * train_per_class, "fine_labels"))
        test = batch(num_classes * test_per_class, "fine_labels")
        coarse_names = [f"superclass_{i}" for i in range(20)]
        dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": coarse_names})
    dump(folder / "test_batch" if num_classes == 10 else folder / "test", test)
    return test["data"]


@pytest.mark.parametrize(("module", "num_classes"), [(CIFAR10DataModule, 10), (CIFAR100DataModule, 100)])
def test_cifar_pickles(module: type, num_classes: int, tmp_path: Path) -> None:
    test_data = write_cifar_pickles(tmp_path, num_classes, train_per_class=5, test_per_class=2)
    dm = module(tmp_path, val_size=2 * num_classes, batch_size=7)
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == num_classes and dm.classes[-1] == f"class_{num_classes - 1:03d}"
    train, val, test = dm.train_dataset(augment=False), dm.val_dataset(), dm.test_dataset()
    assert (len(train), len(val), len(test)) == (3 * num_classes, 2 * num_classes, 2 * num_classes)
    assert class_counts(val.labels, num_classes) == [2] * num_classes
    image, label = test[num_classes + 3]
    assert label == 3
    expected = torch.from_numpy(test_data[num_classes + 3].reshape(3, 32, 32)).float()
    torch.testing.assert_close(to_pixels(image, dm.mean, dm.std), expected, atol=1e-3, rtol=0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (7, 3, 32, 32) and y.shape == (7,)


def test_cifar_pickle_with_wrong_shape_is_rejected(tmp_path: Path) -> None:
    write_cifar_pickles(tmp_path, 100, train_per_class=1, test_per_class=1)
    bad = {"data": np.zeros((2, 10), np.uint8), "fine_labels": [0, 1]}
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match=r"cifar-100-python/test: 'data' must be a uint8 array of shape \(N, 3072\)$"):
        CIFAR100DataModule(tmp_path, val_size=100).setup()


# --- Tiny ImageNet (fixtures in the standard layout) -------------------------------------------

TINY_WNIDS = ("n03000003", "n01000001", "n02000002")  # wnids.txt need not be sorted
SHARED_TINY_IMAGENET = Path(__file__).resolve().parents[2] / "shared/datasets/tiny-imagenet-100-classes.tar.gz"


def write_tiny_imagenet(
    root: Path,
    wnids: tuple[str, ...] = TINY_WNIDS,
    train_per_class: int = 2,
    val_per_class: int = 2,
    unlisted: tuple[str, ...] = (),
) -> dict[str, tuple[int, int, int]]:
    """``root/tiny-imagenet-200/`` of solid-colour 64x64 JPEGs (the first class grayscale).

    ``wnids.txt`` lists ``wnids``; the ``unlisted`` classes have train/ folders and
    validation images too, as in a class subset cut from the official folder.
    Returns each class's colour.
    """
    rng = np.random.default_rng(len(wnids))
    colours = {wnid: tuple(int(c) for c in rng.integers(0, 256, 3)) for wnid in wnids + unlisted}
    colours[wnids[0]] = (200, 200, 200)

    def write(path: Path, wnid: str) -> None:
        grayscale = wnid == wnids[0]  # Tiny ImageNet has some grayscale JPEGs
        Image.new("L" if grayscale else "RGB", (64, 64), 200 if grayscale else colours[wnid]).save(path)

    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    annotations = []
    for j in range(val_per_class):  # annotations interleave the classes, as the official file does
        for wnid in wnids + unlisted:
            name = f"val_{len(annotations)}.JPEG"
            write(base / "val" / "images" / name, wnid)
            annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    for wnid in wnids + unlisted:
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        for j in range(train_per_class):
            write(images / f"{wnid}_{j}.JPEG", wnid)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    (base / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return {wnid: colours[wnid] for wnid in wnids}


def pack_tiny_imagenet(source: Path, archive: Path) -> None:
    """``source/tiny-imagenet-200/`` as a .zip or .tar.gz, plus an unlabelled test/ that must be ignored."""
    test_image = io.BytesIO()
    Image.new("RGB", (64, 64)).save(test_image, "JPEG")
    paths = [path for path in sorted(source.rglob("*")) if path.is_file()]
    files = {path.relative_to(source).as_posix(): path.read_bytes() for path in paths}
    files["tiny-imagenet-200/test/images/test_0.JPEG"] = test_image.getvalue()
    files["tiny-imagenet-200/words.txt"] = b"n01000001\tone\n"
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as zipped:
            for name, data in files.items():
                zipped.writestr(name, data)
    else:
        with tarfile.open(archive, "w:gz") as tar:
            for name, data in files.items():
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def tiny_dm(data_dir: Path, cache_dir: Path, **options: object) -> TinyImageNetDataModule:
    return TinyImageNetDataModule(data_dir, cache_dir=cache_dir, **options)


def test_tiny_imagenet_classes_come_from_wnids(tmp_path: Path) -> None:
    colours = write_tiny_imagenet(tmp_path / "data", train_per_class=4, val_per_class=2)
    dm = tiny_dm(tmp_path / "data", tmp_path / "cache", val_size=3)
    assert dm.num_classes == 3 and dm.wnids == tuple(sorted(TINY_WNIDS))
    assert not (tmp_path / "cache").exists()  # the class count is read without decoding anything
    assert TinyImageNetDataModule.num_classes == 200  # on the class (no data read): the official count
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == 3 and dm.classes == tuple(sorted(TINY_WNIDS))
    train, val, test = dm.train_dataset(augment=False), dm.val_dataset(), dm.test_dataset()
    assert (len(train), len(val), len(test)) == (9, 3, 6)
    assert class_counts(train.labels, 3) == [3, 3, 3] and class_counts(val.labels, 3) == [1, 1, 1]
    batch = test.__getitems__(range(len(test)))
    assert batch.images.shape == (6, 3, 32, 32)
    # val_annotations.txt lists val_0 .. val_5 as n03, n01, n02, n03, n01, n02: label = index in sorted wnids
    assert batch.labels.tolist() == [2, 0, 1, 2, 0, 1]
    pixels = torch.stack([to_pixels(image, dm.mean, dm.std) for image in batch.images])
    expected = torch.tensor([colours[dm.classes[label]] for label in batch.labels], dtype=torch.float32)
    torch.testing.assert_close(pixels.mean((2, 3)), expected, atol=3, rtol=0)  # JPEG of a flat colour
    for image, label in (train[i] for i in range(len(train))):
        colour = torch.tensor(colours[dm.classes[label]], dtype=torch.float32)
        torch.testing.assert_close(to_pixels(image, dm.mean, dm.std).mean((1, 2)), colour, atol=3, rtol=0)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4


def test_tiny_imagenet_val_size_defaults_to_a_tenth_of_the_training_images(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path / "data", train_per_class=10, val_per_class=1)
    dm = tiny_dm(tmp_path / "data", tmp_path / "cache")
    assert dm.val_size == 3  # reading it loads the data: 30 training images
    assert (len(dm.train_dataset(augment=False)), len(dm.val_dataset())) == (27, 3)
    given = create("tiny_imagenet", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", val_size=6)
    assert given.val_size == 6


def test_tiny_imagenet_class_subset_skips_other_validation_images(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path / "data", val_per_class=2, unlisted=("n09000009", "n00000000"))
    dm = tiny_dm(tmp_path / "data", tmp_path / "cache", val_size=3)
    assert dm.num_classes == 3
    message = (
        r"val_annotations.txt: skipped 4 validation images whose class is not in wnids.txt "
        r"\(n00000000, n09000009\); the test split holds the 3 classes of wnids.txt only"
    )
    with pytest.warns(UserWarning, match=message):
        dm.setup()
    assert dm.classes == tuple(sorted(TINY_WNIDS))  # the unlisted train/ folders are ignored too
    assert (len(dm.train_dataset(augment=False)), len(dm.val_dataset()), len(dm.test_dataset())) == (3, 3, 6)
    assert class_counts(dm.test_dataset().labels, 3) == [2, 2, 2]


@pytest.mark.parametrize("archive_name", ["tiny-imagenet-3-classes.tar.gz", "tiny-imagenet-200.zip"])
def test_tiny_imagenet_archive_matches_folder(archive_name: str, tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path / "unpacked")
    (tmp_path / "packed").mkdir()
    pack_tiny_imagenet(tmp_path / "unpacked", tmp_path / "packed" / archive_name)
    before = tree(tmp_path / "packed")
    folder = tiny_dm(tmp_path / "unpacked", tmp_path / "cache", val_size=3)
    packed = tiny_dm(tmp_path / "packed", tmp_path / "cache", val_size=3)
    assert packed.num_classes == 3 and packed.fingerprint == folder.fingerprint  # read before any decode
    packed.prepare_data()
    packed.setup()
    assert packed.classes == folder.classes == tuple(sorted(TINY_WNIDS))
    for split in ("train", "val", "test"):
        a = getattr(packed, f"{split}_dataset")(**({"augment": False} if split == "train" else {}))
        b = getattr(folder, f"{split}_dataset")(**({"augment": False} if split == "train" else {}))
        a_batch, b_batch = a.__getitems__(range(len(a))), b.__getitems__(range(len(b)))
        assert torch.equal(a_batch.images, b_batch.images) and torch.equal(a_batch.labels, b_batch.labels)
    assert tree(tmp_path / "packed") == before  # the archive is read, never unpacked next to it
    assert len(list((tmp_path / "cache").glob("decoded/*"))) == 2  # one entry per source


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        ("delete", DatasetNotFoundError, r"looked for .*tiny-imagenet-200/wnids.txt"),
        ("empty", ValueError, r"wnids.txt lists no classes: it must hold the class ids"),
        ("blank_lines", ValueError, r"wnids.txt lists no classes"),
        ("repeat", ValueError, r"wnids.txt: class ids listed more than once: n01000001$"),
        ("two_per_line", ValueError, r"wnids.txt: expected one class id \(wnid\) per line, got 'n01 n02'"),
        ("no_images", ValueError, r"n05000005/images: no training images for class n05000005, which wnids.txt"),
    ],
)
def test_tiny_imagenet_bad_wnids_are_rejected(damage: str, error: type, message: str, tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path, train_per_class=1, val_per_class=1)
    wnids = tmp_path / "tiny-imagenet-200" / "wnids.txt"
    content = {
        "empty": "",
        "blank_lines": "\n  \n",
        "repeat": wnids.read_text() + "n01000001\n",
        "two_per_line": wnids.read_text() + "n01 n02\n",
        "no_images": wnids.read_text() + "n05000005\n",
    }
    if damage == "delete":
        wnids.unlink()
    else:
        wnids.write_text(content[damage])
    with pytest.raises(error, match=message):
        tiny_dm(tmp_path, tmp_path / "cache").prepare_data()
    if damage != "no_images":
        with pytest.raises(error, match=message):
            tiny_dm(tmp_path, tmp_path / "cache").num_classes  # noqa: B018


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("val_x.JPEG", r"val_annotations.txt:7: expected '<file>\\t<wnid>\\t...', got 'val_x.JPEG'"),
        ("val_x.JPEG\tn01000001\t0\t0\t1\t1", r"val_annotations.txt:7: val_x.JPEG is not an image in .*/images"),
    ],
)
def test_tiny_imagenet_bad_annotations_are_rejected(line: str, message: str, tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path, train_per_class=1, val_per_class=2)
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + line + "\n")
    with pytest.raises(ValueError, match=message):
        tiny_dm(tmp_path, tmp_path / "cache").prepare_data()


def test_tiny_imagenet_no_validation_image_of_a_listed_class_is_rejected(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path, train_per_class=1, val_per_class=0)
    with pytest.raises(ValueError, match=r"val_annotations.txt: no validation images of the 3 classes in wnids"):
        tiny_dm(tmp_path, tmp_path / "cache").prepare_data()


def test_tiny_imagenet_fingerprint_includes_the_classes(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path / "three")
    write_tiny_imagenet(tmp_path / "two", wnids=TINY_WNIDS[:2])
    write_tiny_imagenet(tmp_path / "other", wnids=("n04000004", *TINY_WNIDS[1:]))

    def fingerprint(data: str, **options: object) -> str:
        return tiny_dm(tmp_path / data, tmp_path / "cache", val_size=2, **options).fingerprint

    three = fingerprint("three")
    assert three == fingerprint("three", batch_size=7, augment=False)
    assert len({three, fingerprint("two"), fingerprint("other"), fingerprint("three", seed=1)}) == 4
    dm = tiny_dm(tmp_path / "three", tmp_path / "cache", val_size=2)
    dm.setup()
    assert dm.fingerprint == three


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("corrupt", r"tiny-imagenet-200.tar.gz: cannot read the archive"),
        ("no_annotations", r"tiny-imagenet-200.tar.gz:tiny-imagenet-200/val/val_annotations.txt is missing"),
        ("no_wnids", r"tiny-imagenet-200.tar.gz: expected one tiny-imagenet-200/wnids.txt .* found no wnids.txt"),
    ],
)
def test_tiny_imagenet_bad_archive_is_rejected(damage: str, message: str, tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path / "unpacked", train_per_class=1, val_per_class=1)
    base = tmp_path / "unpacked" / "tiny-imagenet-200"
    if damage != "corrupt":
        (base / {"no_annotations": "val/val_annotations.txt", "no_wnids": "wnids.txt"}[damage]).unlink()
    (tmp_path / "data").mkdir()
    archive = tmp_path / "data" / "tiny-imagenet-200.tar.gz"
    pack_tiny_imagenet(tmp_path / "unpacked", archive)
    if damage == "corrupt":
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match=message):
        tiny_dm(tmp_path / "data", tmp_path / "cache").prepare_data()


def test_tiny_imagenet_doctests() -> None:
    assert doctest.testmod(tiny_imagenet).failed == 0


def test_tiny_imagenet_several_archives_are_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(b"")
    (tmp_path / "tiny-imagenet-100-classes.tar.gz").write_bytes(b"")
    names = r"tiny-imagenet-100-classes.tar.gz, tiny-imagenet-200.zip; keep only the one to use"
    with pytest.raises(ValueError, match=rf"several archives in .*: {names}"):
        tiny_dm(tmp_path, tmp_path / "cache").prepare_data()


# --- the real Tiny ImageNet class subset (tiny-imagenet-100-classes.tar.gz) --------------------


@pytest.fixture(scope="module")
def real_tiny_imagenet(data_cache_dir: Path) -> TinyImageNetDataModule:
    if not SHARED_TINY_IMAGENET.is_file():
        pytest.skip(f"the shared Tiny ImageNet archive {SHARED_TINY_IMAGENET} is missing")
    dm = create("tiny_imagenet", data_dir=SHARED_TINY_IMAGENET.parent, cache_dir=data_cache_dir)
    assert isinstance(dm, TinyImageNetDataModule)
    assert dm.num_classes == 100  # from wnids.txt, the archive's first member; nothing decoded yet
    dm.prepare_data()
    dm.setup()
    return dm


def test_real_tiny_imagenet_has_100_classes(real_tiny_imagenet: TinyImageNetDataModule) -> None:
    dm = real_tiny_imagenet
    assert dm.num_classes == 100 and len(dm.classes) == 100 and list(dm.classes) == sorted(dm.classes)
    train, val, test = dm.train_dataset(augment=False), dm.val_dataset(), dm.test_dataset()
    assert (len(train) + len(val), len(test)) == (10_000, 5_000)
    assert (len(train), len(val)) == (9_000, 1_000)  # val_size: a tenth of the training images
    assert class_counts(train.labels, 100) == [90] * 100 and class_counts(val.labels, 100) == [10] * 100
    assert class_counts(test.labels, 100) == [50] * 100
    for split, count in ((train, 9_000), (val, 1_000), (test, 5_000)):
        batch = split.__getitems__(range(len(split)))
        assert batch.images.shape == (count, 3, 32, 32) and batch.images.dtype == torch.float32
    for labels in (train.labels, test.labels):
        assert labels.dtype == torch.int64 and 0 <= int(labels.min()) and int(labels.max()) < 100


def test_real_tiny_imagenet_pixels_are_the_resized_jpeg(real_tiny_imagenet: TinyImageNetDataModule) -> None:
    with tarfile.open(SHARED_TINY_IMAGENET, "r|gz") as tar:  # val/ comes last, its annotations after its images
        val = {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and "/val/" in m.name}  # type: ignore
    first = val["tiny-imagenet-200/val/val_annotations.txt"].decode().splitlines()[0].split("\t")
    with Image.open(io.BytesIO(val[f"tiny-imagenet-200/val/images/{first[0]}"])) as jpeg:
        assert jpeg.size == (64, 64)
        expected = np.asarray(jpeg.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    image, label = real_tiny_imagenet.test_dataset()[0]
    assert real_tiny_imagenet.classes[label] == first[1]
    pixels = to_pixels(image, real_tiny_imagenet.mean, real_tiny_imagenet.std)
    torch.testing.assert_close(pixels, torch.from_numpy(expected).float(), atol=1e-3, rtol=0)


def test_real_tiny_imagenet_decode_is_reused(
    real_tiny_imagenet: TinyImageNetDataModule, caplog: pytest.LogCaptureFixture
) -> None:
    before = tree(real_tiny_imagenet.cache_dir)
    again = TinyImageNetDataModule(SHARED_TINY_IMAGENET.parent, cache_dir=real_tiny_imagenet.cache_dir)
    with caplog.at_level(logging.INFO, logger="nf_lightning.data"):
        again.prepare_data()
        again.setup()
    assert not any("decoding" in record.message for record in caplog.records)
    assert tree(real_tiny_imagenet.cache_dir) == before
    assert again.fingerprint == real_tiny_imagenet.fingerprint
    assert torch.equal(again.test_dataset()[123][0], real_tiny_imagenet.test_dataset()[123][0])


# --- building blocks ---------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=6),
    fraction=st.floats(min_value=0, max_value=1),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_balanced_choice(counts: list[int], fraction: float, seed: int) -> None:
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    size = int(fraction * (min(counts) - 1)) * len(counts) + int(fraction * (len(counts) - 1))
    chosen = balanced_choice(labels, size, len(counts), np.random.default_rng(seed))
    per_class = np.bincount(labels[chosen], minlength=len(counts))
    assert len(chosen) == size and len(set(chosen.tolist())) == size
    assert list(chosen) == sorted(chosen)
    assert per_class.max() - per_class.min() <= 1
    assert np.array_equal(chosen, balanced_choice(labels, size, len(counts), np.random.default_rng(seed)))


def test_balanced_choice_rejects_impossible_sizes() -> None:
    labels = np.array([0, 0, 0, 1])
    message = "val_size=4 needs 2 items of class 1 but only 1 are available; choose at most 2$"
    with pytest.raises(ValueError, match=message):
        balanced_choice(labels, 4, 2, np.random.default_rng(0), what="val_size")
    with pytest.raises(ValueError, match="val_size=5 is out of range"):
        balanced_choice(labels, 5, 2, np.random.default_rng(0), what="val_size")


def test_random_crop_flip_is_a_padded_crop_or_its_mirror() -> None:
    images = torch.randint(0, 256, (512, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(0))
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    crops = {(dy, dx): padded[:, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)}
    candidates = {(*offset, 0): crop for offset, crop in crops.items()}
    candidates |= {(*offset, 1): crop.flip(3) for offset, crop in crops.items()}
    used = set()
    for i in range(len(images)):
        matches = [key for key, crops in candidates.items() if torch.equal(out[i], crops[i])]
        assert matches, f"image {i} is not a crop of its padded original"
        used.update(matches)
    assert used == set(candidates)  # every offset and both flips occur


def test_dataset_item_access_and_default_collate() -> None:
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(10) % 3
    ds = ImageTensorDataset(images, labels, (0.5,) * 3, (0.2,) * 3, indices=torch.tensor([9, 2, 5]))
    assert len(ds) == 3 and ds.labels.tolist() == [0, 2, 2]
    image, label = ds[-1]
    torch.testing.assert_close(image, (images[5].float() / 255 - 0.5) / 0.2)
    assert label == 2
    with pytest.raises(IndexError):
        ds[3]
    fast = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_batch)))
    default = next(iter(DataLoader(ds, batch_size=3)))
    assert torch.equal(fast[0], default[0]) and torch.equal(fast[1], default[1])


def test_dataset_rejects_bad_inputs() -> None:
    images, labels = torch.zeros(4, 3, 4, 4, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)
    mean, std = (0.0,) * 3, (1.0,) * 3
    with pytest.raises(ValueError, match="images must be a uint8"):
        ImageTensorDataset(images.float(), labels, mean, std)
    with pytest.raises(ValueError, match=r"labels must be int64 of shape \(4,\)"):
        ImageTensorDataset(images, labels[:3], mean, std)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        ImageTensorDataset(images, labels, mean, (1, 1))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        ImageTensorDataset(images, labels, mean, std, indices=torch.tensor([4]))


def test_interrupted_save_leaves_no_partial_files(tmp_path: Path) -> None:
    class FailsOnSecond(dict):
        def items(self):  # type: ignore[override]
            yield "first", np.arange(3)
            raise RuntimeError("disk full")

    store = ArrayStore(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        store.save(FailsOnSecond(), meta={})
    assert store.load() is None and not store.is_complete()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first.npy"]
