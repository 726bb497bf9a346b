"""Every use of Lightning's private internals, in one place.

Lightning does not promise these names across releases; ``tests/test_internals.py``
checks each of them against the installed version so an upgrade that moves
one fails loudly there instead of deep inside a training run.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import _configure_optimizers, _configure_schedulers_automatic_opt
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim import Optimizer


def set_max_epochs(trainer: pl.Trainer, epochs: int) -> None:
    """Override the fit loop's epoch limit (the Trainer has no public setter)."""
    trainer.fit_loop.max_epochs = epochs


def parse_optimizer_recipe(optim_conf: Any) -> tuple[list[Optimizer], list[LRSchedulerConfig]]:
    """Parse whatever ``configure_optimizers`` returned, with Lightning's own rules.

    Scheduler configs keep their ``interval``/``frequency`` as automatic
    optimization would, since the strategy steps them itself.
    """
    optimizers, schedulers, monitor = _configure_optimizers(optim_conf)
    return optimizers, _configure_schedulers_automatic_opt(schedulers, monitor)


def train_dataloader_of(trainer: pl.Trainer) -> Any:
    """The training dataloader(s) ``fit`` will use, before the fit loop has loaded them.

    Works whether they came from ``fit(train_dataloaders=...)``, a data module or
    the LightningModule's own ``train_dataloader``.
    """
    return trainer.fit_loop._data_source.dataloader()
