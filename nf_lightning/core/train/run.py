"""``BlockwiseRun``: the one object that owns a NeuroFlux run, free of Lightning; a coordinator of parts.

It holds the immutable plan, the exit heads, the active block and one
``state_dict`` (:mod:`~nf_lightning.core.train.run_state`), and hands each job
to a part that does only that job:

- :class:`~nf_lightning.core.train.block_progress.BlockProgress`: the block
  schedule (horizon, patience, annealing) and how each block ended;
- :class:`~nf_lightning.core.train.unit_optimizers.UnitOptimizers`: per-unit
  copies of the user's recipe and their learning rates;
- :class:`~nf_lightning.core.train.budgeted_step.BudgetedStep`: each step held
  to the budget, shrunk when it does not fit;
- :class:`~nf_lightning.core.exits.validation.ExitValidation`: exit records and
  the deployable model's forward;
- :class:`~nf_lightning.core.train.block_caches.BlockCaches`: activation caches.

A driver (the Lightning strategy, or a plain loop) calls, in order:
:meth:`start`; per epoch :meth:`begin_epoch`, :meth:`train_loader`,
:meth:`train_batch` for every batch, then optionally :meth:`begin_validation` /
:meth:`validate_batch` / :meth:`end_validation`; and :meth:`end_epoch`, which
ends blocks, writes the caches and enters the next block. :attr:`batch_size`
is the one place a block's batch size is decided (the plan's, lowered if a step
had to shrink; the lowered size is the run's state, the plan never changes).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from nf_lightning.core.network.decompose import decompose
    >>> from nf_lightning.core.memory.budget import MemoryBudget
    >>> from nf_lightning.core.options import NeuroFluxOptions
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    >>> data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    >>> recipe = lambda: (torch.optim.SGD(net.parameters(), lr=0.1), [])
    >>> run = BlockwiseRun.create(decompose(net), recipe, (3, 8, 8), MemoryBudget(10**8),
    ...                           NeuroFluxOptions(epochs_per_block=1, cache=False))
    >>> run.attach_data(DataSources(DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)))
    >>> run.start()
    >>> epoch = 0
    >>> while not run.finished:
    ...     run.begin_epoch()
    ...     for x, y in run.train_loader():
    ...         losses = run.train_batch(x, y)
    ...     event = run.end_epoch(epoch)
    ...     epoch += 1
    >>> epoch, run.progress.ended_blocks[-1]["reason"]
    (1, 'horizon')
"""

from __future__ import annotations

import dataclasses
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from nf_lightning.core.exits.aux_heads import build_exits, num_classes
from nf_lightning.core.exits.selection import ExitModel
from nf_lightning.core.exits.validation import DeployedForward, ExitValidation
from nf_lightning.core.memory.budget import MemoryBudget, format_bytes
from nf_lightning.core.memory.enforcement import BudgetGuard
from nf_lightning.core.memory.meter import cap_cuda_allocator
from nf_lightning.core.network.decompose import Decomposition, check_input_shape
from nf_lightning.core.options import NeuroFluxOptions
from nf_lightning.core.plan.training_plan import TrainingPlan, make_plan
from nf_lightning.core.train.batches import rebatch
from nf_lightning.core.train.block_caches import SPLITS, BlockCaches
from nf_lightning.core.train.block_progress import BlockProgress
from nf_lightning.core.train.budgeted_step import BudgetedStep, check_batch
from nf_lightning.core.train.distributed import LOCAL, Collective, LocalCollective
from nf_lightning.core.train.feature_augment import augment_features
from nf_lightning.core.train.local_learning import LocalBlock
from nf_lightning.core.train.optim_recipe import Recipe, optimizer_factory
from nf_lightning.core.train.run_state import restore_run, run_state, upgrade_state
from nf_lightning.core.train.sources import DataSources
from nf_lightning.core.train.streaming import stream
from nf_lightning.core.train.unit_optimizers import UnitOptimizers

__all__ = ["BlockwiseRun", "DataSources"]

# What end_epoch reports.
CONTINUE, NEXT_BLOCK, DONE, SEEN = "continue", "next_block", "done", "seen"


class BlockwiseRun:
    """Block-wise adaptive local learning (Algorithms 1-2 and §5.3-5.4 of the paper).

    Args:
        decomposition: units and head of the network (the model's own modules).
        exits: one classifier per unit; the last is the model's own head.
        plan: blocks, batch sizes and epochs (never changed by the run).
        recipe: builds the user's optimizer (and schedulers) afresh, per unit; None: inference only.
        options: every block-wise setting (:class:`~nf_lightning.core.options.NeuroFluxOptions`); a
            block's horizon is the plan's epochs for it; caches go to ``options.cache_dir`` if given.
        device: where the active block trains.
        collective: the other ranks (:class:`~nf_lightning.core.train.distributed.Collective`),
            each training and caching its own shard; one process if None.
    """

    def __init__(
        self, decomposition: Decomposition, exits: nn.ModuleList, plan: TrainingPlan, recipe: Recipe | None,
        options: NeuroFluxOptions | None = None, *, device: torch.device | str = "cpu",
        collective: Collective | LocalCollective | None = None,
    ) -> None:  # fmt: skip
        if len(exits) != len(decomposition.units):
            raise ValueError(f"need one exit per unit, got {len(exits)} exits for {len(decomposition.units)} units")
        self.options = options or NeuroFluxOptions()
        self.decomposition, self.units, self.exits, self.plan = decomposition, decomposition.units, exits, plan
        self.device = torch.device(device)
        self.collective = collective or LOCAL
        self.schedule = dataclasses.replace(self.options.schedule, epochs=tuple(plan.epochs_per_block))
        self.run_id = uuid.uuid4().hex  # owns the cache directory; kept across resumes
        self.active_block = 0
        self.finished = False
        self.batch_overrides: dict[int, int] = {}  # blocks whose steps had to shrink: their batch from then on
        self.train_seconds = 0.0
        self.loader_version = 0  # changes whenever train_loader() would return something else
        self.sources: DataSources | None = None
        blocks = [block.units for block in plan.blocks]
        cache_dir = self.options.cache_dir if self.options.cache else None
        self.caches = None if cache_dir is None else BlockCaches(
            cache_dir, self.units, blocks, self.batch_size_of, self.collective, self.device,
            dtype=self.options.cache_dtype, workers=self.options.cache_workers, seed=self.options.cache_seed,
        )  # fmt: skip
        self.progress = BlockProgress(self.schedule)
        self.optim = UnitOptimizers(recipe, self.schedule)
        guard = BudgetGuard(self.device, plan.budget, self.options.meter_full_steps, self.options.meter_sample_every)
        self.step = BudgetedStep(
            guard, self.collective, self.options.gradient_clip_val, self.options.gradient_clip_algorithm
        )
        self.validation = ExitValidation(
            self.units, exits, blocks, self.caches, self.collective, self.device, self.options.exit_tolerance
        )
        self._augment_rng = torch.Generator().manual_seed(self.options.cache_seed)
        self.entered_block: int | None = None  # the block whose modules and optimizers are on the device

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(
        cls, decomposition: Decomposition, recipe: Recipe, input_shape: Sequence[int], budget: MemoryBudget | str | int,
        options: NeuroFluxOptions | None = None, *, device: torch.device | str = "cpu",
        collective: Collective | LocalCollective | None = None,
    ) -> BlockwiseRun:  # fmt: skip
        """Build the exits, profile and partition under ``budget``'s tensor bytes (Algorithm 1); a new run."""
        options = options or NeuroFluxOptions()
        check_input_shape(decomposition, input_shape)
        exits = build_exits(decomposition, input_shape, options.aux, options.aux_max_filters)
        plan = make_plan(
            decomposition.units, list(exits), tuple(input_shape), MemoryBudget.parse(budget).tensor_bytes,
            epochs_per_block=options.epochs_per_block, batch_limit=options.batch_limit, rho=options.rho,
            aux_policy=options.aux, aux_max_filters=options.aux_max_filters,
            optimizer_factory=optimizer_factory(recipe), device=device,
            single_block=options.single_block,
        )  # fmt: skip
        run = cls(decomposition, exits, plan, recipe, options, device=device, collective=collective)
        run.collective.check_same({k: v for k, v in plan.to_dict().items() if k != "seconds"}, "plan")  # not timings
        run.collective.broadcast_modules([*decomposition.units, *exits])  # every rank starts from rank 0's weights
        run.run_id = run.collective.broadcast_object(run.run_id)  # one run, however many ranks
        return run

    @classmethod
    def from_state(
        cls, decomposition: Decomposition, state: dict[str, Any], recipe: Recipe | None = None,
        options: NeuroFluxOptions | None = None, **where: Any,
    ) -> BlockwiseRun:  # fmt: skip
        """The run saved in ``state`` (same plan, exits, progress and records); ``where``: ``device``, ``collective``."""
        state = upgrade_state(state)
        plan = TrainingPlan.from_dict(state["plan"])
        exits = build_exits(decomposition, plan.input_shape, plan.aux_policy, plan.aux_max_filters)
        run = cls(decomposition, exits, plan, recipe, options, **where)
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

    def batch_size_of(self, block: int) -> int:
        """``block``'s batch size: the plan's, lowered if a step had to shrink."""
        return self.batch_overrides.get(block, self.plan.blocks[block].batch_size)

    @property
    def batch_size(self) -> int:
        """The active block's batch size."""
        return self.batch_size_of(self.active_block)

    @property
    def records(self) -> dict[int, Any]:
        """Each exit's latest :class:`~nf_lightning.core.exits.selection.ExitRecord`, by unit."""
        return self.validation.records

    @property
    def deploy_unit(self) -> int:
        """The exit NeuroFlux would deploy now: the best recorded one, else the active block's deepest."""
        return self.validation.deploy_unit(fallback=self.active_units[-1])

    def exit_model(self, unit: int | None = None) -> ExitModel:
        """A standalone copy of the exit ``unit`` (the deployable one if None), on the CPU."""
        return ExitModel(self.units, self.exits, self.deploy_unit if unit is None else unit).cpu()

    def modules_of(self, block: int) -> list[nn.Module]:
        """The units of ``block`` and their exits."""
        indices = self.units_of(block)
        return [*(self.units[i] for i in indices), *(self.exits[i] for i in indices)]

    # ---------------------------------------------------------------- lifecycle
    def attach_data(self, sources: DataSources) -> None:
        """The data the run trains and validates on (needed before training and cache writes)."""
        self.sources = sources
        if self.caches is not None:
            self.caches.attach(sources)

    def start(self) -> None:
        """Claim the cache directory, cap a CUDA device's allocator at the budget, and put the active block on
        the device with fresh (or restored) optimizers."""
        if self.caches is not None:
            self.caches.claim(self.run_id)
        cap_cuda_allocator(self.device, self.plan.budget)
        self._enter(self.active_block)

    def release(self) -> None:
        """Give up the cache directory (a resumed run claims it again)."""
        if self.caches is not None:
            self.caches.release(self.run_id)

    def _enter(self, block: int) -> None:
        if self.entered_block is not None and self.caches is not None:
            for module in self.modules_of(self.entered_block):
                module.to("cpu")  # trained blocks go to storage
        self.active_block = block
        prefix = [] if self.caches is not None else self.units[: self.units_of(block)[0]]
        for module in [*prefix, *self.modules_of(block)]:
            module.to(self.device)
        units = self.units_of(block)
        self.optim.build([self.units[i] for i in units], [self.exits[i] for i in units], self.batch_size,
                         self.reference_batch(), block)  # fmt: skip
        self.entered_block = block
        self.loader_version += 1

    def reference_batch(self) -> int | None:
        """The batch size the recipe's learning rate was tuned for (the user's training loader's by default)."""
        if self.options.lr_reference_batch:
            return self.options.lr_reference_batch
        return getattr(self.sources.train, "batch_size", None) if self.sources is not None else None

    def steps_per_epoch(self, block: int | None = None) -> int:
        """Batches in one epoch of ``block`` (the active one if None) over the whole training set."""
        if self.sources is None or self.sources.train is None:
            return 1
        batch = self.batch_size_of(self.active_block if block is None else block)
        return self.sources.batches_per_epoch(batch, self.collective.world_size)

    def begin_epoch(self, steps: int | None = None) -> None:
        """Start a training epoch of ``steps`` batches (the whole training set if None)."""
        self.progress.begin_epoch(self.active_block, steps or self.steps_per_epoch())

    # ---------------------------------------------------------------- training
    def train_loader(self) -> DataLoader:
        """The active block's training data at its batch size: raw for block 0 (or without a cache), else cached."""
        if self.sources is None:
            raise RuntimeError("no data attached: call attach_data() first")
        if self.caches is None or self.active_units[0] == 0:
            return rebatch(self.sources.train, self.batch_size, shuffle=True)
        return self.caches.train_loader(self.active_block, self.batch_size)

    def train_batch(
        self, x: Tensor, y: Tensor, *, optimizers: Sequence[Any] | None = None,
        backward: Callable[[Tensor], None] = Tensor.backward,
    ) -> list[Tensor]:  # fmt: skip
        """One step of every active unit on a batch (Algorithm 2); returns each unit's loss.

        ``optimizers`` are wrappers of :attr:`optim`'s optimizers to step instead (e.g.
        Lightning's, so precision plugins apply), ``backward`` likewise.
        Each unit step is held to the budget; one that would exceed it is
        retried on smaller pieces and the block's batch size lowered.
        """
        if self.finished:
            raise RuntimeError("the run is finished: every block has been trained")
        where = f"step {self.progress.block_step} of block {self.active_block}"
        check_batch(x, y, num_classes(self.decomposition.head), where)
        start = time.perf_counter()
        first = self.active_units[0]
        if self.caches is None or first == 0:  # the batch's own inputs, prepared as the model prepares them
            x = stream(self.units[:first], self.sources.network_input(x) if self.sources else x, self.device)
        else:
            x = augment_features(x, self.options.feature_augment, generator=self._augment_rng)
        own = self.optim.optimizers
        block = LocalBlock([self.units[i] for i in self.active_units], [self.exits[i] for i in self.active_units],
                           list(optimizers) if optimizers is not None else own, backward=backward)  # fmt: skip
        if self.optim.decays and len(y) >= block.smallest_batch():
            self.optim.set_factor(self.progress.lr_factor(self.active_block, self.steps_per_epoch()))
        reference = self.reference_batch()
        try:
            losses = self.step.train(block, self.active_block, self.active_units, x, y, own,
                                     lambda batch: self.optim.step_ratio(batch, reference), self._shrunk)  # fmt: skip
        except FloatingPointError as error:
            raise FloatingPointError(
                f"{error} at {where} (batch {len(y)}); the unit diverged: lower the learning rate, or check the data"
            ) from error
        if losses is None:
            return []
        self.progress.count_step()
        self.optim.after_step()
        self.train_seconds += time.perf_counter() - start
        return losses

    def _shrunk(self, unit: int, old: int, new: int) -> None:
        block = self.active_block
        self.batch_overrides[block] = min(new, self.batch_size_of(block))
        self.loader_version += 1
        warnings.warn(
            f"unit {unit} needed more than the {format_bytes(self.plan.budget)} budget at batch {old}; "
            f"retrying at {new} and training block {block} at batch {self.batch_size} from the next epoch on",
            stacklevel=2,
        )

    # ---------------------------------------------------------------- epochs
    def end_epoch(self, epoch: int, metrics: dict[str, float] | None = None) -> str:
        """Close training epoch ``epoch``: step epoch schedulers, end the block when it is done.

        A block is done at the end of its horizon, or earlier once its exits stopped improving
        (see :meth:`BlockProgress.verdict`). Idempotent per epoch (a resumed run may see
        the same epoch end twice). ``metrics`` feeds ``ReduceLROnPlateau`` schedulers.
        Returns ``"continue"``, ``"next_block"`` (caches written, next block entered),
        ``"done"`` (last block trained) or ``"seen"``.
        """
        if epoch <= self.progress.last_epoch or self.finished:
            return SEEN
        last = self.active_block == self.num_blocks - 1
        verdict = self.progress.verdict(self.active_block, self.validation.epoch_best, self.steps_per_epoch(),
                                        self.optim.decays)  # fmt: skip
        if verdict.reason is not None and not last and self.caches is not None:
            self.collective.average_buffers(self.modules_of(self.active_block))
            for split in SPLITS:  # first, since it may fail (a full disk): the epoch then stays open
                self.caches.write(self.active_block, split)
        self.progress.close_epoch(epoch, verdict)
        self.validation.epoch_best = None
        self.optim.after_epoch(epoch, metrics or {})
        reason = verdict.reason
        if reason is None:
            return CONTINUE
        self.progress.end_block(self.active_block, reason)
        if last:
            self.finished = True
            return DONE
        self.progress.next_block(self.records[self.deploy_unit].accuracy if self.records else None)
        self.step.guard.restart()  # a new batch size: meter it in full again
        self._enter(self.active_block + 1)
        return NEXT_BLOCK

    def catch_up(self, epoch: int) -> list[str]:
        """End every epoch before ``epoch`` that was not ended (a checkpoint taken before an epoch's end)."""
        return [self.end_epoch(e) for e in range(self.progress.last_epoch + 1, epoch)]

    # ---------------------------------------------------------------- validation
    def begin_validation(self) -> None:
        """Start a validation pass over the active block's exits; the deployable exit is fixed for the pass."""
        self.collective.average_buffers(self.modules_of(self.active_block))
        self.validation.begin(self.active_units, self.deploy_unit)

    def validate_batch(self, x: Tensor, y: Tensor, count: bool = True) -> DeployedForward:
        """Score the active block's exits on a batch (in the loader's order); the deployable model's forward for it."""
        inputs = self.sources.network_input(x) if self.sources else x  # as the model hands them to its network
        check_batch(inputs, y, num_classes(self.decomposition.head), "a validation batch")
        return self.validation.validate_batch(self.active_block, inputs, y, count)

    def end_validation(self, record: bool = True) -> dict[int, float]:
        """Each active exit's accuracy over the pass; recorded as its latest unless ``record`` is False."""
        return self.validation.end(record)

    # ---------------------------------------------------------------- state
    @property
    def seconds(self) -> dict[str, float]:
        """Wall time spent training, validating exits and writing caches."""
        return {"train": self.train_seconds, "validate": self.validation.seconds,
                "cache": self.caches.seconds if self.caches is not None else 0.0}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run, or to deploy its exits, as plain data and CPU tensors."""
        return run_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; optimizers are restored when their block is entered."""
        restore_run(self, upgrade_state(state))
        self.entered_block = None
