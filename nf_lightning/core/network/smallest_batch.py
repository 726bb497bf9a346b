"""The smallest batch a module can train on: 2 where it holds a BatchNorm layer, else 1.

BatchNorm in training normalizes over the batch: one sample leaves it a single value per
channel on a 1x1 map (ResNet's last stage at 32x32, or after a global pool), which it
refuses, and a poor estimate of the statistics on any map. NeuroFlux's plan, its retries on
smaller pieces and the backprop baselines' batch sizing never go below this batch.

Example:
    >>> from torch import nn
    >>> smallest_batch(nn.Conv2d(3, 8, 3)), smallest_batch(nn.Conv2d(3, 8, 3), nn.Sequential(nn.BatchNorm2d(8)))
    (1, 2)
    >>> smallest_batches([nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)], [nn.BatchNorm2d(8), nn.Flatten()])
    [2, 1]
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def smallest_batch(*modules: nn.Module) -> int:
    """2 if any of ``modules`` holds a BatchNorm layer (of any dimension, SyncBatchNorm included), else 1."""
    norms = (m for module in modules for m in module.modules())
    return 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in norms) else 1


def smallest_batches(units: Sequence[nn.Module], exits: Sequence[nn.Module]) -> list[int]:
    """Each unit's smallest batch, trained with its exit (``exits[i]`` is unit ``i``'s classifier)."""
    return [smallest_batch(unit, exit_head) for unit, exit_head in zip(units, exits, strict=True)]
