"""``ValidationHistory``: validation metrics per epoch with the wall time at which they were reached.

Example:
    >>> history = ValidationHistory()  # then pl.Trainer(callbacks=[history]).fit(...)
    >>> history.records, history.validation_seconds, history.final_accuracy()
    ([], 0.0, None)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

from nf_lightning.lightning.run_access import neuroflux_run

RECORDED_PREFIXES = ("val/", "neuroflux/", "neuron_budget/")
EXIT_ACCURACY_PREFIX = "neuroflux/acc_exit_"


class ValidationHistory(pl.Callback):
    """Records every ``val/*`` and ``neuroflux/*`` metric after each validation, with seconds since ``fit`` began.

    The clock starts when the callback is set up, before profiling and
    planning, so the times include everything a user waits for. Each record
    also holds ``epoch`` and ``block`` (NeuroFlux's active block, else None);
    :attr:`validation_seconds` sums the wall time of validation during ``fit``.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.validation_seconds = 0.0
        self._start: float | None = None
        self._validation_start: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return 0.0 if self._start is None else time.perf_counter() - self._start

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the clock while the ``with`` block runs: for work inside ``fit`` that no user waits for
        (a benchmark's own test pass), so later records do not count it.

        >>> history = ValidationHistory()
        >>> with history.paused():
        ...     pass
        """
        begin = time.perf_counter()
        try:
            yield
        finally:
            if self._start is not None:
                self._start += time.perf_counter() - begin

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_start is not None:
            self.validation_seconds += time.perf_counter() - self._validation_start
            self._validation_start = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(RECORDED_PREFIXES)}
        run = neuroflux_run(trainer)
        block = run.active_block if run is not None else None
        self.records.append({"epoch": trainer.current_epoch, "seconds": self.elapsed, "block": block, **metrics})

    def final_exit_accuracies(self) -> dict[int, float]:
        """Each exit's accuracy at its last validation (its final weights), by unit index."""
        final: dict[int, float] = {}
        for record in self.records:
            for key, value in record.items():
                if key.startswith(EXIT_ACCURACY_PREFIX):
                    final[int(key.removeprefix(EXIT_ACCURACY_PREFIX))] = value
        return final

    def final_accuracy(self) -> float | None:
        """Best final exit accuracy under local learning, the last ``val/acc`` otherwise."""
        exits = self.final_exit_accuracies()
        if exits:
            return max(exits.values())
        return self.records[-1].get("val/acc") if self.records else None

    def state_dict(self) -> dict[str, Any]:
        return {"records": list(self.records), "elapsed": self.elapsed, "validation_seconds": self.validation_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict["records"])
        self._start = time.perf_counter() - float(state_dict["elapsed"])
        self.validation_seconds = float(state_dict.get("validation_seconds", 0.0))
