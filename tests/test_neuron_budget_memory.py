"""Budgeted neuron updates that save memory: partial convs against the old freeze-and-restore trajectory,
gradients and optimizer state of the selected channels only, reselection, state-dict keys, the bytes a
selection keeps (counted tensor by tensor), byte budgets and the guard, and measured peaks against the floor."""

from __future__ import annotations

import copy
import doctest
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nf_lightning.core.memory.meter import TrackedMemoryMeter
from nf_lightning.models import create
from nf_lightning.neuron_budget import budget as budget_module
from nf_lightning.neuron_budget import partial as partial_module
from nf_lightning.neuron_budget import trainable as trainable_module
from nf_lightning.neuron_budget.budget import NeuronBytes, fill_bytes, inference_profile, parse_bytes, trace_layers
from nf_lightning.neuron_budget.selection import (
    conv_neurons,
    masks_params,
    neuron_costs,
    velocity_order,
    velocity_per_byte_order,
)
from nf_lightning.neuron_budget.selector import Selector
from nf_lightning.neuron_budget.trainable import SelectiveTraining, activations_of, norms_to_freeze

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
}


@pytest.mark.parametrize("module", [budget_module, partial_module, trainable_module])
def test_docstring_examples(module) -> None:
    assert doctest.testmod(module).failed == 0


def test_only_the_callback_imports_lightning() -> None:
    """Read, not run (``import nf_lightning`` loads Lightning): the package's pure parts import none of it."""
    import ast

    package = Path(__file__).resolve().parents[1] / "nf_lightning" / "neuron_budget"
    importers = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])  # fmt: skip
            if any(n.split(".")[0] in ("lightning", "pytorch_lightning") or n.startswith("nf_lightning.lightning")
                   for n in names):  # fmt: skip
                importers.add(path.name)
    assert importers == {"callback.py"}


def small_net() -> nn.Sequential:
    """Convs with bias, a depthwise conv, BatchNorms, ReLU6, a max-pool and a Linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def convs_of(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def random_masks(net: nn.Module, fraction: float, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = [torch.rand(c.out_channels, generator=generator) < fraction for c in convs_of(net)]
    masks[0][:] = False  # the first conv frozen entirely
    return masks


def reference_step(net: nn.Module, optimizer: torch.optim.Optimizer, masks: list[torch.Tensor], loss) -> None:
    """The old mechanism: frozen rows' gradients zeroed, their weights and state written back after the step."""
    loss.backward()
    convs = convs_of(net)
    saved = []
    for conv, mask in zip(convs, masks):
        for p in (conv.weight, conv.bias):
            if p is None:
                continue
            if not mask.any():
                p.grad = None
            else:
                p.grad[~mask] = 0
            state = {k: v[~mask].clone() for k, v in optimizer.state.get(p, {}).items() if v.ndim}
            saved.append((p, mask, p.detach()[~mask].clone(), state))
    optimizer.step()
    with torch.no_grad():
        for p, mask, rows, state in saved:
            p[~mask] = rows
            for key, value in optimizer.state.get(p, {}).items():
                if value.ndim:
                    value[~mask] = state[key] if key in state else 0
    optimizer.zero_grad()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("model", ["small", "resnet18"])
def test_training_follows_the_old_mechanisms_trajectory(name: str, model: str) -> None:
    torch.manual_seed(0)
    net = small_net() if model == "small" else create("resnet18", num_classes=4, width_mult=0.125)
    ours, theirs = copy.deepcopy(net), copy.deepcopy(net)
    masks = random_masks(net, 0.4)
    opt_ours, opt_theirs = OPTIMIZERS[name](ours.parameters()), OPTIMIZERS[name](theirs.parameters())
    training = SelectiveTraining()
    activations = [m for m in ours.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    training.apply(dict(zip(convs_of(ours), masks)), [opt_ours], activations=activations)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for step in range(5):
        loss_ours = nn.functional.cross_entropy(ours(x + step / 10), y)
        loss_ours.backward()
        opt_ours.step()
        opt_ours.zero_grad()
        loss_theirs = nn.functional.cross_entropy(theirs(x + step / 10), y)
        reference_step(theirs, opt_theirs, masks, loss_theirs)
        assert float(loss_ours) == pytest.approx(float(loss_theirs), abs=1e-5), step
    state_ours, state_theirs = ours.state_dict(), theirs.state_dict()
    assert list(state_ours) == list(state_theirs)  # the same keys, in the same order
    for key, value in state_theirs.items():
        assert torch.allclose(state_ours[key].float(), value.float(), atol=1e-5), key
    training.release()
    assert all(type(c) is nn.Conv2d for c in convs_of(ours)) and all(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "adamw_amsgrad"])
def test_frozen_channels_stay_bit_identical_and_have_no_gradient_or_state(name: str) -> None:
    make = OPTIMIZERS.get(name, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True))
    torch.manual_seed(0)
    net = small_net()
    optimizer = make(net.parameters())
    masks = random_masks(net, 0.5)
    before = [c.weight.detach().clone() for c in convs_of(net)]
    SelectiveTraining().apply(dict(zip(convs_of(net), masks)), [optimizer])
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for step in range(30):
        nn.functional.cross_entropy(net(x * (1 + step / 10)), y).backward()
        for conv, mask in zip(convs_of(net), masks):  # gradients exist for the selected channels only
            k = int(mask.sum())
            grad = conv.weight_selected.grad
            assert (grad is None) if k == 0 else grad.shape == (k, *conv.weight.shape[1:])
            assert conv.weight.grad is None  # the full weight is a buffer
        optimizer.step()
        optimizer.zero_grad()
    for conv, mask, old in zip(convs_of(net), masks, before):
        assert torch.equal(conv.weight[~mask], old[~mask])
        assert not mask.any() or not torch.equal(conv.weight[mask], old[mask])
        state = optimizer.state.get(conv.weight_selected, {})
        sizes = {k: v.shape[0] for k, v in state.items() if v.ndim}
        assert all(size == int(mask.sum()) for size in sizes.values()) and (bool(sizes) == bool(mask.any()))
    state_numel = sum(v.numel() for s in optimizer.state.values() for v in s.values() if v.ndim)
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    per_param = {"sgd_momentum": 1, "adam": 2, "adamw_amsgrad": 3}[name]
    assert state_numel == per_param * trained  # state for the selected channels (and BN, head) alone


def test_reselection_keeps_the_state_of_the_channels_that_stay() -> None:
    torch.manual_seed(0)
    net = small_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    conv = net[7]
    training = SelectiveTraining()
    first = torch.tensor([True, True, False, False, True, False, True, False] * 2)
    training.apply({conv: first}, [optimizer])
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for _ in range(3):
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    old = {k: v.clone() for k, v in optimizer.state[conv.weight_selected].items()}
    old_rows = first.nonzero().flatten().tolist()
    second = torch.tensor([True, False, True, False, True, True, False, False] * 2)
    training.apply({conv: second}, [optimizer])
    new = optimizer.state[conv.weight_selected]
    assert any(p is conv.weight_selected for g in optimizer.param_groups for p in g["params"])
    for position, row in enumerate(second.nonzero().flatten().tolist()):
        for key in ("exp_avg", "exp_avg_sq"):
            expected = old[key][old_rows.index(row)] if row in old_rows else torch.zeros_like(new[key][0])
            assert torch.equal(new[key][position], expected), (row, key)
    assert torch.equal(new["step"], old["step"])
    nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()  # the carried state is usable
    assert torch.equal(conv.weight.index_select(0, conv.selected_rows), conv.weight_selected.detach())


def test_a_new_selection_keeps_the_layers_that_save_memory() -> None:
    """Re-applying (every epoch) leaves the activations and frozen norms swapped: the same bytes are kept."""
    torch.manual_seed(0)
    net = create("mobilenetv2", num_classes=4, width_mult=0.25)
    x = torch.randn(4, 3, 32, 32)
    masks = random_masks(net, 0.2)
    install(net, masks, "range")
    first = saved_bytes(net, x)
    install(net, masks, "range")
    assert saved_bytes(net, x) == first
    assert all(type(m).__name__.startswith("Mask") for m in net.modules() if isinstance(m, (nn.ReLU, nn.ReLU6)))


def test_state_dict_keys_stay_and_loading_reaches_the_selected_rows() -> None:
    torch.manual_seed(0)
    net, plain = small_net(), small_net()
    keys = list(net.state_dict())
    SelectiveTraining().apply(dict(zip(convs_of(net), random_masks(net, 0.5))), [])
    assert list(net.state_dict()) == keys
    net.load_state_dict(plain.state_dict())  # strict: no key missing, none unexpected
    for conv, other in zip(convs_of(net), convs_of(plain)):
        assert torch.equal(conv.weight, other.weight)
        assert torch.equal(conv.weight_selected, other.weight.index_select(0, conv.selected_rows))


def saved_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass (each storage once; parameters, buffers and the input excluded)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    known = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers(), x]}
    return sum(n for ptr, n in saved.items() if ptr not in known)


_TRAINING: dict[int, SelectiveTraining] = {}


def install(net: nn.Module, masks: list[torch.Tensor], norm: str, optimizer=None) -> None:
    """The selection in ``net`` as the callback puts it there (one SelectiveTraining per net, as per callback)."""
    modules, by_conv = list(net.modules()), dict(zip(convs_of(net), masks))
    training = _TRAINING.setdefault(id(net), SelectiveTraining())
    training.apply(by_conv, [optimizer] if optimizer else [], norms_to_freeze(modules, by_conv, norm),
                   activations_of(modules))


def test_the_probe_keeps_no_statistics_of_a_frozen_batchnorm_which_training_leaves_as_they_are() -> None:
    from nf_lightning.neuron_budget.partial import AffineBatchNorm2d
    from nf_lightning.neuron_budget.probe import VelocityProbe

    torch.manual_seed(0)
    net = create("mobilenetv2", num_classes=4, width_mult=0.25)
    install(net, random_masks(net, 0.1, seed=3), "frozen", optimizer := torch.optim.SGD(net.parameters(), lr=0.1))
    frozen = [m for m in net.modules() if isinstance(m, AffineBatchNorm2d)]
    statistics = [b.clone() for m in frozen for b in m.buffers()]
    probe = VelocityProbe({n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)})
    probe.keep([net])
    assert frozen and not any(isinstance(k.module, AffineBatchNorm2d) for k in probe.snapshot)
    net.train()
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 4, (8,))).backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(statistics, [b for m in frozen for b in m.buffers()]))
    probe.compare([net], net, [torch.randn(4, 3, 32, 32)])
    assert all(v.isfinite().all() for v in probe.velocity.values())


@pytest.mark.parametrize("norm", ["always", "range", "frozen"])
@pytest.mark.parametrize("model", ["small", "resnet18", "mobilenetv2"])
def test_the_bytes_a_selection_keeps_are_what_autograd_keeps(model: str, norm: str) -> None:
    torch.manual_seed(0)
    net = {"small": small_net, "resnet18": lambda: create("resnet18", num_classes=4, width_mult=0.125),
           "mobilenetv2": lambda: create("mobilenetv2", num_classes=4, width_mult=0.25)}[model]()
    net.eval()  # no dropout mask: the same forward pass as the trace
    x = torch.randn(4, 3, 32, 32)
    trace = trace_layers(net, x[:1])
    for fraction, first in [(0.3, False), (0.1, True)]:
        masks = random_masks(net, fraction, seed=3)
        masks[0][:] = first
        candidate = copy.deepcopy(net)
        install(candidate, masks, norm)
        costs = NeuronBytes(trace_layers(candidate, x[:1]), convs_of(candidate), 4, norm, state_tensors=1)
        activations = sum(a + b for a, b in costs._kept([int(m.sum()) for m in masks]))
        assert saved_bytes(candidate, x) == pytest.approx(activations, rel=0.01, abs=2048), (fraction, first)
    assert len(trace) > len(convs_of(net))


def test_a_byte_selection_is_non_empty_grows_with_the_budget_and_never_exceeds_it() -> None:
    net = create("resnet18", num_classes=4, width_mult=0.125)
    costs = NeuronBytes(trace_layers(net, torch.randn(1, 3, 32, 32)), convs_of(net), 64, "frozen", state_tensors=1)
    neurons = sum(c.out_channels for c in convs_of(net))
    for seed in range(3):
        order = torch.randperm(neurons, generator=torch.Generator().manual_seed(seed))
        used, counts = [], []
        for budget in ["0.5MB", "1MB", "2MB", "4MB", "8MB", "16MB", "32MB"]:
            masks = fill_bytes(order, costs, parse_bytes(budget))
            counts.append(sum(int(m.sum()) for m in masks))
            used.append(costs.selection_bytes(masks))
            assert counts[-1] > 0 and used[-1] <= parse_bytes(budget)
        # the bytes used grow with the budget (the count can dip: a larger budget can afford a big layer's
        # input early in the order, which leaves room for fewer neurons), and a budget beyond the whole
        # network's needs takes every neuron
        assert used == sorted(used) and used[0] < used[-1]
        assert counts[-1] == neurons and counts[-2] > counts[0]
        # the first neuron of a layer pays its input: not a prefix of the order
        small = torch.cat(fill_bytes(order, costs, parse_bytes("1MB")))
        assert not small[order[: int(small.sum())]].all()


def test_velocity_under_a_byte_budget_ranks_per_byte_and_tries_unknown_neurons_where_they_are_cheap() -> None:
    """In bytes a neuron of the first conv is dear (it keeps the image batch) though its row is small. Per
    parameter it ranks first; per byte it does not. Neurons nothing is known of are tried where they are cheap:
    a budget then holds many times the parameters it holds in a random order (which the old rule, unknown
    neurons first in a random order, was)."""
    net = create("resnet18", num_classes=4, width_mult=0.125)
    layers = conv_neurons(net.named_modules())
    costs = NeuronBytes(trace_layers(net, torch.randn(1, 3, 32, 32)), [layer.module for layer in layers], 64,
                        "frozen", state_tensors=1)
    per_byte, per_param = costs.neuron_bytes(), neuron_costs(layers)
    first = layers[0].out_channels
    assert per_byte[:first].min() > 4 * per_byte.median() and per_param[:first].max() < per_param.median()
    velocity = torch.ones(len(per_byte))
    velocity[0] = 5.0  # the fastest neuron, in the first conv
    by_byte = velocity_per_byte_order(velocity, per_byte, torch.Generator().manual_seed(0))
    assert velocity_order(velocity, per_param)[0] == 0 and int((by_byte == 0).nonzero()) > len(by_byte) // 2
    budget = parse_bytes("4MB")
    unknown = torch.full((len(per_byte),), float("nan"))
    masks = Selector(budget_bytes=budget, seed=0).select("velocity", layers, costs, unknown)
    chosen = torch.cat(masks)
    assert 0 < costs.selection_bytes(masks) <= budget
    assert per_byte[chosen].mean() < per_byte[~chosen].mean()
    shuffled = fill_bytes(velocity_order(unknown, per_param, torch.Generator().manual_seed(0)), costs, budget)
    params = [masks_params(layers, m) for m in (masks, shuffled)]
    assert params[0] > 5 * params[1], params


def measured_peak(net: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """The tracked meter's peak of one training step (after a first one), and the bytes live before it."""

    def step() -> None:
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    meter = TrackedMemoryMeter("cpu")
    meter.track(net, optimizer, x, y)
    before = meter.current_bytes()
    with meter:
        step()
    return meter.peak_bytes, before


def inference_peak(net: nn.Module, x: torch.Tensor) -> int:
    meter = TrackedMemoryMeter("cpu")
    meter.track(net, x)
    with meter, torch.no_grad():
        net(x)
    return meter.peak_bytes


@pytest.mark.parametrize("norm", ["always", "frozen"])
def test_the_measured_peak_is_within_10_percent_of_the_computed_floor(norm: str) -> None:
    torch.manual_seed(0)
    net = create("resnet18", num_classes=4, width_mult=0.125)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,))
    weights = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    inference = inference_peak(net, x)
    full_peak, _ = measured_peak(copy.deepcopy(net), torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), x, y)
    masks = random_masks(net, 0.2, seed=5)
    install(net, masks, norm, optimizer := torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
    peak, _ = measured_peak(net, optimizer, x, y)
    costs = NeuronBytes(trace_layers(net, x[:1]), convs_of(net), 32, norm, state_tensors=1)
    floor = max(inference, weights + x.numel() * 4 + y.numel() * 8 + costs.peak_bytes([int(m.sum()) for m in masks]))
    assert floor <= peak * 1.02 and peak <= floor * 1.10, (peak, floor)
    if norm == "frozen":
        assert peak < 0.6 * full_peak


def test_the_floor_counts_once_a_kept_input_that_inference_still_holds() -> None:
    """A stage's input stays referenced by the callers' arguments all through the stage, so the first conv
    keeping it for its weight gradient adds nothing: with the profile's liveness the floor meets the measured
    peak, where by the last reading layer alone it counts that input twice (batch 64, frozen statistics)."""
    torch.manual_seed(0)
    net = create("resnet18", num_classes=4, width_mult=0.125)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 4, (64,))
    masks = random_masks(net, 0.2, seed=5)
    install(net, masks, "frozen", optimizer := torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
    peak, before = measured_peak(net, optimizer, x, y)
    trace = trace_layers(net, x[:1])
    counts = [int(m.sum()) for m in masks]
    profile = inference_profile(net, x, trace)
    floor = NeuronBytes(trace, convs_of(net), 64, "frozen", 1, working=profile).peak_bytes(counts)
    weights = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    floor += weights + x.numel() * 4 + y.numel() * 8
    assert abs(floor - peak) <= 0.02 * peak, (peak, floor)
    first = next(t for t in trace if t.module is dict(net.named_modules())["stages.0.0.residual.0.0"])
    assert masks[convs_of(net).index(first.module)].any()  # it keeps its input, the stage's
    last_reader = max(t.order for t in trace if t.source == first.source)
    assert all(first.source in alive for alive in profile.alive[last_reader + 1: last_reader + 8])


def test_a_byte_budget_holds_every_step_through_the_guard(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from nf_lightning.lightning.classifier import ClassifierModule
    from nf_lightning.neuron_budget.callback import NeuronUpdateBudget
    from nf_lightning.neuron_budget.kept_state import fixed_copy_bytes

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 32, 32, generator=g), torch.randint(0, 4, (96,), generator=g)
    train, val = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16), DataLoader(TensorDataset(x[64:], y[64:]), 16)
    grown = []
    with pytest.raises(ValueError, match="probe's copy"):
        NeuronUpdateBudget("velocity", "0.5MB").selector.select("random", [], None, reserve=700_000)
    for budget in ["1.5MB", "3MB"]:
        torch.manual_seed(0)
        update = NeuronUpdateBudget("velocity", budget, norm="frozen", first_epoch="random", probe_size=16)
        module = ClassifierModule(create("resnet18", num_classes=4, width_mult=0.125), num_classes=4, lr=0.05)
        trainer = pl.Trainer(max_epochs=2, callbacks=[update], accelerator="cpu", logger=False,
                             enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0)
        trainer.fit(module, train, val)
        guard = update.guard
        assert guard.metered_steps == 8 and not guard.violations and not guard.failed
        assert guard.peak <= guard.budget  # inference's peak + the byte budget, probe copy counted
        # the selection's price includes the probe's copy of its rows; the rest of the copy is reserved
        reserve = fixed_copy_bytes([module])
        assert all(h["selection_bytes"] + reserve <= parse_bytes(budget) for h in update.history)
        whole = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        rows = sum(k.tensor.numel() * k.tensor.element_size() for k in update._probe.snapshot if k.rows is not None)
        # the copy holds the selected rows, not every weight
        assert 0 < rows < 0.9 * whole and update._probe.kept_bytes <= rows + reserve
        assert [h["policy"] for h in update.history] == ["random", "velocity"]
        assert update.history[-1]["updated_neurons"] > 0
        grown.append(update.history[-1]["selection_bytes"])
    assert grown[1] > grown[0]


@pytest.mark.parametrize("model", ["resnet18", "mobilenetv2"])
def test_stock_full_fine_tuning_keeps_what_the_stock_model_says(model: str) -> None:
    torch.manual_seed(0)
    net = create(model, num_classes=4, width_mult=0.25 if model == "mobilenetv2" else 0.125)
    net.eval()
    x = torch.randn(4, 3, 32, 32)
    convs = convs_of(net)
    costs = NeuronBytes(trace_layers(net, x[:1]), convs, 4, "always", state_tensors=1, stock=True)
    kept = sum(a + b for a, b in costs._kept([c.out_channels for c in convs]))
    assert saved_bytes(net, x) == pytest.approx(kept, rel=0.01)
