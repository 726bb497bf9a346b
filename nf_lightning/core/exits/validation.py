"""Scoring a run's exits on validation data, and the forward of the model NeuroFlux would deploy now.

:class:`ExitValidation` scores every exit of the active block on each
validation batch and keeps each exit's latest :class:`ExitRecord`; the exit
NeuroFlux would deploy is the best record (the fewest parameters among those
within the tolerance). For every batch it returns a :class:`DeployedForward`:
the deployable model's logits for that batch, which the user's own
``validation_step`` computes through :func:`standing_in`, a context manager that
lets it stand for the network's ``forward``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 2))
    >>> with standing_in(net, CountingForward(lambda x: torch.zeros(len(x), 3)), "validation_step"):
    ...     net(torch.ones(5, 4)).shape
    torch.Size([5, 3])
    >>> net(torch.ones(5, 4)).shape  # the network's own forward again
    torch.Size([5, 2])
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nf_lightning.core.exits.selection import ExitRecord, exit_parameters, select_exit
from nf_lightning.core.train.block_caches import BlockCaches
from nf_lightning.core.train.distributed import Collective, LocalCollective
from nf_lightning.core.train.streaming import run_frozen, stream


@dataclass
class _Pass:
    unit: int
    units: tuple[int, ...]
    correct: Tensor
    total: int = 0
    offset: int = 0


class ExitValidation:
    """The exits' records and the validation passes that make them.

    Args:
        units, exits: the network's units and one classifier per unit.
        blocks: each block's units (the plan's).
        caches: the run's activation caches, whose validation rows stand in for running
            the blocks before when they line up with a batch; None without a cache.
        collective: the other ranks; validation counts are summed over them.
        device: where exits run.
        tolerance: exits within this accuracy of the best count as equal; the smallest wins.
    """

    def __init__(
        self,
        units: Sequence[nn.Module],
        exits: Sequence[nn.Module],
        blocks: Sequence[tuple[int, ...]],
        caches: BlockCaches | None,
        collective: Collective | LocalCollective,
        device: torch.device,
        tolerance: float = 0.0,
    ) -> None:
        self.units, self.exits, self.blocks = units, exits, blocks
        self.caches, self.collective, self.device = caches, collective, device
        self.tolerance = tolerance
        self.records: dict[int, ExitRecord] = {}
        self.epoch_best: float | None = None  # the best active exit's accuracy in this epoch's validation
        self.seconds = 0.0
        self._pass: _Pass | None = None

    def deploy_unit(self, fallback: int) -> int:
        """The exit NeuroFlux would deploy now: the best recorded one, else ``fallback``."""
        if not self.records:
            return fallback
        return select_exit(self.records.values(), self.tolerance).unit

    def begin(self, units: tuple[int, ...], deploy_unit: int) -> None:
        """Start a pass over the exits of ``units``; the deployable exit is fixed for the pass."""
        self._pass = _Pass(unit=deploy_unit, units=units, correct=torch.zeros(len(units), dtype=torch.long))

    def validate_batch(self, block: int, x: Tensor, y: Tensor, count: bool = True) -> DeployedForward:
        """Score the exits of the pass on one batch (in the validation loader's order); returns the
        deployable model's forward for the batch. Uncounted batches (other loaders) are not scored."""
        start = time.perf_counter()
        val = self._require_pass()
        offset = val.offset if count else None
        h = self.block_input(block, x, y, offset)
        logits = []
        with torch.no_grad():
            for unit in val.units:
                h = run_frozen(self.units[unit], h, self.device)
                logits.append(run_frozen(self.exits[unit], h, self.device))
        if count:
            for index, unit_logits in enumerate(logits):
                val.correct[index] += int((unit_logits.argmax(dim=1) == y).sum())
            val.total += len(y)
            val.offset += len(y)
        self.seconds += time.perf_counter() - start
        return DeployedForward(self, x, y, val.unit, dict(zip(val.units, logits)), offset)

    def end(self, record: bool = True) -> dict[int, float]:
        """Each exit's accuracy over the pass; recorded as its latest unless ``record`` is False."""
        val = self._require_pass()
        self._pass = None
        counts = self.collective.sum(torch.tensor([*val.correct.tolist(), val.total], dtype=torch.long))
        correct, total = counts[:-1], int(counts[-1])
        if total == 0:
            return {}
        accuracies = {unit: float(hits) / total for unit, hits in zip(val.units, correct)}
        if record:
            for unit, accuracy in accuracies.items():
                self.records[unit] = ExitRecord(unit, accuracy, exit_parameters(self.units, self.exits, unit))
            self.epoch_best = max(accuracies.values())
        return accuracies

    def exit_forward(self, x: Tensor, unit: int) -> Tensor:
        """Logits of exit ``unit`` on raw inputs ``x`` (eval mode, no grad, streamed through the device)."""
        with torch.no_grad():
            return run_frozen(self.exits[unit], stream(self.units[: unit + 1], x, self.device), self.device)

    def exit_logits(self, unit: int, x: Tensor, y: Tensor, offset: int | None) -> Tensor:
        """Logits of exit ``unit`` for a validation batch, from its block's input (cached rows if they line up)."""
        block = next(index for index, units in enumerate(self.blocks) if unit in units)
        units = self.blocks[block]
        with torch.no_grad():
            h = self.block_input(block, x, y, offset)
            h = stream([self.units[i] for i in units[: units.index(unit) + 1]], h, self.device)
            return run_frozen(self.exits[unit], h, self.device)

    def block_input(self, block: int, x: Tensor, y: Tensor, offset: int | None) -> Tensor:
        """Input of ``block`` for the validation batch ``x, y`` at ``offset`` in the validation loader
        (None: not in its order): cached rows if they line up with the batch, else computed."""
        first = self.blocks[block][0]
        if first == 0:
            return x
        rows = self.caches.val_rows(block, y, offset) if self.caches is not None else None
        if rows is not None:
            dtype = next((p.dtype for p in self.units[first].parameters()), torch.float32)
            return torch.from_numpy(rows).to(self.device, dtype=dtype)
        return stream(self.units[:first], x, self.device)

    def _require_pass(self) -> _Pass:
        if self._pass is None:
            raise RuntimeError("call begin_validation() before validate_batch()/end_validation()")
        return self._pass


class DeployedForward:
    """What the deployable model computes for one validation batch; stands in for the network's forward.

    Called with the batch's own input tensor (or an equal one: the model prepared the
    batch as NeuroFlux did), it returns the deployable exit's logits computed from the
    active block's input (cached or computed once); called with any other tensor (the
    step transformed the input), it runs that exit on it from scratch. :attr:`calls`
    counts the calls.
    """

    def __init__(
        self, validation: ExitValidation, x: Tensor, y: Tensor, unit: int, logits: dict[int, Tensor], offset: int | None
    ) -> None:
        self.validation, self.x, self.y, self.unit, self.offset = validation, x, y, unit, offset
        self.logits = logits  # the active exits' logits for this batch, by unit
        self.calls = 0

    def __call__(self, inputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        if not _same_tensor(inputs, self.x):
            return self.validation.exit_forward(inputs, self.unit)
        if self.unit in self.logits:
            return self.logits[self.unit]
        return self.validation.exit_logits(self.unit, self.x, self.y, self.offset)


def _same_tensor(a: Any, b: Tensor) -> bool:
    """``a`` is ``b``, or a tensor of the same shape, type, device and values."""
    if a is b:
        return True
    alike = isinstance(a, Tensor) and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
    return alike and torch.equal(a, b)


class CountingForward:
    """A forward that counts its calls (so :func:`standing_in` can tell a step that bypassed it)."""

    def __init__(self, forward: Callable[..., Tensor]) -> None:
        self.forward = forward
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        return self.forward(*args, **kwargs)


@contextlib.contextmanager
def standing_in(network: nn.Module | None, forward: DeployedForward | CountingForward, step_name: str) -> Iterator[None]:
    """Let ``forward`` stand in for ``network``'s forward while the user's ``step_name`` runs.

    The network's own ``forward`` is back when the block exits. A step that never
    called the network (it computed its outputs through submodules) gets a clear
    error, since it would have scored the full network instead of the exit.
    """
    if network is None:
        raise RuntimeError(
            "NeuroFlux evaluates its deployable exit by standing in for the forward of the network it "
            "decomposed, but it was given explicit units; give it the network (a module of a supported form) "
            "or pass evaluate='full'"
        )
    before = forward.calls
    network.forward = forward
    try:
        yield
    finally:
        del network.forward
    if forward.calls == before:
        raise RuntimeError(
            f"{step_name} ran without calling the network NeuroFlux decomposed ({type(network).__name__}); "
            f"NeuroFlux evaluates the exit it would deploy by standing in for that network's forward, so "
            f"{step_name} must compute its outputs through it (e.g. self(x) or self.net(x)), not through its "
            "submodules; or use NeuroFluxStrategy(evaluate='full') outside fit"
        )
