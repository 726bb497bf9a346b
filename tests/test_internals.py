"""Fails loudly when a Lightning release moves an internal that nf_lightning relies on."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig

from nf_lightning.lightning import _internals


def test_fit_loop_max_epochs_is_settable() -> None:
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    _internals.set_max_epochs(trainer, 7)
    assert trainer.fit_loop.max_epochs == 7


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
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    for name in ("process_dataloader", "training_step", "validation_step", "setup", "connect", "teardown"):
        assert callable(getattr(Strategy, name))
    # the accelerator connector fills `parallel_devices` on strategies that have the attribute
    import inspect

    assert "parallel_devices" in inspect.getsource(_AcceleratorConnector._lazy_init_strategy)
    assert issubclass(SingleDeviceStrategy, Strategy)


def test_train_dataloader_is_reachable_before_the_fit_loop_loads_it(tmp_path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    seen = []

    class Peek(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            seen.append(_internals.train_dataloader_of(trainer))

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, enable_model_summary=False, callbacks=[Peek()])
    trainer.fit(Tiny(), loader)
    assert seen == [loader]
