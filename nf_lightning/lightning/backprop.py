"""Ordinary backpropagation held to a memory budget by NeuroFlux's own rule, on one device
(``BudgetedBackpropStrategy``) or several through Lightning's DDP (``BudgetedBackpropDDPStrategy``).

The baselines must play by the rules NeuroFlux plays by. Every optimizer step
of the whole network is one transaction of the same
:class:`~nf_lightning.core.memory.enforcement.BudgetGuard` that holds NeuroFlux's unit
steps: forward and backward run under the tracked meter with the budget as a
hard limit, the update is refused before it starts if the bytes live then plus
what ``optimizer.step()`` will allocate exceed the budget, and an update is
never applied twice. A step that does not fit is retried on the same batch in
more pieces whose gradients accumulate (half-size pieces, then quarter...), so
the update is the same mean-loss update as the whole batch would give (only
BatchNorm's batch statistics see smaller pieces) and the learning rate stays;
the pieces stay for the rest of the run. The metering schedule is NeuroFlux's:
every step while the batch size is new, then one in ``meter_sample_every``.
On CUDA the allocator is capped at the budget, as for NeuroFlux.

Automatic optimization only (Lightning runs forward, backward and the update
as one closure, which is what is metered); ``accumulate_grad_batches`` must be 1.

Example:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(strategy=BudgetedBackpropStrategy(memory_budget="50MB"), accelerator="cpu",
    ...                      logger=False, enable_progress_bar=False, enable_checkpointing=False)
    >>> trainer.strategy.budget.bytes
    50000000
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer

from nf_lightning.core.train.batches import batch_size_of, chunk_batch
from nf_lightning.core.memory.budget import DEFAULT_BUDGET, MemoryBudget, format_bytes
from nf_lightning.core.train.distributed import LOCAL, Collective, LocalCollective, PeerStepFailed
from nf_lightning.core.memory.enforcement import FULL_STEPS, SAMPLE_EVERY, BudgetGuard
from nf_lightning.core.memory.meter import cap_cuda_allocator
from nf_lightning.lightning._internals import TrainerDevices
from nf_lightning.lightning.ddp import UnwrappedDDPStrategy, collective_for

CHECKPOINT_KEY = "budgeted_backprop"


class _BudgetedBackpropAdapter:
    """The budgeted step, shared by :class:`BudgetedBackpropStrategy` (one device) and
    :class:`BudgetedBackpropDDPStrategy` (several processes); it comes before a Lightning
    strategy in the method resolution order, so ``super()`` reaches that strategy."""

    def _configure(self, budget: MemoryBudget, meter_full_steps: int, meter_sample_every: int) -> None:
        self.budget = budget
        self.guard = BudgetGuard(
            torch.device("cpu"), budget.tensor_bytes, full_steps=meter_full_steps, sample_every=meter_sample_every
        )
        self.pieces = 1
        self.shrinks: list[dict[str, int]] = []
        self.collective: Collective | LocalCollective = LOCAL
        self._batch: Any = None
        self._optimizer: Optimizer | None = None
        self._stash: dict[Tensor, Tensor] = {}  # gradients of the pieces before the last

    def _fitting(self) -> bool:
        module = self.lightning_module
        return module is not None and module.trainer.state.fn == TrainerFn.FITTING

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if not self.lightning_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__} meters Lightning's automatic optimization step (forward, backward and "
                "update in one closure); this module uses manual optimization"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"{type(self).__name__} cuts a batch into pieces itself when it does not fit; "
                f"accumulate_grad_batches must be 1, got {trainer.accumulate_grad_batches}"
            )
        self.guard.device = self.root_device
        cap_cuda_allocator(self.root_device, self.budget.tensor_bytes)
        self.collective = collective_for(self)
        self.collective.broadcast_modules([self.lightning_module])  # every rank starts from rank 0's weights

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    # ------------------------------------------------------------------ the step
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """One metered transaction; a step that does not fit is retried in twice as many pieces."""
        if not self._fitting() or self._batch is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        metered = self.guard.next_batch()
        size = batch_size_of(self._batch) or 1
        while True:
            try:
                return self._transaction(optimizer, closure, model, metered, size, **kwargs)
            except torch.OutOfMemoryError as error:
                if not isinstance(error, PeerStepFailed):  # outside the meter: the other ranks drop the step too
                    self.collective.agree(failed=True)
                if -(-size // self.pieces) <= 1:
                    raise
                failed = True  # retried below, outside this handler, so the failed attempt's tensors are freed
            if failed:
                optimizer.zero_grad(set_to_none=True)
                old = -(-size // self.pieces)
                self.pieces *= 2
                self.guard.restart()
                metered = self.guard.next_batch()
                new = -(-size // self.pieces)
                self.shrinks.append({"from": old, "to": new, "pieces": self.pieces})
                warnings.warn(
                    f"a backpropagation step at batch {old} needed more than the {format_bytes(self.budget.tensor_bytes)} "
                    f"budget; retrying the batch in {self.pieces} pieces of at most {new} (gradients accumulated) "
                    "and training so from now on",
                    stacklevel=2,
                )

    def _transaction(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None,
        metered: bool,
        size: int,
        **kwargs: Any,
    ) -> Any:
        tensors: list[Tensor] = []
        apply_to_collection(self._batch, Tensor, tensors.append)
        tracked = [self.lightning_module, optimizer, *tensors]
        piece = -(-size // self.pieces)
        with self.guard.unit_step(0, 0, piece, tracked, optimizer, metered) as before_update:

            def checked_closure() -> Any:
                result = closure()
                self._restore_stashed_gradients()
                before_update(optimizer)  # the budget's limit is lifted from here on: collectives may allocate
                if self.collective.agree(failed=False):
                    raise PeerStepFailed("another rank's step did not fit the budget")
                self.collective.average_gradients(p for g in optimizer.param_groups for p in g["params"])
                return result

            self._optimizer = optimizer
            try:
                return super().optimizer_step(optimizer, checked_closure, model, **kwargs)
            finally:
                self._optimizer = None
                self._stash.clear()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's ``training_step``; in pieces after a shrink.

        Every piece but the last is back-propagated here and its gradients are set
        aside (Lightning's closure zeroes gradients between ``training_step`` and
        ``backward``); they are added back before the update.
        """
        if self.pieces == 1 or not args or self._optimizer is None:
            return super().training_step(*args, **kwargs)
        batch, rest = args[0], args[1:]
        size = batch_size_of(batch) or 1
        parts = chunk_batch(batch, self.pieces)
        for part in parts[:-1]:
            loss = _loss_of(super().training_step(part, *rest, **kwargs))
            if loss is not None:
                self.backward(loss * (batch_size_of(part) / size), self._optimizer)
                del loss
        for group in self._optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._stash[p] = p.grad
                    p.grad = None
        output = super().training_step(parts[-1], *rest, **kwargs)
        return _scaled(output, batch_size_of(parts[-1]) / size)

    def _restore_stashed_gradients(self) -> None:
        for p, grad in self._stash.items():
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        self._stash.clear()

    # ------------------------------------------------------------------ state
    def summary(self) -> dict[str, Any]:
        """The guard's record plus how batches were cut (what ``nf-train`` writes to ``results.json``)."""
        return {**self.guard.summary(), "pieces": self.pieces, "shrinks": list(self.shrinks)}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        checkpoint[CHECKPOINT_KEY] = {"guard": self.guard.state_dict(), "pieces": self.pieces, "shrinks": self.shrinks}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is not None and self._fitting():
            self.guard.load_state_dict(state["guard"])
            self.pieces = int(state["pieces"])
            self.shrinks = list(state["shrinks"])




class BudgetedBackpropStrategy(_BudgetedBackpropAdapter, TrainerDevices, SingleDeviceStrategy):
    """Backpropagation on one device, every step held to ``memory_budget`` as a transaction.

    Args:
        memory_budget: device memory for training, e.g. ``"300MB"``, a number of bytes or a
            :class:`~nf_lightning.core.memory.budget.MemoryBudget`.
        memory_overhead: device bytes held per tensor byte the meter counts; steps are held
            to ``memory_budget / memory_overhead`` tensor bytes (as ``NeuroFluxStrategy``).
        meter_full_steps, meter_sample_every: meter every step while the batch size is
            new (the first ``meter_full_steps`` steps, and again after a step had to be cut
            into pieces), then one step in ``meter_sample_every`` (1: every step).
        device: the training device; from the Trainer's ``accelerator``/``devices`` if None.

    After ``fit``, :attr:`guard` holds the record (metered steps, peak, refused
    attempts) and :attr:`pieces` how many pieces each batch is cut into.
    """

    strategy_name = "budgeted_bp"

    def __init__(
        self,
        memory_budget: str | int | MemoryBudget = DEFAULT_BUDGET,
        memory_overhead: float | None = None,
        meter_full_steps: int = FULL_STEPS,
        meter_sample_every: int = SAMPLE_EVERY,
        device: str | torch.device | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device=device or "cpu", accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin
        )
        self._device = torch.device(device) if device is not None else None
        self._configure(MemoryBudget.parse(memory_budget, memory_overhead), meter_full_steps, meter_sample_every)

    @property
    def root_device(self) -> torch.device:
        return self._device or self.trainer_device() or torch.device("cpu")


class BudgetedBackpropDDPStrategy(_BudgetedBackpropAdapter, UnwrappedDDPStrategy):
    """Budgeted backpropagation on several processes through Lightning's DDP (``"budgeted_bp_ddp"``).

    The same transaction per step as :class:`BudgetedBackpropStrategy`, with the budget per
    device, and the same gradient rule as :class:`~nf_lightning.lightning.strategy.NeuroFluxDDPStrategy`:
    no ``DistributedDataParallel`` wrapper (its bucketed all-reduce during backward would
    fire once per piece of a cut batch, and its buckets sit outside the meter's view), but
    an in-place all-reduce of every gradient after the whole batch's backward, before the
    update; a step that does not fit on one rank is cut into pieces on every rank. Initial
    weights come from rank 0; BatchNorm statistics are averaged before every validation and
    at the end of training.

    Args:
        memory_budget, memory_overhead, meter_full_steps, meter_sample_every: as
            :class:`BudgetedBackpropStrategy`, per device.
        **ddp_options: ``timeout``, ``process_group_backend``, ... as
            :class:`~nf_lightning.lightning.ddp.UnwrappedDDPStrategy`.

    Example::

        >>> BudgetedBackpropDDPStrategy("50MB", memory_overhead=2.0).budget.tensor_bytes
        25000000
    """

    strategy_name = "budgeted_bp_ddp"

    def __init__(
        self,
        memory_budget: str | int | MemoryBudget = DEFAULT_BUDGET,
        memory_overhead: float | None = None,
        meter_full_steps: int = FULL_STEPS,
        meter_sample_every: int = SAMPLE_EVERY,
        **ddp_options: Any,
    ) -> None:
        super().__init__(**ddp_options)
        self._configure(MemoryBudget.parse(memory_budget, memory_overhead), meter_full_steps, meter_sample_every)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._fitting():
            self.collective.average_buffers([self.lightning_module])

    def on_train_end(self) -> None:
        super().on_train_end()
        self.collective.average_buffers([self.lightning_module])


def _loss_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        return output.get("loss")
    return None


def _scaled(output: Any, factor: float) -> Any:
    if isinstance(output, Tensor):
        return output * factor
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        return {**output, "loss": output["loss"] * factor}
    return output


if BudgetedBackpropDDPStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        BudgetedBackpropDDPStrategy.strategy_name,
        BudgetedBackpropDDPStrategy,
        description="backpropagation held to a per-device memory budget, on several processes",
    )
if BudgetedBackpropStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        BudgetedBackpropStrategy.strategy_name,
        BudgetedBackpropStrategy,
        description="backpropagation held to a memory budget by NeuroFlux's meter and rule",
    )
