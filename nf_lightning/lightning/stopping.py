"""How the user's ``EarlyStopping`` meets NeuroFlux's blocks, said to the user instead of done behind their back.

While a deeper block trains, the model NeuroFlux deploys (and so the metric a
user's ``EarlyStopping`` watches) can stay flat for the whole block: the new
block's exits have to overtake the best exit so far before anything the user
logs changes. An ``EarlyStopping`` whose patience is shorter than a block
would end the run before the deeper blocks train. NeuroFlux does not rewrite
the user's callback; it warns when the run starts, and when a run ends before
its plan does it says which blocks never trained and who stopped it.

Example:
    >>> from lightning.pytorch.callbacks import EarlyStopping
    >>> stall_epochs(EarlyStopping(monitor="val_acc", patience=3), check_val_every_n_epoch=2)
    6
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_warn

from nf_lightning.core.train.run import BlockwiseRun


def stall_epochs(callback: EarlyStopping, check_val_every_n_epoch: int | None) -> int:
    """The training epochs without improvement after which ``callback`` stops the run."""
    return callback.patience * (check_val_every_n_epoch or 1)


def longest_block_epochs(run: BlockwiseRun) -> int:
    """The longest horizon (in epochs) of the blocks still to train, the active one included."""
    return max(run.schedule.horizon(b, run.steps_per_epoch(b)) for b in range(run.active_block, run.num_blocks))


def warn_if_early_stopping_cuts_blocks(trainer: pl.Trainer, run: BlockwiseRun) -> None:
    """Warn for each ``EarlyStopping`` whose patience is shorter than a block still to train."""
    if run.active_block >= run.num_blocks - 1:
        return
    longest = longest_block_epochs(run)
    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping) and stall_epochs(callback, trainer.check_val_every_n_epoch) < longest:
            rank_zero_warn(
                f"EarlyStopping(monitor={callback.monitor!r}, patience={callback.patience}) may end the run before "
                f"NeuroFlux's deeper blocks train: the deployed model it watches can stay flat for a whole block "
                f"(up to {longest} epochs here) while the next block's exits catch up. NeuroFlux already ends each "
                f"block once its exits stop improving (block_patience) and can stop going deeper "
                f"(EarlyExitSelector(depth_patience=...)); give EarlyStopping patience >= {longest} or leave it out"
            )


def warn_if_plan_unfinished(trainer: pl.Trainer, run: BlockwiseRun) -> None:
    """At the end of ``fit``: name the blocks that never trained and what stopped the run."""
    if run.finished:
        return
    stoppers = [
        f"EarlyStopping(monitor={c.monitor!r}) at epoch {c.stopped_epoch}"
        for c in trainer.callbacks
        if isinstance(c, EarlyStopping) and c.stopped_epoch > 0
    ]
    if trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs:
        stoppers.append(f"max_epochs={trainer.max_epochs}")
    untrained = list(range(run.active_block + 1, run.num_blocks))
    rank_zero_warn(
        f"the run ended in block {run.active_block} of {run.num_blocks} before NeuroFlux's plan did "
        f"({', '.join(stoppers) or 'the Trainer was asked to stop'}); "
        f"{'blocks ' + str(untrained) + ' never trained' if untrained else 'the last block did not finish'}"
    )
