"""``MemoryProfiler``: logs the measured peak memory of budgeted steps against the plan and budget.

Optional and independent: it reads the guard the strategy exposes
(``trainer.strategy.run.step.guard`` for NeuroFlux, ``trainer.strategy.guard`` for
``BudgetedBackpropStrategy``) and imports neither strategy.

Example:
    >>> import lightning.pytorch as pl
    >>> from nf_lightning import MemoryProfiler, NeuroFluxStrategy
    >>> trainer = pl.Trainer(strategy=NeuroFluxStrategy("300MB"), callbacks=[MemoryProfiler()],
    ...                      accelerator="cpu", logger=False, enable_progress_bar=False)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from nf_lightning.core.memory.enforcement import BudgetGuard
from nf_lightning.lightning.run_access import neuroflux_run


class MemoryProfiler(pl.Callback):
    """Logs ``memory/peak_bytes`` (measured: the tracked meter on CPU, the CUDA allocator on GPUs) after
    every training step, next to ``memory/predicted_bytes`` (NeuroFlux's plan), ``memory/budget_bytes``
    and ``memory/failed_attempts`` (steps refused and retried on smaller pieces so far).

    :attr:`peaks` keeps the largest measured peak of every block (block 0 for BP).
    """

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        run = neuroflux_run(trainer)
        guard = run.step.guard if run is not None else getattr(trainer.strategy, "guard", None)
        if not isinstance(guard, BudgetGuard):
            return
        pl_module.log("memory/failed_attempts", float(len(guard.failed)), reduce_fx="max")
        pl_module.log("memory/budget_bytes", float(guard.budget), reduce_fx="max")
        if run is not None:
            peak, block = run.step.last_step_peak, run.active_block
            pl_module.log("memory/predicted_bytes", float(run.plan.blocks[block].predicted_peak), reduce_fx="max")
        else:
            peak, block = guard.last_peak or None, 0
        if peak is None:
            return
        self.peaks[block] = max(self.peaks.get(block, 0), peak)
        pl_module.log("memory/peak_bytes", float(peak), reduce_fx="max")

    def state_dict(self) -> dict[str, Any]:
        return {"peaks": dict(self.peaks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.peaks = {int(k): int(v) for k, v in state_dict.get("peaks", {}).items()}
