"""``ValidationHistory``: validation metrics per epoch with the wall time at which they were reached.

Example:
    >>> history = ValidationHistory()
    >>> history.records
    []
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


class ValidationHistory(pl.Callback):
    """Records every ``val/*`` metric after each validation, with seconds since ``fit`` began.

    The clock starts when the callback is set up, before profiling and
    planning, so the times include everything a user waits for.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._start: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return 0.0 if self._start is None else time.perf_counter() - self._start

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        block = getattr(trainer.strategy, "active_block", None)
        self.records.append({"epoch": trainer.current_epoch, "seconds": self.elapsed, "block": block, **metrics})

    def final_exit_accuracies(self) -> dict[int, float]:
        """Each exit's accuracy at its last validation (its final weights), by unit index."""
        final: dict[int, float] = {}
        for record in self.records:
            for key, value in record.items():
                if key.startswith("val/acc_exit_"):
                    final[int(key.rsplit("_", 1)[1])] = value
        return final

    def final_accuracy(self) -> float | None:
        """Best final exit accuracy under local learning, the last ``val/acc`` otherwise."""
        exits = self.final_exit_accuracies()
        if exits:
            return max(exits.values())
        return self.records[-1].get("val/acc") if self.records else None

    def state_dict(self) -> dict[str, Any]:
        return {"records": list(self.records), "elapsed": self.elapsed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict["records"])
        self._start = time.perf_counter() - float(state_dict["elapsed"])
