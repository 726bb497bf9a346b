"""``NeuroFluxAdapter``: what NeuroFlux's strategies do in each of Lightning's strategy hooks.

Mixed in before a Lightning strategy by :class:`~nf_lightning.lightning.strategy.NeuroFluxStrategy`
(one device) and :class:`~nf_lightning.lightning.strategy.NeuroFluxDDPStrategy` (several
processes), so ``super()`` reaches that strategy. In ``fit``:

- ``connect``: decompose the network, take over optimization, list
  :class:`~nf_lightning.lightning.hooks.NeuroFluxHooks` in ``trainer.callbacks``;
- ``setup``: plan (or restore) the :class:`~nf_lightning.core.train.run.BlockwiseRun`;
- ``process_dataloader``: the active block's training data;
- ``training_step``: the run's budgeted step; ``validation_step``: the user's own, with the
  deployable exit standing in for the network
  (:func:`~nf_lightning.core.exits.validation.standing_in`);
- ``save_checkpoint``/``load_model_state_dict``: the run's state under ``"neuroflux"``.

Outside ``fit``, ``validate``/``test``/``predict`` run the user's steps on the selected exit
(unless ``evaluate="full"``).

Example:
    >>> from nf_lightning import NeuroFluxStrategy
    >>> isinstance(NeuroFluxStrategy("300MB"), NeuroFluxAdapter)
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from nf_lightning.core.exits.validation import CountingForward, standing_in
from nf_lightning.core.memory.budget import MemoryBudget, format_bytes
from nf_lightning.core.memory.meter import device_memory_bytes
from nf_lightning.core.network.decompose import Decomposition, decompose
from nf_lightning.core.network.network_input import PreparedInputs
from nf_lightning.core.options import NeuroFluxOptions
from nf_lightning.core.train.batches import require_map_style, split_batch
from nf_lightning.core.train.optim_recipe import SchedulerSpec
from nf_lightning.core.train.run import BlockwiseRun, DataSources
from nf_lightning.lightning._internals import (
    carry_manual_steps_to_automatic,
    has_val_dataloader,
    parse_optimizer_recipe,
    train_dataloader_of,
)
from nf_lightning.lightning.ddp import collective_for
from nf_lightning.lightning.hooks import NeuroFluxHooks
from nf_lightning.lightning.unsupported import refuse_unsupported_settings

CHECKPOINT_KEY = "neuroflux"


class NeuroFluxAdapter:
    """NeuroFlux's Lightning adapter (see the module's description); its strategy calls
    :meth:`_configure` with the budget and the options before anything else."""

    def _configure(self, budget: MemoryBudget, options: NeuroFluxOptions) -> None:
        self.budget = budget
        self.options = options
        self.decomposition: Decomposition | None = None
        self.run: BlockwiseRun | None = None
        self.validation_seconds = 0.0  # wall time of validation during fit (the user's steps included)
        self._validation_started: float | None = None
        self._saved_state: dict[str, Any] | None = None
        self._sources = DataSources(train=None, val=None)  # type: ignore[arg-type]  # filled as loaders arrive
        self._automatic_optimization: bool | None = None
        self._held_gradient_clip_val: float | None = None  # the Trainer's, held while NeuroFlux clips (fit only)

    # ------------------------------------------------------------------ wiring
    @property
    def trainer(self) -> pl.Trainer:
        assert self.lightning_module is not None, "the strategy is not connected to a LightningModule yet"
        return self.lightning_module.trainer

    def _fitting(self) -> bool:
        return self.lightning_module is not None and self.trainer.state.fn == TrainerFn.FITTING

    @property
    def plan(self) -> Any:
        """The run's plan (blocks, batch sizes, epochs); made when ``fit`` starts."""
        if self.run is None:
            raise RuntimeError("no plan yet: NeuroFlux plans when Trainer.fit starts")
        return self.run.plan

    def connect(self, model: pl.LightningModule) -> None:
        """Decompose the network; for ``fit``, take over optimization and list :class:`NeuroFluxHooks`
        first in ``trainer.callbacks`` (unless the Trainer already has one)."""
        super().connect(model)
        self.decomposition = decompose(model)
        trainer = model.trainer
        fitting = trainer.state.fn == TrainerFn.FITTING
        refuse_unsupported_settings(trainer, self.precision_plugin, fitting)
        if not fitting:
            return
        self._take_gradient_clipping(trainer)
        self._automatic_optimization = model.automatic_optimization
        model.automatic_optimization = False  # each unit steps its own optimizer
        if not any(isinstance(c, NeuroFluxHooks) for c in trainer.callbacks):
            trainer.callbacks.insert(0, NeuroFluxHooks())
            rank_zero_info("NeuroFluxStrategy: added its NeuroFluxHooks callback first in trainer.callbacks")

    def _take_gradient_clipping(self, trainer: pl.Trainer) -> None:
        """``Trainer(gradient_clip_val=...)`` clips every unit's gradients. Lightning refuses that setting
        once optimization is manual, so the Trainer's value is held here until ``teardown``."""
        value = trainer.gradient_clip_val
        if not value:
            return
        algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm"
        self.options = self.options.replace(gradient_clip_val=float(value), gradient_clip_algorithm=str(algorithm))
        self._held_gradient_clip_val, trainer.gradient_clip_val = value, None

    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            super().setup(trainer)
            return
        assert self.accelerator is not None and self.decomposition is not None
        _require_validation(trainer)
        self.accelerator.setup(trainer)
        self._warn_if_device_is_small()
        options = self.options.replace(
            cache_dir=self.options.cache_dir or Path(trainer.default_root_dir) / "neuroflux_cache",
            lr_reference_batch=self.options.lr_reference_batch or _loader_batch_size(trainer),
        )
        where = {"device": self.root_device, "collective": collective_for(self)}
        self._sources.inputs = prepared = _prepared_inputs(trainer, self.decomposition.network)
        if self._saved_state is not None:
            self.run = BlockwiseRun.from_state(self.decomposition, self._saved_state, self._recipe, options, **where)
            self._saved_state = None
            self._check_budget_of_resumed_plan()
        else:
            shape = prepared.shape if prepared else self.options.input_shape or _infer_input_shape(trainer)
            self.run = BlockwiseRun.create(self.decomposition, self._recipe, shape, self.budget, options, **where)
        rank_zero_info(self.run.plan.describe())
        datamodule = trainer.datamodule
        self._sources.data_id = str(getattr(datamodule, "fingerprint", "") or "") + (
            f"|inputs prepared {prepared.digest}" if prepared else ""
        )
        if hasattr(datamodule, "train_dataset"):
            self._sources.train_unaugmented = datamodule.train_dataset(augment=False)
        self.run.attach_data(self._sources)
        self.model = self.precision_plugin.convert_module(self.model)
        self.run.start()
        self.sync_optimizers()
        self.setup_precision_plugin()

    def sync_optimizers(self) -> None:
        """Show Lightning the active block's optimizers and schedulers (for ``LearningRateMonitor`` and steps)."""
        assert self.run is not None
        self.optimizers = list(self.run.optim.optimizers)
        self.lr_scheduler_configs = [spec.extra for spec in self.run.optim.schedulers]

    def _recipe(self) -> tuple[torch.optim.Optimizer, list[SchedulerSpec]]:
        """The user's ``configure_optimizers``, freshly called and parsed by Lightning's rules."""
        optimizers, configs = parse_optimizer_recipe(self.lightning_module.configure_optimizers())
        if len(optimizers) != 1:
            raise ValueError(
                f"configure_optimizers returned {len(optimizers)} optimizers; NeuroFlux replicates exactly one "
                "optimizer recipe per unit"
            )
        specs = [
            SchedulerSpec(c.scheduler, c.interval, c.frequency, c.monitor, c.strict, c.name, extra=c) for c in configs
        ]
        return optimizers[0], specs

    def teardown(self) -> None:
        if self.run is not None:
            self.run.release()
        if self.lightning_module is not None and self._automatic_optimization is not None:
            if self._automatic_optimization:
                carry_manual_steps_to_automatic(self.trainer)  # else trainer.global_step reads 0 from here on
            self.lightning_module.automatic_optimization = self._automatic_optimization
            self._automatic_optimization = None
        if self._held_gradient_clip_val is not None and self.lightning_module is not None:
            self.trainer.gradient_clip_val, self._held_gradient_clip_val = self._held_gradient_clip_val, None
        super().teardown()

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # the run restores its per-unit optimizers from its own state

    def _check_budget_of_resumed_plan(self) -> None:
        """A resumed run keeps its plan; a budget now below what its remaining blocks need is an error."""
        assert self.run is not None
        plan, budget = self.run.plan, self.budget.tensor_bytes
        if budget == plan.budget:
            return
        needed = max(block.predicted_peak for block in plan.blocks[self.run.active_block :])
        if budget < needed:
            raise ValueError(
                f"the checkpoint's plan was made for a {format_bytes(plan.budget)} budget and its remaining blocks "
                f"need {format_bytes(needed)}; this run's budget is {format_bytes(budget)}. Resume with "
                f"memory_budget >= {format_bytes(needed)}, or start a new run (without ckpt_path) to plan anew"
            )
        rank_zero_warn(
            f"resuming a run planned for {format_bytes(plan.budget)} under {format_bytes(budget)}: "
            "it keeps its plan (batch sizes and blocks) so that it continues exactly"
        )

    def _warn_if_device_is_small(self) -> None:
        available = device_memory_bytes(self.root_device)
        if available is not None and available < self.budget.bytes:
            rank_zero_warn(
                f"the memory budget ({self.budget}) is larger than the memory of "
                f"{self.root_device} ({format_bytes(available)}): the plan may not fit"
            )

    def warn_if_max_epochs_cut_plan(self, trainer: pl.Trainer) -> None:
        """Warn when the Trainer's ``max_epochs`` ends the run before the plan's horizons do."""
        assert self.run is not None
        run = self.run
        planned = run.progress.planned_epochs(run.active_block, run.num_blocks, run.steps_per_epoch)
        needed = trainer.current_epoch - run.progress.epochs_in_block + planned
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs < needed:
            rank_zero_warn(
                f"max_epochs={trainer.max_epochs} ends the run before NeuroFlux's plan does (up to {needed} epochs "
                f"over {run.num_blocks} blocks): later blocks may not train"
            )

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        """During ``fit``: the active block's training data; the user's own validation loader, as is."""
        if not self._fitting():
            return dataloader
        training = self.trainer.state.stage == RunningStage.TRAINING
        require_map_style(dataloader, "training" if training else "validation")  # type: ignore[arg-type]
        if training:
            self._sources.train = dataloader  # type: ignore[assignment]
            assert self.run is not None
            return self.run.train_loader()
        if self._sources.val is None:
            self._sources.val = dataloader  # type: ignore[assignment]
        return dataloader

    # ------------------------------------------------------------------ steps
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if not self._fitting():
            return super().training_step(*args, **kwargs)
        run = self.run
        assert run is not None
        if run.finished:  # only min_epochs/min_steps keep the Trainer going past NeuroFlux's end
            return None
        x, y = split_batch(args[0])
        module = self.lightning_module
        optimizers = module.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        units = run.active_units
        with self.precision_plugin.train_step_context():
            losses = run.train_batch(x, y, optimizers=optimizers, backward=module.manual_backward)
        for unit, loss in zip(units, losses):
            module.log(f"neuroflux/loss_unit_{unit}", loss, batch_size=len(y))
        module.log("neuroflux/block", float(run.active_block), prog_bar=True, batch_size=len(y))
        module.log("neuroflux/batch_size", float(run.batch_size), batch_size=len(y))  # the block's, not a remainder's
        return None

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if not self._fitting():
            return self._evaluation_step(super().validation_step, args, kwargs)
        assert self.run is not None and self.decomposition is not None
        x, y = split_batch(args[0])
        dataloader_idx = kwargs.get("dataloader_idx", args[2] if len(args) > 2 else 0)
        deployed = self.run.validate_batch(x, y, count=dataloader_idx == 0)
        with standing_in(self.decomposition.network, deployed, "validation_step"):
            return super().validation_step(*args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step(super().test_step, args, kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step(super().predict_step, args, kwargs)

    def _evaluation_step(self, step: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The user's step, on the selected exit unless ``evaluate="full"`` or NeuroFlux trained nothing."""
        if self.options.evaluate == "full" or self.run is None or not self.run.records:
            return step(*args, **kwargs)
        assert self.decomposition is not None
        run = self.run
        forward = CountingForward(lambda inputs, *a, **k: run.validation.exit_forward(inputs, run.deploy_unit))
        with standing_in(self.decomposition.network, forward, step.__name__):
            return step(*args, **kwargs)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._validation_started = time.perf_counter()

    def on_validation_end(self) -> None:
        super().on_validation_end()
        if self._validation_started is not None and self._fitting():
            self.validation_seconds += time.perf_counter() - self._validation_started
        self._validation_started = None

    # ------------------------------------------------------------------ state
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self.run is not None:
            checkpoint[CHECKPOINT_KEY] = self.run.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        if self._fitting():
            self._saved_state = state  # the run is rebuilt from it in setup
        elif self.run is not None:
            self.run.load_state_dict(state)
        else:
            assert self.decomposition is not None
            inference = self.options.replace(cache=False)  # evaluation only: nothing is trained or cached
            self.run = BlockwiseRun.from_state(self.decomposition, state, None, inference, device=self.root_device)


def _require_validation(trainer: pl.Trainer) -> None:
    """Fail before any work when ``fit`` has no validation data: NeuroFlux scores its exits on it."""
    if trainer.limit_val_batches == 0 or not has_val_dataloader(trainer):
        raise ValueError(
            "NeuroFlux needs validation data: it scores every exit on it to choose the one to deploy and to end "
            "blocks, and caches each block's outputs for it. Pass trainer.fit(model, train_loader, val_loader) "
            "(or a datamodule with val_dataloader()) and keep limit_val_batches above 0. To hold out part of the "
            "training set: train_set, val_set = torch.utils.data.random_split(dataset, [0.9, 0.1], "
            "generator=torch.Generator().manual_seed(0))"
        )


def _loader_batch_size(trainer: pl.Trainer) -> int | None:
    """The batch size of the user's training loader: what their learning rate was tuned for.

    Known before the first block's optimizers are built, so every block scales from the same reference.
    """
    return getattr(train_dataloader_of(trainer), "batch_size", None)


def _prepared_inputs(trainer: pl.Trainer, network: torch.nn.Module | None) -> PreparedInputs | None:
    """What the LightningModule's ``forward`` does to the training inputs before ``network`` (normalizing,
    scaling ``uint8`` images...), tried on the training set's first sample; None: nothing, or no network."""
    loader = train_dataloader_of(trainer)
    if network is None or not isinstance(loader, torch.utils.data.DataLoader):
        return None
    with torch.random.fork_rng(devices=[]):  # a random augmentation of the sample leaves the seeded run as it was
        try:
            sample, _ = split_batch(loader.collate_fn([loader.dataset[0]]))
        except Exception:  # noqa: BLE001 - a data set or collate that needs more than one sample: batches as they come
            return None
        return PreparedInputs.of(trainer.lightning_module, network, sample)


def _infer_input_shape(trainer: pl.Trainer) -> tuple[int, ...]:
    datamodule = trainer.datamodule
    if datamodule is not None and getattr(datamodule, "input_shape", None) is not None:
        return tuple(datamodule.input_shape)
    example = trainer.lightning_module.example_input_array
    if isinstance(example, Tensor):
        return tuple(example.shape[1:])
    x, _ = split_batch(next(iter(train_dataloader_of(trainer))))
    return tuple(x.shape[1:])
