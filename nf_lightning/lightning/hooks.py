"""``NeuroFluxHooks``: the callback through which a NeuroFlux run follows Lightning's epochs.

:class:`~nf_lightning.lightning.strategy.NeuroFluxStrategy` adds one to
``trainer.callbacks`` when ``fit`` starts (first in the list, and it says so in the
log), unless the Trainer already has one: list it yourself to place it. It holds
no state of its own; it only calls the run's public epoch methods:

- training epoch start: :meth:`~nf_lightning.core.train.run.BlockwiseRun.begin_epoch`;
- validation epoch start and end: open and close the pass that scores the exits, and
  log each exit's accuracy as ``neuroflux/acc_exit_<unit>`` and the deployed exit as
  ``neuroflux/deploy_unit``;
- training epoch end: :meth:`~nf_lightning.core.train.run.BlockwiseRun.end_epoch`, which
  ends blocks, writes the caches and enters the next block (the strategy then shows
  Lightning the new optimizers and the Trainer reloads the training data).

Example:
    >>> import lightning.pytorch as pl
    >>> from nf_lightning import NeuroFluxStrategy
    >>> trainer = pl.Trainer(strategy=NeuroFluxStrategy("300MB"), callbacks=[NeuroFluxHooks()],
    ...                      logger=False, enable_progress_bar=False)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from nf_lightning.core.cache import CacheSpaceError
from nf_lightning.core.train.run import BlockwiseRun
from nf_lightning.lightning._internals import reload_train_dataloader
from nf_lightning.lightning.run_access import neuroflux_run
from nf_lightning.lightning.stopping import (
    warn_if_early_stopping_cuts_blocks,
    warn_if_plan_unfinished,
)


class NeuroFluxHooks(pl.Callback):
    """Lightning's epoch hooks, handed to the NeuroFlux run (see the module's description)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = neuroflux_run(trainer, fitting=True)
        if run is None:
            return
        if trainer.val_dataloaders is not None and sum(trainer.num_val_batches) == 0:
            raise ValueError(
                "the validation loader is empty: NeuroFlux scores its exits on validation data; give it samples"
            )
        version = run.loader_version
        _end_epochs(trainer, lambda: run.catch_up(trainer.current_epoch))  # a checkpoint taken mid-end
        _after_change(trainer, run, version)
        trainer.strategy.warn_if_max_epochs_cut_plan(trainer)
        warn_if_early_stopping_cuts_blocks(trainer, run)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = neuroflux_run(trainer, fitting=True)
        if run is not None:
            warn_if_plan_unfinished(trainer, run)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = neuroflux_run(trainer, fitting=True)
        if run is not None:
            batches = trainer.num_training_batches
            run.begin_epoch(int(batches) if batches != float("inf") else None)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = neuroflux_run(trainer, fitting=True)
        if run is not None:
            run.begin_validation()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = neuroflux_run(trainer, fitting=True)
        if run is None:
            return
        unit = run.deploy_unit
        accuracies = run.end_validation(record=not trainer.sanity_checking)
        for exit_unit, accuracy in accuracies.items():
            pl_module.log(f"neuroflux/acc_exit_{exit_unit}", accuracy)
        pl_module.log("neuroflux/deploy_unit", float(unit))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = neuroflux_run(trainer, fitting=True)
        if run is None:
            return
        version = run.loader_version
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        _end_epochs(trainer, lambda: run.end_epoch(trainer.current_epoch, metrics))
        _after_change(trainer, run, version)


def _end_epochs(trainer: pl.Trainer, end: Callable[[], Any]) -> None:
    """Run ``end``; if a cache does not fit on disk, save a checkpoint to resume from, then fail clearly."""
    try:
        end()
    except CacheSpaceError as error:
        path = Path(trainer.default_root_dir) / "neuroflux-disk-full.ckpt"
        trainer.save_checkpoint(path)
        raise CacheSpaceError(
            error.errno, f"{error.strerror}. A checkpoint was saved to {path}: once there is room, resume with "
            f"trainer.fit(..., ckpt_path={str(path)!r})"
        ) from error


def _after_change(trainer: pl.Trainer, run: BlockwiseRun, loader_version: int) -> None:
    """A new block or batch size: Lightning gets the new optimizers and reloads the training data."""
    if run.loader_version != loader_version:
        trainer.strategy.sync_optimizers()
        reload_train_dataloader(trainer)
    if run.finished:
        trainer.should_stop = True
