"""Fails loudly when a Lightning release moves an internal that nf_lightning relies on."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig

from nf_lightning.lightning import _internals


class _Linear(pl.LightningModule):
    """One linear layer whose training loss is its output's sum."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_a_linear_layer(loader, callback: pl.Callback, root) -> None:
    """One quiet epoch of ``_Linear`` on ``loader``, with ``callback`` watching."""
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         default_root_dir=root, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(_Linear(), loader)


def test_optimizer_recipe_parsing_keeps_scheduler_interval() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    recipe = {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    optimizers, configs = _internals.parse_optimizer_recipe(recipe)
    assert optimizers == [optimizer]
    assert isinstance(configs[0], LRSchedulerConfig)
    assert configs[0].scheduler is scheduler and configs[0].interval == "step"
    assert _internals.parse_optimizer_recipe(optimizer) == ([optimizer], [])


def test_strategy_hooks_the_strategy_relies_on_exist() -> None:
    """Public-but-undocumented Lightning behaviour the strategy builds on."""
    from lightning.pytorch.strategies import SingleDeviceStrategy, Strategy

    for name in (
        "process_dataloader", "training_step", "validation_step", "test_step", "predict_step", "setup", "connect",
        "teardown", "save_checkpoint", "load_model_state_dict", "on_validation_start", "on_validation_end",
    ):
        assert callable(getattr(Strategy, name)), name
    assert isinstance(Strategy.lightning_restore_optimizer, property)
    assert issubclass(SingleDeviceStrategy, Strategy)


def test_accelerator_connector_fills_parallel_devices() -> None:
    class Probe(_internals.TrainerDevices, pl.strategies.SingleDeviceStrategy):
        pass

    trainer = pl.Trainer(strategy=Probe(device="cpu"), accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False)
    assert trainer.strategy.trainer_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="pass devices=1"):
        pl.Trainer(strategy=Probe(device="cpu"), accelerator="cpu", devices=2, logger=False).strategy.trainer_device()


def test_dropping_the_loaded_train_loader_makes_the_fit_loop_fetch_it_again(tmp_path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    fetched, lengths = [], []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def train_dataloader(self):
            fetched.append(self.current_epoch)
            return DataLoader(TensorDataset(torch.zeros(8, 2)), batch_size=2 + 2 * (self.current_epoch >= 1))

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class ReloadAfterFirstEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lengths.append(trainer.num_training_batches)

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                _internals.reload_train_dataloader(trainer)

    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, enable_model_summary=False, callbacks=[ReloadAfterFirstEpoch()])
    trainer.fit(Module())
    assert fetched == [0, 1]  # fetched again once, at the start of epoch 1
    assert lengths == [4, 2, 2]  # and its length recomputed


def test_train_dataloader_is_reachable_before_the_fit_loop_loads_it(tmp_path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    seen = []

    class Peek(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            seen.append(_internals.train_dataloader_of(trainer))

    loader = DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2)
    _fit_a_linear_layer(loader, Peek(), tmp_path)
    assert seen == [loader]


def test_has_val_dataloader_sees_every_way_fit_gets_validation_data(tmp_path) -> None:
    from nf_lightning.testing.demo import PlainClassifier, loaders

    class Probe(pl.Callback):
        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            seen.append(_internals.has_val_dataloader(trainer))
            raise SystemExit  # nothing more to run

    class OwnLoaders(PlainClassifier):
        def val_dataloader(self):
            return loaders()[1]

    train, val = loaders()
    seen: list[bool] = []
    for model, args in ((PlainClassifier(), (train,)), (PlainClassifier(), (train, val)), (OwnLoaders(), (train,))):
        t = pl.Trainer(accelerator="cpu", logger=False, callbacks=[Probe()], default_root_dir=tmp_path)
        with pytest.raises(SystemExit):
            t.fit(model, *args)
    assert seen == [False, True, True]


def test_an_eval_mode_submodule_stays_so_through_fit_and_only_lightnings_warning_is_quieted(tmp_path) -> None:
    """The polish's frozen units: Lightning keeps their eval mode and warns about it in these words."""
    import re
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    class Frozen(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.stem, self.layer = torch.nn.BatchNorm1d(2).eval(), torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(self.stem(batch[0])).sum()

        def validation_step(self, batch, batch_idx):
            self.log("v", self.layer(self.stem(batch[0])).sum())

        def configure_optimizers(self):
            return torch.optim.SGD(self.layer.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    caught = []
    for quiet in (False, True):
        module = Frozen()
        trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                             default_root_dir=tmp_path, enable_model_summary=False)  # fmt: skip
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with _internals.eval_mode_on_purpose() if quiet else warnings.catch_warnings():
                trainer.fit(module, loader, loader)
        caught.append([w for w in seen if re.search(_internals.EVAL_MODE_WARNING, str(w.message))])
        assert not module.stem.training and module.layer.training  # kept through fit and two validations
    assert caught[0] and not caught[1]


def test_the_train_loader_can_be_loaded_before_the_fit_loop_does_and_is_not_loaded_again(tmp_path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    seen = {}

    class Load(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            assert trainer.train_dataloader is None  # not loaded yet at this hook
            seen["first"] = next(iter(_internals.loaded_train_dataloader(trainer)))[0]
            seen["loaded"] = trainer.train_dataloader

        def on_train_epoch_start(self, trainer, pl_module):
            seen["used"] = trainer.train_dataloader

    loader = DataLoader(TensorDataset(torch.arange(8.0).view(4, 2)), batch_size=2)
    _fit_a_linear_layer(loader, Load(), tmp_path)
    assert torch.equal(seen["first"], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert seen["loaded"] is not None and seen["used"] is seen["loaded"]  # the fit loop kept what was loaded


def test_a_checkpoint_file_is_written_through_the_crash_drills_patch_target(tmp_path, monkeypatch) -> None:
    owner, name = _internals.CHECKPOINT_WRITE
    original, written = getattr(owner, name), []

    def recording(checkpoint, path, *args, **kwargs):
        written.append(str(path))
        return original(checkpoint, path, *args, **kwargs)

    monkeypatch.setattr(owner, name, recording)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

    trainer = pl.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.strategy.connect(Tiny())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    assert written == [str(tmp_path / "a.ckpt")] and (tmp_path / "a.ckpt").is_file()


class _ManualLinear(_Linear):
    """``_Linear`` stepping its optimizer itself, as NeuroFlux runs a module during ``fit``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.layer(batch[0]).sum())
        optimizer.step()


def test_the_manual_step_count_carries_over_to_the_automatic_one(tmp_path) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 2)), batch_size=4)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, enable_model_summary=False)  # fmt: skip
    module = _ManualLinear()
    trainer.fit(module, loader)
    assert trainer.global_step == 3
    module.automatic_optimization = True  # handed back as the user wrote it: the Trainer reads another counter
    assert trainer.global_step == 0
    _internals.carry_manual_steps_to_automatic(trainer)
    assert trainer.global_step == 3
