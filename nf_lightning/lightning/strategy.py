"""``NeuroFluxStrategy``: block-wise adaptive local learning as a Lightning strategy.

The user's LightningModule supplies the network, the optimizer recipe
(``configure_optimizers``, replicated per unit) and its ``validation_step``
for evaluation outside ``fit``. During ``fit`` the strategy owns the steps:
it profiles the units, partitions them under the memory budget, and trains
the blocks one after another, each for its epochs at its own batch size,
reading its inputs from the activation cache the block before it wrote.

Example:
    >>> import lightning.pytorch as pl
    >>> from nf_lightning import NeuroFluxStrategy
    >>> trainer = pl.Trainer(strategy=NeuroFluxStrategy(memory_budget="300MB", epochs_per_block=2),
    ...                      accelerator="cpu", logger=False, enable_progress_bar=False)
    >>> type(trainer.strategy).__name__
    'NeuroFluxStrategy'
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from nf_lightning.core.aux_heads import build_aux_heads
from nf_lightning.core.budget import format_bytes, parse_bytes
from nf_lightning.core.decompose import Decomposition, decompose
from nf_lightning.core.local_learning import LocalBlock, train_with_retry
from nf_lightning.core.memory import meter_for
from nf_lightning.core.plan import TrainingPlan
from nf_lightning.lightning._internals import parse_optimizer_recipe, set_max_epochs, train_dataloader_of
from nf_lightning.lightning.activation_cache import ActivationCache
from nf_lightning.lightning.memory_profiler import MemoryProfiler

AUX_POLICIES = ("adaptive", "classic")


class NeuroFluxStrategy(SingleDeviceStrategy):
    """Train a CNN block by block with local losses under a hard memory budget.

    Args:
        memory_budget: device memory for training, e.g. ``"300MB"`` (10^6 bytes),
            ``"0.5GiB"`` (2^30) or a number of bytes.
        epochs_per_block: epochs for every block, or one number per block.
        batch_limit: largest batch size any block uses (``B`` in Algorithm 1).
        rho: grouping threshold of Algorithm 1.
        aux: ``"adaptive"`` (AAN, the paper's heads) or ``"classic"`` (256 filters).
        cache: write each finished block's outputs to disk and train the next
            block from them (the paper's §5.3). ``False`` instead runs every batch
            through the frozen blocks before the active one (kept on the device,
            outside the budget): slower, but later blocks see augmented data;
            it exists to measure what the cache's policy costs.
        cache_dir: where caches go; ``<default_root_dir>/neuroflux_cache`` if None.
        cache_dtype: ``"float16"`` or ``"float32"``.
        input_shape: one sample's shape; taken from the data module
            (``input_shape``), the module's ``example_input_array`` or the first batch if None.
        lr_reference_batch: if set, every block's learning rate is scaled by
            ``batch_size / lr_reference_batch`` (linear scaling rule).
        single_block: train all units as one block at one batch size (classic
            local learning, the paper's baseline) instead of Algorithm 1's blocks.
        device: the training device; resolved from the Trainer's accelerator if None.
    """

    strategy_name = "neuroflux"

    def __init__(
        self,
        memory_budget: str | int = "300MB",
        epochs_per_block: int | Sequence[int] = 1,
        batch_limit: int = 256,
        rho: float = 0.4,
        aux: str = "adaptive",
        cache: bool = True,
        cache_dir: str | Path | None = None,
        cache_dtype: str = "float16",
        input_shape: Sequence[int] | None = None,
        lr_reference_batch: int | None = None,
        single_block: bool = False,
        device: str | torch.device | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device=device or "cpu", accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin
        )
        if aux not in AUX_POLICIES:
            raise ValueError(f"unknown aux policy {aux!r}; choose one of {AUX_POLICIES}")
        if batch_limit < 1 or rho < 0:
            raise ValueError(f"batch_limit must be >= 1 and rho >= 0, got {batch_limit} and {rho}")
        self.memory_budget = parse_bytes(memory_budget)
        self.epochs_per_block = epochs_per_block
        self.batch_limit = batch_limit
        self.rho = rho
        self.aux = aux
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_dtype = cache_dtype
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.lr_reference_batch = lr_reference_batch
        self.single_block = single_block
        self._explicit_device = device is not None
        # Lightning fills this from the accelerator and `devices` flag (see `_lazy_init_strategy`).
        self.parallel_devices: list[torch.device] | None = None

        self.decomposition: Decomposition | None = None
        self.exits: nn.ModuleList | None = None
        self.active_block: int | None = None
        self.last_step_peak: int | None = None
        self._pending_exit_state: dict[str, Tensor] | None = None
        self._automatic_optimization: bool | None = None
        self._epoch_seen: int | None = None
        self._raw_loaders: dict[RunningStage, DataLoader] = {}

    # ------------------------------------------------------------------ device
    @property
    def root_device(self) -> torch.device:
        if self._explicit_device or not self.parallel_devices:
            return self._root_device
        if len(self.parallel_devices) > 1:
            raise ValueError(
                f"NeuroFluxStrategy trains on one device, but the Trainer asked for {len(self.parallel_devices)}; "
                "pass devices=1"
            )
        return self.parallel_devices[0]

    # ------------------------------------------------------------------ wiring
    @property
    def trainer(self) -> pl.Trainer:
        assert self.lightning_module is not None, "the strategy is not connected to a LightningModule yet"
        return self.lightning_module.trainer

    def _fitting(self) -> bool:
        return self.lightning_module is not None and self.trainer.state.fn == TrainerFn.FITTING

    @property
    def plan(self) -> TrainingPlan:
        plan = self._callback(MemoryProfiler).plan
        assert plan is not None, "no plan yet: the strategy is set up in Trainer.fit"
        return plan

    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        trainer = model.trainer
        if trainer.state.fn != TrainerFn.FITTING:
            return
        self.decomposition = decompose(model)
        self._automatic_optimization = model.automatic_optimization
        model.automatic_optimization = False
        trainer.reload_dataloaders_every_n_epochs = 1
        # Ours run before the user's callbacks so caches exist before ModelCheckpoint saves.
        needed = (MemoryProfiler, ActivationCache, _StrategyState)
        trainer.callbacks[:0] = [kind() for kind in needed if not any(isinstance(c, kind) for c in trainer.callbacks)]

    def _callback(self, kind: type) -> Any:
        return next(c for c in self.trainer.callbacks if isinstance(c, kind))

    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            super().setup(trainer)
            return
        assert self.accelerator is not None and self.decomposition is not None
        self.accelerator.setup(trainer)
        self.input_shape = self.input_shape or _infer_input_shape(trainer)
        units = self.decomposition.units
        aux_heads = build_aux_heads(units, _num_classes(self.decomposition.head), self.input_shape, policy=self.aux)
        self.exits = nn.ModuleList([*aux_heads, self.decomposition.head])
        if self._pending_exit_state is not None:
            self.exits.load_state_dict(self._pending_exit_state)
            self._pending_exit_state = None
        plan = self._callback(MemoryProfiler).ensure_plan(self)
        set_max_epochs(trainer, plan.total_epochs)
        self.model = self.precision_plugin.convert_module(self.model)
        start = self.active_block if self.active_block is not None else plan.block_of_epoch(trainer.current_epoch)
        self.active_block = None
        self._enter_block(start)
        self.setup_precision_plugin()

    def optimizer_factory(self) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
        """Build the user's optimizer (class and hyper-parameters) over other parameters."""
        optimizers, _ = parse_optimizer_recipe(self.lightning_module.configure_optimizers())
        template = optimizers[0]
        hparams = {k: v for k, v in template.param_groups[0].items() if k not in ("params", "initial_lr")}
        return lambda params: type(template)(params, **hparams)

    def teardown(self) -> None:
        if self.lightning_module is not None and self._automatic_optimization is not None:
            self.lightning_module.automatic_optimization = self._automatic_optimization
            self._automatic_optimization = None
        super().teardown()

    # ------------------------------------------------------------------ blocks
    def block_units(self, block: int) -> tuple[int, ...]:
        return self.plan.blocks[block].units

    def block_modules(self, block: int) -> list[nn.Module]:
        """Units then exits of ``block``."""
        units, exits = self._unit_and_exit(block)
        return [*units, *exits]

    @torch.no_grad()
    def forward_block(self, block: int, x: Tensor) -> Tensor:
        """Output of ``block``'s last unit, in eval mode (used to write caches)."""
        units, _ = self._unit_and_exit(block)
        for unit in units:
            x = unit(x)
        return x

    def _enter_block(self, block: int) -> None:
        """Make ``block`` the one on the device, with fresh optimizers."""
        if block == self.active_block:
            return
        if self.active_block is not None and self.cache:
            for module in self.block_modules(self.active_block):
                module.to("cpu")  # trained blocks go to storage
        self.active_block = block
        assert self.decomposition is not None
        frozen = [] if self.cache else self.decomposition.units[: self.block_units(block)[0]]
        for module in [*frozen, *self.block_modules(block)]:
            module.to(self.root_device)
        batch = self.plan.batch_size(block)
        optimizers, schedulers = [], []
        for unit, exit_head in zip(*self._unit_and_exit(block)):
            opt, configs = self._replicate_optimizer([*unit.parameters(), *exit_head.parameters()], batch)
            optimizers.append(opt)
            schedulers += configs
        self.optimizers = optimizers
        self.lr_scheduler_configs = schedulers
        self._epoch_seen = None

    def _active(self) -> LocalBlock:
        """The active block with Lightning's current wrappers of its optimizers.

        Built per step: Lightning re-wraps optimizers (precision plugins, the
        manual loop's step counting), so holding on to old wrappers would miss that.
        """
        assert self.active_block is not None, "no active block: fit has not started"
        return LocalBlock(
            *self._unit_and_exit(self.active_block),
            self._lightning_optimizers,
            backward=self.lightning_module.manual_backward,
        )

    def _unit_and_exit(self, block: int) -> tuple[list[nn.Module], list[nn.Module]]:
        assert self.decomposition is not None and self.exits is not None
        indices = self.block_units(block)
        return [self.decomposition.units[i] for i in indices], [self.exits[i] for i in indices]

    def _replicate_optimizer(self, params: list[nn.Parameter], batch: int) -> tuple[torch.optim.Optimizer, list]:
        """The user's optimizer recipe (and schedulers) re-pointed at ``params``."""
        optimizers, schedulers = parse_optimizer_recipe(self.lightning_module.configure_optimizers())
        if len(optimizers) != 1:
            raise ValueError(
                f"configure_optimizers returned {len(optimizers)} optimizers; NeuroFlux replicates exactly one "
                "optimizer recipe per unit"
            )
        optimizer = optimizers[0]
        scale = batch / self.lr_reference_batch if self.lr_reference_batch else 1.0
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        for key in ("lr", "initial_lr"):
            if key in group:
                group[key] = group[key] * scale
        optimizer.param_groups.clear()
        optimizer.state.clear()
        optimizer.add_param_group({**group, "params": params})
        for config in schedulers:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * scale for lr in config.scheduler.base_lrs]
        return optimizer, schedulers

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        if not self._fitting() or not isinstance(dataloader, DataLoader):
            return dataloader
        trainer = self.trainer
        stage = trainer.state.stage
        block = self.plan.block_of_epoch(trainer.current_epoch)
        training = stage == RunningStage.TRAINING
        self._raw_loaders[RunningStage.TRAINING if training else RunningStage.VALIDATING] = dataloader
        self._enter_block(block)
        batch = self.plan.batch_size(block)
        if block == 0 or not self.cache:
            return rebatch(dataloader, batch, shuffle=training)
        split = "train" if training else "val"
        return self._callback(ActivationCache).loader(self, block, split, batch, shuffle=training)

    def raw_loader(self, split: str) -> DataLoader:
        """The user's own loader of ``split`` (``"train"`` or ``"val"``) as Lightning gave it."""
        stage = RunningStage.TRAINING if split == "train" else RunningStage.VALIDATING
        if stage not in self._raw_loaders:
            raise RuntimeError(f"no {split} dataloader has been seen yet; NeuroFlux needs both train and val data")
        return self._raw_loaders[stage]

    # ------------------------------------------------------------------ steps
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if not self._fitting():
            return super().training_step(*args, **kwargs)
        block = self._active()
        x, y = self._block_input(args[0])
        self._step_epoch_schedulers()
        block.train(True)
        peaks: list[int] = []
        with self.precision_plugin.train_step_context():
            losses = train_with_retry(block, x, y, lambda: self._guard(block, peaks), self._on_shrink)
        self.last_step_peak = max(peaks) if peaks else None
        module = self.lightning_module
        for unit, loss in zip(self.block_units(self.active_block), losses):
            module.log(f"train/loss_unit_{unit}", loss, batch_size=len(y))
        module.log("block", float(self.active_block), prog_bar=True, batch_size=len(y))
        module.log("batch_size", float(len(y)), batch_size=len(y))
        for config in self.lr_scheduler_configs:
            if config.interval == "step":
                config.scheduler.step()
        return None

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if not self._fitting():
            return super().validation_step(*args, **kwargs)
        block = self._active()
        x, y = self._block_input(args[0])
        block.train(False)
        with self.precision_plugin.val_step_context():
            correct = block.evaluate(x, y)
        module = self.lightning_module
        units = self.block_units(self.active_block)
        for unit, hits in zip(units, correct):
            module.log(f"val/acc_exit_{unit}", hits.float() / len(y), batch_size=len(y))
        module.log("val/acc", correct[-1].float() / len(y), prog_bar=True, batch_size=len(y))
        return None

    def _block_input(self, batch: Any) -> tuple[Tensor, Tensor]:
        """The active block's input: the batch itself, or without a cache its pass through the frozen blocks."""
        x, y = split_batch(batch)
        assert self.decomposition is not None and self.active_block is not None
        first = self.block_units(self.active_block)[0]
        if first > 0 and not self.cache:
            with torch.no_grad():
                for unit in self.decomposition.units[:first]:
                    x = unit.eval()(x)
        return x, y

    @contextlib.contextmanager
    def _guard(self, block: LocalBlock, peaks: list[int]) -> Iterator[None]:
        """Measure one unit step and hold it to the budget (raises ``torch.OutOfMemoryError`` past it)."""
        meter = meter_for(self.root_device, limit=self.memory_budget)
        meter.track(*block.modules(), *(opt.optimizer for opt in block.optimizers))
        with meter:
            yield
        peaks.append(meter.peak_bytes)  # only steps that fit: a failed attempt is retried smaller

    def _on_shrink(self, unit: int, old: int, new: int) -> None:
        assert self.active_block is not None
        plan = self.plan
        plan.batch_overrides[self.active_block] = min(new, plan.batch_size(self.active_block))
        rank_zero_warn(
            f"unit {unit} needed more than the {format_bytes(self.memory_budget)} budget at batch {old}; "
            f"retrying at {new} and training block {self.active_block} at batch "
            f"{plan.batch_size(self.active_block)} from the next epoch on"
        )

    def _step_epoch_schedulers(self) -> None:
        epoch = self.trainer.current_epoch
        if self._epoch_seen is not None and epoch != self._epoch_seen:
            for config in self.lr_scheduler_configs:
                if config.interval == "epoch" and not config.reduce_on_plateau:
                    config.scheduler.step()
        self._epoch_seen = epoch

    # ------------------------------------------------------------------ state
    def neuroflux_state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the user's module: exits and the active block."""
        assert self.exits is not None
        return {
            "exits": {k: v.detach().cpu() for k, v in self.exits.state_dict().items()},
            "active_block": self.active_block,
        }

    def load_neuroflux_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_exit_state = state["exits"]
        self.active_block = state["active_block"]

    def exit_modules(self) -> nn.ModuleList:
        assert self.exits is not None, "exits are built when fit starts"
        return self.exits


class _StrategyState(pl.Callback):
    """Carries the strategy's own state (exit heads, active block) through checkpoints."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if isinstance(trainer.strategy, NeuroFluxStrategy) and trainer.strategy.exits is not None:
            checkpoint["neuroflux"] = trainer.strategy.neuroflux_state_dict()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if isinstance(trainer.strategy, NeuroFluxStrategy) and "neuroflux" in checkpoint:
            trainer.strategy.load_neuroflux_state_dict(checkpoint["neuroflux"])


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of a batch given as a tuple/list or a dict.

    >>> split_batch((torch.zeros(2, 3), torch.ones(2)))[1].tolist()
    [1.0, 1.0]
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for x_key, y_key in (("x", "y"), ("image", "label"), ("input", "target"), ("inputs", "targets")):
            if x_key in batch and y_key in batch:
                return batch[x_key], batch[y_key]
    raise TypeError(
        f"cannot find inputs and targets in a batch of type {type(batch).__name__}; NeuroFlux expects "
        "(inputs, targets, ...) tuples or dicts with keys x/y, image/label, input/target or inputs/targets"
    )


def rebatch(loader: DataLoader, batch_size: int, shuffle: bool) -> DataLoader:
    """The same data as ``loader`` at another batch size.

    >>> from torch.utils.data import TensorDataset
    >>> len(rebatch(DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=2), 5, shuffle=False))
    2
    """
    if loader.batch_size == batch_size and isinstance(loader.sampler, RandomSampler) == shuffle:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
    )


def _num_classes(head: nn.Module) -> int:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the network's head has no nn.Linear, so the number of classes is unknown")
    return linears[-1].out_features


def _infer_input_shape(trainer: pl.Trainer) -> tuple[int, ...]:
    datamodule = trainer.datamodule
    if datamodule is not None and getattr(datamodule, "input_shape", None) is not None:
        return tuple(datamodule.input_shape)
    example = trainer.lightning_module.example_input_array
    if isinstance(example, Tensor):
        return tuple(example.shape[1:])
    loader = train_dataloader_of(trainer)
    x, _ = split_batch(next(iter(loader)))
    return tuple(x.shape[1:])


if NeuroFluxStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        NeuroFluxStrategy.strategy_name, NeuroFluxStrategy, description="NeuroFlux adaptive local learning"
    )
