"""The run's saved state carries a format version; an older state is converted, an unknown one refused clearly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nf_lightning.core.memory.budget import MemoryBudget
from nf_lightning.core.network.decompose import decompose
from nf_lightning.core.options import NeuroFluxOptions
from nf_lightning.core.train.run import BlockwiseRun, DataSources
from nf_lightning.core.train.run_state import STATE_VERSION


def trained_run() -> BlockwiseRun:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))  # fmt: skip
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,)))
    recipe = lambda: (torch.optim.SGD(net.parameters(), lr=0.1), [])  # noqa: E731
    options = NeuroFluxOptions(epochs_per_block=2, cache=False, single_block=True)
    run = BlockwiseRun.create(decompose(net), recipe, (3, 8, 8), MemoryBudget(10**8), options)
    run.attach_data(DataSources(DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)))
    run.start()
    run.begin_epoch()
    for x, y in run.train_loader():
        run.train_batch(x, y)
    run.begin_validation()
    for x, y in run.sources.val:
        run.validate_batch(x, y)
    run.end_validation()
    run.end_epoch(0)
    run.batch_overrides[0] = 5  # as after a step had to shrink
    return run


def test_the_state_says_its_version_and_a_lowered_batch_is_the_runs() -> None:
    run = trained_run()
    state = run.state_dict()
    assert state["version"] == STATE_VERSION == 2
    assert state["batch_overrides"] == {"0": 5} and "batch_overrides" not in state["plan"]
    assert run.batch_size == 5 and run.plan.batch_size(0) > 5  # the plan itself is unchanged


def test_a_version_1_state_is_converted() -> None:
    run = trained_run()
    state = run.state_dict()
    old = copy.deepcopy(state)
    old["version"] = 1
    old["plan"]["batch_overrides"] = old.pop("batch_overrides")  # where version 1 kept it
    restored = BlockwiseRun.from_state(run.decomposition, old, options=run.options)
    assert restored.batch_size_of(0) == 5
    assert restored.records.keys() == run.records.keys() and restored.progress.last_epoch == 0
    assert restored.state_dict()["batch_overrides"] == state["batch_overrides"]


@pytest.mark.parametrize(("version", "message"), [(None, "has no format version"), (3, "written by a newer")])
def test_an_unknown_version_is_refused_clearly(version: int | None, message: str) -> None:
    run = trained_run()
    state = run.state_dict()
    if version is None:
        del state["version"]
    else:
        state["version"] = version
    with pytest.raises(ValueError, match=message):
        BlockwiseRun.from_state(run.decomposition, state)
    with pytest.raises(ValueError, match=message):
        run.load_state_dict(state)
