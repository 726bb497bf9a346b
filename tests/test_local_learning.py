"""Algorithm 2 steps held to the budget as transactions: retried on smaller pieces, never updated twice."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch import nn

from nf_lightning.core.memory.enforcement import BudgetGuard, update_overhead
from nf_lightning.core.train.local_learning import LocalBlock, shrink, train_with_retry
from nf_lightning.core.memory.meter import TrackedMemoryMeter


def block(optimizer: str = "sgd", channels: tuple[int, int] = (3, 8)) -> LocalBlock:
    torch.manual_seed(0)
    c_in, c = channels
    units = [nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()), nn.Sequential(nn.Conv2d(c, c, 3, padding=1))]
    exits = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)) for _ in units]

    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if optimizer == "adam":
            return torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

    optimizers = [make([*u.parameters(), *e.parameters()]) for u, e in zip(units, exits)]
    return LocalBlock(units, exits, optimizers)


def first_unit(b: LocalBlock) -> LocalBlock:
    return LocalBlock(b.units[:1], b.exits[:1], b.optimizers[:1])


def windows(b: LocalBlock, guard: BudgetGuard, x: torch.Tensor, y: torch.Tensor):
    tracked = [*b.modules(), *b.optimizers, x, y]
    return lambda index, unit_input: guard.unit_step(
        0, index, len(unit_input), [*tracked, unit_input], b.optimizers[index]
    )


def count_updates(b: LocalBlock) -> Counter:
    """Samples each unit's applied updates covered, counted by wrapping the optimizers' step."""
    applied: Counter = Counter()
    for index, optimizer in enumerate(b.optimizers):
        original = optimizer.step

        def step(*args, _index=index, _original=original, **kwargs):
            applied[_index] += _batch[0]
            return _original(*args, **kwargs)

        optimizer.step = step
    _batch = [0]
    original_unit_step = b.unit_step

    def unit_step(index, x, y, before_update=None):
        _batch[0] = len(x)
        return original_unit_step(index, x, y, before_update)

    b.unit_step = unit_step
    return applied


def full_step_peak(b: LocalBlock, x: torch.Tensor, y: torch.Tensor) -> int:
    meter = TrackedMemoryMeter("cpu")
    meter.track(*b.modules(), *b.optimizers, x, y)
    with meter:
        b.unit_step(0, x, y)
    return meter.peak_bytes


def test_an_overrun_is_retried_on_smaller_pieces_and_no_update_applies_twice() -> None:
    b = block()
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    budget = int(full_step_peak(block(), x, y) * 0.8)  # the whole batch no longer fits; a smaller piece does
    guard = BudgetGuard(torch.device("cpu"), budget, full_steps=10**6, sample_every=1)
    applied = count_updates(b)
    before = [p.detach().clone() for p in b.units[1].parameters()]
    shrinks: list[tuple[int, int, int]] = []
    losses = train_with_retry(b, x, y, windows(b, guard, x, y), lambda *event: shrinks.append(event))
    assert shrinks and shrinks[0] == (0, 32, shrink(32))
    assert len(losses) == 2 and all(torch.isfinite(loss) for loss in losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, b.units[1].parameters()))  # later units trained too
    assert applied == Counter({0: 32, 1: 32})  # every sample in exactly one applied update per unit
    assert guard.failed and guard.failed[0].phase == "forward/backward" and guard.failed[0].batch == 32
    assert guard.peak <= budget and not guard.violations


def test_an_update_that_would_not_fit_is_refused_before_it_applies() -> None:
    """The update's own memory (as predicted) does not fit the first time: refused, nothing applied, retried."""
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    b = first_unit(block("adam"))
    guard = BudgetGuard(torch.device("cpu"), 10**9, full_steps=10**6, sample_every=1)
    real = guard.overhead
    calls = []

    def overhead(optimizer):
        calls.append(1)
        return 10**10 if len(calls) == 1 else real(optimizer)  # the first update's prediction does not fit

    guard.overhead = overhead
    applied = count_updates(b)
    weights = [p.detach().clone() for p in b.units[0].parameters()]
    train_with_retry(b, x, y, windows(b, guard, x, y), lambda *event: None)
    assert [(a.phase, a.batch) for a in guard.failed] == [("update refused", 8)]
    assert applied[0] == 8  # the refused update never ran; the two pieces' updates cover the batch once
    assert len(calls) == 3 and not guard.violations
    assert all(not torch.equal(w, p) for w, p in zip(weights, b.units[0].parameters()))


def test_not_even_one_sample_fitting_raises() -> None:
    b = block()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    guard = BudgetGuard(torch.device("cpu"), 1, full_steps=10**6)
    with pytest.raises(torch.OutOfMemoryError):
        train_with_retry(b, x, y, windows(b, guard, x, y), lambda *event: None)
    assert len(guard.failed) >= 3  # 4, 3, 2, 1 all tried


def test_with_batchnorm_no_retried_piece_is_a_single_sample() -> None:
    """BatchNorm on 1x1 features refuses a batch of one: pieces are near-equal and never that small."""
    torch.manual_seed(0)
    units = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8), nn.ReLU())]
    exits = [nn.Sequential(nn.Flatten(), nn.Linear(8, 10))]
    b = LocalBlock(units, exits, [torch.optim.SGD([*units[0].parameters(), *exits[0].parameters()], lr=0.1)])
    sizes: list[int] = []

    @contextlib.contextmanager
    def guard(index, unit_input):
        sizes.append(len(unit_input))
        if len(unit_input) > 2:
            raise torch.OutOfMemoryError("over the budget")
        yield lambda optimizer: None

    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
    losses = train_with_retry(b, x, y, guard, lambda *event: None)
    assert len(losses) == 1 and min(sizes) == 2 and sizes.count(2) == 4  # 8 -> 4 + 4 (too big) -> 2 + 2 each
    with pytest.raises(torch.OutOfMemoryError):  # 5 cannot be cut into pieces of 2 only
        train_with_retry(b, x[:5], y[:5], guard, lambda *event: None)
    assert b.smallest_batch() == 2 and first_unit(block()).smallest_batch() == 1


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_update_overhead_matches_a_measured_real_update(kind: str) -> None:
    b = block(kind)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    optimizer = b.optimizers[0]
    for first in (True, False):
        predicted = update_overhead(optimizer)
        nn.functional.cross_entropy(b.exits[0](b.units[0](x)), y).backward()
        meter = TrackedMemoryMeter("cpu")
        meter.track(*b.modules(), optimizer)
        before = meter.current_bytes()
        with meter:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert predicted == meter.peak_bytes - before, (first, predicted, meter.peak_bytes - before)


def test_sampling_meters_new_batch_sizes_in_full_then_one_in_n() -> None:
    guard = BudgetGuard(torch.device("cpu"), 10**9, full_steps=3, sample_every=4)
    pattern = [guard.next_batch() for _ in range(12)]
    assert pattern == [True, True, True, True, False, False, False, True, False, False, False, True]
    guard.restart()
    assert [guard.next_batch() for _ in range(3)] == [True, True, True]
    with pytest.raises(ValueError):
        BudgetGuard(torch.device("cpu"), 1, sample_every=0)


def test_a_run_with_a_wrong_plan_commits_only_steps_within_the_budget(tmp_path) -> None:
    """The plan says batch 64 fits; it does not. Every step metered: failed attempts counted, no update twice."""
    from torch.utils.data import DataLoader, TensorDataset

    from nf_lightning.core.network.decompose import decompose
    from nf_lightning.core.plan.partitioner import Block
    from nf_lightning.core.plan.training_plan import TrainingPlan
    from nf_lightning.core.exits.aux_heads import build_exits
    from nf_lightning.core.options import NeuroFluxOptions
    from nf_lightning.core.train.run import BlockwiseRun, DataSources

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    parts = decompose(net)
    budget = 900_000
    plan = TrainingPlan(budget=budget, batch_limit=64, rho=0.0, aux_policy="adaptive", input_shape=(3, 16, 16),
                        unit_models=[], blocks=[Block((0, 1), 64, budget)], epochs_per_block=[1])
    recipe = lambda: (torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True,  # noqa: E731
                                      weight_decay=5e-4), [])
    options = NeuroFluxOptions(cache_dir=tmp_path, meter_full_steps=0, meter_sample_every=1)
    run = BlockwiseRun(parts, build_exits(parts, (3, 16, 16)), plan, recipe, options)
    data = TensorDataset(torch.randn(128, 3, 16, 16), torch.randint(0, 10, (128,)))
    run.attach_data(DataSources(DataLoader(data, batch_size=64, shuffle=True), DataLoader(data, batch_size=64)))
    run.start()
    last_batch: dict[int, int] = {}
    applied: Counter = Counter()  # samples each unit's applied updates covered
    steps = 0
    for index, (unit, optimizer) in enumerate(zip(run.active_units, run.optim.optimizers)):
        run.units[unit].register_forward_pre_hook(lambda m, args, _i=index: last_batch.__setitem__(_i, len(args[0])))
        original = optimizer.step

        def step(*args, _i=index, _original=original, **kwargs):
            nonlocal steps
            applied[_i] += last_batch[_i]
            steps += 1
            return _original(*args, **kwargs)

        optimizer.step = step
    with pytest.warns(UserWarning, match="needed more than"):
        run.begin_epoch()
        for x, y in run.train_loader():
            run.train_batch(x, y)
    guard = run.step.guard
    assert guard.failed and run.step.shrinks  # the wrong plan was caught
    assert guard.peak <= budget and not guard.violations  # every committed step within the budget
    assert applied == Counter({0: 128, 1: 128})  # every sample in exactly one applied update per unit
    assert guard.metered_steps == steps  # and each applied update was metered
    assert run.batch_size < 64  # the block's batch size was lowered for the next epochs


def test_a_last_batch_of_one_sample_is_skipped_where_batchnorm_trains() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from nf_lightning.core.network.decompose import decompose
    from nf_lightning.core.options import NeuroFluxOptions
    from nf_lightning.core.train.run import BlockwiseRun, DataSources

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8, 10))  # fmt: skip
    data = TensorDataset(torch.randn(9, 3, 8, 8), torch.randint(0, 10, (9,)))
    run = BlockwiseRun.create(decompose(net), lambda: (torch.optim.SGD(net.parameters(), lr=0.1), []), (3, 8, 8),
                              budget=10**8, options=NeuroFluxOptions(cache=False))  # fmt: skip
    run.attach_data(DataSources(DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)))
    run.start()
    run.begin_epoch()
    x, y = data.tensors
    weights = [p.detach().clone() for p in net.parameters()]
    with pytest.warns(UserWarning, match="skipping a training batch of 1 sample"):
        assert run.train_batch(x[:1], y[:1]) == []
    assert all(torch.equal(w, p) for w, p in zip(weights, net.parameters()))
    assert len(run.train_batch(x[:2], y[:2])) == len(run.active_units)
