"""``BlockwiseRun``: the one object that owns a NeuroFlux run, free of Lightning.

It holds the plan (blocks, batch sizes, epochs), the exit heads, the active
block and its progress, the per-unit optimizers and schedulers, the exit
records and the activation caches, and saves all of it in one ``state_dict``.
The active block is saved state, not a function of the epoch number, so a
block may end for any reason (its epochs, later its exits' patience) and a
resumed run continues exactly where it stopped.

A driver (the Lightning strategy, or a plain loop) calls, in order:
:meth:`start`; per epoch :meth:`train_loader`, :meth:`train_batch` for every
batch, then optionally :meth:`begin_validation` / :meth:`validate_batch` /
:meth:`end_validation`; and :meth:`end_epoch`, which ends blocks, writes the
caches and enters the next block. :attr:`batch_size` is the one place a
block's batch size is decided (the plan's, lowered if a step had to shrink).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from nf_lightning.core.network.decompose import decompose
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    >>> data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    >>> recipe = lambda: (torch.optim.SGD(net.parameters(), lr=0.1), [])
    >>> run = BlockwiseRun.create(decompose(net), recipe, (3, 8, 8), budget=10**8, cache_dir=None)
    >>> run.attach_data(DataSources(DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)))
    >>> run.start()
    >>> epoch = 0
    >>> while not run.finished:
    ...     run.begin_epoch()
    ...     for x, y in run.train_loader():
    ...         losses = run.train_batch(x, y)
    ...     event = run.end_epoch(epoch)
    ...     epoch += 1
    >>> epoch, run.ended_blocks[-1]["reason"]
    (1, 'horizon')
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from nf_lightning.core.exits.aux_heads import build_aux_heads
from nf_lightning.core.train.batches import rebatch, samples_in_order
from nf_lightning.core.memory.budget import format_bytes
from nf_lightning.core.cache import (
    ActivationCacheWriter,
    CacheCorrupt,
    CachedActivations,
    CacheMissing,
    cache_loader,
    claim_cache_dir,
    open_cache,
    release_cache_dir,
)
from nf_lightning.core.network.decompose import Decomposition
from nf_lightning.core.train.distributed import LOCAL, Collective, LocalCollective, PeerStepFailed, shard_sampler
from nf_lightning.core.train.feature_augment import POLICIES as AUGMENT_POLICIES
from nf_lightning.core.train.feature_augment import augment_features
from nf_lightning.core.exits.selection import ExitModel, ExitRecord, exit_parameters, select_exit
from nf_lightning.core.train.local_learning import LocalBlock, train_with_retry
from nf_lightning.core.memory.enforcement import BudgetGuard
from nf_lightning.core.train.optim_recipe import Recipe, SchedulerSpec, replicate_recipe
from nf_lightning.core.plan.training_plan import TrainingPlan, make_plan
from nf_lightning.core.train.schedule import BlockSchedule, Patience, cosine_factor

log = logging.getLogger("nf_lightning")

SPLITS = ("train", "val")
STATE_VERSION = 1

# What end_epoch reports.
CONTINUE, NEXT_BLOCK, DONE, SEEN = "continue", "next_block", "done", "seen"


@dataclass
class DataSources:
    """The user's data as the run needs it.

    Args:
        train: the training loader (with augmentation); block 0 trains from it.
        val: the validation loader; exits are scored on it.
        train_unaugmented: the training set without augmentation, which block
            0's cache is written from; ``train.dataset`` if None.
        data_id: identifies the data in cache fingerprints (e.g. a data module's fingerprint).
    """

    train: DataLoader
    val: DataLoader
    train_unaugmented: Dataset | None = None
    data_id: str = ""


class BlockwiseRun:
    """Block-wise adaptive local learning (Algorithms 1-2 and §5.3-5.4 of the paper).

    Args:
        decomposition: units and head of the network (the model's own modules).
        exits: one classifier per unit; the last is the model's own head.
        plan: blocks, batch sizes and epochs.
        recipe: builds the user's optimizer (and schedulers) afresh; replicated per unit.
        device: where the active block trains.
        cache_dir: where activation caches go; None trains every block from the
            raw data through the frozen units before it (no cache).
        cache_dtype: ``"float16"`` or ``"float32"``.
        cache_workers: loader worker processes for cached data (0: a background thread).
        cache_seed: base seed of the shuffling of cached training data.
        lr_reference_batch: the batch size the recipe's learning rate was tuned for; each
            block's rate follows its own batch size from there (``schedule.lr_scaling``).
            The user's training loader's batch size if None.
        exit_tolerance: exits within this accuracy of the best count as equal; the smallest wins.
        schedule: each block's horizon, patience and learning-rate decay
            (:class:`~nf_lightning.core.train.schedule.BlockSchedule`); the plan's epochs, cosine decay if None.
        feature_augment: what blocks reading cached activations do to them each step
            (:func:`~nf_lightning.core.train.feature_augment.augment_features`): ``"flip_crop"``,
            ``"flip"``, ``"crop"`` or ``"none"``.
        meter_full_steps, meter_sample_every: every unit step of a block's first
            ``meter_full_steps`` batches (and after a shrink) is metered and held to the
            budget, then one batch in ``meter_sample_every``
            (:class:`~nf_lightning.core.memory.enforcement.BudgetGuard`).
        collective: the other ranks when several processes train together
            (:class:`~nf_lightning.core.train.distributed.Collective`): each rank trains on its own
            shard and caches it under ``cache_dir/rank<r>-of-<n>``; gradients are averaged per
            unit, steps that do not fit on one rank are dropped on all, BatchNorm statistics
            averaged and validation counts summed. One process if None.
    """

    def __init__(
        self,
        decomposition: Decomposition,
        exits: nn.ModuleList,
        plan: TrainingPlan,
        recipe: Recipe | None,
        *,
        device: torch.device | str = "cpu",
        cache_dir: Path | str | None = None,
        cache_dtype: str = "float16",
        cache_workers: int = 0,
        cache_seed: int = 0,
        lr_reference_batch: int | None = None,
        exit_tolerance: float = 0.0,
        schedule: BlockSchedule | None = None,
        feature_augment: str = "none",
        meter_full_steps: int = 5,
        meter_sample_every: int = 20,
        collective: Collective | LocalCollective | None = None,
    ) -> None:
        if feature_augment not in AUGMENT_POLICIES:
            raise ValueError(f"feature_augment must be one of {AUGMENT_POLICIES}, got {feature_augment!r}")
        if len(exits) != len(decomposition.units):
            raise ValueError(f"need one exit per unit, got {len(exits)} exits for {len(decomposition.units)} units")
        self.decomposition = decomposition
        self.units = decomposition.units
        self.exits = exits
        self.plan = plan
        self.recipe = recipe
        self.device = torch.device(device)
        self.collective = collective or LOCAL
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None and self.collective.world_size > 1:
            self.cache_dir = self.cache_dir / f"rank{self.collective.rank}-of-{self.collective.world_size}"
        self.cache_dtype = cache_dtype
        self.cache_workers = cache_workers
        self.cache_seed = cache_seed
        self.lr_reference_batch = lr_reference_batch
        self.exit_tolerance = exit_tolerance
        self.schedule = schedule or BlockSchedule.from_epochs(plan.epochs_per_block)
        self.feature_augment = feature_augment
        self._augment_rng = torch.Generator().manual_seed(cache_seed)

        self.run_id = uuid.uuid4().hex  # owns the cache directory; kept across resumes
        self.active_block = 0
        self.epochs_in_block = 0
        self.horizon: int | None = None  # epochs the active block trains at most, fixed when it starts
        self.block_step = 0
        self.patience = Patience(self.schedule.patience, self.schedule.min_delta)
        self.anneal: dict[str, float] | None = None  # the active block stalled: its rate falls to zero, then it ends
        self.ended_blocks: list[dict[str, Any]] = []  # how each block ended: epochs, reason, best accuracy
        self.last_epoch = -1
        self.finished = False
        self.records: dict[int, ExitRecord] = {}
        self.peaks: dict[int, int] = {}
        self.shrinks: list[dict[str, int]] = []
        self._warned_single_sample = False
        self.manifests: dict[str, dict[str, Any]] = {}
        self.seconds: dict[str, float] = {"train": 0.0, "validate": 0.0, "cache": 0.0}
        self.last_step_peak: int | None = None
        self.loader_version = 0  # changes whenever train_loader() would return something else

        self.optimizers: list[Optimizer] = []
        self.schedulers: list[SchedulerSpec] = []
        self._entered: int | None = None
        self._pending_optim: dict[str, Any] | None = None
        self._sources: DataSources | None = None
        self._verified: dict[str, CachedActivations] = {}
        self._val: _ValidationPass | None = None
        self._epoch_best: float | None = None  # the best active exit's accuracy in this epoch's validation
        self._epoch_steps: int | None = None
        self._step_in_epoch = 0
        self._base_lrs: list[list[float]] = []
        self._lr_batch = plan.batch_size(0)
        self.guard = BudgetGuard(self.device, plan.budget, full_steps=meter_full_steps, sample_every=meter_sample_every)

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        decomposition: Decomposition,
        recipe: Recipe,
        input_shape: Sequence[int],
        budget: int,
        *,
        epochs_per_block: int | Sequence[int] = 1,
        batch_limit: int = 256,
        rho: float = 0.4,
        aux: str = "adaptive",
        single_block: bool = False,
        device: torch.device | str = "cpu",
        **options: Any,
    ) -> BlockwiseRun:
        """Build the exits, profile and partition under ``budget`` (Algorithm 1), and return a new run."""
        check_input_shape(decomposition, input_shape)
        exits = build_exits(decomposition, input_shape, aux)
        plan = make_plan(
            decomposition.units,
            list(exits),
            tuple(input_shape),
            budget,
            epochs_per_block=epochs_per_block,
            batch_limit=batch_limit,
            rho=rho,
            aux_policy=aux,
            optimizer_factory=optimizer_factory(recipe),
            device=device,
            single_block=single_block,
        )
        run = cls(decomposition, exits, plan, recipe, device=device, **options)
        run.collective.check_same({k: v for k, v in plan.to_dict().items() if k != "seconds"}, "plan")  # not timings
        run.collective.broadcast_modules([*decomposition.units, *exits])  # every rank starts from rank 0's weights
        run.run_id = run.collective.broadcast_object(run.run_id)  # one run, however many ranks
        return run

    @classmethod
    def from_state(
        cls, decomposition: Decomposition, state: dict[str, Any], recipe: Recipe | None = None, **options: Any
    ) -> BlockwiseRun:
        """The run saved in ``state`` (same plan, exits, progress and records)."""
        _check_version(state)
        plan = TrainingPlan.from_dict(state["plan"])
        run = cls(decomposition, build_exits(decomposition, plan.input_shape, plan.aux_policy), plan, recipe, **options)
        run.load_state_dict(state)
        return run

    # ---------------------------------------------------------------- structure
    @property
    def num_blocks(self) -> int:
        return len(self.plan.blocks)

    def units_of(self, block: int) -> tuple[int, ...]:
        return self.plan.blocks[block].units

    @property
    def active_units(self) -> tuple[int, ...]:
        return self.units_of(self.active_block)

    def block_of_unit(self, unit: int) -> int:
        return next(index for index, block in enumerate(self.plan.blocks) if unit in block.units)

    @property
    def batch_size(self) -> int:
        """The active block's batch size: the plan's, lowered if a step had to shrink."""
        return self.plan.batch_size(self.active_block)

    @property
    def uses_cache(self) -> bool:
        return self.cache_dir is not None

    @property
    def deploy_unit(self) -> int:
        """The exit NeuroFlux would deploy now: the best recorded one, else the active block's deepest."""
        if not self.records:
            return self.active_units[-1]
        return select_exit(self.records.values(), self.exit_tolerance).unit

    def exit_model(self, unit: int | None = None) -> ExitModel:
        """A standalone copy of the exit ``unit`` (the deployable one if None), on the CPU."""
        return ExitModel(self.units, self.exits, self.deploy_unit if unit is None else unit).cpu()

    # ---------------------------------------------------------------- lifecycle
    def attach_data(self, sources: DataSources) -> None:
        """The data the run trains and validates on (needed before training and cache writes)."""
        self._sources = sources

    def start(self) -> None:
        """Claim the cache directory, cap a CUDA device's allocator at the budget, and put the active block on
        the device with fresh (or restored) optimizers."""
        if self.cache_dir is not None:
            claim_cache_dir(self.cache_dir, self.run_id)
        cap_cuda_allocator(self.device, self.plan.budget)
        self._enter(self.active_block)

    def release(self) -> None:
        """Give up the cache directory (a resumed run claims it again)."""
        if self.cache_dir is not None:
            release_cache_dir(self.cache_dir, self.run_id)

    def _enter(self, block: int) -> None:
        if self._entered is not None and self.uses_cache:
            for module in self._modules_of(self._entered):
                module.to("cpu")  # trained blocks go to storage
        self.active_block = block
        prefix = [] if self.uses_cache else self.units[: self.units_of(block)[0]]
        for module in [*prefix, *self._modules_of(block)]:
            module.to(self.device)
        self._build_optimizers(block)
        self._entered = block
        self.loader_version += 1

    def _build_optimizers(self, block: int) -> None:
        if self.recipe is None:
            raise RuntimeError("this run was restored for inference only (no optimizer recipe); it cannot train")
        scale = self.schedule.lr_scale(self.batch_size, self.reference_batch())
        self.optimizers, self.schedulers = [], []
        for unit in self.units_of(block):
            optimizer, schedulers = replicate_recipe(self.recipe, self.units[unit], self.exits[unit], lr_scale=scale)
            self.optimizers.append(optimizer)
            self.schedulers += schedulers
        self._base_lrs = [[group["lr"] for group in optimizer.param_groups] for optimizer in self.optimizers]
        self._lr_batch = self.batch_size
        pending = self._pending_optim
        if pending is not None and pending["block"] == block:
            for optimizer, state in zip(self.optimizers, pending["optimizers"]):
                optimizer.load_state_dict(state)
            for spec, state in zip(self.schedulers, pending["schedulers"]):
                spec.scheduler.load_state_dict(state)
        self._pending_optim = None

    def _modules_of(self, block: int) -> list[nn.Module]:
        indices = self.units_of(block)
        return [*(self.units[i] for i in indices), *(self.exits[i] for i in indices)]

    def reference_batch(self) -> int | None:
        """The batch size the recipe's learning rate was tuned for (the user's training loader's by default)."""
        if self.lr_reference_batch:
            return self.lr_reference_batch
        return getattr(self._sources.train, "batch_size", None) if self._sources is not None else None

    def steps_per_epoch(self, block: int | None = None) -> int:
        """Batches in one epoch of ``block`` (the active one if None) over the whole training set."""
        sources = self._sources
        if sources is None or sources.train is None:
            return 1
        samples = len(sources.train_unaugmented if sources.train_unaugmented is not None else sources.train.dataset)
        samples = math.ceil(samples / self.collective.world_size)  # this rank's shard
        return math.ceil(samples / self.plan.batch_size(self.active_block if block is None else block))

    def planned_epochs(self) -> int:
        """Epochs until the last block's horizon ends, counted from the active block's first."""
        rest = range(self.active_block + 1, self.num_blocks)
        horizon = self.horizon if self.horizon is not None else self.schedule.horizon(self.active_block, self.steps_per_epoch())
        return horizon + sum(self.schedule.horizon(b, self.steps_per_epoch(b)) for b in rest)

    @property
    def decays(self) -> bool:
        """Whether NeuroFlux decays the learning rate (the recipe brought no scheduler of its own)."""
        return self.schedule.decay == "cosine" and not self.schedulers

    def begin_epoch(self, steps: int | None = None) -> None:
        """Start a training epoch of ``steps`` batches (the whole training set if None).

        The first epoch of a block fixes the block's horizon.
        """
        self._epoch_steps = steps or self.steps_per_epoch()
        self._step_in_epoch = 0
        if self.horizon is None:
            self.horizon = self.schedule.horizon(self.active_block, self._epoch_steps)

    # ---------------------------------------------------------------- training
    def train_loader(self) -> DataLoader:
        """The active block's training data at its batch size: raw for block 0 (or without a cache), else cached."""
        sources = self._require_sources()
        if self.active_units[0] == 0 or not self.uses_cache:
            return rebatch(sources.train, self.batch_size, shuffle=True)
        return cache_loader(
            self._inputs_of(self.active_block, "train"),
            self.batch_size,
            shuffle=True,
            seed=self.cache_seed + self.active_block,
            num_workers=self.cache_workers,
            pin_memory=self.device.type == "cuda",
        )

    def train_batch(
        self,
        x: Tensor,
        y: Tensor,
        *,
        optimizers: Sequence[Any] | None = None,
        backward: Callable[[Tensor], None] = Tensor.backward,
    ) -> list[Tensor]:
        """One step of every active unit on a batch (Algorithm 2); returns each unit's loss.

        ``optimizers`` are wrappers of :attr:`optimizers` to step instead (e.g.
        Lightning's, so precision plugins apply), ``backward`` likewise.
        Each unit step is held to the budget; one that would exceed it is
        retried on smaller pieces and the block's batch size lowered.
        """
        if self.finished:
            raise RuntimeError("the run is finished: every block has been trained")
        self._check_batch(x, y)
        start = time.perf_counter()
        if not self.uses_cache:
            x = self._block_input_from_raw(x)
        elif self.active_units[0] > 0:
            x = augment_features(x, self.feature_augment, generator=self._augment_rng)
        block = LocalBlock(
            [self.units[i] for i in self.active_units],
            [self.exits[i] for i in self.active_units],
            list(optimizers) if optimizers is not None else self.optimizers,
            backward=backward,
        )
        block.train(True)
        if len(y) < block.smallest_batch():
            if not self._warned_single_sample:
                warnings.warn(
                    f"skipping a training batch of {len(y)} sample in block {self.active_block}: its BatchNorm "
                    "layers need at least 2 (the data set's size leaves a last batch of one at this batch size)",
                    stacklevel=2,
                )
                self._warned_single_sample = True
            return []
        if self.decays:
            self._set_learning_rates()
        peaks: list[int] = []
        metered = self.guard.next_batch()
        tracked = [*block.modules(), *(getattr(opt, "optimizer", opt) for opt in block.optimizers), x, y]

        def window(index: int, unit_input: Tensor) -> contextlib.AbstractContextManager[Any]:
            return self._unit_window(index, unit_input, tracked, metered, peaks)

        try:
            losses = train_with_retry(block, x, y, window, self._on_shrink)
        except FloatingPointError as error:
            raise FloatingPointError(
                f"{error} at step {self.block_step} of block {self.active_block} (batch {len(y)}); the unit "
                "diverged: lower the learning rate, or check the data"
            ) from error
        self.block_step += 1
        self._step_in_epoch += 1
        self.last_step_peak = max(peaks) if peaks else None
        if peaks:
            self.peaks[self.active_block] = max(self.peaks.get(self.active_block, 0), max(peaks))
        for spec in self.schedulers:
            if spec.interval == "step" and not spec.reduce_on_plateau:
                spec.scheduler.step()
        self.seconds["train"] += time.perf_counter() - start
        return losses

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        """Clear errors for inputs no step could learn from: NaN/Inf, labels outside the head's classes."""
        where = f"step {self.block_step} of block {self.active_block}"
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"the input batch at {where} holds NaN or Inf values")
        classes = num_classes(self.decomposition.head)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise ValueError(
                f"labels at {where} range over [{int(y.min())}, {int(y.max())}], but the network's head has "
                f"{classes} classes (labels 0..{classes - 1})"
            )

    def _set_learning_rates(self) -> None:
        """Cosine decay over the block's horizon, by the fraction of it done."""
        steps = self._epoch_steps or self.steps_per_epoch()
        if self.horizon is None:
            self.horizon = self.schedule.horizon(self.active_block, steps)
        done = self.epochs_in_block + min(self._step_in_epoch / steps, 1.0)
        if self.anneal is None:
            factor = cosine_factor(done / self.horizon)
        else:  # from the rate the block stalled at, down to zero over the annealing epochs
            factor = self.anneal["factor"] * cosine_factor((done - self.anneal["start"]) / self.anneal["epochs"])
        for optimizer, base in zip(self.optimizers, self._base_lrs):
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = lr * factor

    def _block_input_from_raw(self, x: Tensor) -> Tensor:
        first = self.active_units[0]
        return self._stream(self.units[:first], x) if first > 0 else x

    @contextlib.contextmanager
    def _unit_window(
        self, index: int, x: Tensor, tracked: list[Any], metered: bool, peaks: list[int]
    ) -> Iterator[Callable[[Optimizer], None]]:
        """One unit step as a transaction under the budget (see :class:`BudgetGuard`), with the
        learning rate following the batch size the step actually uses."""
        unit = self.active_units[index]
        ratio = self.schedule.lr_scale(len(x), self.reference_batch()) / self.schedule.lr_scale(
            self._lr_batch, self.reference_batch()
        )
        changed: list[tuple[dict[str, Any], Any]] = []
        before = self.guard.metered_steps
        optimizer = self.optimizers[index]
        try:
            with self.guard.unit_step(self.active_block, unit, len(x), [*tracked, x], optimizer, metered) as check:

                def before_update(optimizer: Optimizer) -> None:
                    check(optimizer)  # the budget's limit is lifted from here on: collectives may allocate
                    if self.collective.agree(failed=False):
                        raise PeerStepFailed(f"another rank's step of unit {unit} did not fit the budget")
                    self.collective.average_gradients(p for g in optimizer.param_groups for p in g["params"])
                    if ratio != 1.0:
                        for group in getattr(optimizer, "optimizer", optimizer).param_groups:
                            changed.append((group, group["lr"]))
                            group["lr"] = group["lr"] * ratio

                try:
                    yield before_update
                finally:
                    for group, lr in changed:
                        group["lr"] = lr
        except torch.OutOfMemoryError as error:
            if not isinstance(error, PeerStepFailed):  # outside the meter, whose limit this step already broke
                self.collective.agree(failed=True)  # the other ranks drop their step too
            raise
        if self.guard.metered_steps > before:
            peaks.append(self.guard.last_peak)

    def _on_shrink(self, unit: int, old: int, new: int) -> None:
        block = self.active_block
        self.guard.restart()
        self.plan.batch_overrides[block] = min(new, self.plan.batch_size(block))
        self.shrinks.append({"block": block, "unit": unit, "from": old, "to": new})
        self.loader_version += 1
        warnings.warn(
            f"unit {unit} needed more than the {format_bytes(self.plan.budget)} budget at batch {old}; "
            f"retrying at {new} and training block {block} at batch {self.batch_size} from the next epoch on",
            stacklevel=2,
        )

    # ---------------------------------------------------------------- epochs
    def end_epoch(self, epoch: int, metrics: dict[str, float] | None = None) -> str:
        """Close training epoch ``epoch``: step epoch schedulers, end the block when it is done.

        A block is done at the end of its horizon, or earlier once its exits
        stopped improving for ``schedule.patience`` epochs (after ``min_epochs``).
        Idempotent per epoch (a resumed run may see the same epoch end twice).
        ``metrics`` feeds ``ReduceLROnPlateau`` schedulers their monitored value.
        Returns ``"continue"``, ``"next_block"`` (caches written, next block
        entered), ``"done"`` (last block trained) or ``"seen"``.
        """
        if epoch <= self.last_epoch or self.finished:
            return SEEN
        epochs = self.epochs_in_block + 1
        patience = dataclasses.replace(self.patience)
        stalled = patience.update(self._epoch_best) if self._epoch_best is not None else False
        if self.horizon is None:
            self.horizon = self.schedule.horizon(self.active_block, self.steps_per_epoch())
        reason = "horizon" if epochs >= self.horizon else None
        anneal = self.anneal
        if reason is None and anneal is not None and epochs >= anneal["start"] + anneal["epochs"]:
            reason = "patience"
        elif reason is None and anneal is None and stalled and epochs >= self.schedule.min_epochs:
            if self.decays and self.schedule.anneal_epochs > 0:  # anneal first: the rate is still high here
                length = min(self.schedule.anneal_epochs, self.horizon - epochs)
                anneal = {"start": epochs, "epochs": length, "factor": cosine_factor(epochs / self.horizon)}
            else:
                reason = "patience"
        last = self.active_block == self.num_blocks - 1
        if reason is not None and not last and self.uses_cache:
            self.collective.average_buffers(self._modules_of(self.active_block))
            for split in SPLITS:  # first, since it may fail (a full disk): the epoch then stays open
                self._write_cache(self.active_block, split)
        self.last_epoch, self.epochs_in_block, self.patience, self._epoch_best = epoch, epochs, patience, None
        self.anneal = anneal
        self._step_epoch_schedulers(epoch, metrics or {})
        if reason is None:
            return CONTINUE
        self.ended_blocks.append(
            {"block": self.active_block, "epochs": epochs, "horizon": self.horizon,
             "steps": self.block_step, "reason": reason, "best_accuracy": patience.best,
             "annealed_from": anneal["start"] if anneal is not None else None}
        )
        if last:
            self.finished = True
            return DONE
        self.epochs_in_block, self.horizon, self.block_step, self.anneal = 0, None, 0, None
        self.patience = Patience(self.schedule.patience, self.schedule.min_delta)
        self.guard.restart()  # a new batch size: meter it in full again
        self._enter(self.active_block + 1)
        return NEXT_BLOCK

    def catch_up(self, epoch: int) -> list[str]:
        """End every epoch before ``epoch`` that was not ended (a checkpoint taken before an epoch's end)."""
        return [self.end_epoch(e) for e in range(self.last_epoch + 1, epoch)]

    def _step_epoch_schedulers(self, epoch: int, metrics: dict[str, float]) -> None:
        for spec in self.schedulers:
            if spec.interval != "epoch" or (epoch + 1) % spec.frequency:
                continue
            if not spec.reduce_on_plateau:
                spec.scheduler.step()
                continue
            if spec.monitor not in metrics:
                if spec.strict and metrics:
                    raise KeyError(
                        f"ReduceLROnPlateau monitors {spec.monitor!r}, which was not logged; "
                        f"available: {sorted(metrics)}"
                    )
                continue
            spec.scheduler.step(float(metrics[spec.monitor]))

    # ---------------------------------------------------------------- validation
    def begin_validation(self) -> None:
        """Start a validation pass; the deployable exit is fixed for the pass."""
        units = self.active_units
        self.collective.average_buffers(self._modules_of(self.active_block))
        self._val = _ValidationPass(unit=self.deploy_unit, correct=torch.zeros(len(units), dtype=torch.long))

    def validate_batch(self, x: Tensor, y: Tensor, count: bool = True) -> DeployedForward:
        """Score the active block's exits on one batch (in order of the validation loader).

        Returns the forward the deployable model computes for this batch: use it
        in place of the network. The active block's input comes from the
        validation cache when the batch lines up with it, else from running the
        units before the block.
        """
        start = time.perf_counter()
        val = self._require_pass()
        block_input = self._val_input(self.active_block, x, y, val.offset if count else None)
        with torch.no_grad():
            logits = []
            h = block_input
            for unit in self.active_units:
                h = self._eval(self.units[unit], h)
                logits.append(self._eval(self.exits[unit], h))
        if count:
            for index, unit_logits in enumerate(logits):
                val.correct[index] += int((unit_logits.argmax(dim=1) == y).sum())
            val.total += len(y)
        deployed = DeployedForward(self, x, y, val.unit, logits, val.offset if count else None)
        if count:
            val.offset += len(y)
        self.seconds["validate"] += time.perf_counter() - start
        return deployed

    def end_validation(self, record: bool = True) -> dict[int, float]:
        """Each active exit's accuracy over the pass; recorded as its latest unless ``record`` is False."""
        val = self._require_pass()
        self._val = None
        counts = self.collective.sum(torch.tensor([*val.correct.tolist(), val.total], dtype=torch.long))
        val.correct, val.total = counts[:-1], int(counts[-1])
        if val.total == 0:
            return {}
        accuracies = {unit: float(hits) / val.total for unit, hits in zip(self.active_units, val.correct)}
        if record:
            for unit, accuracy in accuracies.items():
                self.records[unit] = ExitRecord(unit, accuracy, exit_parameters(self.units, self.exits, unit))
            self._epoch_best = max(accuracies.values())
        return accuracies

    def exit_forward(self, x: Tensor, unit: int) -> Tensor:
        """Logits of exit ``unit`` on raw inputs ``x`` (eval mode, no grad, streamed through the device)."""
        with torch.no_grad():
            return self._eval(self.exits[unit], self._stream(self.units[: unit + 1], x))

    def _val_input(self, block: int, x: Tensor, y: Tensor, offset: int | None) -> Tensor:
        """Input of ``block`` for a validation batch: cached rows if they line up, else computed."""
        first = self.units_of(block)[0]
        if first == 0:
            return x
        cached = self._aligned_val_cache(block, y, offset)
        if cached is not None:
            rows = np.array(cached.activations[offset : offset + len(y)])
            dtype = next((p.dtype for p in self.units[first].parameters()), torch.float32)
            return torch.from_numpy(rows).to(self.device, dtype=dtype)
        return self._stream(self.units[:first], x)

    def _aligned_val_cache(self, block: int, y: Tensor, offset: int | None) -> CachedActivations | None:
        if offset is None or not self.uses_cache or self._sources is None or block > self.active_block:
            return None
        samples = samples_in_order(self._sources.val)
        if samples is None:
            return None
        cache = self._inputs_of(block, "val")
        if len(cache) != samples or offset + len(y) > len(cache):
            return None
        if not torch.equal(cache.labels[offset : offset + len(y)], y.detach().cpu().long()):
            return None
        return cache

    def _stream(self, modules: Sequence[nn.Module], x: Tensor) -> Tensor:
        """``x`` through ``modules`` in eval mode without grad, each moved to the device only while it runs."""
        with torch.no_grad():
            for module in modules:
                x = self._eval(module, x)
        return x

    def _eval(self, module: nn.Module, x: Tensor) -> Tensor:
        home = next((p.device for p in module.parameters()), self.device)
        was_training = module.training
        module.eval()
        if home != self.device:
            module.to(self.device)
        try:
            return module(x.to(self.device))
        finally:
            module.train(was_training)
            if home != self.device:
                module.to(home)

    def _require_pass(self) -> _ValidationPass:
        if self._val is None:
            raise RuntimeError("call begin_validation() before validate_batch()/end_validation()")
        return self._val

    # ---------------------------------------------------------------- caches
    def _inputs_of(self, block: int, split: str) -> CachedActivations:
        """The verified cache feeding ``block`` (outputs of the block before), rebuilt if missing or corrupt."""
        name = cache_name(block - 1, split)
        if name in self._verified:
            return self._verified[name]
        assert self.cache_dir is not None
        try:
            cache = open_cache(self.cache_dir, name, fingerprint=self._fingerprint(block - 1, split), verify=True)
        except CacheMissing:
            if name in self.manifests:
                warnings.warn(f"activation cache {name} is gone from {self.cache_dir}; rebuilding it", stacklevel=2)
            cache = self._write_cache(block - 1, split)
        except CacheCorrupt as error:
            warnings.warn(f"activation cache {name} failed verification ({error}); rebuilding it", stacklevel=2)
            cache = self._write_cache(block - 1, split)
        self._verified[name] = cache
        return cache

    def _write_cache(self, block: int, split: str) -> CachedActivations:
        """Run ``block`` over its whole input of ``split`` once and store the outputs."""
        assert self.cache_dir is not None
        start = time.perf_counter()
        name = cache_name(block, split)
        batch = self.plan.batch_size(block)
        source = self._cache_source(block, split, batch)
        writer: ActivationCacheWriter | None = None
        with contextlib.ExitStack() as stack:
            for x, y in source:
                out = self._stream([self.units[i] for i in self.units_of(block)], x).cpu()
                if writer is None:
                    writer = stack.enter_context(
                        ActivationCacheWriter(
                            self.cache_dir,
                            name,
                            num_samples=len(source.sampler),
                            sample_shape=tuple(out.shape[1:]),
                            dtype=self.cache_dtype,
                            fingerprint=self._fingerprint(block, split),
                            meta={"block": block, "split": split},
                        )
                    )
                writer.write(out, y)
            if writer is None:
                raise ValueError(f"the {split} data is empty: nothing to cache for block {block}")
            manifest = writer.commit()
        self.manifests[name] = manifest.to_dict()
        cache = open_cache(self.cache_dir, name, fingerprint=self._fingerprint(block, split), verify=True)
        self._verified[name] = cache
        self.seconds["cache"] += time.perf_counter() - start
        log.info("cached block %d %s outputs: %.1f MB in %s", block, split, cache.nbytes / 1e6, self.cache_dir / name)
        return cache

    def _cache_source(self, block: int, split: str, batch: int) -> DataLoader:
        if block > 0:
            return cache_loader(self._inputs_of(block, split), batch, shuffle=False)
        sources = self._require_sources()
        raw = sources.train if split == "train" else sources.val
        dataset = sources.train_unaugmented if split == "train" and sources.train_unaugmented is not None else raw.dataset
        sampler = shard_sampler(dataset, self.collective, shuffle=False)
        return DataLoader(
            dataset, batch_size=batch, sampler=sampler, num_workers=raw.num_workers, collate_fn=raw.collate_fn
        )

    def _fingerprint(self, block: int, split: str) -> str:
        """Identifies data, split, block and the weights of every unit up to the block's last."""
        sources = self._require_sources()
        data_id = sources.data_id or type((sources.train if split == "train" else sources.val).dataset).__name__
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{data_id}|{split}|{block}|{self.cache_dtype}".encode())
        if self.collective.world_size > 1:  # a shard's cache is never taken for another shard's
            digest.update(f"|rank {self.collective.rank} of {self.collective.world_size}".encode())
        for index in range(self.units_of(block)[-1] + 1):
            for tensor in self.units[index].state_dict().values():
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _require_sources(self) -> DataSources:
        if self._sources is None:
            raise RuntimeError("no data attached: call attach_data() first")
        return self._sources

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run, or to deploy its exits, as plain data and CPU tensors."""
        return {
            "version": STATE_VERSION,
            "run_id": self.run_id,
            "world_size": self.collective.world_size,
            "plan": self.plan.to_dict(),
            "active_block": self.active_block,
            "epochs_in_block": self.epochs_in_block,
            "horizon": self.horizon,
            "block_step": self.block_step,
            "patience": {"best": self.patience.best, "stale": self.patience.stale},
            "anneal": self.anneal,
            "ended_blocks": list(self.ended_blocks),
            "schedule": self.schedule.to_dict(),
            "last_epoch": self.last_epoch,
            "finished": self.finished,
            "records": [record.to_dict() for record in self.records.values()],
            "exit_tolerance": self.exit_tolerance,
            "peaks": dict(self.peaks),
            "enforcement": self.guard.state_dict(),
            "shrinks": list(self.shrinks),
            "manifests": dict(self.manifests),
            "seconds": dict(self.seconds),
            "exits": {k: v.detach().cpu() for k, v in self.exits.state_dict().items()},
            "optim": {
                "block": self._entered,
                "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
                "schedulers": [spec.scheduler.state_dict() for spec in self.schedulers],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; optimizers are restored when their block is entered."""
        _check_version(state)
        saved = TrainingPlan.from_dict(state["plan"])
        if [b.units for b in saved.blocks] != [b.units for b in self.plan.blocks]:
            raise ValueError(
                f"the saved run has blocks {[b.units for b in saved.blocks]}, this one "
                f"{[b.units for b in self.plan.blocks]}: it belongs to another model or plan"
            )
        self.plan = saved
        self.run_id = str(state["run_id"])
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.collective.world_size and self.uses_cache:
            warnings.warn(
                f"the checkpoint was written by {saved_world} rank(s) and this run has {self.collective.world_size}: "
                "each rank caches its own shard, so the caches of the finished blocks are rebuilt for the new shards "
                f"(under {self.cache_dir})",
                stacklevel=2,
            )
        self.exits.load_state_dict(state["exits"])
        self.active_block = int(state["active_block"])
        self.epochs_in_block = int(state["epochs_in_block"])
        self.horizon = state["horizon"]
        self.block_step = int(state["block_step"])
        self.patience = Patience(self.schedule.patience, self.schedule.min_delta, **state["patience"])
        self.anneal = state.get("anneal")
        self.ended_blocks = list(state["ended_blocks"])
        self.last_epoch = int(state["last_epoch"])
        self.finished = bool(state["finished"])
        self.records = {r.unit: r for r in (ExitRecord.from_dict(d) for d in state["records"])}
        self.exit_tolerance = float(state.get("exit_tolerance", self.exit_tolerance))
        self.peaks = {int(k): int(v) for k, v in state["peaks"].items()}
        self.guard.load_state_dict(state["enforcement"])
        self.shrinks = list(state["shrinks"])
        self.manifests = dict(state["manifests"])
        self.seconds = {**self.seconds, **state.get("seconds", {})}
        self._pending_optim = state["optim"] if state["optim"]["block"] is not None else None
        self._entered = None
        self._verified.clear()


@dataclass
class _ValidationPass:
    unit: int
    correct: Tensor
    total: int = 0
    offset: int = 0


class DeployedForward:
    """What the deployable model computes for one validation batch; stands in for the network's forward.

    Called with the batch's own input tensor, it returns the deployable exit's
    logits computed from the active block's input (cached or computed once);
    called with any other tensor (the user transformed the input), it runs
    that exit on it from scratch. :attr:`calls` counts the calls.
    """

    def __init__(
        self, run: BlockwiseRun, x: Tensor, y: Tensor, unit: int, logits: list[Tensor], offset: int | None
    ) -> None:
        self.run, self.x, self.y, self.unit, self.offset = run, x, y, unit, offset
        self._logits = logits
        self.calls = 0

    def __call__(self, inputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        run = self.run
        if inputs is not self.x:
            return run.exit_forward(inputs, self.unit)
        if self.unit in run.active_units:
            return self._logits[run.active_units.index(self.unit)]
        block = run.block_of_unit(self.unit)
        with torch.no_grad():
            h = run._val_input(block, self.x, self.y, self.offset)
            units = run.units_of(block)
            h = run._stream([run.units[i] for i in units[: units.index(self.unit) + 1]], h)
            return run._eval(run.exits[self.unit], h)


def build_exits(decomposition: Decomposition, input_shape: Sequence[int], aux: str = "adaptive") -> nn.ModuleList:
    """Every unit's classifier: an auxiliary head per unit but the last, then the model's own head.

    >>> from torch import nn
    >>> from nf_lightning.core.network.decompose import Decomposition
    >>> parts = Decomposition([nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)], nn.Sequential(nn.Flatten(), nn.Linear(64, 5)))
    >>> len(build_exits(parts, (3, 8, 8)))
    2
    """
    heads = build_aux_heads(decomposition.units, num_classes(decomposition.head), tuple(input_shape), policy=aux)
    return nn.ModuleList([*heads, decomposition.head])


def cap_cuda_allocator(device: torch.device, budget: int) -> float | None:
    """On CUDA, make the caching allocator itself refuse to hold more than ``budget`` bytes for this process.

    The budget counts bytes of tensors the allocator hands out (``memory_allocated``); the CUDA
    context and the allocator's cache above the cap are not in it. Returns the fraction set, or
    None on other devices. (Unverified on a GPU in this project's CI: see the README.)
    """
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def check_input_shape(decomposition: Decomposition, input_shape: Sequence[int]) -> None:
    """A clear error when the data's channels do not match the network's first convolution.

    >>> check_input_shape(Decomposition([nn.Conv2d(3, 4, 3)], nn.Linear(4, 2)), (1, 32, 32))
    Traceback (most recent call last):
    ...
    ValueError: the data has 1 input channel(s) (samples of shape (1, 32, 32)), but the network's first convolution expects 3
    """
    first = next((m for m in decomposition.units[0].modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and len(input_shape) == 3 and input_shape[0] != first.in_channels:
        raise ValueError(
            f"the data has {input_shape[0]} input channel(s) (samples of shape {tuple(input_shape)}), "
            f"but the network's first convolution expects {first.in_channels}"
        )


def num_classes(head: nn.Module) -> int:
    """Output classes of a classifier head (its last Linear's outputs)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the network's head has no nn.Linear, so the number of classes is unknown")
    return linears[-1].out_features


def cache_name(block: int, split: str) -> str:
    """``block3-train``: outputs of block 3 for the training set."""
    return f"block{block}-{split}"


def optimizer_factory(recipe: Recipe) -> Callable[[list[nn.Parameter]], Optimizer]:
    """The recipe's optimizer class and first group's settings over other parameters.

    Profiling needs the size of the optimizer's state, which its class and settings decide.
    """
    template, _ = recipe()
    hparams = {k: v for k, v in template.param_groups[0].items() if k not in ("params", "initial_lr")}
    return lambda params: type(template)(params, **hparams)


def _check_version(state: dict[str, Any]) -> None:
    version = state.get("version")
    if version != STATE_VERSION:
        raise ValueError(f"NeuroFlux state version {version!r} is not supported (expected {STATE_VERSION})")


