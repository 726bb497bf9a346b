"""The training plan: blocks, batch sizes and epochs, derived from a budget.

A plan is what the profiler and the partitioner decide before training
starts, kept as plain data so it goes into checkpoints and JSON unchanged.
Which block is active is the run's state (:class:`~nf_lightning.core.train.run.BlockwiseRun`),
not the plan's: ``epochs_per_block`` is each block's allotment.

Example:
    >>> from nf_lightning.core.plan.partitioner import Block
    >>> plan = TrainingPlan(budget=10**8, batch_limit=256, rho=0.4, aux_policy="adaptive",
    ...     input_shape=(3, 32, 32), unit_models=[], blocks=[Block((0, 1), 64, 0), Block((2,), 256, 0)],
    ...     epochs_per_block=[2, 3])
    >>> plan.total_epochs, plan.batch_size(1)
    (5, 256)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nf_lightning.core.exits.aux_heads import AUX_MAX_FILTERS
from nf_lightning.core.memory.budget import format_bytes
from nf_lightning.core.memory.profiler import LinearMemoryModel, profile_units
from nf_lightning.core.network.smallest_batch import smallest_batches
from nf_lightning.core.plan.partitioner import (
    BATCH_LIMIT,
    RHO,
    Block,
    BudgetTooSmall,
    block_peak,
    largest_batch,
    minimum_budget,
    partition,
)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class TrainingPlan:
    """Blocks of units with their batch sizes and epochs under a memory budget; fixed once made."""

    budget: int
    batch_limit: int
    rho: float
    aux_policy: str
    input_shape: tuple[int, ...]
    unit_models: list[LinearMemoryModel]
    blocks: list[Block]
    epochs_per_block: list[int]
    seconds: float = 0.0
    aux_max_filters: int | None = AUX_MAX_FILTERS  # its heads' cap; None: uncapped (as in plans saved before it)

    @property
    def total_epochs(self) -> int:
        return sum(self.epochs_per_block)

    def batch_size(self, block: int) -> int:
        """The block's planned batch size (the run's :meth:`~nf_lightning.core.train.run.BlockwiseRun.batch_size_of`
        is lower after a step had to shrink)."""
        return self.blocks[block].batch_size

    def describe(self) -> str:
        """A few lines a person can read: blocks, batch sizes, epochs, predicted peak against the budget."""
        lines = [f"NeuroFlux plan under {format_bytes(self.budget)} (made in {self.seconds:.2f} s):"]
        for index, block in enumerate(self.blocks):
            units = f"{block.units[0]}-{block.units[-1]}" if len(block.units) > 1 else str(block.units[0])
            lines.append(
                f"  block {index}: units {units:<7} batch {self.batch_size(index):<4} "
                f"epochs {self.epochs_per_block[index]:<3} predicted peak {format_bytes(block.predicted_peak)}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "batch_limit": self.batch_limit,
            "rho": self.rho,
            "aux_policy": self.aux_policy,
            "input_shape": list(self.input_shape),
            "unit_models": [m.to_dict() for m in self.unit_models],
            "blocks": [b.to_dict() for b in self.blocks],
            "epochs_per_block": list(self.epochs_per_block),
            "seconds": self.seconds,
            "aux_max_filters": self.aux_max_filters,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingPlan:
        return cls(
            budget=int(data["budget"]),
            batch_limit=int(data["batch_limit"]),
            rho=float(data["rho"]),
            aux_policy=str(data["aux_policy"]),
            input_shape=tuple(data["input_shape"]),
            unit_models=[LinearMemoryModel.from_dict(m) for m in data["unit_models"]],
            blocks=[Block.from_dict(b) for b in data["blocks"]],
            epochs_per_block=[int(e) for e in data["epochs_per_block"]],
            seconds=float(data.get("seconds", 0.0)),
            aux_max_filters=data.get("aux_max_filters"),
        )


def expand_epochs(epochs_per_block: int | Sequence[int], num_blocks: int) -> list[int]:
    """One epoch count per block from a single number or a per-block list.

    >>> expand_epochs(3, 2), expand_epochs([1, 2], 2)
    ([3, 3], [1, 2])
    """
    if isinstance(epochs_per_block, int):
        counts = [epochs_per_block] * num_blocks
    else:
        counts = [int(e) for e in epochs_per_block]
        if len(counts) != num_blocks:
            raise ValueError(
                f"epochs_per_block has {len(counts)} entries but the plan has {num_blocks} blocks; "
                "give one number for all blocks or one per block"
            )
    if any(e < 1 for e in counts):
        raise ValueError(f"every block needs at least one epoch, got {counts}")
    return counts


def profile_batch_sizes(batch_limit: int, device: torch.device | str) -> tuple[int, ...]:
    """Batch sizes to profile at: powers of two over the whole range the partitioner will use.

    The true peak bends slightly upward with the batch, so fitting over that
    range keeps predictions honest at large batches. On CPU profiling runs on
    fake tensors and costs nothing; on CUDA it runs real steps and stops at the
    first batch the device cannot hold (``profile_unit``).

    >>> profile_batch_sizes(256, "cpu") == profile_batch_sizes(256, "cuda") == (2, 4, 8, 16, 32, 64, 128, 256)
    True
    """
    del device  # the same range everywhere; kept for callers that name it
    sizes = [2]
    while sizes[-1] * 2 <= batch_limit:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes) if len(sizes) > 1 else (1, 2)


def make_plan(
    units: Sequence[nn.Module],
    exits: Sequence[nn.Module],
    input_shape: tuple[int, ...],
    budget: int,
    epochs_per_block: int | Sequence[int] = 1,
    batch_limit: int = BATCH_LIMIT,
    rho: float = RHO,
    aux_policy: str = "adaptive",
    aux_max_filters: int | None = AUX_MAX_FILTERS,
    optimizer_factory: OptimizerFactory | None = None,
    device: torch.device | str = "cpu",
    single_block: bool = False,
) -> TrainingPlan:
    """Profile every unit with its exit and partition them under ``budget`` (Algorithm 1).

    ``exits[i]`` is unit ``i``'s classifier: an auxiliary head, or the model's
    own head for the last unit (built under ``aux_policy`` and ``aux_max_filters``, which
    the plan records so a resumed run builds the same heads). ``single_block`` puts every unit in one block
    at the largest batch that fits (classic local learning).
    """
    start = time.perf_counter()
    models = profile_units(
        list(units),
        list(exits[:-1]),
        exits[-1],
        input_shape,
        batch_sizes=profile_batch_sizes(batch_limit, device),
        optimizer_factory=optimizer_factory,
        device=device,
    )
    smallest = smallest_batches(units, exits)
    if single_block:
        blocks = single_block_plan(models, budget, batch_limit, max(smallest))
    else:
        blocks = partition(models, budget, batch_limit, rho, smallest)
    return TrainingPlan(
        budget=budget,
        batch_limit=batch_limit,
        rho=rho,
        aux_policy=aux_policy,
        input_shape=tuple(input_shape),
        unit_models=models,
        blocks=blocks,
        epochs_per_block=expand_epochs(epochs_per_block, len(blocks)),
        seconds=time.perf_counter() - start,
        aux_max_filters=aux_max_filters,
    )


def single_block_plan(
    models: Sequence[LinearMemoryModel], budget: int, batch_limit: int, smallest: int = 1
) -> list[Block]:
    """All units in one block at the largest batch (at least ``smallest``) whose predicted peak fits ``budget``."""
    units = tuple(range(len(models)))
    batch = largest_batch(models, units, budget, batch_limit)
    if batch < smallest:
        needed = max(math.ceil(block_peak(models, units, smallest)), minimum_budget(models, [smallest] * len(models)))
        raise BudgetTooSmall(
            budget, needed, len(models) - 1, needed_by=f"all {len(models)} units as one block (batch {smallest})"
        )
    return [Block(units, batch, int(block_peak(models, units, batch)))]
