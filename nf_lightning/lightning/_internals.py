"""Every use of Lightning's private or undocumented internals, in one place.

Lightning does not promise these names across releases; ``tests/test_internals.py``
checks each of them against the installed version so an upgrade that moves
one fails loudly there instead of deep inside a training run.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io import torch_io
from lightning.pytorch.core.optimizer import _configure_optimizers, _configure_schedulers_automatic_opt
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim import Optimizer


def parse_optimizer_recipe(optim_conf: Any) -> tuple[list[Optimizer], list[LRSchedulerConfig]]:
    """Parse whatever ``configure_optimizers`` returned, with Lightning's own rules.

    Scheduler configs keep their ``interval``/``frequency``/``monitor`` as
    automatic optimization would, since NeuroFlux steps them itself.
    """
    optimizers, schedulers, monitor = _configure_optimizers(optim_conf)
    return optimizers, _configure_schedulers_automatic_opt(schedulers, monitor)


def train_dataloader_of(trainer: pl.Trainer) -> Any:
    """The training dataloader(s) ``fit`` will use, before the fit loop has loaded them.

    Works whether they came from ``fit(train_dataloaders=...)``, a data module or
    the LightningModule's own ``train_dataloader``.
    """
    return trainer.fit_loop._data_source.dataloader()


def has_val_dataloader(trainer: pl.Trainer) -> bool:
    """Whether ``fit`` was given validation data (``val_dataloaders=``, a data module's or the
    LightningModule's own ``val_dataloader``), known before the loop loads it."""
    return trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined()


def loaded_train_dataloader(trainer: pl.Trainer) -> Any:
    """The training loader(s) ``fit`` uses, loaded by the fit loop now if it has not loaded them yet
    (as at ``on_fit_start``), so ``trainer.train_dataloader`` is what the first epoch will iterate."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    return trainer.train_dataloader


def reload_train_dataloader(trainer: pl.Trainer) -> None:
    """Make the fit loop fetch (and pass through ``Strategy.process_dataloader``) its training loader
    again at the start of the next epoch, with its length, progress bar total and validation interval
    recomputed.

    Lightning's public way is ``Trainer(reload_dataloaders_every_n_epochs=...)``, a user
    setting NeuroFlux must not rewrite; dropping the loaded loader is what that setting does.
    """
    trainer.fit_loop._combined_loader = None


def carry_manual_steps_to_automatic(trainer: pl.Trainer) -> None:
    """Make ``trainer.global_step`` count the optimizer steps a fit took in manual optimization after the
    module is handed back in automatic optimization.

    The Trainer reads its step count from the automatic loop's optimizer progress when the module
    optimizes automatically, from the manual loop's otherwise
    (``TrainingEpochLoop.global_step``); without the copy it reads 0 after NeuroFlux's ``fit``.
    """
    loop = trainer.fit_loop.epoch_loop
    manual = loop.manual_optimization.optim_step_progress.total
    automatic = loop.automatic_optimization.optim_progress.optimizer.step.total
    automatic.ready, automatic.completed = manual.ready, manual.completed


CHECKPOINT_WRITE: tuple[Any, str] = (torch_io, "_atomic_save")
"""Where Lightning writes a checkpoint file to disk (``owner, name``): the crash drill
(``nf_lightning.testing.faults``) patches it to kill a process while a checkpoint is being saved."""


EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"
"""Lightning's warning, at ``fit``'s start, about submodules in eval mode (its text, not a promised API)."""


@contextmanager
def eval_mode_on_purpose() -> Iterator[None]:
    """A ``fit`` whose eval-mode submodules are meant to be (frozen units): without Lightning's warning.

    Lightning keeps a submodule's mode through ``fit`` and restores it after each validation
    (undocumented behaviour the frozen units rely on, checked with the warning's text).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING)
        yield


class TrainerDevices:
    """Lets a strategy receive the Trainer's ``accelerator``/``devices`` choice.

    The accelerator connector fills ``parallel_devices`` on any strategy that has
    the attribute (``_AcceleratorConnector._lazy_init_strategy``); Lightning's own
    single-device strategies get their device at construction instead.
    """

    parallel_devices: list[torch.device] | None = None

    def trainer_device(self) -> torch.device | None:
        """The one device the Trainer asked for, None if it named none; an error for several."""
        devices = self.parallel_devices
        if not devices:
            return None
        if len(devices) > 1:
            raise ValueError(
                f"{type(self).__name__} trains on one device, but the Trainer asked for {len(devices)}; pass devices=1"
            )
        return devices[0]
