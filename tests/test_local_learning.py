"""Algorithm 2 steps and the shrink-and-retry path that holds a step to the budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nf_lightning.core.local_learning import LocalBlock, shrink, train_with_retry
from nf_lightning.core.memory import TrackedMemoryMeter


def block() -> LocalBlock:
    torch.manual_seed(0)
    units = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))]
    exits = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)) for _ in units]
    optimizers = [torch.optim.SGD([*u.parameters(), *e.parameters()], lr=0.1) for u, e in zip(units, exits)]
    return LocalBlock(units, exits, optimizers)


def test_budget_overrun_is_retried_on_smaller_pieces() -> None:
    b = block()
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))

    def guard(limit: int) -> TrackedMemoryMeter:
        meter = TrackedMemoryMeter("cpu", limit=limit)
        meter.track(*b.modules(), *b.optimizers)
        return meter

    with guard(10**9) as free:  # measure the full batch's peak without a limit
        b.unit_step(0, x, y)
    limit = int(free.peak_bytes * 0.8)  # the whole batch no longer fits; a smaller piece does
    before = [p.detach().clone() for p in b.units[1].parameters()]
    shrinks: list[tuple[int, int, int]] = []
    losses = train_with_retry(b, x, y, lambda: guard(limit), lambda *event: shrinks.append(event))
    assert shrinks and shrinks[0][0] == 0 and shrinks[0][1] == 32 and shrinks[0][2] == shrink(32)
    assert len(losses) == 2 and all(torch.isfinite(loss) for loss in losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, b.units[1].parameters()))  # later units trained too


def test_not_even_one_sample_fitting_raises() -> None:
    b = block()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    with pytest.raises(torch.OutOfMemoryError):
        train_with_retry(b, x, y, lambda: TrackedMemoryMeter("cpu", limit=1), lambda *event: None)
