"""Callbacks the benchmark adds to a run, and scoring a model on the run's test split.

- :class:`BenchmarkProbe`: the training loop's own time, steps per block, the test split after ``fit``;
- :class:`DeployableSnapshots`: the deployable exit each time its validation accuracy improves, so its test
  accuracy at the moment it first reached a target (known only later) can be measured after the run;
- :class:`StopAtTarget`: ends a run at its first validation that reaches a target (``depth_search``).

Example:
    >>> stop = StopAtTarget(target=0.68)  # pl.Trainer(callbacks=[stop]) stops once val/acc >= 0.68
    >>> stop.target
    0.68
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from nf_lightning.benchmark.presets import ACCURACY_EPSILON, PROBE_FILE
from nf_lightning.lightning.history import ValidationHistory

SNAPSHOT_INDEX = "index.json"


class BenchmarkProbe(pl.Callback):
    """What the benchmark measures inside a run, written to ``probe.json`` when ``fit`` ends.

    - the training loop's own wall time: each epoch from its start to its
      validation (or its end), so setup, profiling, validation and what
      happens between epochs (NeuroFlux's cache writes) are left out, and the
      optimizer steps per block (one entry for BP), counted as they run;
    - the test split: the trained model scored after ``fit`` (eval mode,
      ``no_grad``, outside the budget, with the run's :class:`ValidationHistory`
      clock stopped: a polish that follows is timed without it). BP: the final model. Local learning:
      every exit in one pass (``unit``/``accuracy`` are the exit the run
      selected), so an exit chosen later has its test accuracy too. ``subset`` > 0
      scores every k-th test image only; ``test_images`` says how many were scored.
    """

    def __init__(self, subset: int = 0, batch_size: int = 500) -> None:
        self.subset = subset
        self.batch_size = batch_size
        self.train_loop_seconds = 0.0
        self.steps: dict[int, int] = {}
        self._epoch_start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        block = getattr(getattr(trainer.strategy, "run", None), "active_block", None) or 0
        self.steps[block] = self.steps.get(block, 0) + 1

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch()

    def _close_epoch(self) -> None:
        if self._epoch_start is not None:
            self.train_loop_seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        run = getattr(trainer.strategy, "run", None)
        guard = getattr(trainer.strategy, "guard", None) or getattr(run, "guard", None)
        history = next((c for c in trainer.callbacks if isinstance(c, ValidationHistory)), None)
        with history.paused() if history is not None else nullcontext():
            tested = self._score_test_split(trainer, pl_module)
        out: dict[str, Any] = {
            "metered_steps": guard.metered_steps if guard is not None else None,
            "train_loop_seconds": self.train_loop_seconds,
            "steps": [self.steps.get(b, 0) for b in range(max(self.steps, default=-1) + 1)],
            "parameters": sum(p.numel() for p in pl_module.parameters()),
            **tested,
            "test_off_clock": history is not None,
        }
        out["test_seconds"] = time.perf_counter() - start
        (Path(trainer.default_root_dir) / PROBE_FILE).write_text(json.dumps(out, indent=2))

    def _score_test_split(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        from nf_lightning.lightning.early_exit import EarlyExitSelector

        loader = held_out_loader(trainer.datamodule, self.subset, self.batch_size)
        images = len(loader.dataset)
        device = trainer.strategy.root_device
        run = getattr(trainer.strategy, "run", None)
        out: dict[str, Any] = {"test_images": images}
        with torch.no_grad():
            if run is not None and hasattr(run, "exits"):
                units = [u.to(device).eval() for u in run.units]
                exits = [e.to(device).eval() for e in run.exits]
                correct = [0] * len(units)
                for x, y in loader:
                    h, y = x.to(device), y.to(device)
                    for index, (unit, head) in enumerate(zip(units, exits)):
                        h = unit(h)
                        correct[index] += int((head(h).argmax(1) == y).sum())
                selector = next((c for c in trainer.callbacks if isinstance(c, EarlyExitSelector)), None)
                unit = selector.selected.unit if selector and selector.selected else run.deploy_unit
                out["exit_accuracies"] = {str(i): c / images for i, c in enumerate(correct)}
                out.update(unit=unit, accuracy=correct[unit] / images)
            else:
                pl_module.eval()
                correct = sum(int((pl_module(x.to(device)).argmax(1) == y.to(device)).sum()) for x, y in loader)
                out["accuracy"] = correct / images
        return out


class DeployableSnapshots(pl.Callback):
    """Saves the deployable model whenever its validation accuracy beats every earlier validation's.

    The deployable model is the exit NeuroFlux's selection rule picks at that
    validation (``run.deploy_unit``, the run's own choice) during the block-wise
    phase, and the module's network in a Trainer without a block-wise run (the
    polish, whose module trains the exit). Validations are counted across both
    Trainers through ``index.json`` in ``directory``, in the order
    ``ValidationHistory`` records them, so entry ``validation`` *i* is the run's
    *i*-th history record. A first crossing of any target is a new best, so it
    always has a snapshot. The saving time is on the run's clock; ``index.json`` sums it.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _index(self) -> dict[str, Any]:
        path = self.directory / SNAPSHOT_INDEX
        return json.loads(path.read_text()) if path.is_file() else {"validations": 0, "seconds": 0.0, "saved": []}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        index = self._index()
        run = getattr(trainer.strategy, "run", None)
        if run is not None and hasattr(run, "exit_model"):
            unit = run.deploy_unit
            record = run.records.get(unit)
            accuracy = None if record is None else record.accuracy
            model = None if record is None else run.exit_model(unit)
        else:
            unit, accuracy, model = None, trainer.callback_metrics.get("val/acc"), pl_module.net
        best = max((s["accuracy"] for s in index["saved"]), default=-1.0)
        if model is not None and accuracy is not None and float(accuracy) > best + ACCURACY_EPSILON:
            name = f"validation{index['validations']}.pt"
            torch.save(model, self.directory / name)
            index["saved"].append({"validation": index["validations"], "unit": unit, "accuracy": float(accuracy),
                                   "file": name})  # fmt: skip
        index["validations"] += 1
        index["seconds"] += time.perf_counter() - start
        (self.directory / SNAPSHOT_INDEX).write_text(json.dumps(index, indent=1))


class StopAtTarget(pl.Callback):
    """Stops training after the first validation whose ``val/acc`` reaches ``target``."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accuracy = trainer.callback_metrics.get("val/acc")
        if not trainer.sanity_checking and accuracy is not None and float(accuracy) >= self.target - ACCURACY_EPSILON:
            trainer.should_stop = True


def held_out_loader(datamodule: Any, subset: int = 0, batch_size: int = 500) -> Any:
    """The test split in order, batch ``batch_size``; ``subset`` > 0 keeps every k-th image only (the split
    is ordered by class, so the subset stays balanced)."""
    from torch.utils.data import DataLoader, Subset

    from nf_lightning.data import collate_batch

    dataset = datamodule.test_dataset()
    if subset and subset < len(dataset):
        step = len(dataset) / subset
        dataset = Subset(dataset, [int(i * step) for i in range(subset)])
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)


def score_test_split(model: torch.nn.Module, cfg: Any, images: int) -> float:
    """Accuracy of ``model`` on the run's test split (every k-th image when ``images`` is fewer), as the probe scores."""
    from hydra.utils import instantiate

    from nf_lightning.core.exits.selection import loader_accuracy

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    return loader_accuracy(model, held_out_loader(datamodule, images))


def snapshot_test_accuracy(run_dir: Path, validation: int, images: int) -> dict[str, Any] | None:
    """Test accuracy of the snapshot saved at history record ``validation`` of the run in ``run_dir``.

    ``None`` when no snapshot was saved there (the validation was not a new best).
    """
    from omegaconf import OmegaConf

    index = json.loads((run_dir / "snapshots" / SNAPSHOT_INDEX).read_text())
    entry = next((s for s in index["saved"] if s["validation"] == validation), None)
    if entry is None:
        return None
    model = torch.load(run_dir / "snapshots" / entry["file"], weights_only=False).eval()
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return {**entry, "test_acc": score_test_split(model, cfg, images)}
