"""``UnitOptimizers``: the active block's per-unit copies of the user's optimizer recipe, and their rates.

Each unit (with its exit) gets a fresh optimizer and fresh schedulers from the
recipe when its block starts, at a learning rate scaled to the block's batch
size (:meth:`~nf_lightning.core.train.schedule.BlockSchedule.lr_scale`). A
restored run hands them their saved state when their block is entered again.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from nf_lightning.core.train.schedule import BlockSchedule
    >>> units, exits = [nn.Linear(2, 2), nn.Linear(2, 2)], [nn.Linear(2, 2), nn.Linear(2, 2)]
    >>> net = nn.ModuleList([*units, *exits])
    >>> recipe = lambda: (torch.optim.SGD(net.parameters(), lr=0.1), [])
    >>> optim = UnitOptimizers(recipe, BlockSchedule())
    >>> optim.build(units, exits, batch_size=64, reference_batch=32)
    >>> [round(o.param_groups[0]["lr"], 3) for o in optim.optimizers]
    [0.2, 0.2]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from nf_lightning.core.train.optim_recipe import Recipe, SchedulerSpec, replicate_recipe
from nf_lightning.core.train.schedule import BlockSchedule


class UnitOptimizers:
    """One optimizer (and the recipe's schedulers) per unit of the active block.

    Args:
        recipe: builds the user's optimizer and schedulers afresh; None for a run
            restored for inference only.
        schedule: how a block's rate follows its batch size, and whether NeuroFlux decays it.
    """

    def __init__(self, recipe: Recipe | None, schedule: BlockSchedule) -> None:
        self.recipe, self.schedule = recipe, schedule
        self.optimizers: list[Optimizer] = []
        self.schedulers: list[SchedulerSpec] = []
        self.base_lrs: list[list[float]] = []  # each group's rate when built, before any decay
        self.batch_size = 0  # the batch size the rates were scaled for
        self.pending: dict[str, Any] | None = None  # saved state for the block it belongs to

    def build(self, units: Sequence[nn.Module], exits: Sequence[nn.Module], batch_size: int,
              reference_batch: int | None, block: int | None = None) -> None:  # fmt: skip
        """Fresh optimizers for ``units`` (with ``exits``) at ``batch_size``; the pending state if it is ``block``'s."""
        if self.recipe is None:
            raise RuntimeError("this run was restored for inference only (no optimizer recipe); it cannot train")
        scale = self.schedule.lr_scale(batch_size, reference_batch)
        self.optimizers, self.schedulers = [], []
        for unit, head in zip(units, exits):
            optimizer, schedulers = replicate_recipe(self.recipe, unit, head, lr_scale=scale)
            self.optimizers.append(optimizer)
            self.schedulers += schedulers
        self.base_lrs = [[group["lr"] for group in optimizer.param_groups] for optimizer in self.optimizers]
        self.batch_size = batch_size
        pending, self.pending = self.pending, None
        if pending is not None and pending["block"] == block:
            for optimizer, state in zip(self.optimizers, pending["optimizers"]):
                optimizer.load_state_dict(state)
            for spec, state in zip(self.schedulers, pending["schedulers"]):
                spec.scheduler.load_state_dict(state)

    @property
    def decays(self) -> bool:
        """Whether NeuroFlux decays the rate itself (the recipe brought no scheduler of its own)."""
        return self.schedule.decay == "cosine" and not self.schedulers

    def set_factor(self, factor: float) -> None:
        """Every group's rate at ``factor`` times its rate when built."""
        for optimizer, base in zip(self.optimizers, self.base_lrs):
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = lr * factor

    def step_ratio(self, batch: int, reference_batch: int | None) -> float:
        """Factor on the rate of a step that runs at ``batch`` (smaller pieces after a shrink)."""
        scale = self.schedule.lr_scale
        return scale(batch, reference_batch) / scale(self.batch_size, reference_batch)

    def after_step(self) -> None:
        """Step the per-step schedulers."""
        for spec in self.schedulers:
            if spec.interval == "step" and not spec.reduce_on_plateau:
                spec.scheduler.step()

    def after_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Step the per-epoch schedulers; ``ReduceLROnPlateau`` gets its monitored value from ``metrics``."""
        for spec in self.schedulers:
            if spec.interval != "epoch" or (epoch + 1) % spec.frequency:
                continue
            if not spec.reduce_on_plateau:
                spec.scheduler.step()
                continue
            if spec.monitor not in metrics:
                if spec.strict and metrics:
                    raise KeyError(
                        f"ReduceLROnPlateau monitors {spec.monitor!r}, which was not logged; "
                        f"available: {sorted(metrics)}"
                    )
                continue
            spec.scheduler.step(float(metrics[spec.monitor]))

    def state_dict(self, block: int | None) -> dict[str, Any]:
        return {
            "block": block,
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "schedulers": [spec.scheduler.state_dict() for spec in self.schedulers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep ``state`` for when its block is built."""
        self.pending = state if state["block"] is not None else None
