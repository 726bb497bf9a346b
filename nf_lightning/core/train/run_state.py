"""A block-wise run's saved state: its format version, what it holds, and older formats brought up to date.

The state is plain data and CPU tensors under one checkpoint key (the strategy's
``"neuroflux"``), with a ``"version"``. Version 2 keeps a block's lowered batch
size (after a step had to shrink) as the run's ``"batch_overrides"``, the plan
unchanged; version 1 kept it inside the plan, and is converted on load.
Anything else gets a clear error.

Example:
    >>> upgrade_state({"version": 1, "plan": {"batch_overrides": {"1": 40}}})["batch_overrides"]
    {'1': 40}
    >>> upgrade_state({"plan": {}})
    Traceback (most recent call last):
    ...
    ValueError: this NeuroFlux state has no format version (expected 1 or 2): it was not written by NeuroFluxStrategy or BlockwiseRun.state_dict()
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Protocol

from torch import nn

from nf_lightning.core.exits.selection import ExitRecord
from nf_lightning.core.exits.validation import ExitValidation
from nf_lightning.core.plan.training_plan import TrainingPlan
from nf_lightning.core.train.block_caches import BlockCaches
from nf_lightning.core.train.block_progress import BlockProgress
from nf_lightning.core.train.budgeted_step import BudgetedStep
from nf_lightning.core.train.distributed import Collective, LocalCollective
from nf_lightning.core.train.schedule import BlockSchedule
from nf_lightning.core.train.unit_optimizers import UnitOptimizers

STATE_VERSION = 2


class SavedRun(Protocol):
    """What of a :class:`~nf_lightning.core.train.run.BlockwiseRun` its state holds."""

    run_id: str
    plan: TrainingPlan
    exits: nn.ModuleList
    schedule: BlockSchedule
    collective: Collective | LocalCollective
    active_block: int
    entered_block: int | None
    finished: bool
    batch_overrides: dict[int, int]
    train_seconds: float
    progress: BlockProgress
    validation: ExitValidation
    step: BudgetedStep
    optim: UnitOptimizers
    caches: BlockCaches | None

    @property
    def seconds(self) -> dict[str, float]: ...


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` in the current format (a converted copy if it is older); a clear error if it cannot be read."""
    version = state.get("version")
    if version == STATE_VERSION:
        return state
    if version is None:
        raise ValueError(
            f"this NeuroFlux state has no format version (expected 1 or {STATE_VERSION}): it was not written by "
            "NeuroFluxStrategy or BlockwiseRun.state_dict()"
        )
    if version != 1:
        raise ValueError(
            f"NeuroFlux state version {version!r} is not supported (this nf_lightning reads 1 and {STATE_VERSION}); "
            "it was written by a newer nf_lightning"
        )
    state = copy.copy(state)
    state["plan"] = dict(state["plan"])
    state["batch_overrides"] = state["plan"].pop("batch_overrides", {})
    state["version"] = STATE_VERSION
    return state


def run_state(run: SavedRun) -> dict[str, Any]:
    """What :meth:`BlockwiseRun.state_dict` returns."""
    return {
        "version": STATE_VERSION,
        "run_id": run.run_id,
        "world_size": run.collective.world_size,
        "plan": run.plan.to_dict(),
        "batch_overrides": {str(k): v for k, v in run.batch_overrides.items()},
        "active_block": run.active_block,
        **run.progress.state_dict(),
        "schedule": run.schedule.to_dict(),
        "finished": run.finished,
        "records": [record.to_dict() for record in run.validation.records.values()],
        "exit_tolerance": run.validation.tolerance,
        "peaks": dict(run.step.peaks),
        "enforcement": run.step.guard.state_dict(),
        "shrinks": list(run.step.shrinks),
        "manifests": dict(run.caches.manifests) if run.caches is not None else {},
        "seconds": dict(run.seconds),
        "exits": {k: v.detach().cpu() for k, v in run.exits.state_dict().items()},
        "optim": run.optim.state_dict(run.entered_block),
    }


def restore_run(run: SavedRun, state: dict[str, Any]) -> None:
    """Put ``state`` (current format) into ``run``, whose plan must have the same blocks."""
    saved = TrainingPlan.from_dict(state["plan"])
    if [b.units for b in saved.blocks] != [b.units for b in run.plan.blocks]:
        raise ValueError(
            f"the saved run has blocks {[b.units for b in saved.blocks]}, this one "
            f"{[b.units for b in run.plan.blocks]}: it belongs to another model or plan"
        )
    saved_world = int(state.get("world_size", 1))
    if saved_world != run.collective.world_size and run.caches is not None:
        warnings.warn(
            f"the checkpoint was written by {saved_world} rank(s) and this run has {run.collective.world_size}: "
            "each rank caches its own shard, so the caches of the finished blocks are rebuilt for the new shards "
            f"(under {run.caches.directory})",
            stacklevel=3,
        )
    run.plan = saved
    run.run_id = str(state["run_id"])
    run.exits.load_state_dict(state["exits"])
    run.active_block = int(state["active_block"])
    run.finished = bool(state["finished"])
    run.batch_overrides = {int(k): int(v) for k, v in state["batch_overrides"].items()}
    run.progress.load_state_dict(state)
    run.validation.records = {r.unit: r for r in (ExitRecord.from_dict(d) for d in state["records"])}
    run.validation.tolerance = float(state.get("exit_tolerance", run.validation.tolerance))
    run.step.peaks = {int(k): int(v) for k, v in state["peaks"].items()}
    run.step.guard.load_state_dict(state["enforcement"])
    run.step.shrinks = list(state["shrinks"])
    seconds = state.get("seconds", {})
    run.train_seconds = float(seconds.get("train", 0.0))
    run.validation.seconds = float(seconds.get("validate", 0.0))
    if run.caches is not None:
        run.caches.manifests = dict(state["manifests"])
        run.caches.seconds = float(seconds.get("cache", 0.0))
        run.caches.forget()
    run.optim.load_state_dict(state["optim"])
