"""Bad input gets clear errors, and cache faults (a shared directory, a full disk) lose no more than an epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nf_lightning.core.cache import CacheInUse, claim_cache_dir
from nf_lightning.core.network.decompose import UndecomposableModelError
from nf_lightning.testing.demo import PlainClassifier, loaders, tight_strategy, trainer


def data(n: int = 64, channels: int = 3, classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, channels, 16, 16, generator=g), torch.randint(0, classes, (n,), generator=g))


def fit(tmp_path: Path, train: DataLoader, val: DataLoader, module: pl.LightningModule | None = None, **options):
    strategy = tight_strategy(tmp_path, **options)
    t = trainer(tmp_path, strategy, enable_checkpointing=False)
    t.fit(module or PlainClassifier(), train, val)
    return t


def test_nan_in_the_inputs_names_the_step(tmp_path: Path) -> None:
    x, y = data().tensors
    x[40, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"input batch at step \d+ of block 0 holds NaN or Inf"):
        fit(tmp_path, DataLoader(TensorDataset(x, y), batch_size=32), DataLoader(data(), batch_size=32))


def test_labels_outside_the_heads_classes(tmp_path: Path) -> None:
    expected = r"labels at step \d+ of block 0 range over \[\d+, 1[01]\], but the network's head has 10 classes"
    with pytest.raises(ValueError, match=expected):
        fit(tmp_path, DataLoader(data(classes=12), batch_size=64), DataLoader(data(), batch_size=32))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_width_train(dtype: torch.dtype, tmp_path: Path) -> None:
    """A data set's int32 labels (numpy's default on some platforms) train as int64 ones do."""
    x, y = data().tensors
    narrow = DataLoader(TensorDataset(x, y.to(dtype)), batch_size=32)
    t = fit(tmp_path, narrow, narrow)
    assert t.strategy.run.finished


@pytest.mark.parametrize("labels", [torch.zeros(64), torch.zeros(64, 10)], ids=["float", "one-hot"])
def test_labels_that_are_not_class_indices(labels: torch.Tensor, tmp_path: Path) -> None:
    x, _ = data().tensors
    loader = DataLoader(TensorDataset(x, labels), batch_size=32)
    with pytest.raises(ValueError, match=r"labels at step \d+ of block 0 are torch.float32 of shape .* one integer"):
        fit(tmp_path, loader, DataLoader(data(), batch_size=32))


def test_validation_labels_that_are_not_class_indices(tmp_path: Path) -> None:
    """One-hot validation labels failed in the first validation pass with torch's shape mismatch."""
    x, y = data().tensors
    one_hot = DataLoader(TensorDataset(x, nn.functional.one_hot(y, 10).float()), batch_size=32)
    with pytest.raises(ValueError, match=r"labels at a validation batch are torch.float32 of shape \(32, 10\)"):
        fit(tmp_path, DataLoader(data(), batch_size=32), one_hot)


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(data())


@pytest.mark.parametrize("role", ["training", "validation"])
def test_an_iterable_dataset_gets_a_clear_error(role: str, tmp_path: Path) -> None:
    stream, mapped = DataLoader(Stream(), batch_size=32), DataLoader(data(), batch_size=32)
    train, val = (stream, mapped) if role == "training" else (mapped, stream)
    with pytest.raises(TypeError, match=f"the {role} loader reads an IterableDataset \\(Stream\\).*map-style"):
        fit(tmp_path, train, val)


def test_input_channels_that_do_not_match_the_first_unit(tmp_path: Path) -> None:
    one_channel = DataLoader(data(channels=1), batch_size=32)
    with pytest.raises(ValueError, match=r"1 input channel\(s\).*first convolution expects 3"):
        fit(tmp_path, one_channel, one_channel)


def test_a_diverging_unit_stops_with_the_unit_and_step(tmp_path: Path) -> None:
    class Exploding(PlainClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=float("inf"))

    train, val = loaders()
    with pytest.raises(FloatingPointError, match=r"unit \d of the block has a non-finite local loss .* at step \d+ "):
        fit(tmp_path, train, val, module=Exploding())


def test_an_empty_validation_loader(tmp_path: Path) -> None:
    train, _ = loaders()
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long)), batch_size=8)
    with pytest.raises(ValueError, match="validation loader is empty"):
        fit(tmp_path, train, empty)


def test_a_network_that_cannot_be_decomposed(tmp_path: Path) -> None:
    class Opaque(PlainClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.other = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Flatten(), nn.Linear(3 * 16 * 16, 10))

    train, val = loaders()
    with pytest.raises(UndecomposableModelError, match="several decomposable children"):
        fit(tmp_path, train, val, module=Opaque())


def test_a_budget_below_the_plans_needs_at_resume(tmp_path: Path) -> None:
    train, val = loaders()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, tight_strategy(tmp_path), callbacks=[ckpt], max_epochs=1)
    t.fit(PlainClassifier(), train, val)
    smaller = trainer(tmp_path, tight_strategy(tmp_path, memory_budget="0.6MB"))
    with pytest.raises(ValueError, match=r"plan was made for a 1.2 MB budget .* Resume with memory_budget >="):
        smaller.fit(PlainClassifier(), train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt")


def test_a_cache_directory_in_use_by_a_live_run_is_refused(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cache = tmp_path / "cache"
        cache.mkdir()
        (cache / "OWNER.json").write_text(json.dumps({"run_id": "other", "pid": other.pid, "host": _host()}))
        train, val = loaders()
        with pytest.raises(CacheInUse, match="belongs to another run"):
            fit(tmp_path, train, val)
    finally:
        other.kill()
        other.wait()
    # once that process is gone, its claim is stale and taken over
    train, val = loaders()
    fit(tmp_path, train, val)
    assert not (tmp_path / "cache" / "OWNER.json").exists()  # released when fit ended


def _host() -> str:
    from nf_lightning.core.cache import writer as cache_writer

    return cache_writer._HOST


def test_too_little_free_space_is_refused_before_writing(tmp_path: Path) -> None:
    from nf_lightning.core.cache import CacheSpaceError, check_free_space

    check_free_space(tmp_path, 1)
    with pytest.raises(CacheSpaceError, match=r"needs 1000000000000.0 MB in .* but only .* MB are free"):
        check_free_space(tmp_path, 10**18)


def test_claims_are_exclusive_and_resumable(tmp_path: Path) -> None:
    claim_cache_dir(tmp_path, "run-a")
    claim_cache_dir(tmp_path, "run-a")  # the same run again: fine
    with pytest.raises(CacheInUse):
        claim_cache_dir(tmp_path, "run-b")  # this process is alive and owns it as run-a


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from nf_lightning.testing.demo import PlainClassifier, loaders, trainer, tight_strategy
    if {limit}:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
    tmp = Path({tmp!r})
    pl.seed_everything(0)
    train, val = loaders()
    strategy = tight_strategy(tmp)
    t = trainer(tmp, strategy, callbacks=[ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)])
    resume = tmp / "neuroflux-disk-full.ckpt"
    t.fit(PlainClassifier(), train, val, ckpt_path=str(resume) if resume.exists() else None)
    print("FINISHED", strategy.run.finished, [b["block"] for b in strategy.run.progress.ended_blocks])
    """
)


def test_a_full_disk_fails_clearly_after_a_checkpoint_and_resumes(tmp_path: Path) -> None:
    """A file-size limit (RLIMIT_FSIZE) makes the cache write fail as a full disk would; no mocks."""
    def run(limit: int) -> subprocess.CompletedProcess:
        script = FULL_DISK.format(tmp=str(tmp_path), limit=limit)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)

    # block 0's training cache is 256 samples x 8 x 8 x 8 in float16 = 262 kB; a checkpoint is about 110 kB
    failed = run(limit=200_000)
    assert failed.returncode != 0
    assert "CacheSpaceError" in failed.stderr and "A checkpoint was saved to" in failed.stderr, failed.stderr[-3000:]
    assert (tmp_path / "neuroflux-disk-full.ckpt").is_file()
    assert not list((tmp_path / "cache").glob("block0-train/*"))  # no half cache left to be used
    resumed = run(limit=0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finished = [line for line in resumed.stdout.splitlines() if line.startswith("FINISHED")]
    assert finished and finished[0].startswith("FINISHED True")
    assert finished[0].endswith("[0, 1]")  # block 0 ended once (its epoch closed on resume), then block 1
