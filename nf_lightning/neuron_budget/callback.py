"""``NeuronUpdateBudget``: fine-tune only a budget of conv neurons, in the memory that budget promises.

Example:
    >>> import lightning.pytorch as pl
    >>> budget = NeuronUpdateBudget(policy="velocity", budget="2MB", norm="frozen")
    >>> trainer = pl.Trainer(callbacks=[budget], accelerator="cpu", logger=False, enable_progress_bar=False)
    >>> budget.policy, budget.budget_bytes
    ('velocity', 2000000)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from nf_lightning.core.memory.enforcement import BudgetGuard
from nf_lightning.core.memory.meter import meter_for
from nf_lightning.core.train.batches import batch_tensors, split_batch
from nf_lightning.lightning._internals import loaded_train_dataloader
from nf_lightning.lightning.run_access import neuroflux_run
from nf_lightning.neuron_budget.budget import NeuronBytes, parse_bytes, state_tensors, trace_layers
from nf_lightning.neuron_budget.kept_state import fixed_copy_bytes, selected_row_bytes
from nf_lightning.neuron_budget.probe import VelocityProbe
from nf_lightning.neuron_budget.probe_memory import ProbeMemory, inference_peak
from nf_lightning.neuron_budget.scope import Scope, first_inputs, probe_forward, probe_inputs
from nf_lightning.neuron_budget.selection import (
    FIRST_EPOCH_POLICIES,
    NORM_POLICIES,
    POLICIES,
    RECURSIONS,
    ConvNeurons,
    masks_params,
)
from nf_lightning.neuron_budget.selector import Selector
from nf_lightning.neuron_budget.trainable import SelectiveTraining, activations_of, norms_to_freeze

STATE_VERSION = 3


class NeuronUpdateBudget(pl.Callback):
    """Update only a budget of conv neurons (output channels); the rest are frozen and cost no training memory.

    Every epoch has one selection. A selected channel's filter is a parameter of
    its own (gradient and optimizer state for it alone); the other channels are
    buffers and stay bit-identical; a conv's input is kept for the backward pass
    only if it has a selected channel; ReLUs keep one bit per element; frozen
    BatchNorms are affine maps; the backward pass stops below the lowest layer
    with anything to update (:mod:`nf_lightning.neuron_budget.partial`).
    On a new selection the channels that stay keep their optimizer state.

    Policies: ``"velocity"`` (NEq's velocity on a probe set, ranked by
    ``|v| / cost``; ``first_epoch`` before it exists), ``"random"`` (a fresh
    permutation per epoch), ``"sparse_update"`` (static: a given scheme, or the
    top convs down, channels by filter norm), ``"full"``.

    **Budget.** A float in [0, 1] is a fraction of the conv parameters in scope
    (the paper's budget; under NeuroFlux, of the active block's). A string such
    as ``"2MB"`` is bytes: the training step's memory over inference's (selected
    copies, gradients, optimizer state, the activations the selection keeps, the
    probe's copy of the weights). Each neuron then costs its parameters' bytes,
    the first in a layer also that layer's kept input, and one below the lowest
    so far the layers the backward pass newly reaches; neurons that do not fit
    are skipped. Every step is metered by the project's
    :class:`~nf_lightning.core.memory.enforcement.BudgetGuard` against inference's
    measured peak plus the budget, and a step over it raises
    :class:`~nf_lightning.core.memory.MemoryLimitExceeded` before its update.
    Byte budgets are for ordinary training (NeuroFlux has its own memory budget).

    **Velocity's probe** (:class:`~nf_lightning.neuron_budget.probe.VelocityProbe`)
    keeps a copy of what the epoch's selection can change (its rows, the other
    trained parameters, the buffers), not recorded outputs. Between epochs it
    compares old and new outputs within ``probe_memory``: bytes, or a fraction
    of the least a step can hold, inference's peak at the training batch (the
    weights counted once) or the epoch's first step if smaller; so within it of
    the next step too, whatever that selection is.
    ``neuron_budget/probe_bytes`` logs its peak on the device (the copy there,
    the rows it swaps in, the outputs it holds). ``probe_copy`` says where the
    copy of the selected rows lives: ``"device"``; ``"off_device"``, host
    memory when training on an accelerator, else an unlinked memory-mapped file;
    ``"auto"`` (default), off the device on an accelerator, and on the CPU while
    no step has been measured yet or when the rows would take more than half of
    ``probe_memory``.

    Args:
        policy: ``"velocity"``, ``"random"``, ``"sparse_update"`` or ``"full"``.
        budget: a fraction of the conv parameters, or bytes as a string (``"2MB"``).
        first_epoch: velocity's policy before it has one: ``"sparse_update"``, ``"random"`` or ``"full"``.
        sparse_update: the SU scheme (``{"layers": [...], "ratios": [...]}``); None: top-down.
        mu: velocity momentum. recursion: ``"paper"`` or ``"public_code"``.
        probe_size: probe samples from the validation data (a count, or a fraction of the training set).
        probe: the probe inputs themselves. probe_batch: the largest batch of a probe pass.
        probe_memory: the probe's bytes at most, a fraction of the least step (see above) or bytes (``"256KB"``);
            it takes smaller batches, fewer layers and fewer channels a pass to fit.
        probe_copy: where the copy of the selected rows lives: ``"auto"``, ``"device"`` or ``"off_device"``.
        norm: ``"always"`` (every norm layer trains, the paper's method), ``"range"`` (those from the
            lowest updated conv up) or ``"frozen"`` (none; BatchNorms become affine maps).
        count_aux_heads: under NeuroFlux, count the auxiliary heads' convs as neurons.
        exclude: ``fnmatch`` patterns of conv names kept out of the selection (always updated).
        seed: seed of the random policy. log_layers: log the per-layer fractions too.
    """

    def __init__(
        self, policy: str = "velocity", budget: float | str = 0.2, *, first_epoch: str = "sparse_update",
        sparse_update: Any = None, mu: float = 0.5, recursion: str = "paper", probe_size: int | float = 0.01,
        probe: Tensor | None = None, probe_batch: int = 8, probe_memory: float | str = 0.1, probe_copy: str = "auto",
        norm: str = "always", count_aux_heads: bool = False, exclude: Sequence[str] = (), seed: int = 0,
        log_layers: bool = True,
    ) -> None:
        for name, value, allowed in (("policy", policy, POLICIES), ("first_epoch", first_epoch, FIRST_EPOCH_POLICIES),
                                     ("recursion", recursion, RECURSIONS), ("norm", norm, NORM_POLICIES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.budget_bytes = parse_bytes(budget) if isinstance(budget, str) else None
        if self.budget_bytes is None and not 0.0 <= float(budget) <= 1.0:
            raise ValueError(f"budget is a fraction of the conv parameters in [0, 1] or bytes ('2MB'), got {budget}")
        self.probe_memory = ProbeMemory(probe_memory, probe_copy)
        if isinstance(probe_batch, bool) or int(probe_batch) < 1:
            raise ValueError(f"probe_batch must be a positive batch size, got {probe_batch!r}")
        if isinstance(probe_size, bool) or not probe_size > 0:
            raise ValueError(f"probe_size must be a positive count or fraction, got {probe_size!r}")
        self.policy, self.budget, self.first_epoch, self.norm = policy, budget, first_epoch, norm
        self.mu, self.recursion, self.probe_size, self.probe = float(mu), recursion, probe_size, probe
        self.probe_batch, self.count_aux_heads, self.exclude = int(probe_batch), count_aux_heads, tuple(exclude)
        self.seed, self.log_layers = int(seed), log_layers
        fraction = float(budget) if self.budget_bytes is None else None
        self.selector = Selector(fraction, self.budget_bytes, sparse_update, seed)
        self.history: list[dict[str, Any]] = []
        self.training = SelectiveTraining()
        self.guard: BudgetGuard | None = None
        self._scope: Scope | None = None
        self._masks: list[Tensor] = []
        self._selected_by: str | None = None
        self._epoch_done = -1
        self._probe: VelocityProbe | None = None
        self._probe_x: Tensor | None = None
        self._costs: NeuronBytes | None = None
        self._applied_to: tuple[int, ...] | None = None
        self._restored: dict[str, Any] | None = None
        self._window: contextlib.ExitStack | None = None
        self._before_update: Any = None
        self._step_meter: Any = None

    # ------------------------------------------------------------------ public view
    @property
    def layers(self) -> list[ConvNeurons]:
        return list(self._scope.layers) if self._scope else []

    @property
    def masks(self) -> dict[str, Tensor]:
        """The selection in effect: per conv name, which output channels are updated."""
        return {layer.name: mask.clone() for layer, mask in zip(self.layers, self._masks)}

    @property
    def velocity(self) -> dict[str, Tensor]:
        return dict(self._probe.velocity) if self._probe is not None else {}

    @property
    def step_peak(self) -> int | None:
        """The epoch's first training step's measured peak (``probe_memory`` is a fraction of it at most)."""
        return self.probe_memory.step_peak

    @property
    def probe_bytes(self) -> int:
        """The probe's copy of the weights plus one probe batch's conv outputs (0 without velocity)."""
        return self._probe.peak_bytes if self._probe is not None else 0

    def summary(self, epoch: int | None = None) -> dict[str, Any]:
        """What the current selection updates (as logged and kept in :attr:`history`)."""
        layers = self.layers
        updated, total = masks_params(layers, self._masks), sum(layer.params for layer in layers)
        costs = self._costs
        return {
            "epoch": epoch, "block": self._scope.block if self._scope else None, "policy": self._selected_by,
            "updated_params": updated, "budget_params": self.selector.budget_params(layers), "total_params": total,
            "updated_fraction": updated / total if total else 0.0,
            "updated_neurons": int(sum(int(mask.sum()) for mask in self._masks)),
            "frozen_layers": sum(1 for mask in self._masks if not bool(mask.any())),
            "probe_bytes": self.probe_bytes,
            "selection_bytes": costs.selection_bytes(self._masks) if costs is not None else None,
            "layers": {layer.name: float(mask.float().mean()) for layer, mask in zip(layers, self._masks)},
        }

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scope = Scope.of(neuroflux_run(trainer), pl_module, self.count_aux_heads, self.exclude)
        restored, self._restored = self._restored, None
        if restored is not None and restored["block"] == scope.block and restored["layers"] == scope.names:
            self._resume(trainer, pl_module, scope, restored)
            return
        self._enter(trainer, pl_module, scope)
        self._apply(trainer)
        self._keep(pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.layers:
            return
        self._ensure_applied(trainer)
        epoch = trainer.current_epoch
        record = self.summary(epoch)
        if not self.history or self.history[-1]["epoch"] != epoch:
            self.history.append(record)
            rank_zero_info(
                f"[neuron budget] epoch {epoch}: {record['policy']} updates {record['updated_params']} of "
                f"{record['total_params']} conv parameters ({record['updated_fraction']:.1%}), "
                f"{record['frozen_layers']} of {len(self.layers)} convs frozen")
        for key in ("updated_params", "budget_params", "updated_fraction", "updated_neurons", "frozen_layers",
                    "probe_bytes", "selection_bytes"):
            if record[key] is not None:
                pl_module.log(f"neuron_budget/{key}", float(record[key]), on_epoch=True)
        if self.log_layers:
            for name, fraction in record["layers"].items():
                pl_module.log(f"neuron_budget/layer/{name}", fraction, on_epoch=True)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._ensure_applied(trainer)
        if self.guard is not None:
            tracked = [pl_module, *trainer.optimizers, *self._probe_tensors(), *batch_tensors(batch)]
            self._window = contextlib.ExitStack()
            metered = self.guard.next_batch()
            step = self.guard.unit_step(0, 0, trainer.global_step, tracked, trainer.optimizers[0], metered)
            self._before_update = self._window.enter_context(step)
        elif batch_idx == 0 and self._probe is not None and neuroflux_run(trainer) is None:
            if self.probe_memory.inference_peak is None:  # the least any selection's step holds: weights once
                rows = selected_row_bytes(self._scope.roots)  # (a selected row is in its buffer and its parameter)
                self.probe_memory.inference_peak = inference_peak(pl_module, split_batch(batch)[0]) - rows
            self._step_meter = meter_for(pl_module.device)  # the step the probe's bytes are a fraction of
            self._step_meter.track(pl_module, *trainer.optimizers, *self._probe_tensors(), *batch_tensors(batch))
            self._window = contextlib.ExitStack()
            self._window.enter_context(self._step_meter)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._before_update is not None:
            self._before_update(optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._window is not None:
            self._window.close()
            self._window, self._before_update = None, None
        if self._step_meter is not None:  # closed with the window above
            self.probe_memory.step_peak, self._step_meter = self._step_meter.peak_bytes, None
        elif batch_idx == 0 and self._probe is not None:
            guard = self.guard if self.guard is not None else _run_guard(trainer)
            if guard is not None and guard.last_peak:
                self.probe_memory.step_peak = guard.last_peak

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = neuroflux_run(trainer)
        if trainer.current_epoch > self._epoch_done and not (run is not None and run.finished):
            self._end_epoch(trainer, pl_module, trainer.current_epoch)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.training.release()
        self._applied_to = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._window is not None:
            self._window.__exit__(type(exception), exception, exception.__traceback__)
            self._window, self._before_update = None, None
        self._step_meter = None
        self.teardown(trainer, pl_module, "fit")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "block": self._scope.block if self._scope else None,
            "layers": self._scope.names if self._scope else [], "masks": [m.clone() for m in self._masks],
            "selector": self.selector.state_dict(), "selected_by": self._selected_by,
            "epoch_done": self._epoch_done, "probe": self._probe.state_dict() if self._probe else None,
            "step_peak": self.step_peak, "inference_peak": self.probe_memory.inference_peak,
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"NeuronUpdateBudget state version {state_dict.get('version')!r} is not supported")
        self._restored = dict(state_dict)
        self.probe_memory.step_peak = state_dict["step_peak"]
        self.probe_memory.inference_peak = state_dict.get("inference_peak")
        self.history = list(state_dict["history"])

    # ------------------------------------------------------------------ internals
    def _resume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, scope: Scope, restored: dict) -> None:
        self._scope, self._epoch_done = scope, int(restored["epoch_done"])
        self.selector.load_state_dict(restored["selector"])
        self._masks = [mask.clone().bool() for mask in restored["masks"]]
        self._selected_by = restored["selected_by"]
        self._start_costs(trainer, pl_module)
        self._apply(trainer)
        if restored["probe"] is not None:
            self._probe = VelocityProbe({layer.name: layer.module for layer in scope.layers}, self.mu, self.recursion)
            self._probe.load_state_dict(restored["probe"], scope.roots, self._off_device(pl_module.device))
        last = trainer.current_epoch - 1  # a checkpoint taken before that epoch's end was handled
        run = neuroflux_run(trainer)
        if last > self._epoch_done and not (run is not None and run.finished):
            self._end_epoch(trainer, pl_module, last)

    def _enter(self, trainer: pl.Trainer, pl_module: pl.LightningModule, scope: Scope) -> None:
        """Start selecting among ``scope``: the first selection, and a probe without a copy yet."""
        self.training.release()
        if not scope.layers:
            warnings.warn("NeuronUpdateBudget found no Conv2d to select neurons among; it does nothing", stacklevel=2)
        self._scope, self._probe = scope, None
        self.probe_memory.new_scope()
        self.selector.enter(scope.layers)
        self._start_costs(trainer, pl_module)
        if self.policy == "velocity" and scope.layers:
            self._probe = VelocityProbe({layer.name: layer.module for layer in scope.layers}, self.mu, self.recursion)
        self._select(self.first_epoch if self.policy == "velocity" else self.policy)

    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """After epoch ``epoch``: the next epoch's selection (a new scope if NeuroFlux changed blocks)."""
        self._epoch_done = epoch
        scope = Scope.of(neuroflux_run(trainer), pl_module, self.count_aux_heads, self.exclude)
        if self._scope is None or scope.block != self._scope.block or scope.names != self._scope.names:
            self._enter(trainer, pl_module, scope)
        elif self._probe is not None:
            self._compare(trainer, pl_module)
            self._select("velocity")
        elif self.policy == "random":
            self._select("random")
        self._apply(trainer)
        self._keep(pl_module)

    def _select(self, policy: str) -> None:
        velocity = self._probe.flat_velocity(self._scope.names) if policy == "velocity" else None
        reserve = fixed_copy_bytes(self._scope.roots) if self._probe is not None else 0
        self._masks = self.selector.select(policy, self.layers, self._costs, velocity, reserve)
        self._selected_by = policy

    def _start_costs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """For a byte budget: trace the layers on the first batch, measure inference, set up the guard."""
        if self.budget_bytes is None or not self.layers:
            return
        if neuroflux_run(trainer) is not None:
            raise ValueError("a byte budget is for ordinary training; under NeuroFlux give a fraction")
        x = first_inputs(loaded_train_dataloader(trainer)).to(pl_module.device)
        meter = meter_for(pl_module.device)
        meter.track(pl_module, x)
        with meter, torch.no_grad():
            pl_module(x)
        convs = [layer.module for layer in self.layers]
        tensors = max((state_tensors(opt) for opt in trainer.optimizers), default=2)
        tensors += int(self.policy == "velocity")  # the probe's copy of the selected rows
        self._costs = NeuronBytes(trace_layers(pl_module, x[:1]), convs, len(x), self.norm, tensors)
        self.probe_memory.inference_peak = meter.peak_bytes
        self.guard = BudgetGuard(pl_module.device, meter.peak_bytes + self.budget_bytes, full_steps=5, sample_every=1)

    def _compare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Velocity over the epoch that ended, within ``probe_memory``."""
        if self._probe_x is None:
            self._probe_x = (torch.as_tensor(self.probe).detach().cpu() if self.probe is not None
                             else probe_inputs(trainer, self.probe_size))
            rank_zero_info(f"[neuron budget] velocity probes {len(self._probe_x)} samples")
        forward = probe_forward(neuroflux_run(trainer), pl_module, self.count_aux_heads)
        limit = self.probe_memory.limit()
        self._probe.compare(self._scope.roots, forward, self._probe_x.split(self.probe_batch), limit)
        if limit is not None and self._probe.peak_bytes > limit:
            warnings.warn(f"the velocity probe held {self._probe.peak_bytes} bytes, over probe_memory's {limit}: its "
                          "copy on the device and one channel of one layer's output on one sample are the least it "
                          "needs", stacklevel=2)

    def _keep(self, pl_module: pl.LightningModule) -> None:
        """The probe's copy of what the selection now in effect can change."""
        if self._probe is not None:
            self._probe.keep(self._scope.roots, self._off_device(pl_module.device))

    def _off_device(self, device: torch.device) -> bool:
        return self.probe_memory.off_device(device, selected_row_bytes(self._scope.roots))

    def _probe_tensors(self) -> list[Tensor]:
        return self._probe.tensors() if self._probe is not None else []

    def _apply(self, trainer: pl.Trainer) -> None:
        """Train what the selection holds, in the optimizers Lightning steps now."""
        modules = [m for _, m in self._scope.named]
        masks = {layer.module: mask for layer, mask in zip(self._scope.layers, self._masks)}
        frozen = norms_to_freeze(modules, masks, self.norm)
        self.training.apply(masks, trainer.optimizers, frozen, activations_of(modules))
        self._applied_to = tuple(id(opt) for opt in trainer.optimizers)

    def _ensure_applied(self, trainer: pl.Trainer) -> None:
        """Re-apply on new optimizers (NeuroFlux builds them anew at every block)."""
        if self.layers and self._applied_to != tuple(id(opt) for opt in trainer.optimizers):
            self._apply(trainer)


def _run_guard(trainer: pl.Trainer) -> BudgetGuard | None:
    """NeuroFlux's guard, which meters its steps."""
    run = neuroflux_run(trainer)
    return run.step.guard if run is not None else None

