"""Budgeted neuron updates: hand-computed selection pieces, the velocity probe, real Trainer runs (BP and
NeuroFlux), resume, nf-train, and measured memory against full fine-tuning. The memory mechanism itself
(partial convs, optimizer state, byte costs) is tested in ``test_neuron_budget_memory.py``."""

from __future__ import annotations

import csv
import doctest
import itertools
import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nf_lightning import NeuroFluxStrategy
from nf_lightning.cli.common import compose_config
from nf_lightning.lightning.classifier import ClassifierModule
from nf_lightning.lightning.peak_memory import PeakMemoryMonitor
from nf_lightning.models import create
from nf_lightning.neuron_budget import callback as callback_module
from nf_lightning.neuron_budget import kept_state as kept_state_module
from nf_lightning.neuron_budget import probe as probe_module
from nf_lightning.neuron_budget import scope as scope_module
from nf_lightning.neuron_budget import selection as selection_module
from nf_lightning.neuron_budget import selector as selector_module
from nf_lightning.neuron_budget.callback import NeuronUpdateBudget
from nf_lightning.neuron_budget.kept_state import selected_row_bytes
from nf_lightning.neuron_budget.partial import make_partial
from nf_lightning.neuron_budget.pretrained import load_pretrained
from nf_lightning.neuron_budget.probe import VelocityProbe
from nf_lightning.neuron_budget.selection import (
    auto_sparse_update,
    budget_params,
    channel_cosine,
    conv_neurons,
    fill_budget,
    neuron_costs,
    parse_sparse_update,
    random_order,
    sparse_update_masks,
    velocity_order,
    velocity_step,
)
from nf_lightning.neuron_budget.trainable import SelectiveTraining
from nf_lightning.testing.probes import paired_probes


@pytest.mark.parametrize("module", [callback_module, probe_module, scope_module, selection_module, selector_module])
def test_docstring_examples(module) -> None:
    assert doctest.testmod(module).failed == 0


# ---------------------------------------------------------------- costs and budgets
def test_neuron_costs_count_filter_and_bias() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),  # 27 + 1
        nn.Conv2d(4, 4, 3, groups=4, bias=False),  # depthwise: 9
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 6, (1, 3)),  # 12 + 1
        nn.Linear(6, 2),  # a classifier: not a neuron
    )
    layers = conv_neurons(net.named_modules())
    assert [(layer.name, layer.cost, layer.params) for layer in layers] == [("0", 28, 112), ("1", 9, 36), ("3", 13, 78)]
    assert neuron_costs(layers).tolist() == [28] * 4 + [9] * 4 + [13] * 6
    assert budget_params(layers, 0.1) == 22  # floor(0.1 * 226)
    with pytest.raises(ValueError, match="fraction"):
        budget_params(layers, 1.5)


def test_budget_filling_with_unequal_sizes_by_hand() -> None:
    costs = torch.tensor([10, 3, 7, 5, 1])
    # in order 0, 1, 2, ...: 10 fits, 10 + 3 = 13 > 12 ends the fill (the next ones are not looked at)
    assert fill_budget(torch.arange(5), costs, 12).tolist() == [True, False, False, False, False]
    # in order 4, 1, 3, 2, 0: 1, 4, 9, then 9 + 7 = 16 > 12
    assert fill_budget(torch.tensor([4, 1, 3, 2, 0]), costs, 12).tolist() == [False, True, False, True, True]
    assert fill_budget(torch.arange(5), costs, 26).all() and not fill_budget(torch.arange(5), costs, 0).any()
    with pytest.raises(ValueError, match="permutation"):
        fill_budget(torch.tensor([0, 0, 1, 2, 3]), costs, 12)


def test_budget_filling_is_never_over_and_a_maximal_prefix() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 40, (1,), generator=generator))
        costs = torch.randint(1, 500, (n,), generator=generator)
        budget = int(torch.randint(0, int(costs.sum()) + 1, (1,), generator=generator))
        order = torch.randperm(n, generator=generator)
        selected = fill_budget(order, costs, budget)
        taken = int(selected.sum())
        assert int(costs[selected].sum()) <= budget
        assert selected[order[:taken]].all()  # a prefix of the order
        if taken < n:
            assert int(costs[order[: taken + 1]].sum()) > budget  # the next one would not fit


def test_random_fill_is_fresh_each_epoch_reproducible_and_within_budget() -> None:
    costs = torch.tensor([5, 1, 9, 2, 7, 3, 3, 8, 4, 6] * 3)
    budget = 30
    draws = []
    generator = torch.Generator().manual_seed(7)
    for _ in range(5):
        order = random_order(len(costs), generator)
        assert sorted(order.tolist()) == list(range(len(costs)))
        selected = fill_budget(order, costs, budget)
        assert int(costs[selected].sum()) <= budget
        draws.append(selected)
    assert len({tuple(d.tolist()) for d in draws}) > 1  # a new permutation each epoch
    again = torch.Generator().manual_seed(7)
    assert torch.equal(fill_budget(random_order(len(costs), again), costs, budget), draws[0])


def test_velocity_ranking_divides_by_cost() -> None:
    velocity = torch.tensor([0.5, -0.4, 0.05, -0.3])
    costs = torch.tensor([100, 10, 1, 10])
    # |v|/cost: 0.005, 0.04, 0.05, 0.03
    assert velocity_order(velocity, costs).tolist() == [2, 1, 3, 0]
    assert fill_budget(velocity_order(velocity, costs), costs, 25).tolist() == [False, True, True, True]


# ---------------------------------------------------------------- velocity
def test_channel_cosine_by_hand() -> None:
    previous = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 0.0]]])  # (N=2, C=2, L=2)
    current = torch.tensor([[[1.0, 1.0], [-3.0, -4.0]], [[0.0, 2.0], [1.0, 0.0]]])
    cosine = channel_cosine(previous, current)
    expected = torch.tensor([[2**-0.5, -1.0], [1.0, 0.0]])  # one zero vector against a non-zero one: 0
    assert torch.allclose(cosine, expected)


def test_velocity_recursion_on_hand_computed_values() -> None:
    phis = [0.9, 0.95, 0.97, 0.98]
    # phi_0 = 1: deltas -0.1, 0.05, 0.02, 0.01
    # paper:       v1 = -0.1, v2 = 0.05 + 0.05 = 0.1, v3 = 0.02 - 0.05 = -0.03, v4 = 0.01 + 0.015 = 0.025
    # public code: u1 = -0.1, u2 = 0.05 + 0.1 - 0.05 = 0.1, u3 = 0.02 - 0.05 + 0.05 = 0.02, u4 = 0.01 - 0.02 + 0.01 = 0
    expected = {"paper": [-0.1, 0.1, -0.03, 0.025], "public_code": [-0.1, 0.1, 0.02, 0.0]}
    for recursion, values in expected.items():
        phi_prev, velocity, delta = torch.tensor([1.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        got = []
        for phi in phis:
            phi = torch.tensor([phi], dtype=torch.float64)
            delta, velocity = velocity_step(phi, phi_prev, velocity, delta, 0.5, recursion)
            phi_prev = phi
            got.append(float(velocity))
        assert got == pytest.approx(values, abs=1e-12), recursion
    with pytest.raises(ValueError, match="recursion"):
        velocity_step(torch.ones(1), torch.ones(1), torch.zeros(1), torch.zeros(1), 0.5, "nesterov")


def test_velocity_probe_on_hand_computed_outputs() -> None:
    """One channel (a 1x1 conv of a 2-channel input) rotated a little more each epoch, over two probe batches."""
    import math

    conv = nn.Conv2d(2, 1, 1, bias=False)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1).repeat(1, 1, 1, 2)  # output = the filter
    x[:, :, :, 1] = x[:, :, :, 0].flip(1)  # two positions: (w0, w1) and (w1, w0)
    probe = VelocityProbe({"c": conv}, mu=0.5)
    angles = [0.0, math.acos(0.9), math.acos(0.9) + math.acos(0.8)]  # cosines 0.9, then 0.8 between epochs
    for angle in angles:
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([math.cos(angle), math.sin(angle)]).view(1, 2, 1, 1))
        probe.measure([conv], conv, x.split(1))
    # the output of sample 0 is (cos a, sin a), of sample 1 (sin a, cos a): both rotate by the same angle
    # phi: 0.9 then 0.8; delta: -0.1 (phi_0 = 1) then -0.1; velocity: -0.1 then -0.1 + 0.05 = -0.05
    assert probe.phi["c"].tolist() == pytest.approx([0.8], abs=1e-6)
    assert probe.delta["c"].tolist() == pytest.approx([-0.1], abs=1e-6)
    assert probe.velocity["c"].tolist() == pytest.approx([-0.05], abs=1e-6)
    assert probe.kept_bytes == 2 * 4 and probe.batch_bytes == 1 * 1 * 2 * 4  # the weight copy; one sample's output
    copy = VelocityProbe({"c": conv}, mu=0.5)
    copy.load_state_dict(probe.state_dict(), [conv])
    assert copy.passes == 3 and torch.equal(copy.velocity["c"], probe.velocity["c"])
    assert torch.equal(copy.snapshot[0].tensor, conv.weight)


def test_velocity_probe_matches_recorded_outputs_exactly() -> None:
    """The probe's velocity and selection equal those of recording every output each epoch (the old scheme)."""
    torch.manual_seed(0)
    net = create("resnet18", num_classes=4, width_mult=0.125)
    convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    probe_x = torch.randn(12, 3, 32, 32)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    probe = VelocityProbe(convs, mu=0.5)
    recorded: dict[str, torch.Tensor] = {}
    phi_prev = {n: torch.ones(c.out_channels) for n, c in convs.items()}
    velocity = {n: torch.zeros(c.out_channels) for n, c in convs.items()}
    delta = {n: torch.zeros(c.out_channels) for n, c in convs.items()}
    for epoch in range(4):
        probe.measure([net], net, probe_x.split(5))
        outputs = _record(net, convs, probe_x)
        if recorded:
            for name in convs:
                phi = channel_cosine(recorded[name], outputs[name]).double().mean(0).float()
                delta[name], velocity[name] = velocity_step(phi, phi_prev[name], velocity[name], delta[name], 0.5)
                phi_prev[name] = phi
                assert torch.allclose(probe.velocity[name], velocity[name], atol=1e-6), (epoch, name)
        recorded = outputs
        for _ in range(2):  # an epoch of training
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 4, (8,))).backward()
            optimizer.step()
    layers = conv_neurons(convs.items())
    costs = neuron_costs(layers)
    ours = fill_budget(velocity_order(probe.flat_velocity(list(convs)), costs), costs, 5000)
    theirs = fill_budget(velocity_order(torch.cat([velocity[n] for n in convs]), costs), costs, 5000)
    assert torch.equal(ours, theirs) and ours.any()
    recorded_bytes = sum(t.numel() * t.element_size() for t in recorded.values())
    assert probe.batch_bytes * 12 == recorded_bytes * 5  # one probe batch of 5 outputs at a time, not all 12
    state = [*net.parameters(), *net.buffers()]
    assert probe.kept_bytes == sum(t.numel() * t.element_size() for t in state)  # and a copy of the weights


def test_a_bounded_probe_keeps_the_selected_rows_and_gives_the_same_velocity_within_its_bytes() -> None:
    """Two probes of one partly trained network: unbounded, and bounded to a tenth of the unbounded one's outputs."""
    torch.manual_seed(0)
    net = create("resnet18", num_classes=4, width_mult=0.125)
    convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    masks = {m: torch.rand(m.out_channels) < 0.3 for m in convs.values()}
    first = next(iter(convs.values()))
    masks[first] = torch.zeros(first.out_channels, dtype=torch.bool)  # one conv left wholly frozen
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    training = SelectiveTraining()
    training.apply(masks, [optimizer])
    whole, bounded = VelocityProbe(convs), VelocityProbe(convs)
    probe_x = torch.randn(12, 3, 32, 32)
    for epoch in range(3):
        for probe in (whole, bounded):
            if probe.snapshot:
                limit = None if probe is whole else probe.kept_bytes + probe.swap_bytes + whole.batch_bytes // 10
                probe.compare([net], net, probe_x.split(6), limit)
            probe.keep([net])
        if epoch:
            for name in convs:
                assert torch.allclose(bounded.velocity[name], whole.velocity[name], atol=1e-6), (epoch, name)
            assert bounded.batch_bytes <= whole.batch_bytes // 10 < whole.batch_bytes
            assert bounded.peak_bytes <= limit and bounded.forwards > 4 * whole.forwards
        for _ in range(2):  # an epoch of training
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 4, (8,))).backward()
            optimizer.step()
    rows = sum(int(mask.sum()) * conv.weight[0].numel() for conv, mask in masks.items())
    others = [p for m in net.modules() if not isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False)]
    buffers = [b for m in net.modules() if not isinstance(m, nn.Conv2d) for b in m.buffers(recurse=False)]
    index = sum(int(mask.sum()) for mask in masks.values()) * 8  # the kept rows' int64 indices
    assert all(conv.bias is None for conv in convs.values())
    assert whole.kept_bytes == rows * 4 + index + sum(t.numel() * t.element_size() for t in others + buffers)
    assert not any(k.module is first for k in whole.snapshot)  # a frozen conv's weight cannot change: not kept
    # rows are exchanged a run at a time: unbounded, a whole layer's (its rows and their copy); bounded, within a
    # sixteenth of what the bound leaves after the copy, one row at the least
    one_row = max(c.weight[0].numel() for c, m in masks.items() if m.any()) * 4
    largest = max(int(m.sum()) * c.weight[0].numel() for c, m in masks.items()) * 4
    assert whole.swap_bytes == 2 * largest and one_row <= bounded.swap_bytes < whole.swap_bytes
    training.release()


def test_a_probe_bounded_below_one_samples_layer_output_compares_its_channels_in_groups() -> None:
    """Bytes for a third of the largest layer's output on one sample: that layer is compared a third of its
    channels at a time, the velocity is the unbounded one's, and the outputs held stay within the bytes."""
    torch.manual_seed(0)
    net = create("resnet18", num_classes=4, width_mult=0.125)
    convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    probe_x = torch.randn(4, 3, 32, 32)
    largest = max(t[0].numel() * 4 for t in _record(net, convs, probe_x[:1]).values())  # one sample, bytes
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    whole, bounded = VelocityProbe(convs), VelocityProbe(convs)
    for epoch in range(3):
        for probe in (whole, bounded):
            if probe.snapshot:
                limit = None if probe is whole else probe.kept_bytes + probe.swap_bytes + largest // 3
                probe.compare([net], net, probe_x.split(2), limit)
            probe.keep([net])
        if epoch:
            for name in convs:
                assert torch.allclose(bounded.velocity[name], whole.velocity[name], atol=1e-6), (epoch, name)
            assert 0 < bounded.batch_bytes <= largest // 3 and bounded.peak_bytes <= limit
        for _ in range(2):  # an epoch of training
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 4, (8,))).backward()
            optimizer.step()
    calls = bounded._calls(net, probe_x[:1])
    micro, groups = probe_module._plan(calls, 2, largest // 3)
    split = [group for group, _ in groups if any(channels != slice(None) for channels in group.values())]
    assert micro == 1 and len(split) >= 3 and all(len(group) == 1 for group in split)
    assert len(probe_module._plan(calls, 2, -1)[1]) == len(convs)  # no bytes left: a whole layer at a time


def _record(net: nn.Module, convs: dict[str, nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out.flatten(2).clone()))
               for n, m in convs.items()]
    training = net.training
    net.eval()
    with torch.no_grad():
        net(x)
    net.train(training)
    for handle in handles:
        handle.remove()
    return outputs


# ---------------------------------------------------------------- sparse update
def test_sparse_update_config_parsing() -> None:
    assert parse_sparse_update({"layers": [-1, -3], "ratios": [1.0, 0.25]}, 6) == {5: 1.0, 3: 0.25}
    assert parse_sparse_update({"layers": [0, 1], "ratios": 0.5}, 6) == {0: 0.5, 1: 0.5}
    assert parse_sparse_update({"-2": "0.5", 1: 1}, 6) == {4: 0.5, 1: 1.0}
    assert parse_sparse_update({"-1": 0.5, "0": 1}, 6) == {5: 0.5, 0: 1.0}
    assert parse_sparse_update([[2, 0.125], [-1, 1]], 6) == {2: 0.125, 5: 1.0}
    for bad, message in [
        ({"layers": [1, 2], "ratios": [0.5]}, "2 layers but 1 ratios"),
        ({"7": 0.5}, "does not exist"),
        ({"1": 1.5}, r"\[0, 1\]"),
        ({"layers": [-1, 5], "ratios": 1.0}, "given twice"),
        ("last three", "sparse update scheme is"),
        ({"x": 0.5}, "bad entry"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_sparse_update(bad, 6)


def test_sparse_update_takes_the_largest_filters_and_auto_fills_the_budget() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 2, 1, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.0, 3.0, 2.0, 0.5]).view(4, 1, 1, 1) * torch.ones(4, 4, 1, 1))
    layers = conv_neurons(net.named_modules())
    masks = sparse_update_masks(layers, parse_sparse_update({"layers": [1, -1], "ratios": [0.5, 1.0]}, 3))
    assert [m.tolist() for m in masks] == [[False] * 4, [False, True, True, False], [True, True]]
    # costs: 1, 4, 4 per neuron; 4 + 16 + 8 = 28 parameters
    assert auto_sparse_update(layers, 8) == {2: 1.0}
    assert auto_sparse_update(layers, 17) == {2: 1.0, 1: 0.5}
    assert auto_sparse_update(layers, 28) == {2: 1.0, 1: 1.0, 0: 1.0}


# ---------------------------------------------------------------- real Trainer runs
class Net(nn.Sequential):
    def __init__(self, width: int = 8, classes: int = 4) -> None:
        super().__init__(
            nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(), nn.MaxPool2d(2)),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, classes),
        )


def data(n_train: int = 128, n_val: int = 64, batch: int = 32, shuffle: bool = True) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n_train + n_val,), generator=g)
    x = torch.randn(n_train + n_val, 3, 12, 12, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() / 4
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch, shuffle=shuffle)
    return train, DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=batch)


def fit(tmp_path: Path, callbacks: list, max_epochs: int = 3, strategy="auto", module=None, ckpt_path=None, **kw):
    train, val = kw.pop("loaders", None) or data()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        strategy=strategy,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )
    module = module or ClassifierModule(Net(), num_classes=4, lr=0.05)
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, module


class FrozenRowsWatch(pl.Callback):
    """Checks, epoch by epoch, that every neuron the budget froze kept its weights bit for bit."""

    def __init__(self, budget: NeuronUpdateBudget) -> None:
        self.budget = budget
        self.checked = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # the epoch's selection is made by now
        self.masks = self.budget.masks
        self.weights = {layer.name: layer.module.weight.detach().clone() for layer in self.budget.layers}

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # before the budget's hook (listed before it)
        for layer in self.budget.layers:
            frozen = ~self.masks[layer.name]
            assert torch.equal(layer.module.weight[frozen], self.weights[layer.name][frozen]), layer.name
            if frozen.any():
                self.checked += 1


@pytest.mark.parametrize("policy", ["velocity", "random", "sparse_update"])
def test_callback_under_backprop(tmp_path: Path, policy: str) -> None:
    budget = NeuronUpdateBudget(policy=policy, budget=0.25, probe_size=16, probe_batch=16)
    watch = FrozenRowsWatch(budget)
    trainer, module = fit(tmp_path, [watch, budget], max_epochs=3)
    history = budget.history
    assert [h["epoch"] for h in history] == [0, 1, 2]
    first = "sparse_update" if policy == "velocity" else policy
    assert [h["policy"] for h in history] == [first] + [policy] * 2
    assert all(0 < h["updated_params"] <= h["budget_params"] for h in history)
    assert history[0]["budget_params"] == int(0.25 * history[0]["total_params"])
    assert watch.checked >= 3
    metrics = trainer.callback_metrics
    assert metrics["neuron_budget/updated_params"] == history[-1]["updated_params"]
    assert "neuron_budget/layer/net.3.0" in metrics
    if policy == "velocity":
        assert history[-1]["probe_bytes"] > 0  # logged each epoch (each comparison plans its own passes)
        # the default probe_memory: a tenth of the step's peak, measured on the epoch's first step
        assert 0 < budget.probe_bytes <= 0.1 * budget.step_peak, (budget.probe_bytes, budget.step_peak)
        # one probe batch of 16 holds twice the tenth's bytes: to fit, each comparison took smaller or shorter
        # passes than one old and one new over the batch
        probe = budget._probe
        assert probe.passes == 3 and probe.forwards > 2 * (probe.passes - 1)
    if policy == "random":
        assert history[1]["layers"] != history[2]["layers"]
    if policy == "sparse_update":
        assert history[0]["layers"] == history[2]["layers"] and history[0]["layers"]["net.0.0"] == 0.0
    # fit is over: the module is whole again
    assert all(p.requires_grad for p in module.parameters())


class SelectionLog(pl.Callback):
    """The budget's selection at the start of every epoch (listed after the budget, which makes it)."""

    def __init__(self, budget: NeuronUpdateBudget) -> None:
        self.budget, self.masks = budget, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.masks.append(torch.cat(list(self.budget.masks.values())))


def test_velocity_under_frozen_statistics_tries_the_neurons_it_knows_nothing_of_before_reselecting_its_own(
        tmp_path: Path) -> None:
    """Under ``norm="frozen"`` only the neurons trained in an epoch move. Their velocity is the only one measured;
    the unmoved neurons are unknown, not still, so the next selection takes them before any neuron trained."""
    budget = NeuronUpdateBudget(policy="velocity", budget=0.25, norm="frozen", probe_size=16, probe_batch=16)
    log = SelectionLog(budget)
    fit(tmp_path, [budget, log], max_epochs=3)
    first, second, third = log.masks
    assert [h["policy"] for h in budget.history] == ["sparse_update", "velocity", "velocity"]
    assert first.any() and second.any() and not (first & second).any()  # SU's own neurons are not chosen again
    measured = torch.cat([budget._probe.measured[name] for name in budget._scope.names])
    assert measured[first | second].all()  # what was trained has moved and is measured
    assert not torch.equal(second, third)


def test_a_neuron_that_stops_moving_keeps_its_velocity_and_one_that_neither_trained_nor_moved_is_unmeasured() -> None:
    """A grouped 1x1 conv: channels 0-1 read input 0, channels 2-3 input 1, which is all zeros (a dead input).
    Epoch 1 trains channels 0-2, epoch 2 channel 0 alone; channel 3 never trains."""
    conv = nn.Conv2d(2, 4, 1, groups=2, bias=False)
    x = torch.randn(4, 2, 2, 2)
    x[:, 1] = 0
    probe = VelocityProbe({"c": conv}, mu=0.5)
    epochs = [[0, 1, 2], [0], [0]]  # each epoch's selection
    make_partial(conv, torch.tensor(epochs[0]))
    probe.measure([conv], conv, [x])  # the first call keeps the selected rows
    velocities = []
    for epoch, rows in enumerate(epochs[:2]):
        with torch.no_grad():  # the epoch's training turns the selected filters
            conv.weight_selected.mul_(-0.5).add_(0.3)
        conv.sync_rows()
        make_partial(conv, torch.tensor(epochs[epoch + 1]))  # the next selection, then compare and keep
        probe.measure([conv], conv, [x])
        velocities.append(probe.velocity["c"].clone())
    assert probe.measured["c"].tolist() == [True, True, True, False]
    assert velocities[1][1] == velocities[0][1] != 0  # channel 1 stood still in epoch 2: not decayed
    assert velocities[0][2].abs() < 1e-6  # trained, yet its output cannot move: measured, velocity 0
    assert probe.velocity["c"][3] == 0 and probe.flat_velocity(["c"])[3].isnan()
    order = velocity_order(probe.flat_velocity(["c"]), torch.ones(4, dtype=torch.int64))
    assert order[0] == 3 and order[-1] == 2  # the unmeasured channel first, the dead one last
    copy = VelocityProbe({"c": conv}, mu=0.5)
    copy.load_state_dict(probe.state_dict(), [conv])
    assert torch.equal(copy.measured["c"], probe.measured["c"])


class StepPeaks(pl.Callback):
    """The budget's measured first step of each epoch (listed after the budget, which measures it)."""

    def __init__(self, budget: NeuronUpdateBudget) -> None:
        self.budget, self.peaks = budget, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.peaks.append(self.budget.step_peak)


@pytest.mark.parametrize("budget_arg, first_epoch", [(0.1, "full"), ("60KB", "random")])
def test_the_probe_holds_a_tenth_of_the_next_step_whatever_selection_it_makes(
        tmp_path: Path, budget_arg: float | str, first_epoch: str) -> None:
    """The probe that chooses the next selection runs before that selection's step is measured; with a fraction
    budget, after velocity's first epoch has trained every neuron (a large step). It holds a tenth of inference's
    peak with the weights counted once, which no step is under, so it stays within a tenth of the next step."""
    budget = NeuronUpdateBudget("velocity", budget=budget_arg, first_epoch=first_epoch, norm="frozen",
                                probe_size=64, probe_batch=16)
    peaks = StepPeaks(budget)
    fit(tmp_path, [budget, peaks], max_epochs=2, module=ClassifierModule(Net(width=16), num_classes=4, lr=0.05))
    first, second = peaks.peaks
    inference = budget.probe_memory.inference_peak
    assert [h["policy"] for h in budget.history] == [first_epoch, "velocity"]
    assert inference < min(first, second)
    if first_epoch == "full":
        assert second < 0.7 * first  # the velocity selection's step is much smaller than the one measured
    probe = budget.history[1]["probe_bytes"]  # the comparison that chose epoch 1's selection
    assert 0.05 * second < probe <= 0.1 * inference < 0.1 * second, (probe, inference, second)


def test_the_probe_reports_what_its_comparison_held_not_the_next_copy_with_its_outputs() -> None:
    """The probe's peak is its comparison's (the copy then, a row set aside, the outputs) or the copy kept
    after it; the next selection's larger copy never existed beside the comparison's outputs."""
    conv = nn.Conv2d(3, 8, 3, bias=False)
    x = torch.randn(4, 3, 6, 6)
    make_partial(conv, torch.tensor([0]))
    probe = VelocityProbe({"c": conv}, mu=0.5)
    probe.measure([conv], conv, [x])  # keeps one row
    small = probe.kept_bytes
    with torch.no_grad():
        conv.weight_selected.add_(0.1)
    probe.compare([conv], conv, [x])
    compared = probe.peak_bytes
    assert compared == small + probe.swap_bytes + probe.batch_bytes and probe.batch_bytes > 0
    conv.sync_rows()
    make_partial(conv, torch.arange(8))  # the next selection: every row
    probe.keep([conv])
    assert probe.kept_bytes > small and probe.peak_bytes == max(compared, probe.kept_bytes)
    assert probe.peak_bytes < probe.kept_bytes + probe.batch_bytes


def test_the_probe_exchanges_only_the_rows_a_pass_reads_a_run_at_a_time_and_restores_them_bit_for_bit() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
    for conv in (net[0], net[2]):
        make_partial(conv, torch.arange(0, 8, 2))
    probe = VelocityProbe({"a": net[0], "b": net[2]})
    probe.keep([net])
    rows = [k for k in probe.snapshot if k.rows is not None]
    calls = probe._calls(net, torch.randn(1, 3, 5, 5))
    assert {id(k.module) for k in probe._read_by(calls, 0) if k.rows is not None} == {id(net[0])}
    assert len(probe._read_by(calls, 1)) == len(probe.snapshot)  # a pass to the last conv reads every row
    with torch.no_grad():
        for conv in (net[0], net[2]):
            conv.weight.add_(1.0)  # an epoch moved the selected rows (and, here, the others too)
            conv.bias.add_(1.0)
    kept = [k.tensor.clone() for k in rows]
    current = [getattr(k.module, k.name).clone() for k in rows]
    for aside in (0, 3 * 2 * rows[0].tensor[0].numel() * 4, 10**9):  # one row, three rows, all at a time
        with kept_state_module.swapped_state(probe.snapshot, aside):
            for k, old, now in zip(rows, kept, current):
                assert torch.equal(getattr(k.module, k.name)[k.rows], old)  # the kept rows in place
                assert torch.equal(getattr(k.module, k.name)[1::2], now[1::2])  # the others untouched
        assert all(torch.equal(getattr(k.module, k.name), now) for k, now in zip(rows, current))
        assert all(torch.equal(k.tensor, old) for k, old in zip(rows, kept))


def test_the_probe_memory_option_holds_in_bytes_and_bad_values_are_refused(tmp_path: Path) -> None:
    for bad, message in [(0.0, "probe_memory"), (1.5, "probe_memory"), (True, "probe_memory"),
                         ("lots", "looks like"), ({"probe_batch": 0}, "probe_batch")]:
        kwargs = bad if isinstance(bad, dict) else {"probe_memory": bad}
        with pytest.raises(ValueError, match=message):
            NeuronUpdateBudget("velocity", 0.25, **kwargs)
    budget = NeuronUpdateBudget("velocity", budget=0.25, probe_size=16, probe_memory="40KB")
    fit(tmp_path, [budget], max_epochs=2)
    assert budget.history[-1]["policy"] == "velocity"
    assert 0 < budget.probe_bytes <= 40_000 < budget.step_peak


def test_a_probe_copy_off_the_device_gives_the_same_velocity_from_a_memory_mapped_file() -> None:
    """The selected rows copied into an unlinked, memory-mapped file: the same velocities, epoch by epoch, as
    the copy on the device; the device holds only the rest, and the state dict restores it off the device."""
    import os

    net, training, on, off, epochs = paired_probes(torch.device("cpu"))
    assert len(epochs) == 2 and all(torch.equal(a[name], b[name]) for a, b in epochs for name in a)
    rows = selected_row_bytes([net])
    assert rows > 0 and off.off_device_bytes == rows and off.kept_bytes == on.kept_bytes - rows
    assert sum(t.numel() * t.element_size() for t in off.tensors()) == off.kept_bytes
    mapped = [k.tensor for k in off.snapshot if k.off_device]
    files = {t.untyped_storage().filename for t in mapped}
    assert len(mapped) == len(files) and all(f and not os.path.exists(f) for f in files)  # mapped, unlinked
    restored = VelocityProbe(off.layers)
    restored.load_state_dict(off.state_dict(), [net], off_device=True)
    assert restored.off_device_bytes == rows and all(
        torch.equal(a.tensor, b.tensor) and a.off_device for a, b in zip(restored.snapshot, off.snapshot) if b.off_device)
    training.release()


@pytest.mark.parametrize("probe_copy", ["auto", "device"])
def test_at_batch_1_the_probe_holds_its_tenth_with_the_rows_off_the_device(tmp_path: Path, probe_copy: str) -> None:
    """At batch 1 a 30 % selection's copy is about a tenth of the step: ``auto`` moves it off the device and
    the probe stays within probe_memory; kept on the device it cannot, and the callback says so."""
    budget = NeuronUpdateBudget("velocity", budget=0.3, probe_size=8, probe_copy=probe_copy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [budget], max_epochs=2, module=ClassifierModule(Net(width=16), num_classes=4, lr=0.05),
            loaders=data(n_train=8, n_val=8, batch=1))
    over = [w for w in caught if "over probe_memory" in str(w.message)]
    rows = sum(k.tensor.numel() * k.tensor.element_size() for k in budget._probe.snapshot if k.rows is not None)
    assert budget.history[-1]["policy"] == "velocity" and rows > 0.05 * budget.step_peak
    if probe_copy == "auto":
        assert budget._probe.off_device_bytes == rows and not over
        assert 0 < budget.probe_bytes <= 0.1 * budget.step_peak, (budget.probe_bytes, budget.step_peak)
    else:
        assert budget._probe.off_device_bytes == 0 and over and budget.probe_bytes > 0.1 * budget.step_peak
    with pytest.raises(ValueError, match="probe_copy"):
        NeuronUpdateBudget("velocity", 0.3, probe_copy="disk")


def test_callback_inside_neuroflux_blocks(tmp_path: Path) -> None:
    budget = NeuronUpdateBudget(policy="velocity", budget=0.3, probe_size=16, first_epoch="random")
    watch = FrozenRowsWatch(budget)
    strategy = NeuroFluxStrategy(memory_budget="1.2MB", epochs_per_block=2, batch_limit=64, cache_dir=tmp_path / "cache")
    trainer, module = fit(tmp_path, [watch, budget], max_epochs=20, strategy=strategy)
    run = trainer.strategy.run
    assert run.finished and run.num_blocks >= 2
    history = budget.history
    blocks = [h["block"] for h in history]
    assert blocks == sorted(blocks) and set(blocks) == set(range(run.num_blocks))
    for block in range(run.num_blocks):
        records = [h for h in history if h["block"] == block]
        assert records[0]["policy"] == "random" and all(h["policy"] == "velocity" for h in records[1:])
        units = run.units_of(block)
        convs = [m for u in units for m in run.units[u].modules() if isinstance(m, nn.Conv2d)]
        assert records[0]["total_params"] == sum(c.weight.numel() + c.bias.numel() for c in convs)  # per block
        assert all(h["updated_params"] <= h["budget_params"] for h in records)
    assert watch.checked >= 2
    assert all(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("policy", ["velocity", "random"])
@pytest.mark.parametrize("at_train_epoch_end", [True, False], ids=["saved_after_epoch_end", "saved_at_validation"])
def test_resume_mid_run_restores_the_selection(tmp_path: Path, policy: str, at_train_epoch_end: bool) -> None:
    # saved at validation, the checkpoint holds the weights after epoch 1 but the callback's state from
    # before that epoch's end: the resumed callback closes epoch 1 itself, from the restored weights
    def run(root: Path, epochs: int, ckpt_path=None) -> NeuronUpdateBudget:
        torch.manual_seed(0)
        budget = NeuronUpdateBudget(policy=policy, budget=0.25, probe_size=16, seed=3)
        checkpoints = ModelCheckpoint(
            dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}",
            save_on_train_epoch_end=at_train_epoch_end,
        )
        fit(root, [budget, checkpoints], max_epochs=epochs, loaders=data(shuffle=False), ckpt_path=ckpt_path,
            module=ClassifierModule(Net(), num_classes=4, lr=0.05))
        return budget

    whole = run(tmp_path / "whole", 4)
    saved = torch.load(tmp_path / "whole" / "ckpt" / "epoch=1.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("NeuronUpdateBudget")]
    assert state["epoch_done"] == (1 if at_train_epoch_end else 0)
    resumed = run(tmp_path / "resumed", 4, ckpt_path=tmp_path / "whole" / "ckpt" / "epoch=1.ckpt")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.history == whole.history  # the same selection, epoch by epoch, after the resume too
    assert all(torch.equal(resumed.masks[k], whole.masks[k]) for k in whole.masks)
    if policy == "velocity":
        for name, velocity in whole.velocity.items():
            assert torch.allclose(resumed.velocity[name], velocity, atol=1e-6)


def test_measured_peak_memory_is_below_full_fine_tuning_at_a_10_percent_budget(tmp_path: Path) -> None:
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 5, (32,))
    loaders = (DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16))

    def peak(update: NeuronUpdateBudget | None) -> int:
        torch.manual_seed(0)
        monitor = PeakMemoryMonitor()  # the project's tracked meter around every training step
        callbacks = [monitor] + ([update] if update is not None else [])
        module = ClassifierModule(create("resnet18", num_classes=5, width_mult=0.125), num_classes=5)
        fit(tmp_path, callbacks, max_epochs=1, module=module, loaders=loaders, enable_checkpointing=False)
        return monitor.peak_bytes

    full = peak(None)
    always = peak(NeuronUpdateBudget("sparse_update", budget=0.1))
    ranged = peak(NeuronUpdateBudget("sparse_update", budget=0.1, norm="range"))
    assert 0 < ranged < always < full
    assert ranged < 0.5 * full  # the backward stops above the frozen bottom


# ---------------------------------------------------------------- nf-train
POLICIES = ["velocity", "random", "sparse_update", "full"]


def test_update_multirun_composes() -> None:
    """``nf-train -m method=bp update=velocity,random,sparse_update,full update.budget=0.1,0.2,0.3 seed=0,1,2``:
    Hydra's own sweeper expands the sweep, and every job's config composes into a NeuronUpdateBudget."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import instantiate

    default = compose_config("train", ["method=bp"])
    assert default["update"] is None and "neuron_budget" not in default.callbacks  # `update` is also a dict method
    sweep = [f"update={','.join(POLICIES)}", "update.budget=0.1,0.2,0.3", "seed=0,1,2"]
    (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(sweep), max_batch_size=None)
    assert len(jobs) == 36
    seen = set()
    for job in jobs:
        cfg = compose_config("train", ["method=bp", *job])
        callback = cfg.callbacks.neuron_budget  # the `update` group lands among the run's callbacks
        assert callback._target_.endswith("NeuronUpdateBudget")
        seen.add((callback.policy, callback.budget, callback.seed))
    assert seen == set(itertools.product(POLICIES, [0.1, 0.2, 0.3], [0, 1, 2]))
    built = instantiate(cfg.callbacks.neuron_budget)
    assert isinstance(built, NeuronUpdateBudget) and (built.policy, built.budget, built.seed) == ("full", 0.3, 2)
    cfg = compose_config("train", ["method=neuroflux", "update=velocity", "update.sparse_update={layers:[-1],ratios:[0.5]}"])
    assert cfg["update"].sparse_update.layers == [-1]
    assert instantiate(cfg.callbacks.neuron_budget).policy == "velocity"


def test_load_pretrained(tmp_path: Path) -> None:
    source = ClassifierModule(create("vgg11", num_classes=5, width_mult=0.125), num_classes=5)
    target = ClassifierModule(create("vgg11", num_classes=10, width_mult=0.125), num_classes=10)
    torch.save(source.net.state_dict(), tmp_path / "net.pt")  # a bare network's state dict: keys without "net."
    report = load_pretrained(target, tmp_path / "net.pt")
    assert report["skipped"] == ["net.classifier.2.bias", "net.classifier.2.weight"]  # 5 classes, not 10
    first = next(k for k in source.net.state_dict() if k.endswith("weight"))
    assert torch.equal(target.net.state_dict()[first], source.net.state_dict()[first])
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "last.ckpt")
    assert load_pretrained(source, tmp_path / "last.ckpt")["skipped"] == []
    torch.save({"other": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="matches"):
        load_pretrained(target, tmp_path / "bad.pt")


@pytest.fixture
def cifar(shared_datasets_dir: Path, data_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NF_DATA_DIR", str(shared_datasets_dir))
    monkeypatch.setenv("NF_CACHE_DIR", str(data_cache_dir))
    return shared_datasets_dir


def test_tiny_nf_train_run_with_an_update_policy_and_a_pretrained_model(tmp_path: Path, cifar: Path) -> None:
    from nf_lightning.cli.train import run

    tiny = [
        "model=vgg11", "model.width_mult=0.125", "data.train_subset=400", "data.val_subset=100", "epochs=2",
        "batch_limit=64", "budget=8MB", "trainer.enable_progress_bar=false", "method=bp",
    ]
    pretrained = ClassifierModule(create("vgg11", num_classes=5, width_mult=0.125), num_classes=5)
    torch.save({"state_dict": pretrained.state_dict()}, tmp_path / "pre.ckpt")
    overrides = [*tiny, "update=velocity", "update.budget=0.2", "update.probe_size=32", f"pretrained={tmp_path / 'pre.ckpt'}"]
    results = run(compose_config("train", overrides), tmp_path / "run")
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["could_run"] and results["final_accuracy"] is not None
    assert written["pretrained"]["loaded"] == len(pretrained.state_dict()) - 2  # all but the 10-class head
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")  # the run's CSV logger
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("neuron_budget/updated_params")]
    assert len(rows) == 2  # one per epoch
    for row in rows:
        assert 0 < float(row["neuron_budget/updated_fraction"]) <= 0.2
        assert float(row["neuron_budget/updated_params"]) <= float(row["neuron_budget/budget_params"])
