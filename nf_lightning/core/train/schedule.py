"""How long each block trains and how its learning rate moves (pure functions and settings).

A block's *horizon* is fixed when the block starts: its epochs, lengthened so
that it gets at least ``min_steps`` optimizer steps (a block at batch 256 on
a small data set gets few steps per epoch), capped at ``max_epochs``. Its
learning rate decays over that horizon (cosine, unless the user's recipe
brings its own schedulers, which are then stepped instead), and it ends
earlier when its exits stop improving for ``patience`` epochs (after
``min_epochs``). A block that stalls that way mid-horizon still has a high
learning rate, so with a decay of NeuroFlux's own it first *anneals*: its
rate falls from where it is to zero (cosine) over ``anneal_epochs`` more
epochs, then it ends.

Example:
    >>> schedule = BlockSchedule(epochs=2, min_steps=100, max_epochs=30)
    >>> schedule.horizon(block=0, steps_per_epoch=40), schedule.horizon(block=1, steps_per_epoch=4)
    (3, 25)
    >>> round(cosine_factor(0.5), 3), cosine_factor(1.0)
    (0.5, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

DECAYS = ("cosine", "none")
LR_SCALINGS = ("linear", "sqrt", "none")
PATIENCE_REFERENCES = ("own", "deployed")
"""What a block's exits must beat for an epoch to count as improving: their own best, or also the deployed exit."""


@dataclass(frozen=True)
class BlockSchedule:
    """Settings of every block's length and learning-rate decay.

    Args:
        epochs: the base horizon, one number or one per block.
        min_steps: lengthen a block's horizon until it gets at least this many steps.
        max_epochs: never lengthen a horizon beyond this.
        min_epochs: a block trains at least this many epochs before patience may end it.
        patience: end a block once its best exit has not improved by ``min_delta``
            for this many epochs; None trains the whole horizon.
        min_delta: the smallest accuracy gain (a fraction) that counts as improving.
        decay: ``"cosine"`` to zero over the horizon, or ``"none"`` (constant).
        lr_scaling: how a block's learning rate follows its batch size relative
            to the batch the user's recipe was tuned for: ``"linear"``, ``"sqrt"`` or ``"none"``.
        anneal_epochs: epochs over which a block that stopped improving before its horizon
            decays its rate to zero before it ends (0: it ends at once; only with ``decay="cosine"``
            and no scheduler of the user's).
        patience_reference: ``"own"``: an epoch improves when the block's best exit beats its own
            best so far. ``"deployed"``: a block after the first must also beat the exit deployed
            when it started; one that has not after ``patience`` epochs ends at once, without
            annealing (none of its exits would be deployed).
    """

    epochs: int | tuple[int, ...] = 1
    min_steps: int = 0
    max_epochs: int = 1000
    min_epochs: int = 1
    patience: int | None = None
    min_delta: float = 0.0
    decay: str = "cosine"
    lr_scaling: str = "linear"
    anneal_epochs: int = 2
    patience_reference: str = "own"

    def __post_init__(self) -> None:
        epochs = (self.epochs,) if isinstance(self.epochs, int) else tuple(self.epochs)
        if not epochs or any(int(e) < 1 for e in epochs):
            raise ValueError(f"every block needs at least one epoch, got epochs={self.epochs}")
        if self.min_steps < 0 or self.min_epochs < 1 or self.max_epochs < 1:
            raise ValueError("min_steps must be >= 0, min_epochs and max_epochs >= 1")
        if self.anneal_epochs < 0:
            raise ValueError(f"anneal_epochs must be >= 0, got {self.anneal_epochs}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be None or >= 1, got {self.patience}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")
        if self.patience_reference not in PATIENCE_REFERENCES:
            raise ValueError(
                f"patience_reference must be one of {PATIENCE_REFERENCES}, got {self.patience_reference!r}"
            )
        if not isinstance(self.epochs, int):
            object.__setattr__(self, "epochs", tuple(int(e) for e in self.epochs))

    def base_epochs(self, block: int) -> int:
        """The base horizon of ``block`` (a per-block list must cover every block)."""
        if isinstance(self.epochs, int):
            return self.epochs
        if block >= len(self.epochs):
            raise ValueError(f"epochs has {len(self.epochs)} entries but the plan has a block {block}")
        return self.epochs[block]

    def horizon(self, block: int, steps_per_epoch: int) -> int:
        """Epochs ``block`` trains at most, fixed when it starts."""
        needed = math.ceil(self.min_steps / max(steps_per_epoch, 1))
        return max(self.base_epochs(block), min(needed, self.max_epochs))

    def lr_scale(self, batch_size: int, reference_batch: int | None) -> float:
        """Factor on the recipe's learning rate for a block at ``batch_size``.

        >>> BlockSchedule().lr_scale(256, 64), BlockSchedule(lr_scaling="sqrt").lr_scale(256, 64)
        (4.0, 2.0)
        """
        if not reference_batch or self.lr_scaling == "none":
            return 1.0
        ratio = batch_size / reference_batch
        return ratio if self.lr_scaling == "linear" else math.sqrt(ratio)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["epochs"] = list(self.epochs) if not isinstance(self.epochs, int) else self.epochs
        return data

    @classmethod
    def from_epochs(cls, epochs: int | Sequence[int], **options: Any) -> BlockSchedule:
        """A schedule with base horizon ``epochs`` (an int or a per-block list)."""
        return cls(epochs=epochs if isinstance(epochs, int) else tuple(epochs), **options)


def cosine_factor(progress: float) -> float:
    """Learning-rate factor at ``progress`` (0 to 1) through a cosine decay to zero."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@dataclass
class Patience:
    """Whether a block's exits are still improving, epoch by epoch.

    >>> p = Patience(patience=2)
    >>> [p.update(a) for a in (0.30, 0.40, 0.40, 0.39)]
    [False, False, False, True]
    """

    patience: int | None
    min_delta: float = 0.0
    best: float = -1.0
    stale: int = 0

    def update(self, accuracy: float) -> bool:
        """Record this epoch's best exit accuracy; True once ``patience`` epochs passed without a gain."""
        if accuracy > self.best + self.min_delta:
            self.best, self.stale = accuracy, 0
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience
