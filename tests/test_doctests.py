"""The runnable examples in the core modules' docstrings run and give what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "nf_lightning.core.train.batches",
    "nf_lightning.core.network.smallest_batch",
    "nf_lightning.core.network.network_input",
    "nf_lightning.core.memory.enforcement",
    "nf_lightning.core.exits.selection",
    "nf_lightning.core.train.feature_augment",
    "nf_lightning.core.train.local_learning",
    "nf_lightning.core.memory.meter",
    "nf_lightning.core.train.optim_recipe",
    "nf_lightning.core.plan.training_plan",
    "nf_lightning.core.train.run",
    "nf_lightning.core.train.schedule",
    "nf_lightning.neuron_budget.kept_state",
    "nf_lightning.neuron_budget.probe",
    "nf_lightning.neuron_budget.probe_memory",
    "nf_lightning.core.train.budgeted_step",
    "nf_lightning.core.exits.aux_heads",
    "nf_lightning.lightning.unsupported",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
