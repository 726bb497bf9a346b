"""The runnable examples in the core modules' docstrings run and give what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "nf_lightning.core.batches",
    "nf_lightning.core.enforcement",
    "nf_lightning.core.exits",
    "nf_lightning.core.feature_augment",
    "nf_lightning.core.local_learning",
    "nf_lightning.core.memory",
    "nf_lightning.core.optim_recipe",
    "nf_lightning.core.plan",
    "nf_lightning.core.run",
    "nf_lightning.core.schedule",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
