"""The largest batch at which backpropagation through a module fits a memory budget.

BP, BP with checkpointing and the end-to-end polish of a deployed exit all size
their batch here, with the profiler NeuroFlux sizes its blocks with.

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

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from nf_lightning.core.plan.training_plan import profile_batch_sizes
from nf_lightning.core.memory.profiler import LinearMemoryModel, profile_backprop


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
    at that batch (at batch 1 when none fits). ``optimizer_factory`` is the
    module's own recipe (``ClassifierModule``'s) if None.
    """
    factory = optimizer_factory or backprop_optimizer(module)
    model = profile_backprop(
        module, input_shape, batch_sizes=profile_batch_sizes(batch_limit, "cpu"), optimizer_factory=factory
    )
    batch = min(model.max_batch(budget_bytes), batch_limit)
    peak = backprop_step_peak(module, input_shape, max(batch, 1), factory)
    while batch >= 1 and peak > budget_bytes:
        batch -= 1
        peak = backprop_step_peak(module, input_shape, max(batch, 1), factory)
    return batch, model, peak


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
