"""Profiler: linear memory models, profiling on fake tensors, and predictions against real steps."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from nf_lightning import models
from nf_lightning.core.exits.aux_heads import build_aux_heads
from nf_lightning.core.network.decompose import decompose
from nf_lightning.core.memory.profiler import (
    LinearMemoryModel,
    profile_backprop,
    profile_inference,
    profile_unit,
    profile_units,
)

FLOAT = 4
SHAPE = (3, 16, 16)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread() -> Iterator[None]:
    """Real CPU steps on one thread: on a busy machine, OpenMP threads waiting for each
    other at barriers slow them down tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv_unit(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))


def aux_head(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)
    )


def nbytes(*modules: nn.Module, buffers: bool = False) -> int:
    tensors = [t for m in modules for t in (m.buffers() if buffers else m.parameters())]
    return sum(t.numel() * t.element_size() for t in tensors)


class TestLinearMemoryModel:
    def test_fit_is_least_squares_on_the_upper_half_with_a_floor(self) -> None:
        samples = [(2, 500), (4, 520), (8, 900), (16, 1700), (32, 3250)]
        fit = LinearMemoryModel.fit(samples, static_bytes=0, input_bytes_per_sample=0)
        # least squares through batches 8, 16, 32 only
        assert fit.slope == pytest.approx(97.767857142857, rel=1e-9)
        assert fit.floor == 500 and fit.predict(1) == 500 and fit.predict(2) == 500
        worst = max(abs(fit.predict(b) - p) / p for b, p in samples)
        assert fit.rel_error == pytest.approx(worst)
        exact = LinearMemoryModel.fit([(2, 250), (4, 450), (8, 850)], static_bytes=0, input_bytes_per_sample=0)
        assert (exact.slope, exact.rel_error) == (100, pytest.approx(0, abs=1e-12))
        assert exact.predict(10) == pytest.approx(1050)

    def test_fit_needs_two_batch_sizes(self) -> None:
        with pytest.raises(ValueError, match="two or more batch sizes"):
            LinearMemoryModel.fit([(4, 100), (4, 120)], static_bytes=0, input_bytes_per_sample=0)

    def test_max_batch_is_the_largest_that_fits(self) -> None:
        fit = LinearMemoryModel(100.0, 100.0, 0.0, [], 0, 0)
        assert [fit.max_batch(budget) for budget in (1100, 1099, 200, 199)] == [10, 9, 1, 0]
        flat = LinearMemoryModel(0.0, 500.0, 0.0, [], 0, 0)
        assert (flat.max_batch(500), flat.max_batch(499)) == (sys.maxsize, 0)

    def test_round_trips_through_json(self) -> None:
        fit = LinearMemoryModel.fit([(2, 250), (4, 450), (8, 860)], static_bytes=64, input_bytes_per_sample=12)
        assert LinearMemoryModel.from_dict(json.loads(json.dumps(fit.to_dict()))) == fit


def test_fake_profile_equals_a_real_one() -> None:
    unit, aux = conv_unit(3, 8), aux_head(8)
    fake = profile_unit(unit, aux, SHAPE, batch_sizes=(2, 4, 8), fake=True)
    real = profile_unit(unit, aux, SHAPE, batch_sizes=(2, 4, 8), fake=False)
    assert fake == real
    assert fake.rel_error < 1e-6
    assert fake.input_bytes_per_sample == 3 * 16 * 16 * FLOAT


def test_static_bytes_are_params_grads_optimizer_state_and_buffers() -> None:
    unit, aux = conv_unit(3, 8), aux_head(8)
    params, buffers = nbytes(unit, aux), nbytes(unit, aux, buffers=True)
    sgd = profile_unit(unit, aux, SHAPE, batch_sizes=(1, 2))
    assert sgd.static_bytes == 3 * params + buffers  # momentum: one buffer per parameter
    adam = profile_unit(unit, aux, SHAPE, batch_sizes=(1, 2), optimizer_factory=torch.optim.Adam)
    steps = FLOAT * sum(1 for m in (unit, aux) for _ in m.parameters())  # one scalar `step` per parameter
    assert adam.static_bytes == 4 * params + buffers + steps


def test_measured_peak_holds_the_optimizer_state() -> None:
    unit, aux = conv_unit(3, 8), aux_head(8)
    momentum = profile_unit(unit, aux, SHAPE, batch_sizes=(2, 4))
    plain = profile_unit(unit, aux, SHAPE, batch_sizes=(2, 4), optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    assert [m - p for (_, m), (_, p) in zip(momentum.samples, plain.samples)] == [nbytes(unit, aux)] * 2


def test_profiling_leaves_the_users_modules_untouched() -> None:
    unit, aux = conv_unit(3, 8), aux_head(8)
    unit[0].bias.requires_grad_(False)
    aux.eval()
    before = {name: t.clone() for name, t in [*unit.state_dict().items(), *aux.state_dict().items()]}
    flags = [(p.requires_grad, p.grad) for p in [*unit.parameters(), *aux.parameters()]]
    modes = [m.training for m in [*unit.modules(), *aux.modules()]]
    for fake in (True, False):
        profile_unit(unit, aux, SHAPE, batch_sizes=(2, 4), fake=fake)
        profile_inference(unit, SHAPE, batch_sizes=(2, 4), fake=fake)
    after = {**unit.state_dict(), **aux.state_dict()}
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert flags == [(p.requires_grad, p.grad) for p in [*unit.parameters(), *aux.parameters()]]
    assert modes == [m.training for m in [*unit.modules(), *aux.modules()]]


def test_profile_units_feeds_each_unit_the_previous_output_shape() -> None:
    units = [conv_unit(3, 8), conv_unit(8, 16), conv_unit(16, 16)]
    head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 10))
    fits = profile_units(units, [aux_head(8), aux_head(16)], head, SHAPE, batch_sizes=(2, 4))
    assert [f.input_bytes_per_sample for f in fits] == [FLOAT * n for n in (3 * 16 * 16, 8 * 8 * 8, 16 * 4 * 4)]
    assert fits[-1].static_bytes == 3 * nbytes(units[-1], head) + nbytes(units[-1], buffers=True)
    with pytest.raises(ValueError, match="3 units need 2 aux heads, got 1"):
        profile_units(units, [aux_head(8)], head, SHAPE)


def test_profile_backprop_trains_the_whole_model() -> None:
    model = nn.Sequential(conv_unit(3, 8), conv_unit(8, 16), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    fit = profile_backprop(model, SHAPE, batch_sizes=(2, 4, 8))
    assert fit.static_bytes == 3 * nbytes(model) + nbytes(model, buffers=True)
    assert fit.rel_error < 1e-6


def test_profile_inference_of_a_linear_layer_by_hand() -> None:
    fit = profile_inference(nn.Linear(100, 10), (100,), batch_sizes=(1, 2, 4))
    assert fit.static_bytes == (100 * 10 + 10) * FLOAT
    assert (fit.slope, fit.intercept) == pytest.approx(((100 + 10) * FLOAT, fit.static_bytes))  # input + output


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "mobilenetv2"])
def test_fake_fits_predict_real_cpu_steps_at_unseen_batch_sizes(name: str) -> None:
    """Fit on fake steps at batch 2, 4, 8; measure real CPU steps at 6 and 12: within 10%."""
    torch.manual_seed(0)
    shape = (3, 32, 32)
    model = models.create(name, num_classes=10, width_mult=0.125)
    parts = decompose(model)
    aux_heads = build_aux_heads(parts.units, 10, shape, policy="adaptive")
    fits = profile_units(parts.units, aux_heads, parts.head, shape, batch_sizes=(2, 4, 8))
    real = profile_units(parts.units, aux_heads, parts.head, shape, batch_sizes=(6, 12), fake=False)
    fits.append(profile_backprop(model, shape, batch_sizes=(2, 4, 8)))
    real.append(profile_backprop(model, shape, batch_sizes=(6, 12), fake=False))
    labels = [f"unit {i}" for i in range(len(parts.units))] + ["BP"]
    for label, fit, measured in zip(labels, fits, real, strict=True):
        for batch, peak in measured.samples:
            assert abs(fit.predict(batch) - peak) / peak < 0.10, f"{name} {label} at batch {batch}"


OPTIMIZERS = ["SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad", "Adadelta", "RMSprop", "ASGD", "Rprop",
              "Adafactor"]  # fmt: skip


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_profilers_optimizer_is_the_recipes_class_with_its_settings(name: str) -> None:
    """Rebuilt from the recipe's first group, which also holds keys the class sets itself (AdamW, NAdam, RAdam)."""
    from nf_lightning.core.train.optim_recipe import optimizer_factory

    cls = getattr(torch.optim, name)
    template = cls([nn.Parameter(torch.ones(3))], lr=0.0123)
    template.param_groups[0]["my_tag"] = "user's own key"  # what users and schedulers add to groups
    built = optimizer_factory(lambda: (template, []))([nn.Parameter(torch.ones(4))])
    assert type(built) is cls and built.defaults == template.defaults
