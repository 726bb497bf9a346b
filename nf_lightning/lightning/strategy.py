"""``NeuroFluxStrategy``: a thin Lightning adapter over :class:`~nf_lightning.core.train.run.BlockwiseRun`.

The strategy decides where and how things run; what training means lives in
the core run object. During ``fit`` it hands training batches to the run,
runs the user's own ``validation_step`` with the network standing for the
exit NeuroFlux would deploy now, changes blocks at epoch ends through a
callback's public hooks, and saves the run's state under one checkpoint key
(``"neuroflux"``). After ``fit`` (and from a checkpoint in a fresh process),
``validate``, ``test`` and ``predict`` use the selected exit unless
``evaluate="full"``.

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
import inspect
import time
import warnings
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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from nf_lightning.core.train import batches
from nf_lightning.core.train.batches import split_batch
from nf_lightning.core.memory.budget import format_bytes, parse_bytes, tensor_budget
from nf_lightning.core.cache import CacheSpaceError
from nf_lightning.core.network.decompose import Decomposition, decompose
from nf_lightning.core.memory.meter import device_memory_bytes
from nf_lightning.core.train.optim_recipe import SchedulerSpec
from nf_lightning.core.train.run import BlockwiseRun, DataSources
from nf_lightning.core.train.schedule import BlockSchedule
from nf_lightning.lightning._internals import (
    TrainerDevices,
    parse_optimizer_recipe,
    reload_train_dataloader,
    train_dataloader_of,
)
from nf_lightning.lightning.ddp import UnwrappedDDPStrategy, collective_for

AUX_POLICIES = ("adaptive", "classic")
EVALUATE = ("exit", "full")
CHECKPOINT_KEY = "neuroflux"


class _NeuroFluxAdapter:
    """NeuroFlux's Lightning adapter, shared by :class:`NeuroFluxStrategy` (one device) and
    :class:`NeuroFluxDDPStrategy` (several processes): it comes before a Lightning strategy
    in the method resolution order, so ``super()`` reaches that strategy."""

    def _configure(
        self,
        *,
        memory_budget: str | int,
        epochs_per_block: int | Sequence[int],
        memory_overhead: float,
        batch_limit: int,
        rho: float,
        aux: str,
        cache: bool,
        cache_dir: str | Path | None,
        cache_dtype: str,
        cache_workers: int,
        cache_seed: int,
        input_shape: Sequence[int] | None,
        lr_reference_batch: int | None,
        lr_scaling: str,
        lr_decay: str,
        min_steps_per_block: int,
        max_epochs_per_block: int,
        min_epochs_per_block: int,
        block_patience: int | None,
        block_min_delta: float,
        block_anneal_epochs: int,
        single_block: bool,
        feature_augment: str,
        meter_full_steps: int,
        meter_sample_every: int,
        exit_tolerance: float,
        evaluate: str,
    ) -> None:
        """Check and keep the NeuroFlux options (see :class:`NeuroFluxStrategy` for each)."""
        if aux not in AUX_POLICIES:
            raise ValueError(f"unknown aux policy {aux!r}; choose one of {AUX_POLICIES}")
        if evaluate not in EVALUATE:
            raise ValueError(f"evaluate must be one of {EVALUATE}, got {evaluate!r}")
        if batch_limit < 1 or rho < 0:
            raise ValueError(f"batch_limit must be >= 1 and rho >= 0, got {batch_limit} and {rho}")
        if not 0.0 <= exit_tolerance <= 1.0:
            raise ValueError(f"exit_tolerance is a fraction of accuracy in [0, 1], got {exit_tolerance}")
        self.memory_budget = parse_bytes(memory_budget)
        self.tensor_budget = tensor_budget(memory_budget, memory_overhead)
        self.epochs_per_block = epochs_per_block
        self.batch_limit = batch_limit
        self.rho = rho
        self.aux = aux
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_dtype = cache_dtype
        self.cache_workers = cache_workers
        self.cache_seed = cache_seed
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.lr_reference_batch = lr_reference_batch
        self.schedule = BlockSchedule.from_epochs(
            epochs_per_block,
            min_steps=min_steps_per_block,
            max_epochs=max_epochs_per_block,
            min_epochs=min_epochs_per_block,
            patience=block_patience,
            min_delta=block_min_delta,
            anneal_epochs=block_anneal_epochs,
            decay=lr_decay,
            lr_scaling=lr_scaling,
        )
        self.single_block = single_block
        self.exit_tolerance = exit_tolerance
        self.feature_augment = feature_augment
        self.meter_full_steps = meter_full_steps
        self.meter_sample_every = meter_sample_every
        self.evaluate = evaluate

        self.decomposition: Decomposition | None = None
        self.run: BlockwiseRun | None = None
        self.validation_seconds = 0.0  # wall time of validation during fit (the user's steps included)
        self._validation_started: float | None = None
        self._saved_state: dict[str, Any] | None = None
        self._sources = DataSources(train=None, val=None)  # type: ignore[arg-type]  # filled as loaders arrive
        self._automatic_optimization: bool | None = None

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

    @property
    def active_block(self) -> int | None:
        """Deprecated: ``strategy.run.active_block``."""
        _deprecated("NeuroFluxStrategy.active_block", "NeuroFluxStrategy.run.active_block")
        return None if self.run is None else self.run.active_block

    def exit_modules(self) -> Any:
        """Deprecated: ``strategy.run.exits``."""
        _deprecated("NeuroFluxStrategy.exit_modules()", "NeuroFluxStrategy.run.exits")
        if self.run is None:
            raise RuntimeError("exits are built when fit starts")
        return self.run.exits

    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        self.decomposition = decompose(model)
        trainer = model.trainer
        if trainer.state.fn != TrainerFn.FITTING:
            return
        self._automatic_optimization = model.automatic_optimization
        model.automatic_optimization = False  # each unit steps its own optimizer
        if not any(isinstance(c, NeuroFluxHooks) for c in trainer.callbacks):
            trainer.callbacks.insert(0, NeuroFluxHooks())

    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            super().setup(trainer)
            return
        assert self.accelerator is not None and self.decomposition is not None
        self.accelerator.setup(trainer)
        self._warn_if_device_is_small()
        options = {
            "device": self.root_device,
            "cache_dir": (self.cache_dir or Path(trainer.default_root_dir) / "neuroflux_cache") if self.cache else None,
            "cache_dtype": self.cache_dtype,
            "cache_workers": self.cache_workers,
            "cache_seed": self.cache_seed,
            "lr_reference_batch": self.lr_reference_batch or _loader_batch_size(trainer),
            "exit_tolerance": self.exit_tolerance,
            "schedule": self.schedule,
            "feature_augment": self.feature_augment,
            "meter_full_steps": self.meter_full_steps,
            "meter_sample_every": self.meter_sample_every,
            "collective": collective_for(self),
        }
        if self._saved_state is not None:
            self.run = BlockwiseRun.from_state(self.decomposition, self._saved_state, self._recipe, **options)
            self._saved_state = None
            self._check_budget_of_resumed_plan()
        else:
            self.run = BlockwiseRun.create(
                self.decomposition,
                self._recipe,
                self.input_shape or _infer_input_shape(trainer),
                self.tensor_budget,
                epochs_per_block=self.epochs_per_block,
                batch_limit=self.batch_limit,
                rho=self.rho,
                aux=self.aux,
                single_block=self.single_block,
                **options,
            )
        rank_zero_info(self.run.plan.describe())
        datamodule = trainer.datamodule
        self._sources.data_id = str(getattr(datamodule, "fingerprint", "") or "")
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
        self.optimizers = list(self.run.optimizers)
        self.lr_scheduler_configs = [spec.extra for spec in self.run.schedulers]

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
            self.lightning_module.automatic_optimization = self._automatic_optimization
            self._automatic_optimization = None
        super().teardown()

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # the run restores its per-unit optimizers from its own state

    def _check_budget_of_resumed_plan(self) -> None:
        """A resumed run keeps its plan; a budget now below what its remaining blocks need is an error."""
        assert self.run is not None
        plan = self.run.plan
        if self.tensor_budget == plan.budget:
            return
        needed = max(block.predicted_peak for block in plan.blocks[self.run.active_block :])
        if self.tensor_budget < needed:
            raise ValueError(
                f"the checkpoint's plan was made for a {format_bytes(plan.budget)} budget and its remaining blocks "
                f"need {format_bytes(needed)}; this run's budget is {format_bytes(self.tensor_budget)}. Resume with "
                f"memory_budget >= {format_bytes(needed)}, or start a new run (without ckpt_path) to plan anew"
            )
        rank_zero_warn(
            f"resuming a run planned for {format_bytes(plan.budget)} under {format_bytes(self.tensor_budget)}: "
            "it keeps its plan (batch sizes and blocks) so that it continues exactly"
        )

    def _warn_if_device_is_small(self) -> None:
        available = device_memory_bytes(self.root_device)
        if available is not None and available < self.memory_budget:
            rank_zero_warn(
                f"the memory budget ({format_bytes(self.memory_budget)}) is larger than the memory of "
                f"{self.root_device} ({format_bytes(available)}): the plan may not fit"
            )

    def warn_if_max_epochs_cut_plan(self, trainer: pl.Trainer) -> None:
        """Warn when the Trainer's ``max_epochs`` ends the run before the plan's horizons do."""
        assert self.run is not None
        run = self.run
        needed = trainer.current_epoch - run.epochs_in_block + run.planned_epochs()
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
        if self.trainer.state.stage == RunningStage.TRAINING:
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
        module.log("neuroflux/batch_size", float(len(y)), batch_size=len(y))
        return None

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if not self._fitting():
            return self._evaluation_step(super().validation_step, args, kwargs)
        assert self.run is not None
        x, y = split_batch(args[0])
        dataloader_idx = kwargs.get("dataloader_idx", args[2] if len(args) > 2 else 0)
        deployed = self.run.validate_batch(x, y, count=dataloader_idx == 0)
        with self._standing_in(deployed, "validation_step"):
            return super().validation_step(*args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step(super().test_step, args, kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step(super().predict_step, args, kwargs)

    def _evaluation_step(self, step: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The user's step, on the selected exit unless ``evaluate="full"`` or NeuroFlux trained nothing."""
        if self.evaluate == "full" or self.run is None or not self.run.records:
            return step(*args, **kwargs)
        run = self.run
        forward = _CountingForward(lambda inputs, *a, **k: run.exit_forward(inputs, run.deploy_unit))
        with self._standing_in(forward, step.__name__):
            return step(*args, **kwargs)

    @contextlib.contextmanager
    def _standing_in(self, forward: Any, step_name: str) -> Iterator[None]:
        """Let ``forward`` stand in for the decomposed network's forward while the user's step runs."""
        assert self.decomposition is not None
        network = self.decomposition.network
        if network is None:
            raise RuntimeError(
                "NeuroFlux evaluates its deployable exit by standing in for the forward of the network it "
                "decomposed, but it was given explicit units; give it the network (a module of a supported form) "
                "or pass evaluate='full'"
            )
        before = getattr(forward, "calls", 0)
        network.forward = forward
        try:
            yield
        finally:
            del network.forward
        if getattr(forward, "calls", 1) == before:
            raise RuntimeError(
                f"{step_name} ran without calling the network NeuroFlux decomposed ({type(network).__name__}); "
                f"NeuroFlux evaluates the exit it would deploy by standing in for that network's forward, so "
                f"{step_name} must compute its outputs through it (e.g. self(x) or self.net(x)), not through its "
                "submodules; or use NeuroFluxStrategy(evaluate='full') outside fit"
            )

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
            self.run = BlockwiseRun.from_state(self.decomposition, state, device=self.root_device)


class NeuroFluxStrategy(_NeuroFluxAdapter, TrainerDevices, SingleDeviceStrategy):
    """Train a CNN block by block with local losses under a hard memory budget.

    A bare ``Trainer(strategy="neuroflux")`` uses a 300 MB budget; each block
    trains for up to 20 epochs with its learning rate decaying (cosine) over them,
    and ends once its best exit has not improved for 2 epochs. The Trainer's ``max_epochs``/``max_time`` bound the run (a
    warning says so when they cut the plan short); NeuroFlux ends it when the
    last block is trained.

    Args:
        memory_budget: device memory for training, e.g. ``"300MB"`` (10^6 bytes),
            ``"0.5GiB"`` (2^30) or a number of bytes.
        epochs_per_block: each block's horizon in epochs (one number, or one per block): its
            learning rate decays over it and it ends there at the latest.
        memory_overhead: device bytes held per tensor byte the meter counts; the plan and the
            guard hold tensor bytes to ``memory_budget / memory_overhead``. 1.0 (the default)
            makes the budget one of tensor bytes (CUDA's ``memory_allocated``); on CPU a step's
            resident memory measured 1.1-2.2x its tensor bytes (see the README).
        batch_limit: largest batch size any block uses (``B`` in Algorithm 1).
        rho: grouping threshold of Algorithm 1.
        aux: ``"adaptive"`` (AAN, the paper's heads) or ``"classic"`` (256 filters).
        cache: write each finished block's outputs to disk and train the next
            block from them (§5.3). ``False`` runs every batch through the
            frozen units before the active block instead (kept on the device,
            outside the budget): slower, but later blocks see augmented data.
        cache_dir: where caches go; ``<default_root_dir>/neuroflux_cache`` if None.
        cache_dtype: ``"float16"`` or ``"float32"``.
        cache_workers: worker processes reading cached data (0: a background thread).
        cache_seed: base seed of the shuffling of cached training data.
        input_shape: one sample's shape; from the data module's ``input_shape``,
            the module's ``example_input_array`` or the first batch if None.
        lr_reference_batch: the batch size your recipe's learning rate was tuned for; the
            training loader's batch size if None. Each block's rate follows its own batch
            size from there by ``lr_scaling`` (``"linear"``, ``"sqrt"`` or ``"none"``).
        lr_decay: ``"cosine"`` decays each block's rate to zero over its horizon, ``"none"``
            keeps it; either way only when ``configure_optimizers`` brings no scheduler
            (yours are stepped instead, fresh for every block).
        min_steps_per_block: lengthen a block's horizon (``epochs_per_block``) until it gets
            at least this many steps, up to ``max_epochs_per_block``.
        min_epochs_per_block: epochs before ``block_patience`` may end a block.
        block_patience: end a block once its best exit has not improved by
            ``block_min_delta`` for this many epochs; None trains every horizon to its end.
        block_anneal_epochs: a block that stops improving before its horizon first decays its
            rate from where it is to zero over this many epochs, then ends (0: it ends at once).
        single_block: all units as one block at one batch size (classic local learning).
        feature_augment: random flips and shifted crops of cached activations, so blocks after
            the first see fresh views every epoch: ``"flip_crop"``, ``"flip"``, ``"crop"`` or ``"none"``.
        meter_full_steps, meter_sample_every: every unit step of a block's first
            ``meter_full_steps`` batches (and again after a shrink) is metered and held to the
            budget as a transaction, then one batch in ``meter_sample_every`` (1: all).
        exit_tolerance: exits within this accuracy (a fraction) of the best count
            as equally good and the one with the fewest parameters is deployed.
        evaluate: what ``validate``/``test``/``predict`` outside ``fit`` run:
            ``"exit"`` (the selected exit) or ``"full"`` (the whole network).
        device: the training device; from the Trainer's ``accelerator``/``devices`` if None.
    """

    strategy_name = "neuroflux"

    def __init__(
        self,
        memory_budget: str | int = "300MB",
        epochs_per_block: int | Sequence[int] = 20,
        memory_overhead: float = 1.0,
        batch_limit: int = 256,
        rho: float = 0.4,
        aux: str = "adaptive",
        cache: bool = True,
        cache_dir: str | Path | None = None,
        cache_dtype: str = "float16",
        cache_workers: int = 0,
        cache_seed: int = 0,
        input_shape: Sequence[int] | None = None,
        lr_reference_batch: int | None = None,
        lr_scaling: str = "linear",
        lr_decay: str = "cosine",
        min_steps_per_block: int = 0,
        max_epochs_per_block: int = 1000,
        min_epochs_per_block: int = 1,
        block_patience: int | None = 2,
        block_min_delta: float = 0.0,
        block_anneal_epochs: int = 2,
        single_block: bool = False,
        feature_augment: str = "none",
        meter_full_steps: int = 5,
        meter_sample_every: int = 20,
        exit_tolerance: float = 0.0,
        evaluate: str = "exit",
        device: str | torch.device | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device=device or "cpu", accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin
        )
        self._device = torch.device(device) if device is not None else None
        self._configure(
            memory_budget=memory_budget,
            epochs_per_block=epochs_per_block,
            memory_overhead=memory_overhead,
            batch_limit=batch_limit,
            rho=rho,
            aux=aux,
            cache=cache,
            cache_dir=cache_dir,
            cache_dtype=cache_dtype,
            cache_workers=cache_workers,
            cache_seed=cache_seed,
            input_shape=input_shape,
            lr_reference_batch=lr_reference_batch,
            lr_scaling=lr_scaling,
            lr_decay=lr_decay,
            min_steps_per_block=min_steps_per_block,
            max_epochs_per_block=max_epochs_per_block,
            min_epochs_per_block=min_epochs_per_block,
            block_patience=block_patience,
            block_min_delta=block_min_delta,
            block_anneal_epochs=block_anneal_epochs,
            single_block=single_block,
            feature_augment=feature_augment,
            meter_full_steps=meter_full_steps,
            meter_sample_every=meter_sample_every,
            exit_tolerance=exit_tolerance,
            evaluate=evaluate,
        )

    # ------------------------------------------------------------------ device
    @property
    def root_device(self) -> torch.device:
        return self._device or self.trainer_device() or torch.device("cpu")


class NeuroFluxDDPStrategy(_NeuroFluxAdapter, UnwrappedDDPStrategy):
    """NeuroFlux on several processes and machines through Lightning's DDP.

    ``Trainer(strategy="neuroflux_ddp", devices=N, num_nodes=M)`` (or an instance, for options;
    torchrun, SLURM and Lightning's other cluster environments work as with ``"ddp"``). Every
    rank trains the same blocks on its ``DistributedSampler`` shard:

    - **Gradients:** each unit steps right after its own backward pass (Algorithm 2), so its
      gradients are averaged across ranks there, by one in-place all-reduce per gradient
      tensor, before its optimizer steps. No ``DistributedDataParallel`` wrapper: it would
      reduce the whole network's gradients at once, keeping every unit's alive, which the
      memory plan does not allow; an in-place all-reduce needs no flat buffer either.
    - **The budget is per device**, and a step that does not fit on one rank is dropped and
      retried in smaller pieces on every rank, so the ranks stay in lock step.
    - **Learning rate:** ``lr_reference_batch`` (the training loader's batch size by default) is
      a per-process batch, like a DDP loader's: a block's rate follows its per-process batch
      size from there, as on one device, and the global batch is ``N x M`` times that.
    - **BatchNorm** running statistics are averaged before every validation and cache write,
      so the ranks evaluate, cache and checkpoint the same network.
    - **One plan:** every rank profiles and partitions, and the plans are checked to be the same
      (a mismatch raises :class:`~nf_lightning.core.train.distributed.PlanMismatch` on every rank).
    - **Per-rank caches** under ``cache_dir/rank<r>-of-<n>``, each of its own shard; a run resumed
      with another number of ranks rebuilds them (with a warning).
    - **Validation** counts are summed over ranks, so exit records, block ends and the exit
      selected agree everywhere; checkpoints and the exported exit are written by rank 0.

    Args:
        memory_budget, epochs_per_block, **options: as :class:`NeuroFluxStrategy` (all its options
            but ``device``), per device.
        timeout, process_group_backend, start_method, accelerator, parallel_devices,
            cluster_environment, checkpoint_io, precision_plugin: as
            :class:`~nf_lightning.lightning.ddp.UnwrappedDDPStrategy` (a dead rank fails the
            job after ``timeout``, 5 minutes by default; gloo's own is 30).

    Example (one process per device; here two on the CPU, launched by Lightning or torchrun)::

        >>> strategy = NeuroFluxDDPStrategy("10MB", epochs_per_block=5, block_patience=None)
        >>> strategy.memory_budget, strategy.schedule.patience, strategy.strategy_name
        (10000000, None, 'neuroflux_ddp')
        >>> trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2)  # doctest: +SKIP
    """

    strategy_name = "neuroflux_ddp"

    def __init__(
        self, memory_budget: str | int = "300MB", epochs_per_block: int | Sequence[int] = 20, **options: Any
    ) -> None:
        defaults = _option_defaults()
        ddp = {k: options.pop(k) for k in list(options) if k in DDP_OPTIONS}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown}; NeuroFlux's are {sorted(defaults)}, DDP's {sorted(DDP_OPTIONS)}"
            )
        super().__init__(**ddp)
        self._configure(**{**defaults, **options, "memory_budget": memory_budget, "epochs_per_block": epochs_per_block})


DDP_OPTIONS = frozenset(inspect.signature(UnwrappedDDPStrategy.__init__).parameters) - {"self"}


def _option_defaults() -> dict[str, Any]:
    """NeuroFlux's options and their defaults: :class:`NeuroFluxStrategy`'s signature, the one place they are set."""
    parameters = inspect.signature(NeuroFluxStrategy.__init__).parameters.values()
    strategy_only = {"self", "device", "accelerator", "checkpoint_io", "precision_plugin"}
    return {p.name: p.default for p in parameters if p.name not in strategy_only}


class NeuroFluxHooks(pl.Callback):
    """The strategy's bridge to Lightning's epoch hooks; added by the strategy, holds no state of its own.

    At each training epoch's end the run closes the epoch (its schedulers, and
    at a block's end the caches and the next block); validation passes are
    opened and closed around the user's ``validation_step`` and the exits'
    accuracies logged as ``neuroflux/acc_exit_<unit>``, with the deployed exit
    as ``neuroflux/deploy_unit``.
    """

    @staticmethod
    def _run(trainer: pl.Trainer) -> BlockwiseRun | None:
        strategy = trainer.strategy
        return strategy.run if isinstance(strategy, _NeuroFluxAdapter) and trainer.state.fn == TrainerFn.FITTING else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run(trainer)
        if run is None:
            return
        if trainer.limit_val_batches == 0 or trainer.val_dataloaders is None:
            rank_zero_warn(
                "validation is off: NeuroFlux cannot score its exits, so no exit is selected and block patience "
                "never acts; give the Trainer a validation loader"
            )
        elif sum(trainer.num_val_batches) == 0:
            raise ValueError(
                "the validation loader is empty: NeuroFlux scores its exits on validation data; give it samples"
            )
        version = run.loader_version
        self._end_epochs(trainer, lambda: run.catch_up(trainer.current_epoch))  # a checkpoint taken mid-end
        self._after_change(trainer, run, version)
        trainer.strategy.warn_if_max_epochs_cut_plan(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run(trainer)
        if run is not None:
            batches = trainer.num_training_batches
            run.begin_epoch(int(batches) if batches != float("inf") else None)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run(trainer)
        if run is not None:
            run.begin_validation()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run(trainer)
        if run is None:
            return
        unit = run.deploy_unit
        accuracies = run.end_validation(record=not trainer.sanity_checking)
        for exit_unit, accuracy in accuracies.items():
            pl_module.log(f"neuroflux/acc_exit_{exit_unit}", accuracy)
        pl_module.log("neuroflux/deploy_unit", float(unit))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run(trainer)
        if run is None:
            return
        version = run.loader_version
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self._end_epochs(trainer, lambda: run.end_epoch(trainer.current_epoch, metrics))
        self._after_change(trainer, run, version)

    @staticmethod
    def _end_epochs(trainer: pl.Trainer, end: Callable[[], Any]) -> None:
        """Run ``end``; if a cache does not fit on disk, save a checkpoint to resume from, then fail clearly."""
        try:
            end()
        except CacheSpaceError as error:
            path = Path(trainer.default_root_dir) / "neuroflux-disk-full.ckpt"
            trainer.save_checkpoint(path)
            raise CacheSpaceError(
                error.errno, f"{error.strerror}. A checkpoint was saved to {path}: once there is room, resume with "
                f"trainer.fit(..., ckpt_path={str(path)!r})"
            ) from error

    @staticmethod
    def _after_change(trainer: pl.Trainer, run: BlockwiseRun, loader_version: int) -> None:
        strategy = trainer.strategy
        assert isinstance(strategy, _NeuroFluxAdapter)
        if run.loader_version != loader_version:
            strategy.sync_optimizers()
            reload_train_dataloader(trainer)
        if run.finished:
            trainer.should_stop = True


class _CountingForward:
    """A forward that counts its calls (to tell a step that bypassed it)."""

    def __init__(self, forward: Callable[..., Tensor]) -> None:
        self.forward = forward
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        return self.forward(*args, **kwargs)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", FutureWarning, stacklevel=3)


_MOVED = {"rebatch": batches.rebatch}


def __getattr__(name: str) -> Any:
    """Deprecated: ``rebatch`` moved to :mod:`nf_lightning.core.train.batches`."""
    if name in _MOVED:
        _deprecated(f"nf_lightning.lightning.strategy.{name}", f"nf_lightning.core.train.batches.{name}")
        return _MOVED[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _loader_batch_size(trainer: pl.Trainer) -> int | None:
    """The batch size of the user's training loader: what their learning rate was tuned for.

    Known before the first block's optimizers are built, so every block scales from the same reference.
    """
    return getattr(train_dataloader_of(trainer), "batch_size", None)


def _infer_input_shape(trainer: pl.Trainer) -> tuple[int, ...]:
    datamodule = trainer.datamodule
    if datamodule is not None and getattr(datamodule, "input_shape", None) is not None:
        return tuple(datamodule.input_shape)
    example = trainer.lightning_module.example_input_array
    if isinstance(example, Tensor):
        return tuple(example.shape[1:])
    x, _ = split_batch(next(iter(train_dataloader_of(trainer))))
    return tuple(x.shape[1:])


if NeuroFluxDDPStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        NeuroFluxDDPStrategy.strategy_name,
        NeuroFluxDDPStrategy,
        description="NeuroFlux adaptive local learning on several processes (Lightning's DDP)",
    )
if NeuroFluxStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        NeuroFluxStrategy.strategy_name, NeuroFluxStrategy, description="NeuroFlux adaptive local learning"
    )

