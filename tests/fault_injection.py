"""Callbacks that kill the process at a fixed point of a run (for kill-and-resume tests; no timers)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class KillAtEpochStart(pl.Callback):
    """SIGKILL this process when training epoch ``epoch`` starts (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
