"""BP with activation checkpointing (``method=bp_ckpt``): exactness, memory, profiling and the nf-train method."""

from __future__ import annotations

import copy
import doctest
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import BasicBlock, ResNet

from nf_lightning.cli.common import compose_config
from nf_lightning.cli.train import run
from nf_lightning.lightning.backprop_batch import backprop_step_peak, largest_backprop_batch
from nf_lightning.core.network import checkpointing
from nf_lightning.core.network.checkpointing import CheckpointedNetwork
from nf_lightning.core.memory.meter import TrackedMemoryMeter
from nf_lightning.core.plan.training_plan import profile_batch_sizes
from nf_lightning.core.memory.profiler import profile_backprop
from nf_lightning.lightning.classifier import ClassifierModule
from nf_lightning.models import create


def test_docstring_example() -> None:
    assert doctest.testmod(checkpointing).failed == 0


def tiny_resnet() -> nn.Module:
    """torchvision's own ResNet class, one BasicBlock per stage (a ResNet-10)."""
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


MODELS = {
    "zoo_vgg11": lambda: create("vgg11", num_classes=10, width_mult=0.125),
    "torchvision_resnet": tiny_resnet,
}


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_outputs_gradients_and_buffers_equal_the_plain_network(name: str) -> None:
    torch.manual_seed(0)
    plain = MODELS[name]()
    wrapped = CheckpointedNetwork(copy.deepcopy(plain))
    assert len(wrapped.units) > 1
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for model in (plain, wrapped):
        model.train()
        F.cross_entropy(model(x), y).backward()
    assert torch.allclose(wrapped(x), plain(x), atol=1e-6)
    plain_params = dict(plain.named_parameters())
    for key, param in wrapped.network.named_parameters():
        assert param.grad is not None, key
        assert torch.allclose(param.grad, plain_params[key].grad, rtol=1e-4, atol=1e-6), key
    # the recomputation in backward does not update BatchNorm's running statistics a second time
    plain_buffers = dict(plain.named_buffers())
    for key, buffer in wrapped.network.named_buffers():
        assert torch.allclose(buffer, plain_buffers[key]), key
    plain.eval(), wrapped.eval()
    with torch.no_grad():
        assert torch.allclose(wrapped(x), plain(x), atol=1e-6)


def test_trains_the_same_parameters_over_several_steps() -> None:
    torch.manual_seed(1)
    plain = create("vgg11", num_classes=10, width_mult=0.125)
    wrapped = CheckpointedNetwork(copy.deepcopy(plain))
    optimizers = [sgd(plain.parameters()), sgd(wrapped.parameters())]
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        for model, optimizer in zip((plain, wrapped), optimizers):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (key, a), b in zip(plain.state_dict().items(), wrapped.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), key


def test_state_dict_is_the_plain_networks() -> None:
    plain = create("vgg11", num_classes=10, width_mult=0.125)
    wrapped = CheckpointedNetwork(create("vgg11", num_classes=10, width_mult=0.125))
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    wrapped.load_state_dict(plain.state_dict())  # plain -> checkpointed
    assert all(torch.equal(a, b) for a, b in zip(wrapped.state_dict().values(), plain.state_dict().values()))
    fresh = create("vgg11", num_classes=10, width_mult=0.125)
    fresh.load_state_dict(wrapped.state_dict())  # checkpointed -> plain
    # nested (as ClassifierModule's `net`): the prefix is handled at any depth
    holder, other = nn.Module(), nn.Module()
    holder.net, other.net = wrapped, create("vgg11", num_classes=10, width_mult=0.125)
    assert set(holder.state_dict()) == set(other.state_dict())
    other.load_state_dict(holder.state_dict())
    holder.load_state_dict(other.state_dict())


def measured_step_peak(model: nn.Module, batch: int) -> int:
    """Peak bytes of a real CPU training step, measured by the tracked meter (optimizer state created first)."""
    optimizer = sgd(model.parameters())
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for measure in (False, True):
        meter = TrackedMemoryMeter("cpu")
        meter.track(model, optimizer, x, y)
        with meter if measure else torch.enable_grad():
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return meter.peak_bytes


def test_profiler_predicts_the_checkpointed_step_and_it_needs_less_than_bp() -> None:
    torch.manual_seed(0)
    net = create("vgg11", num_classes=10, width_mult=0.25)
    wrapped = CheckpointedNetwork(copy.deepcopy(net))
    sizes = profile_batch_sizes(256, "cpu")  # the range NeuroFlux profiles its units over
    fit = profile_backprop(wrapped, (3, 32, 32), batch_sizes=sizes, optimizer_factory=sgd)
    bp_fit = profile_backprop(net, (3, 32, 32), batch_sizes=sizes, optimizer_factory=sgd)
    for batch in (8, 48):
        measured = measured_step_peak(wrapped, batch)
        assert abs(fit.predict(batch) - measured) <= 0.10 * measured, (batch, fit.predict(batch), measured)
        bp_measured = measured_step_peak(net, batch)
        assert measured < bp_measured and fit.predict(batch) < bp_fit.predict(batch)
    # at this width the parameter state is most of a small-batch step: checkpointing saves activations only
    assert fit.slope < 0.8 * bp_fit.slope


def test_bp_batch_is_checked_against_the_budget_with_a_step_of_its_own() -> None:
    module = ClassifierModule(create("vgg11", num_classes=10, width_mult=0.25), num_classes=10)
    peak_at_8 = backprop_step_peak(module, (3, 32, 32), 8)
    batch, fit, peak = largest_backprop_batch(module, (3, 32, 32), peak_at_8, batch_limit=256)
    assert (batch, peak) == (8, peak_at_8)  # BP's tightest budget for batch 8 gives batch 8, not more
    assert backprop_step_peak(module, (3, 32, 32), 9) > peak_at_8
    none, _, _ = largest_backprop_batch(module, (3, 32, 32), fit.static_bytes, batch_limit=256)
    assert none == 0
    module.net = CheckpointedNetwork(module.net)
    ckpt_batch, _, ckpt_peak = largest_backprop_batch(module, (3, 32, 32), peak_at_8, batch_limit=256)
    assert ckpt_batch > batch and ckpt_peak <= peak_at_8


class _RatesSeen(pl.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("warmup", [0.0, 0.25])
def test_cosine_schedule_warms_up_then_decays_to_zero_over_the_run(tmp_path: Path, warmup: float) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    module = ClassifierModule(create("vgg11", num_classes=10, width_mult=0.125), num_classes=10, lr_schedule="cosine",
                              lr_warmup=warmup)  # fmt: skip
    seen = _RatesSeen()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[seen],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8))  # 8 steps
    (scheduler,) = trainer.lr_scheduler_configs
    assert scheduler.interval == "step"
    warm = round(warmup * 8)
    rising = [0.05 * (s + 1) / warm for s in range(warm)]
    cosine = [0.05 * 0.5 * (1 + math.cos(math.pi * s / (8 - warm))) for s in range(8 - warm)]
    assert seen.rates == pytest.approx(rising + cosine)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_warm_up_alone_keeps_the_rate_after_it_and_bad_schedules_are_refused(tmp_path: Path) -> None:
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    module = ClassifierModule(create("vgg11", num_classes=10, width_mult=0.125), num_classes=10, lr_warmup=0.5)
    seen = _RatesSeen()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[seen],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8))  # 4 steps, 2 of warm-up
    assert seen.rates == pytest.approx([0.025, 0.05, 0.05, 0.05])
    with pytest.raises(ValueError, match="lr_schedule"):
        ClassifierModule(nn.Linear(2, 2), num_classes=2, lr_schedule="step")
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="lr_warmup"):
            ClassifierModule(nn.Linear(2, 2), num_classes=2, lr_warmup=bad)


def test_the_classifier_module_reads_dict_batches_and_narrow_integer_labels(tmp_path: Path) -> None:
    """What the polish and BP baselines train with takes the batches NeuroFlux takes."""
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,), dtype=torch.int32))

    def as_dicts(samples: list) -> dict[str, torch.Tensor]:
        return {"image": torch.stack([x for x, _ in samples]), "label": torch.stack([y for _, y in samples])}

    loader = DataLoader(data, batch_size=8, collate_fn=as_dicts)
    module = ClassifierModule(create("vgg11", num_classes=10, width_mult=0.125), num_classes=10)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, loader, loader)
    (tested,) = trainer.test(module, loader, verbose=False)
    assert 0.0 <= tested["test/acc"] <= 1.0 and trainer.global_step == 4


@pytest.fixture
def cifar(shared_datasets_dir: Path, data_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NF_DATA_DIR", str(shared_datasets_dir))
    monkeypatch.setenv("NF_CACHE_DIR", str(data_cache_dir))
    return shared_datasets_dir


def test_nf_train_bp_ckpt_runs_on_real_cifar10(tmp_path: Path, cifar: Path) -> None:
    overrides = [
        "method=bp_ckpt", "model=vgg11", "model.width_mult=0.125", "data.train_subset=500", "data.val_subset=200",
        "epochs=1", "budget=5MB", "batch_limit=64", "trainer.enable_progress_bar=false",
        "+module.lr_schedule=cosine",
    ]
    cfg = compose_config("train", overrides)
    assert cfg.method.name == "bp_ckpt" and cfg.method.before_fit.checkpoint is True
    assert cfg.trainer.strategy._target_.endswith("BudgetedBackpropStrategy")  # held to the budget by the guard
    results = run(cfg, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["method"] == "bp_ckpt" and written["could_run"]
    (batch,) = written["batch_sizes"]
    assert 1 <= batch <= 64 and written["predicted_peak_bytes"] <= written["budget_bytes"]
    assert 0 < written["measured_peak_bytes"] <= written["budget_bytes"]
    guard = written["enforcement"]  # every step a transaction of the same guard as NeuroFlux's
    assert guard["metered_steps"] >= 5 and guard["violations"] == 0 and guard["pieces"] == 1
    assert written["final_accuracy"] == results["final_accuracy"] > 0.1
    bp = run(compose_config("train", [*overrides, "method=bp"]), tmp_path / "bp")
    assert bp["batch_sizes"][0] < batch  # the same budget fits a larger batch with checkpointing
