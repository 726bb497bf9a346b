"""A plain LightningModule, learnable synthetic loaders and quiet CPU trainers: the project's smallest real runs.

Example:
    >>> train, val = loaders(n_train=64, n_val=32)
    >>> t = trainer(".", tight_strategy(".", epochs_per_block=1), max_epochs=1, enable_checkpointing=False)
    >>> t.fit(PlainClassifier(), train, val)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from nf_lightning.lightning.strategy import NeuroFluxStrategy


class PlainClassifier(pl.LightningModule):
    """A LightningModule written without any knowledge of nf_lightning: four conv units and a linear head."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(), nn.MaxPool2d(2)),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loaders(n_train: int = 256, n_val: int = 64, batch: int = 32) -> tuple[DataLoader, DataLoader]:
    """Seeded 16x16 images whose mean depends on their class (learnable, 10 classes): (train, val) loaders."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n_train + n_val,), generator=g)
    x = torch.randn(n_train + n_val, 3, 16, 16, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() / 5
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[n_train:], y[n_train:])
    return DataLoader(train, batch_size=batch, shuffle=True), DataLoader(val, batch_size=batch)


def trainer(root: str | Path, strategy: Any, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer writing under ``root``, without logger, progress bar, model summary or sanity check."""
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    return pl.Trainer(strategy=strategy, accelerator="cpu", default_root_dir=root, **{**options, **kwargs})


def tight_strategy(root: str | Path, **kwargs: Any) -> NeuroFluxStrategy:
    """NeuroFlux under a 1.2 MB budget (several blocks for :class:`PlainClassifier`), caching under ``root``."""
    kwargs = {"memory_budget": "1.2MB", "epochs_per_block": 1, "batch_limit": 64, **kwargs}
    return NeuroFluxStrategy(cache_dir=Path(root) / "cache", **kwargs)
