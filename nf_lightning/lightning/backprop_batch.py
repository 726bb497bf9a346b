"""The largest batch at which backpropagation through a module fits a memory budget.

BP, BP with checkpointing and the end-to-end polish of a deployed exit all size
their batch here (:func:`size_backprop_batch`), with the profiler NeuroFlux sizes
its blocks with; :func:`fit_backprop_to_budget` is the app's ``before_fit`` hook for BP.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    >>> sgd = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)
    >>> batch, model, peak = largest_backprop_batch(net, (3, 8, 8), 2_000_000, batch_limit=64, optimizer_factory=sgd)
    >>> 1 <= batch <= 64 and peak <= 2_000_000
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from nf_lightning.core.memory.budget import MemoryBudget
from nf_lightning.core.memory.profiler import LinearMemoryModel, profile_backprop
from nf_lightning.core.network.checkpointing import CheckpointedNetwork
from nf_lightning.core.network.smallest_batch import smallest_batch
from nf_lightning.core.plan.partitioner import BATCH_LIMIT, BudgetTooSmall
from nf_lightning.core.plan.training_plan import profile_batch_sizes


@dataclass(frozen=True)
class BackpropBatch:
    """What :func:`size_backprop_batch` decided: the batch, the rate scaled to it, the memory model and peak."""

    batch_size: int
    lr: float
    memory_model: LinearMemoryModel
    predicted_peak: int


def size_backprop_batch(
    module: pl.LightningModule,
    input_shape: tuple[int, ...],
    budget: MemoryBudget,
    batch_limit: int,
    *,
    lr: float,
    reference_batch: int,
    needed_by: str,
) -> BackpropBatch:
    """The largest batch at which a BP step of ``module`` fits ``budget``'s tensor bytes (at most
    ``batch_limit``), and the rate ``lr`` (tuned at ``reference_batch``) scaled linearly to it.

    Raises :class:`~nf_lightning.core.plan.partitioner.BudgetTooSmall`, naming ``needed_by``,
    if the smallest batch (1, or 2 with BatchNorm) does not fit.
    """
    batch, model, peak = largest_backprop_batch(module, input_shape, budget.tensor_bytes, batch_limit)
    if batch < 1:
        smallest, needed = backprop_need(module, model, peak)
        raise BudgetTooSmall(budget.tensor_bytes, needed, -1, needed_by=f"{needed_by} (batch {smallest})")
    return BackpropBatch(batch, lr * batch / reference_batch, model, peak)


def fit_backprop_to_budget(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    *,
    budget: MemoryBudget,
    reference_batch: int,
    batch_limit: int = BATCH_LIMIT,
    checkpoint: bool = False,
) -> dict[str, Any]:
    """BP's ``before_fit`` hook: train at the largest batch the profiler fits under ``budget``.

    Sets ``datamodule.batch_size`` and scales ``module.hparams.lr`` (the rate at
    ``reference_batch``) linearly to it (:func:`size_backprop_batch`). With ``checkpoint``
    the module's network (``module.net``) is first wrapped in
    :class:`~nf_lightning.core.network.checkpointing.CheckpointedNetwork` (activation
    checkpointing over its units, the ``bp_ckpt`` method) and that is what is profiled
    and trained. Returns the ``results.json`` entries it decided.

    Example (``conf/method/bp.yaml``; the app passes ``module``, ``datamodule`` and ``budget``)::

        before_fit:
          _target_: nf_lightning.lightning.backprop_batch.fit_backprop_to_budget
          _partial_: true
          reference_batch: ${optim.reference_batch}
    """
    if checkpoint:
        module.net = CheckpointedNetwork(module.net)
    what = "backpropagation with activation checkpointing" if checkpoint else "backpropagation"
    sized = size_backprop_batch(
        module, tuple(datamodule.input_shape), budget, batch_limit, lr=module.hparams.lr,
        reference_batch=reference_batch, needed_by=f"{what} through the whole model",
    )  # fmt: skip
    datamodule.batch_size = sized.batch_size
    module.hparams.lr = sized.lr
    return {
        "batch_sizes": [sized.batch_size],
        "predicted_peak_bytes": sized.predicted_peak,
        "memory_model": sized.memory_model.to_dict(),
    }


def largest_backprop_batch(
    module: torch.nn.Module,
    input_shape: tuple[int, ...],
    budget_bytes: int,
    batch_limit: int,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None,
) -> tuple[int, LinearMemoryModel, int]:
    """The largest batch (at most ``batch_limit``) whose backprop step of ``module`` fits ``budget_bytes``.

    ``module`` is profiled as NeuroFlux profiles its units: a step on fake
    tensors measured by the tracked meter, at the batch sizes of
    :func:`~nf_lightning.core.plan.training_plan.profile_batch_sizes` (2 to ``batch_limit``),
    fitted by a line. A line fitted over that whole range can miss the peak of a
    small batch by a few percent, so the batch it proposes is then checked with
    a step of its own and lowered until its measured peak fits: BP is held to
    the budget as exactly as the meter allows.
    Returns the batch (0 if none fits), the memory model and the measured peak
    at that batch (at the smallest batch when none fits: 1, or 2 for a module with
    BatchNorm, which cannot train on one sample). ``optimizer_factory`` is the
    module's own recipe (``ClassifierModule``'s) if None.
    """
    factory = optimizer_factory or backprop_optimizer(module)
    model = profile_backprop(
        module, input_shape, batch_sizes=profile_batch_sizes(batch_limit, "cpu"), optimizer_factory=factory
    )
    smallest = smallest_batch(module)
    batch = min(model.max_batch(budget_bytes), batch_limit)
    peak = backprop_step_peak(module, input_shape, max(batch, smallest), factory)
    while batch >= smallest and peak > budget_bytes:
        batch -= 1
        peak = backprop_step_peak(module, input_shape, max(batch, smallest), factory)
    return (batch if batch >= smallest else 0), model, peak


def backprop_need(module: torch.nn.Module, model: LinearMemoryModel, peak: int) -> tuple[int, int]:
    """What BP through ``module`` needs where no batch fits: its smallest batch and the bytes at it (the
    larger of ``model``'s line and the measured ``peak`` that :func:`largest_backprop_batch` returned)."""
    smallest = smallest_batch(module)
    return smallest, math.ceil(max(model.predict(smallest), peak))


def backprop_step_peak(
    module: torch.nn.Module,
    input_shape: tuple[int, ...],
    batch: int,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None,
) -> int:
    """Peak bytes of one backprop step of ``module`` at ``batch``, measured on fake tensors (as the profiler does).

    What :func:`largest_backprop_batch` checks against the budget, and what
    ``experiments/compare.py`` sizes BP's tightest budget with.
    """
    factory = optimizer_factory or backprop_optimizer(module)
    model = profile_backprop(module, input_shape, batch_sizes=(batch, batch + 1), optimizer_factory=factory)
    return dict(model.samples)[batch]


def backprop_optimizer(module: pl.LightningModule) -> Callable[[Any], torch.optim.Optimizer]:
    """The optimizer ``ClassifierModule.configure_optimizers`` builds, over other parameters (for profiling)."""
    hp = module.hparams
    nesterov = bool(hp.get("nesterov", False)) and hp.momentum > 0
    return lambda params: torch.optim.SGD(
        params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=nesterov
    )
