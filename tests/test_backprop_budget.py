"""BP held to the budget by NeuroFlux's meter and rule: ``BudgetedBackpropStrategy`` in real Trainer runs."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nf_lightning import BudgetedBackpropStrategy, MemoryProfiler
from nf_lightning.lightning.backprop_batch import backprop_step_peak
from nf_lightning.testing.demo import PlainClassifier, loaders, trainer


class NoNormClassifier(PlainClassifier):
    """No BatchNorm, no momentum: one step's update is the same whether the batch is cut into pieces or not."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def budget_for(module: pl.LightningModule, batch: int) -> int:
    """The measured peak of one BP step of ``module`` at ``batch`` (what nf-train sizes BP by), plus 1 %."""
    return int(backprop_step_peak(copy.deepcopy(module), (3, 16, 16), batch, sgd) * 1.01)


def test_steps_that_fit_are_metered_on_neurofluxs_schedule_and_stay_under_the_budget(tmp_path: Path) -> None:
    module = PlainClassifier()
    budget = budget_for(module, 32)
    strategy = BudgetedBackpropStrategy(memory_budget=budget, meter_full_steps=3, meter_sample_every=4)
    train, val = loaders(n_train=32 * 11)
    trainer(tmp_path, strategy, max_epochs=1, enable_checkpointing=False).fit(module, train, val)
    guard = strategy.guard
    # steps 0-2 in full, then steps 3, 7 of the remaining 8: 5 metered, 6 not
    assert (guard.metered_steps, guard.unmetered_steps) == (5, 6)
    assert 0 < guard.peak <= budget
    assert guard.failed == [] and guard.violations == [] and strategy.pieces == 1


def test_a_batch_over_the_budget_is_refused_then_cut_into_pieces_with_no_update_applied_twice(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = NoNormClassifier()
    reference = copy.deepcopy(module)
    budget = budget_for(module, 16)  # the loader brings 64; pieces of 16 or fewer fit (the whole batch stays alive)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    strategy = BudgetedBackpropStrategy(memory_budget=budget, meter_sample_every=1)
    profiler = MemoryProfiler()
    with pytest.warns(UserWarning, match="retrying the batch in"):
        fit = trainer(tmp_path, strategy, max_steps=1, enable_checkpointing=False, limit_val_batches=0,
                      callbacks=[profiler])  # fmt: skip
        fit.fit(module, DataLoader(TensorDataset(x, y), batch_size=64))
    guard = strategy.guard
    sizes = [64 // 2**k for k in range(len(strategy.shrinks) + 1)]
    assert strategy.pieces == 64 // sizes[-1] >= 4 and [s["to"] for s in strategy.shrinks] == sizes[1:]
    assert [a.batch for a in guard.failed] == sizes[:-1] and all(a.bytes > budget for a in guard.failed)
    assert guard.metered_steps == 1 and guard.peak <= budget and guard.violations == []
    logged = fit.callback_metrics  # the attempts are logged, the committed step's peak too
    assert logged["memory/failed_attempts"] == len(guard.failed) and logged["memory/peak_bytes"] == guard.peak
    assert profiler.peaks == {0: guard.peak}
    # the committed update is exactly one SGD step on the whole batch's mean loss: not zero, not two
    nn.functional.cross_entropy(reference(x), y).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for got, want in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_pieces_and_the_record_survive_a_checkpoint(tmp_path: Path) -> None:
    module = PlainClassifier()
    budget = budget_for(module, 16)
    train, val = loaders(n_train=128, batch=64)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = BudgetedBackpropStrategy(memory_budget=budget)
    with pytest.warns(UserWarning, match="retrying"):
        trainer(tmp_path, first, max_epochs=1, callbacks=[checkpoint]).fit(module, train, val)
    second = BudgetedBackpropStrategy(memory_budget=budget)
    trainer(tmp_path, second, max_epochs=2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")]).fit(
        PlainClassifier(), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert second.pieces == first.pieces >= 4
    assert second.guard.metered_steps > first.guard.metered_steps
    assert len(second.guard.failed) == len(first.guard.failed) >= 2  # none new: the pieces were restored


def test_manual_optimization_and_gradient_accumulation_are_refused(tmp_path: Path) -> None:
    class Manual(PlainClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    train, val = loaders()
    with pytest.raises(ValueError, match="manual optimization"):
        trainer(tmp_path, BudgetedBackpropStrategy(), max_epochs=1).fit(Manual(), train, val)
    with pytest.raises(ValueError, match="accumulate_grad_batches must be 1"):
        trainer(tmp_path, BudgetedBackpropStrategy(), max_epochs=1, accumulate_grad_batches=2).fit(
            PlainClassifier(), train, val
        )


def test_registered_name_resolves(tmp_path: Path) -> None:
    assert type(trainer(tmp_path, "budgeted_bp").strategy) is BudgetedBackpropStrategy


def test_bp_that_fits_nowhere_is_sized_without_a_step_batchnorm_refuses() -> None:
    from nf_lightning.lightning.backprop_batch import largest_backprop_batch

    # BatchNorm on a 1x1 map (ResNet's last stage on 32x32 images): a step at batch 1 raises in torch
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    with pytest.raises(ValueError, match="value per channel"):
        net.train()(torch.randn(1, 3, 16, 16))
    batch, model, peak = largest_backprop_batch(net, (3, 16, 16), 1_000, batch_limit=64, optimizer_factory=sgd)
    assert batch == 0 and peak == backprop_step_peak(net, (3, 16, 16), 2, sgd) > 1_000
    budget = int(backprop_step_peak(net, (3, 16, 16), 2, sgd) * 1.01)  # fits batch 2 but not 3
    assert largest_backprop_batch(net, (3, 16, 16), budget, 64, optimizer_factory=sgd)[0] == 2
