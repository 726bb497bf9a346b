"""Budgeted neuron updates (arXiv 2312.05282): fine-tune only a budget of conv neurons, in less memory.

- :mod:`~nf_lightning.neuron_budget.selection`: neurons, costs, budget filling, velocity ranking, Sparse Update;
- :mod:`~nf_lightning.neuron_budget.partial`: layers that keep only what the selection's backward needs;
- :mod:`~nf_lightning.neuron_budget.trainable`: a selection put into a model and its optimizers;
- :mod:`~nf_lightning.neuron_budget.probe`: velocity from the previous epoch's weights (bounded memory),
  :mod:`~nf_lightning.neuron_budget.kept_state` its copy of them, :mod:`~nf_lightning.neuron_budget.probe_memory`
  its limit and where the copy lives;
- :mod:`~nf_lightning.neuron_budget.budget`: a budget in bytes, the cost of a selection, its memory floor;
- :mod:`~nf_lightning.neuron_budget.callback`: the Lightning callback :class:`NeuronUpdateBudget`;
- :mod:`~nf_lightning.neuron_budget.pretrained`: :func:`load_pretrained`.

Only ``callback`` imports Lightning; ``NeuronUpdateBudget`` is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"NeuronUpdateBudget": "nf_lightning.neuron_budget.callback",
         "load_pretrained": "nf_lightning.neuron_budget.pretrained"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'nf_lightning.neuron_budget' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = sorted(_LAZY)
