"""``BlockProgress``: where the active block stands: its horizon, epochs, steps, patience and annealing.

The settings live in :class:`~nf_lightning.core.train.schedule.BlockSchedule`;
this is the state they act on, saved with the run so that a resumed run ends
its blocks exactly where the uninterrupted one would.

Example:
    >>> from nf_lightning.core.train.schedule import BlockSchedule
    >>> progress = BlockProgress(BlockSchedule(epochs=2))
    >>> progress.begin_epoch(block=0, steps=10)
    >>> progress.horizon, progress.lr_factor(block=0, steps_per_epoch=10)
    (2, 1.0)
    >>> progress.close_epoch(0, progress.verdict(block=0, accuracy=0.5, steps_per_epoch=10, decays=True))
    >>> progress.verdict(block=0, accuracy=0.6, steps_per_epoch=10, decays=True).reason
    'horizon'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nf_lightning.core.train.schedule import BlockSchedule, Patience, cosine_factor


@dataclass(frozen=True)
class Verdict:
    """An epoch's end: why the block ends (None: it goes on), its patience and its annealing after it."""

    reason: str | None
    patience: Patience
    anneal: dict[str, float] | None


class BlockProgress:
    """The active block's progress through its schedule, and how every block before it ended."""

    def __init__(self, schedule: BlockSchedule) -> None:
        self.schedule = schedule
        self.epochs_in_block = 0
        self.horizon: int | None = None  # epochs the active block trains at most, fixed when it starts
        self.block_step = 0
        self.patience = Patience(schedule.patience, schedule.min_delta)
        self.reference: float | None = None  # the deployed exit's accuracy the active block must beat, if any
        self.anneal: dict[str, float] | None = None  # the block stalled: its rate falls to zero, then it ends
        self.ended_blocks: list[dict[str, Any]] = []  # how each block ended: epochs, reason, best accuracy
        self.last_epoch = -1
        self.epoch_steps: int | None = None
        self.step_in_epoch = 0

    def fix_horizon(self, block: int, steps_per_epoch: int) -> int:
        """The active block's horizon, fixed the first time it is asked for."""
        if self.horizon is None:
            self.horizon = self.schedule.horizon(block, steps_per_epoch)
        return self.horizon

    def planned_epochs(self, block: int, num_blocks: int, steps_per_epoch: Callable[[int], int]) -> int:
        """Epochs until the last block's horizon ends, counted from the first of ``block`` (the active one)."""
        horizon = self.horizon if self.horizon is not None else self.schedule.horizon(block, steps_per_epoch(block))
        return horizon + sum(self.schedule.horizon(b, steps_per_epoch(b)) for b in range(block + 1, num_blocks))

    def begin_epoch(self, block: int, steps: int) -> None:
        """Start a training epoch of ``steps`` batches; the block's first fixes its horizon."""
        self.epoch_steps, self.step_in_epoch = steps, 0
        self.fix_horizon(block, steps)

    def count_step(self) -> None:
        self.block_step += 1
        self.step_in_epoch += 1

    def lr_factor(self, block: int, steps_per_epoch: int) -> float:
        """Cosine decay over the horizon by the fraction of it done; after a stall, from the rate it
        stalled at down to zero over the annealing epochs. ``steps_per_epoch`` counts when no epoch began."""
        steps = self.epoch_steps or steps_per_epoch
        horizon = self.fix_horizon(block, steps)
        done = self.epochs_in_block + min(self.step_in_epoch / steps, 1.0)
        if self.anneal is None:
            return cosine_factor(done / horizon)
        return self.anneal["factor"] * cosine_factor((done - self.anneal["start"]) / self.anneal["epochs"])

    def verdict(self, block: int, accuracy: float | None, steps_per_epoch: int, decays: bool) -> Verdict:
        """How the epoch now ending leaves ``block``, given its best exit ``accuracy`` (None: not validated).

        A block ends at its horizon (``"horizon"``), or once its exits stopped
        improving for ``patience`` epochs after ``min_epochs`` (``"patience"``);
        with NeuroFlux's own decay (``decays``) it first anneals its rate to zero.
        A block that had to beat the deployed exit (:meth:`next_block`) and never
        did ends without annealing (``"below_deployed"``).
        Nothing changes until :meth:`close_epoch` takes the verdict.
        """
        epochs = self.epochs_in_block + 1
        patience = dataclasses.replace(self.patience)
        stalled = patience.update(accuracy) if accuracy is not None else False
        horizon = self.fix_horizon(block, steps_per_epoch)
        reason = "horizon" if epochs >= horizon else None
        anneal = self.anneal
        if reason is None and anneal is not None and epochs >= anneal["start"] + anneal["epochs"]:
            reason = "patience"
        elif reason is None and anneal is None and stalled and epochs >= self.schedule.min_epochs:
            if self.reference is not None and patience.best <= self.reference:
                reason = "below_deployed"
            elif decays and self.schedule.anneal_epochs > 0:  # anneal first: the rate is still high here
                length = min(self.schedule.anneal_epochs, horizon - epochs)
                anneal = {"start": epochs, "epochs": length, "factor": cosine_factor(epochs / horizon)}
            else:
                reason = "patience"
        return Verdict(reason, patience, anneal)

    def close_epoch(self, epoch: int, verdict: Verdict) -> None:
        """Epoch ``epoch`` is over, as ``verdict`` says."""
        self.last_epoch, self.epochs_in_block = epoch, self.epochs_in_block + 1
        self.patience, self.anneal = verdict.patience, verdict.anneal

    def end_block(self, block: int, reason: str) -> None:
        """Record how ``block`` ended and start the next one from nothing."""
        self.ended_blocks.append(
            {"block": block, "epochs": self.epochs_in_block, "horizon": self.horizon, "steps": self.block_step,
             "reason": reason, "best_accuracy": self.patience.best, "reference": self.reference,
             "annealed_from": self.anneal["start"] if self.anneal is not None else None}
        )  # fmt: skip

    def next_block(self, deployed_accuracy: float | None = None) -> None:
        """Start the next block from nothing; with ``patience_reference="deployed"`` its exits must beat
        ``deployed_accuracy`` (the deployed exit's) for an epoch to count as improving."""
        self.epochs_in_block, self.horizon, self.block_step, self.anneal = 0, None, 0, None
        deployed = self.schedule.patience_reference == "deployed" and deployed_accuracy is not None
        self.reference = deployed_accuracy if deployed else None
        self.patience = Patience(self.schedule.patience, self.schedule.min_delta,
                                 best=deployed_accuracy if deployed else -1.0)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            "epochs_in_block": self.epochs_in_block,
            "horizon": self.horizon,
            "block_step": self.block_step,
            "patience": {"best": self.patience.best, "stale": self.patience.stale},
            "anneal": self.anneal,
            "reference": self.reference,
            "ended_blocks": list(self.ended_blocks),
            "last_epoch": self.last_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs_in_block = int(state["epochs_in_block"])
        self.horizon = state["horizon"]
        self.block_step = int(state["block_step"])
        self.patience = Patience(self.schedule.patience, self.schedule.min_delta, **state["patience"])
        self.anneal = state.get("anneal")
        self.reference = state.get("reference")
        self.ended_blocks = list(state["ended_blocks"])
        self.last_epoch = int(state["last_epoch"])
