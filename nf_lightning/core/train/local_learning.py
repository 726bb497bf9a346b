"""Block-wise local learning (Algorithm 2 of the paper), free of Lightning.

A :class:`LocalBlock` holds consecutive units, the exit head of each (an
auxiliary head, or the model's own classifier for the last unit) and one
optimizer per unit+exit. A batch passes unit by unit; each unit is updated
from its own local loss, and only the detached output moves on, so no
activation of an earlier unit stays alive while a later one trains.

Example:
    >>> import torch
    >>> from torch import nn
    >>> units = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())]
    >>> exits = [nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 10))]
    >>> block = LocalBlock(units, exits, [torch.optim.SGD([*units[0].parameters(), *exits[0].parameters()], lr=0.1)])
    >>> out, loss = block.unit_step(0, torch.randn(2, 3, 4, 4), torch.tensor([1, 2]))
    >>> out.shape, out.requires_grad
    (torch.Size([2, 8, 4, 4]), False)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from nf_lightning.core.network.smallest_batch import smallest_batch

Loss = Callable[[Tensor, Tensor], Tensor]


class LocalBlock:
    """Units trained together, each by its own local loss and optimizer.

    Args:
        units: consecutive units of the network (same objects as in the model).
        exits: one classifier per unit mapping its output to logits.
        optimizers: one optimizer per unit, over the unit's and its exit's parameters.
        loss: local loss, cross-entropy by default.
        backward: how to back-propagate a loss (Lightning's ``manual_backward``
            so precision plugins apply; ``Tensor.backward`` by default).
    """

    def __init__(
        self,
        units: Sequence[nn.Module],
        exits: Sequence[nn.Module],
        optimizers: Sequence[Optimizer],
        loss: Loss = nn.functional.cross_entropy,
        backward: Callable[[Tensor], None] = Tensor.backward,
    ) -> None:
        if not (len(units) == len(exits) == len(optimizers)):
            raise ValueError(
                f"need one exit and one optimizer per unit, got {len(units)} units, "
                f"{len(exits)} exits and {len(optimizers)} optimizers"
            )
        self.units = list(units)
        self.exits = list(exits)
        self.optimizers = list(optimizers)
        self.loss = loss
        self.backward = backward

    def modules(self) -> Iterator[nn.Module]:
        """Every unit and exit of the block."""
        yield from self.units
        yield from self.exits

    def train(self, mode: bool = True) -> None:
        for module in self.modules():
            module.train(mode)

    def unit_step(
        self, index: int, x: Tensor, y: Tensor, before_update: Callable[[Optimizer], None] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Update unit ``index`` (and its exit) on one batch; returns its detached output and loss.

        ``before_update(optimizer)`` runs after the backward pass and right
        before the update; if it raises, nothing has been updated. A
        non-finite loss raises ``FloatingPointError`` before anything is updated.
        """
        out = self.units[index](x)
        loss = self.loss(self.exits[index](out), y)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"unit {index} of the block has a non-finite local loss ({float(loss)})")
        optimizer = self.optimizers[index]
        optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        if before_update is not None:
            before_update(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.detach(), loss.detach()

    def smallest_batch(self) -> int:
        """The smallest batch the block trains on (:func:`~nf_lightning.core.network.smallest_batch.smallest_batch`)."""
        return smallest_batch(*self.modules())

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """Number of correct predictions of every exit (the block in eval mode)."""
        correct = []
        for unit, exit_head in zip(self.units, self.exits):
            x = unit(x)
            correct.append((exit_head(x).argmax(dim=1) == y).sum())
        return correct


def piece_sizes(batch: int, largest: int, smallest: int = 1) -> list[int]:
    """``batch`` cut into near-equal pieces of at most ``largest`` and, where possible, at least ``smallest``.

    >>> piece_sizes(10, 7), piece_sizes(4, 3, smallest=2), piece_sizes(3, 2, smallest=2)
    ([5, 5], [2, 2], [3])
    """
    count = -(-batch // largest)
    while count > 1 and batch // count < smallest:
        count -= 1
    return [batch // count + (1 if i < batch % count else 0) for i in range(count)]


def shrink(batch: int, factor: float = 0.75) -> int:
    """Next smaller batch size to retry with after running out of budget.

    >>> shrink(100), shrink(2), shrink(1)
    (75, 1, 0)
    """
    return min(batch - 1, int(batch * factor)) if batch > 1 else 0


def train_with_retry(
    block: LocalBlock,
    x: Tensor,
    y: Tensor,
    guard: Callable[[int, Tensor], AbstractContextManager[Callable[[Optimizer], None]]],
    on_shrink: Callable[[int, int, int], None],
    start: int = 0,
) -> list[Tensor]:
    """Algorithm 2 for one batch: every unit from ``start`` takes :meth:`LocalBlock.unit_step` inside
    ``guard(unit index, its input)``, splitting the batch when a unit does not fit.

    ``guard`` yields the ``before_update`` check of the step (see
    :class:`~nf_lightning.core.memory.enforcement.BudgetGuard`). "Does not fit" is an
    out-of-memory error (CUDA's, or :class:`~nf_lightning.core.memory.meter.MemoryLimitExceeded`)
    raised before the unit's update, so a retried unit is never updated twice:
    units before the failing one already took the whole batch; the failing unit
    and those after it take it in smaller, near-equal pieces. ``on_shrink(unit, old, new)``
    is told of every reduction; the error propagates when the batch cannot be cut
    into smaller pieces the block can train on (one sample each, two with
    BatchNorm). Returns the (mean) loss of every unit from ``start``.
    """
    losses: list[Tensor] = []
    smallest = block.smallest_batch()
    for index in range(start, len(block.units)):
        try:
            with guard(index, x) as before_update:
                x, loss = block.unit_step(index, x, y, before_update)
        except torch.OutOfMemoryError:
            if len(piece_sizes(len(x), max(shrink(len(x)), 1), smallest)) < 2:
                raise  # no smaller pieces this block can train on
            failed = True  # retried below, outside this handler: its traceback would keep the attempt alive
        else:
            failed = False
        if failed:
            block.optimizers[index].zero_grad(set_to_none=True)  # the failed attempt's gradients go
            smaller = shrink(len(x))
            on_shrink(index, len(x), smaller)
            sizes = piece_sizes(len(x), smaller, smallest)
            pieces = [
                train_with_retry(block, xs, ys, guard, on_shrink, start=index)
                for xs, ys in zip(x.split(sizes), y.split(sizes))
            ]
            return losses + [torch.stack(per_unit).mean() for per_unit in zip(*pieces)]
        losses.append(loss)
    return losses
