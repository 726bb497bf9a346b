"""``NeuroFluxStrategy``: a thin Lightning adapter over :class:`~nf_lightning.core.train.run.BlockwiseRun`.

The strategy decides where and how things run; what training means lives in
the core run object. It takes one :class:`~nf_lightning.core.memory.budget.MemoryBudget`
and one :class:`~nf_lightning.core.options.NeuroFluxOptions` (or keyword
arguments that build it) and hands both whole to the run. During ``fit`` it
hands training batches to the run, runs the user's own ``validation_step`` with
the network standing for the exit NeuroFlux would deploy now
(:func:`~nf_lightning.core.exits.validation.standing_in`), changes blocks at
epoch ends through the :class:`~nf_lightning.lightning.hooks.NeuroFluxHooks`
callback it lists in ``trainer.callbacks``, and saves the run's state under one
checkpoint key (``"neuroflux"``). After ``fit`` (and from a checkpoint in a
fresh process), ``validate``, ``test`` and ``predict`` use the selected exit
unless ``evaluate="full"``. What it does in each hook lives in :mod:`~nf_lightning.lightning.adapter`.

Example:
    >>> import lightning.pytorch as pl
    >>> from nf_lightning import NeuroFluxStrategy
    >>> trainer = pl.Trainer(strategy=NeuroFluxStrategy(memory_budget="300MB", epochs_per_block=2),
    ...                      accelerator="cpu", logger=False, enable_progress_bar=False)
    >>> trainer.strategy.options.epochs_per_block, trainer.strategy.budget.bytes
    (2, 300000000)
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry

from nf_lightning.core.memory.budget import DEFAULT_BUDGET, MemoryBudget
from nf_lightning.core.options import NeuroFluxOptions
from nf_lightning.lightning._internals import TrainerDevices
from nf_lightning.lightning.adapter import NeuroFluxAdapter
from nf_lightning.lightning.ddp import UnwrappedDDPStrategy

class NeuroFluxStrategy(NeuroFluxAdapter, TrainerDevices, SingleDeviceStrategy):
    """Train a CNN block by block with local losses under a hard memory budget.

    A bare ``Trainer(strategy="neuroflux")`` uses a 300 MB budget and
    :class:`~nf_lightning.core.options.NeuroFluxOptions`' defaults: each block
    trains for up to 20 epochs with its learning rate decaying (cosine) over them,
    and ends once its best exit has not improved for 2 epochs. The Trainer's
    ``max_epochs``/``max_time`` bound the run (a warning says so when they cut
    the plan short); NeuroFlux ends it when the last block is trained.

    ``fit`` lists a :class:`~nf_lightning.lightning.hooks.NeuroFluxHooks` callback first
    in ``trainer.callbacks`` (the run follows Lightning's epochs through it), unless
    you listed one yourself.

    Args:
        memory_budget: device memory for training, e.g. ``"300MB"`` (10^6 bytes),
            ``"0.5GiB"`` (2^30), a number of bytes, or a
            :class:`~nf_lightning.core.memory.budget.MemoryBudget`.
        options: every NeuroFlux setting (:class:`~nf_lightning.core.options.NeuroFluxOptions`,
            whose docstring describes each); its defaults if None.
        memory_overhead: device bytes held per tensor byte the meter counts; the plan and the
            guard hold tensor bytes to ``memory_budget / memory_overhead``. 1.0 (the default)
            makes the budget one of tensor bytes (CUDA's ``memory_allocated``); on CPU a step's
            resident memory measured 1.1-2.2x its tensor bytes (see the README).
        device: the training device; from the Trainer's ``accelerator``/``devices`` if None.
        **option_overrides: options by name (``epochs_per_block=10``, ``rho=0.0``...), over ``options``.
    """

    strategy_name = "neuroflux"

    def __init__(
        self,
        memory_budget: str | int | MemoryBudget = DEFAULT_BUDGET,
        options: NeuroFluxOptions | None = None,
        *,
        memory_overhead: float | None = None,
        device: str | torch.device | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        **option_overrides: Any,
    ) -> None:
        budget = MemoryBudget.parse(memory_budget, memory_overhead)
        super().__init__(
            device=device or "cpu", accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin
        )
        self._device = torch.device(device) if device is not None else None
        self._configure(budget, NeuroFluxOptions.build(options, **option_overrides))

    @property
    def root_device(self) -> torch.device:
        return self._device or self.trainer_device() or torch.device("cpu")


class NeuroFluxDDPStrategy(NeuroFluxAdapter, UnwrappedDDPStrategy):
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
        memory_budget, options, memory_overhead, **option_overrides: as :class:`NeuroFluxStrategy`, per device.
        timeout, process_group_backend, start_method, accelerator, parallel_devices,
            cluster_environment, checkpoint_io, precision_plugin: as
            :class:`~nf_lightning.lightning.ddp.UnwrappedDDPStrategy` (a dead rank fails the
            job after ``timeout``, 5 minutes by default; gloo's own is 30).

    Example (one process per device; here two on the CPU, launched by Lightning or torchrun)::

        >>> strategy = NeuroFluxDDPStrategy("10MB", epochs_per_block=5, block_patience=None)
        >>> strategy.budget.bytes, strategy.options.block_patience, strategy.strategy_name
        (10000000, None, 'neuroflux_ddp')
        >>> trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2)  # doctest: +SKIP
    """

    strategy_name = "neuroflux_ddp"

    def __init__(
        self,
        memory_budget: str | int | MemoryBudget = DEFAULT_BUDGET,
        options: NeuroFluxOptions | None = None,
        *,
        memory_overhead: float | None = None,
        **overrides: Any,
    ) -> None:
        budget = MemoryBudget.parse(memory_budget, memory_overhead)
        ddp = {k: overrides.pop(k) for k in list(overrides) if k in DDP_OPTIONS}
        super().__init__(**ddp)
        self._configure(budget, NeuroFluxOptions.build(options, **overrides))


DDP_OPTIONS = frozenset(inspect.signature(UnwrappedDDPStrategy.__init__).parameters) - {"self"}


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
