"""Running frozen modules on a device they do not live on: eval mode, no grad, moved in only while they run.

Trained blocks live in storage (the CPU); validation and cache writes stream
them through the training device one module at a time, so the device never
holds more than the module that runs.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layers = [nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)]
    >>> stream(layers, torch.ones(3, 4), torch.device("cpu")).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def stream(modules: Sequence[nn.Module], x: Tensor, device: torch.device) -> Tensor:
    """``x`` through ``modules`` in eval mode without grad, each moved to ``device`` only while it runs."""
    with torch.no_grad():
        for module in modules:
            x = run_frozen(module, x, device)
    return x


def run_frozen(module: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    """``module(x)`` on ``device`` in eval mode; the module's mode and home device are restored after."""
    home = next((p.device for p in module.parameters()), device)
    was_training = module.training
    module.eval()
    if home != device:
        module.to(device)
    try:
        return module(x.to(device))
    finally:
        module.train(was_training)
        if home != device:
            module.to(home)
