"""``BudgetedStep``: one training step of the active block, every unit step held to the memory budget.

Each unit step is a transaction under the
:class:`~nf_lightning.core.memory.enforcement.BudgetGuard`: one that would
exceed the budget is refused before the update and retried on smaller pieces
(:func:`~nf_lightning.core.train.local_learning.train_with_retry`), the
block's batch size then lowered from the next epoch on. With several ranks the
ranks agree on every step: a step one rank could not fit is dropped on all,
and gradients are averaged per unit before its update.

Example (what :meth:`~nf_lightning.core.train.run.BlockwiseRun.train_batch` does)::

    >>> step = BudgetedStep(BudgetGuard("cpu", budget=10**8), LOCAL)         # doctest: +SKIP
    >>> losses = step.train(block, 0, (0, 1), x, y, optimizers, lr_ratio, on_shrink)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from nf_lightning.core.memory.enforcement import BudgetGuard
from nf_lightning.core.train.distributed import Collective, LocalCollective, PeerStepFailed
from nf_lightning.core.train.local_learning import LocalBlock, train_with_retry


class BudgetedStep:
    """Runs the active block's steps under the budget and keeps what they measured.

    Args:
        guard: meters unit steps against the budget and keeps the record.
        collective: the other ranks (one process: :data:`~nf_lightning.core.train.distributed.LOCAL`).
        gradient_clip_val, gradient_clip_algorithm: clip each unit's gradients before its update
            (:func:`clip_gradients`); None does not clip.
    """

    def __init__(
        self,
        guard: BudgetGuard,
        collective: Collective | LocalCollective,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        self.guard, self.collective = guard, collective
        self.gradient_clip_val, self.gradient_clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        self.peaks: dict[int, int] = {}  # each block's highest metered step
        self.shrinks: list[dict[str, int]] = []  # every step that had to be cut into smaller pieces
        self.last_step_peak: int | None = None
        self._warned_single_sample = False

    def train(
        self,
        block: LocalBlock,
        index: int,
        units: tuple[int, ...],
        x: Tensor,
        y: Tensor,
        optimizers: Sequence[Optimizer],
        lr_ratio: Callable[[int], float],
        on_shrink: Callable[[int, int, int], None],
    ) -> list[Tensor] | None:
        """One step of ``block`` (block ``index`` of the plan, ``units`` of the network) on a batch.

        ``optimizers`` are the units' own (``block`` may step wrappers of them); ``lr_ratio(batch)`` scales the rate of a step that runs on a smaller piece;
        ``on_shrink(unit, old, new)`` hears of every shrink. Returns each unit's loss,
        or None for a batch too small for the block's BatchNorm layers (skipped).
        """
        block.train(True)
        if len(y) < block.smallest_batch():
            if not self._warned_single_sample:
                warnings.warn(
                    f"skipping a training batch of {len(y)} sample in block {index}: its BatchNorm "
                    "layers need at least 2 (the data set's size leaves a last batch of one at this batch size)",
                    stacklevel=3,
                )
                self._warned_single_sample = True
            return None
        peaks: list[int] = []
        metered = self.guard.next_batch()
        tracked = [*block.modules(), *(getattr(opt, "optimizer", opt) for opt in block.optimizers), x, y]

        def window(position: int, unit_input: Tensor) -> contextlib.AbstractContextManager[Any]:
            return self._unit_window(index, units[position], optimizers[position], unit_input, tracked,
                                     metered, peaks, lr_ratio(len(unit_input)))  # fmt: skip

        def shrunk(unit: int, old: int, new: int) -> None:
            self.guard.restart()
            self.shrinks.append({"block": index, "unit": unit, "from": old, "to": new})
            on_shrink(unit, old, new)

        losses = train_with_retry(block, x, y, window, shrunk)
        self.last_step_peak = max(peaks) if peaks else None
        if peaks:
            self.peaks[index] = max(self.peaks.get(index, 0), max(peaks))
        return losses

    @contextlib.contextmanager
    def _unit_window(
        self, index: int, unit: int, optimizer: Any, x: Tensor, tracked: list[Any], metered: bool,
        peaks: list[int], ratio: float,
    ) -> Iterator[Callable[[Optimizer], None]]:  # fmt: skip
        """One unit step as a transaction under the budget, with the rate following the step's batch."""
        changed: list[tuple[dict[str, Any], Any]] = []
        before = self.guard.metered_steps
        try:
            with self.guard.unit_step(index, unit, len(x), [*tracked, x], optimizer, metered) as check:

                def before_update(optimizer: Optimizer) -> None:
                    check(optimizer)  # the budget's limit is lifted from here on: collectives may allocate
                    if self.collective.agree(failed=False):
                        raise PeerStepFailed(f"another rank's step of unit {unit} did not fit the budget")
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    self.collective.average_gradients(params)
                    if self.gradient_clip_val is not None:
                        clip_gradients(params, self.gradient_clip_val, self.gradient_clip_algorithm)
                    if ratio != 1.0:
                        for group in getattr(optimizer, "optimizer", optimizer).param_groups:
                            changed.append((group, group["lr"]))
                            group["lr"] = group["lr"] * ratio

                try:
                    yield before_update
                finally:
                    for group, lr in changed:
                        group["lr"] = lr
        except torch.OutOfMemoryError as error:
            if not isinstance(error, PeerStepFailed):  # outside the meter, whose limit this step already broke
                self.collective.agree(failed=True)  # the other ranks drop their step too
            raise
        if self.guard.metered_steps > before:
            peaks.append(self.guard.last_peak)


def clip_gradients(params: Sequence[Tensor], value: float, algorithm: str) -> None:
    """Lightning's gradient clipping, on the gradients of ``params``: their total 2-norm to at most
    ``value`` (``"norm"``) or each entry into ``[-value, value]`` (``"value"``).

    >>> weight = torch.nn.Parameter(torch.zeros(2))
    >>> weight.grad = torch.tensor([3.0, 4.0])
    >>> clip_gradients([weight], 1.0, "norm"); weight.grad
    tensor([0.6000, 0.8000])
    >>> clip_gradients([weight], 0.7, "value"); weight.grad
    tensor([0.6000, 0.7000])
    """
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, value)
    else:
        torch.nn.utils.clip_grad_value_(params, value)


def check_batch(x: Tensor, y: Tensor, classes: int, where: str) -> None:
    """Clear errors for inputs no step could learn from: NaN/Inf, labels outside the head's ``classes``.

    >>> check_batch(torch.zeros(2, 3), torch.tensor([0, 5]), classes=3, where="step 0 of block 0")
    Traceback (most recent call last):
    ...
    ValueError: labels at step 0 of block 0 range over [0, 5], but the network's head has 3 classes (labels 0..2)
    """
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"the input batch at {where} holds NaN or Inf values")
    if y.is_floating_point() or y.dim() != 1:
        raise ValueError(
            f"labels at {where} are {y.dtype} of shape {tuple(y.shape)}: NeuroFlux trains classifiers on one "
            "integer class index per sample"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(
            f"labels at {where} range over [{int(y.min())}, {int(y.max())}], but the network's head has "
            f"{classes} classes (labels 0..{classes - 1})"
        )
