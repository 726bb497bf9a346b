"""``EarlyExitSelector``: choose and export the smallest exit that keeps the best accuracy (§5.4).

Every unit with its exit head is a classifier. The run measures each exit of
the active block on the validation data (from the activation cache, so no
trained block runs again) and keeps the records; this callback logs the exit
table at every block's end, optionally stops going deeper, and when training
ends selects the exit with :func:`~nf_lightning.core.exits.selection.select_exit`
and exports it. It finds the run through
:func:`~nf_lightning.lightning.run_access.neuroflux_run` and imports nothing of the strategy.

Example:
    >>> import lightning.pytorch as pl
    >>> from nf_lightning import EarlyExitSelector, NeuroFluxStrategy
    >>> selector = EarlyExitSelector(tolerance=0.01)  # within one point of the best, fewest parameters
    >>> trainer = pl.Trainer(strategy=NeuroFluxStrategy("300MB"), callbacks=[selector],
    ...                      accelerator="cpu", logger=False, enable_progress_bar=False)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from nf_lightning.core.exits.selection import ExitModel, ExitRecord, exit_parameters, save_exit, select_exit
from nf_lightning.core.train.run import BlockwiseRun
from nf_lightning.lightning.run_access import neuroflux_run

EXPORT_STEM = "exit_model"  # save_exit writes exit_model.pt (state dict) and exit_model.pt2 (program)
PROGRAM_FILE = f"{EXPORT_STEM}.pt2"
SUMMARY_FILE = "exit.json"


class EarlyExitSelector(pl.Callback):
    """Selects the exit to deploy, logs the exit table per block and exports the choice.

    At the end of each block the table so far is logged: ``exit/acc_<unit>``,
    ``exit/params_<unit>``, ``exit/best_unit``, ``exit/best_acc`` and
    ``exit/best_params``. The latest record of a unit wins, so the one from its
    block's last validation (after which the unit is frozen) is final.

    When training ends, :attr:`selected` is the chosen exit and
    :attr:`exit_model` the standalone :class:`~nf_lightning.core.exits.selection.ExitModel`.
    With ``export`` on, the export directory receives

    - ``exit_model.pt``: the exit model's state dict;
    - ``exit_model.pt2``: a ``torch.export`` program with a dynamic batch
      dimension, which ``torch.export.load(path).module()`` runs without
      ``nf_lightning`` installed. A model ``torch.export`` cannot capture gets
      a warning and no ``.pt2``, not a failed run;
    - ``exit.json``: :attr:`summary`, i.e. the chosen ``unit``, its ``accuracy``
      and ``parameters``; ``full_parameters``, ``full_accuracy`` (the last exit,
      the model's own head; None if it never trained) and ``compression`` (full
      over exit parameters); ``tolerance``, ``num_units``, ``input_shape``,
      ``num_classes``; every exit in ``exits``; ``files``.

    Args:
        tolerance: exits within this much of the best accuracy count as equally
            good, and the one with the fewest parameters wins. A fraction of
            accuracy: ``0.01`` is one percentage point. None: the strategy's
            ``exit_tolerance``, which is also what the run deploys during ``fit``.
        reference_accuracy: export the smallest exit whose validation accuracy reaches this
            absolute accuracy (a fraction) instead; the best exit if none does. Deployment
            during ``fit`` still follows the strategy's ``exit_tolerance``.
        depth_patience: stop training deeper once this many consecutive blocks
            have left the selected exit unchanged (``None`` trains every block).
        export_dir: where the files go; ``<default_root_dir>/export`` if None.
        export: write the files at all.
    """

    def __init__(
        self,
        tolerance: float | None = None,
        depth_patience: int | None = None,
        export_dir: str | Path | None = None,
        export: bool = True,
        reference_accuracy: float | None = None,
    ) -> None:
        if reference_accuracy is not None and not 0.0 <= reference_accuracy <= 1.0:
            raise ValueError(f"reference_accuracy is a fraction in [0, 1], got {reference_accuracy}")
        if tolerance is not None and not 0.0 <= tolerance <= 1.0:
            raise ValueError(
                f"tolerance is a fraction of accuracy in [0, 1] (0.01 = one percentage point), got {tolerance}"
            )
        if depth_patience is not None and depth_patience < 1:
            raise ValueError(f"depth_patience must be None or >= 1, got {depth_patience}")
        self.tolerance = tolerance
        self.reference_accuracy = reference_accuracy
        self.depth_patience = depth_patience
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.export = export
        self.stale_blocks = 0
        self.selected: ExitRecord | None = None
        self.exit_model: ExitModel | None = None
        self.summary: dict[str, Any] | None = None
        self.records: list[ExitRecord] = []
        """The latest record of every exit measured so far, shallowest first (as of the last block's end)."""
        self._block: int | None = None

    @staticmethod
    def _run(trainer: pl.Trainer) -> BlockwiseRun:
        run = neuroflux_run(trainer)
        if run is None:
            raise TypeError(
                "EarlyExitSelector needs NeuroFluxStrategy, which trains an exit per unit; "
                f"the Trainer's strategy is {type(trainer.strategy).__name__}"
            )
        return run

    # ------------------------------------------------------------- lightning
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not hasattr(trainer.strategy, "run"):  # the run itself exists only from setup on
            raise TypeError(
                "EarlyExitSelector needs NeuroFluxStrategy, which trains an exit per unit; "
                f"the Trainer's strategy is {type(trainer.strategy).__name__}"
            )

    def tolerance_for(self, run: BlockwiseRun) -> float:
        """The tolerance this selector selects with: its own, else the run's."""
        return self.tolerance if self.tolerance is not None else run.validation.tolerance

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run(trainer)
        if self._block is None:
            self._block = run.active_block

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run(trainer)
        if run.active_block == self._block and not run.finished:
            return
        ended, self._block = self._block, run.active_block
        self.records = records_of(run)
        if not self.records:
            return
        best = select_exit(self.records, self.tolerance_for(run))
        self.stale_blocks = 0 if best.unit in run.units_of(ended) else self.stale_blocks + 1
        for record in self.records:
            pl_module.log(f"exit/acc_{record.unit}", record.accuracy)
            pl_module.log(f"exit/params_{record.unit}", float(record.parameters))
        pl_module.log("exit/best_unit", float(best.unit))
        pl_module.log("exit/best_acc", best.accuracy)
        pl_module.log("exit/best_params", float(best.parameters))
        if self.depth_patience is not None and self.stale_blocks >= self.depth_patience and not run.finished:
            trainer.should_stop = True
            rank_zero_info(
                f"the best exit (unit {best.unit}) has not changed for {self.stale_blocks} block(s); "
                f"stopping after block {ended} of {run.num_blocks}"
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run(trainer)
        self.records = records_of(run)
        if not self.records:
            rank_zero_warn("EarlyExitSelector recorded no exit (did validation run?); nothing to select")
            return
        self.selected = select_exit(self.records, self.tolerance_for(run), self.reference_accuracy)
        self.exit_model = run.exit_model(self.selected.unit)
        self.summary = self._summarize(run)
        if self.export and trainer.is_global_zero:
            self._export(self.export_dir or Path(trainer.default_root_dir) / "export", run.plan.input_shape)
        rank_zero_info(
            f"early exit: unit {self.selected.unit} of {len(run.units)} ({self.selected.accuracy:.2%} validation "
            f"accuracy, {self.selected.parameters:,} parameters, {self.summary['compression']:.1f}x fewer than "
            "the full model)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"stale_blocks": self.stale_blocks, "block": self._block}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stale_blocks = int(state_dict["stale_blocks"])
        self._block = state_dict.get("block")

    # ------------------------------------------------------------- internals
    def _summarize(self, run: BlockwiseRun) -> dict[str, Any]:
        """What ``exit.json`` holds: the choice, the full model it is compared with, every exit."""
        assert self.selected is not None and self.exit_model is not None
        last = len(run.units) - 1
        full_parameters = exit_parameters(run.units, run.exits, last)  # the last exit is the model's own head
        with torch.no_grad():
            num_classes = self.exit_model(torch.zeros(1, *run.plan.input_shape)).shape[1]
        return {
            "unit": self.selected.unit,
            "accuracy": self.selected.accuracy,
            "parameters": self.selected.parameters,
            "full_parameters": full_parameters,
            "compression": full_parameters / self.selected.parameters,
            "full_accuracy": run.records[last].accuracy if last in run.records else None,
            "tolerance": self.tolerance_for(run),
            "reference_accuracy": self.reference_accuracy,
            "num_units": len(run.units),
            "input_shape": list(run.plan.input_shape),
            "num_classes": num_classes,
            "exits": [record.to_dict() for record in self.records],
        }

    def _export(self, directory: Path, input_shape: tuple[int, ...]) -> None:
        assert self.exit_model is not None and self.summary is not None
        self.summary["files"] = save_exit(self.exit_model, input_shape, directory, EXPORT_STEM)
        tmp = directory / f"{SUMMARY_FILE}.tmp"
        tmp.write_text(json.dumps(self.summary, indent=2))
        tmp.replace(directory / SUMMARY_FILE)


def records_of(run: BlockwiseRun) -> list[ExitRecord]:
    """The latest record of every exit of ``run`` measured so far, shallowest first."""
    return [run.records[unit] for unit in sorted(run.records)]
