"""Partitioner (paper §5.2, Algorithm 1): units into blocks with batch sizes that fit a budget.

Algorithm 1 gives every unit the largest batch its memory model allows under
the budget, capped at the batch limit B, and groups neighbours with similar
batch sizes into blocks that run at the smallest batch of their units. A block
trains all its units together, so :func:`partition` then checks each block as
it really runs (:func:`block_peak`) and shrinks or splits the ones that do not
fit.

Example (sizes in MB; the last three units share a block at the smallest of their batches):
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Unit:
    ...     slope: int
    ...     intercept: int
    ...     static_bytes: int = 0
    ...     input_bytes_per_sample: int = 0
    ...     def predict(self, batch): return self.slope * batch + self.intercept
    ...     def max_batch(self, budget): return max(0, (budget - self.intercept) // self.slope)
    >>> units = [Unit(4, 20), Unit(2, 60), Unit(1, 140), Unit(1, 80)]
    >>> max_batch_sizes(units, 300, batch_limit=256)
    [70, 120, 160, 220]
    >>> [(b.units, b.batch_size) for b in partition(units, 300, batch_limit=256, rho=0.4)]
    [((0,), 70), ((1, 2, 3), 120)]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from nf_lightning.core.memory.budget import format_bytes

BATCH_LIMIT = 256  # B in Algorithm 1: the largest batch any block uses
RHO = 0.4  # Algorithm 1's grouping threshold

__all__ = [
    "Block",
    "BudgetTooSmall",
    "UnitMemoryModel",
    "block_peak",
    "group_units",
    "max_batch_sizes",
    "minimum_budget",
    "partition",
]


class UnitMemoryModel(Protocol):
    """Training memory of one unit with its auxiliary head, as the profiler models it.

    ``nf_lightning.core.memory.profiler.LinearMemoryModel`` has this shape. ``predict``
    must be non-decreasing in ``batch``.
    """

    @property
    def static_bytes(self) -> int:
        """Bytes of parameters, gradients and optimizer state (batch-independent)."""

    @property
    def input_bytes_per_sample(self) -> int:
        """Bytes of one sample of the unit's input."""

    def predict(self, batch: int) -> float:
        """Peak bytes of one training step of the unit alone at ``batch``."""

    def max_batch(self, budget_bytes: int) -> int:
        """Largest batch whose predicted peak is within ``budget_bytes`` (0 if none)."""


@dataclass(frozen=True)
class Block:
    """Contiguous units trained together at one batch size.

    >>> Block.from_dict(Block((2, 3), 64, 10**8).to_dict())
    Block(units=(2, 3), batch_size=64, predicted_peak=100000000)
    """

    units: tuple[int, ...]
    batch_size: int
    predicted_peak: int

    def __post_init__(self) -> None:
        if not self.units or list(self.units) != list(range(self.units[0], self.units[0] + len(self.units))):
            raise ValueError(f"a block needs consecutive unit indices, got {self.units}")
        if self.batch_size < 1 or self.predicted_peak < 0:
            raise ValueError(f"a block needs batch_size >= 1 and predicted_peak >= 0, got {self}")

    def to_dict(self) -> dict[str, Any]:
        return {"units": list(self.units), "batch_size": self.batch_size, "predicted_peak": self.predicted_peak}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Block:
        return cls(tuple(int(u) for u in data["units"]), int(data["batch_size"]), int(data["predicted_peak"]))


class BudgetTooSmall(ValueError):
    """Some unit cannot train even at its smallest batch (1, or 2 with BatchNorm) within the budget.

    ``minimum_bytes`` is the smallest budget at which every unit fits at its smallest batch;
    ``unit_index`` is the unit that needs it.
    """

    def __init__(self, budget_bytes: int, minimum_bytes: int, unit_index: int, needed_by: str | None = None) -> None:
        super().__init__(budget_bytes, minimum_bytes, unit_index, needed_by)
        self.budget_bytes = budget_bytes
        self.minimum_bytes = minimum_bytes
        self.unit_index = unit_index
        self.needed_by = needed_by or f"unit {unit_index} (batch 1)"

    def __str__(self) -> str:
        return (
            f"budget {format_bytes(self.budget_bytes)} is below the smallest feasible budget "
            f"{format_bytes(self.minimum_bytes)}, needed by {self.needed_by}"
        )


def minimum_budget(models: Sequence[UnitMemoryModel], smallest: Sequence[int] | None = None) -> int:
    """Smallest budget in bytes at which every unit trains at its smallest batch: ``max_i predict_i(smallest_i)``.

    ``smallest`` holds each unit's smallest batch (all 1 if None; 2 for a unit with BatchNorm, see
    :func:`~nf_lightning.core.network.smallest_batch.smallest_batch`). A one-unit block peaks at
    exactly ``predict(batch)``, so this is also the smallest budget :func:`partition` accepts.
    """
    floors = _floors(models, smallest)
    unit = _most_demanding_unit(models, floors)
    return math.ceil(models[unit].predict(floors[unit]))


def max_batch_sizes(
    models: Sequence[UnitMemoryModel], budget_bytes: int, batch_limit: int, smallest: Sequence[int] | None = None
) -> list[int]:
    """Algorithm 1, lines 2-4: each unit's largest batch within the budget, capped at ``batch_limit``.

    0 for a unit that does not fit even at its smallest batch (``smallest``, all 1 if None).
    """
    sizes = [min(model.max_batch(budget_bytes), batch_limit) for model in models]
    return [size if size >= floor else 0 for size, floor in zip(sizes, _floors(models, smallest), strict=True)]


def group_units(batch_sizes: Sequence[int], rho: float) -> list[list[int]]:
    """Algorithm 1, lines 6-16: runs of neighbours with similar batch sizes.

    Exactly the paper's rule: units ``i`` and ``i + 1`` share a block iff
    ``|b[i+1] - b[i]| <= rho * b[i]``, where ``i`` advances through the block.
    Each unit is compared with its left neighbour, not with the block's first or
    smallest unit, so a block can drift: with rho=0.4, ``[100, 70, 49]`` is one
    block although 49 is 51% below 100. The test is asymmetric: 100 -> 141
    splits, 141 -> 100 does not.

    >>> group_units([100, 70, 49, 256], 0.4), group_units([100, 141], 0.4), group_units([141, 100], 0.4)
    ([[0, 1, 2], [3]], [[0], [1]], [[0, 1]])
    """
    if rho < 0:
        raise ValueError(f"the grouping threshold rho must be >= 0, got {rho}")
    groups: list[list[int]] = []
    for i, size in enumerate(batch_sizes):
        if groups and abs(size - batch_sizes[i - 1]) <= rho * batch_sizes[i - 1]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def block_peak(models: Sequence[UnitMemoryModel], units: Sequence[int], batch: int) -> float:
    """Predicted peak bytes of training the block ``units`` at ``batch``.

    All units of the block stay resident with their aux heads and optimizer
    state (the sum of their ``static_bytes``); one unit at a time adds its
    activations (``predict(batch) - static_bytes``); while any unit after the
    first runs, the block's input batch is still held
    (``input_bytes_per_sample`` of the first unit times ``batch``). For one
    unit this is exactly ``predict(batch)``.

    >>> from types import SimpleNamespace as Model
    >>> a = Model(static_bytes=10, input_bytes_per_sample=2, predict=lambda b: 10 + 5 * b)
    >>> b = Model(static_bytes=20, input_bytes_per_sample=7, predict=lambda b: 20 + 4 * b)
    >>> block_peak([a, b], [0], 4), block_peak([a, b], [0, 1], 4)  # 30 + max(5*4, 4*4 + 2*4)
    (30, 54)
    """
    if not units:
        raise ValueError("a block needs at least one unit")
    statics = sum(models[u].static_bytes for u in units)
    held_input = models[units[0]].input_bytes_per_sample * batch
    return max(
        models[u].predict(batch) + (statics - models[u].static_bytes) + (held_input if u != units[0] else 0)
        for u in units
    )


def partition(
    models: Sequence[UnitMemoryModel],
    budget_bytes: int,
    batch_limit: int = BATCH_LIMIT,
    rho: float = RHO,
    smallest: Sequence[int] | None = None,
) -> list[Block]:
    """Blocks of units with batch sizes whose :func:`block_peak` fits ``budget_bytes``.

    Algorithm 1 first (:func:`max_batch_sizes`, :func:`group_units`, block batch
    = smallest batch of its units). Then each block is checked as it really
    runs and, if it does not fit, fixed by this rule:

    1. Shrink: take the largest batch at which the block fits, if that is at
       least 1 and at most ``rho`` below the block's Algorithm 1 batch ``b``
       (``b - batch <= rho * b``, the paper's own tolerance).
    2. Otherwise split it in two where the smaller of the two parts' largest
       fitting batches is largest (ties: the most even split by unit count),
       and fix each part by the same rule. A single unit is never split: it
       runs at its own largest fitting batch, which is its Algorithm 1 batch.

    So every block's batch is within ``rho`` of the smallest Algorithm 1 batch
    of its units, and with ``rho=0`` every unit runs at its own Algorithm 1
    batch. No block runs below the smallest batch of any of its units (``smallest``,
    all 1 if None: 2 for units with BatchNorm). Like Algorithm 1 itself, the result is not monotone in the budget: a
    larger budget can merge a unit into a block with a smaller batch.

    Raises :class:`BudgetTooSmall` iff ``budget_bytes < minimum_budget(models, smallest)``.

    >>> from types import SimpleNamespace as Model
    >>> twin = Model(static_bytes=10, input_bytes_per_sample=0, predict=lambda b: b + 200,
    ...              max_batch=lambda budget: max(0, budget - 200))
    >>> partition([twin, twin], 300)  # alone each fits 100; together 20 + 190 + b <= 300
    [Block(units=(0, 1), batch_size=90, predicted_peak=300)]
    """
    floors = _floors(models, smallest)
    if batch_limit < max(floors):
        raise ValueError(f"batch_limit must be >= {max(floors)} (the smallest batch of a unit), got {batch_limit}")
    minimum = minimum_budget(models, floors)
    if budget_bytes < minimum:
        unit = _most_demanding_unit(models, floors)
        raise BudgetTooSmall(budget_bytes, minimum, unit, needed_by=f"unit {unit} (batch {floors[unit]})")
    sizes = max_batch_sizes(models, budget_bytes, batch_limit, floors)
    fitter = _BlockFitter(models, sizes, budget_bytes, rho, floors)
    return [block for group in group_units(sizes, rho) for block in fitter.fit(group)]


def largest_batch(models: Sequence[UnitMemoryModel], units: Sequence[int], budget_bytes: int, upper: int) -> int:
    """Largest batch up to ``upper`` at which the block ``units`` fits ``budget_bytes`` (0 if none).

    >>> from types import SimpleNamespace as Model
    >>> unit = Model(static_bytes=0, input_bytes_per_sample=0, predict=lambda b: 10 * b)
    >>> largest_batch([unit], [0], 95, upper=256), largest_batch([unit], [0], 95, upper=4)
    (9, 4)
    """
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if block_peak(models, units, middle) <= budget_bytes:
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(frozen=True)
class _BlockFitter:
    """The shrink-or-split fix-up of :func:`partition` for one budget."""

    models: Sequence[UnitMemoryModel]
    sizes: Sequence[int]
    budget_bytes: int
    rho: float
    floors: Sequence[int]

    def fit(self, units: Sequence[int]) -> list[Block]:
        """``units`` as one block if it fits within ``rho`` of its batch, else split and fitted."""
        target = min(self.sizes[u] for u in units)
        batch = self.largest_batch(units)
        floor = max(self.floors[u] for u in units)
        if len(units) == 1 or (batch >= floor and target - batch <= self.rho * target):
            peak = math.ceil(block_peak(self.models, units, batch))
            return [Block(tuple(units), batch, peak)]
        cut = max(range(1, len(units)), key=lambda k: self._split_score(units, k))
        return self.fit(units[:cut]) + self.fit(units[cut:])

    def largest_batch(self, units: Sequence[int]) -> int:
        """Largest batch up to the units' smallest size at which the block fits (0 if none)."""
        return largest_batch(self.models, units, self.budget_bytes, min(self.sizes[u] for u in units))

    def _split_score(self, units: Sequence[int], cut: int) -> tuple[int, int]:
        left, right = units[:cut], units[cut:]
        return min(self.largest_batch(left), self.largest_batch(right)), -abs(len(left) - len(right))


def _floors(models: Sequence[UnitMemoryModel], smallest: Sequence[int] | None) -> list[int]:
    """Each unit's smallest batch, checked against ``models``."""
    if not models:
        raise ValueError("need at least one unit memory model")
    floors = [1] * len(models) if smallest is None else [int(s) for s in smallest]
    if len(floors) != len(models) or min(floors) < 1:
        raise ValueError(f"need a smallest batch >= 1 for each of the {len(models)} units, got {smallest}")
    return floors


def _most_demanding_unit(models: Sequence[UnitMemoryModel], floors: Sequence[int]) -> int:
    return max(range(len(models)), key=lambda i: models[i].predict(floors[i]))
