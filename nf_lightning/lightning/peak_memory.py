"""``PeakMemoryMonitor``: measured peak device memory of ordinary (backpropagation) training steps.

NeuroFlux measures its own steps; this callback gives the baselines the same
meter, so their peaks are measured the same way.

Example:
    >>> monitor = PeakMemoryMonitor()
    >>> monitor.peak_bytes
    0
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from nf_lightning.core.memory.meter import MemoryMeter, meter_for


class PeakMemoryMonitor(pl.Callback):
    """Meters every training step (forward, backward, optimizer step) and keeps the largest peak.

    On CPU the tracked meter counts live tensor storage (model, gradients,
    optimizer state, batch, activations); on CUDA the allocator's peak.
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._meter: MemoryMeter | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._meter = meter_for(trainer.strategy.root_device)
        self._meter.track(pl_module, *(opt for opt in trainer.optimizers))
        self._meter.__enter__()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._meter is None:
            return
        self._meter.__exit__(None, None, None)
        self.peak_bytes = max(self.peak_bytes, self._meter.peak_bytes)
        self._meter = None
        pl_module.log("memory/peak_bytes", float(self.peak_bytes), reduce_fx="max")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._meter is not None:
            self._meter.__exit__(type(exception), exception, exception.__traceback__)
            self._meter = None

    def state_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.peak_bytes = int(state_dict["peak_bytes"])
