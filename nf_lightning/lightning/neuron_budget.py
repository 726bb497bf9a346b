"""``NeuronUpdateBudget``: fine-tune only a budgeted subset of conv neurons (arXiv 2312.05282).

A callback, optional and independent: with ordinary training (BP, automatic
optimization) it selects among every ``Conv2d`` of the LightningModule; under
NeuroFlux it reads the block-wise run as ``trainer.strategy.run`` (duck-typed
through :class:`~nf_lightning.core.train.run.BlockwiseRun`, never importing the
strategy) and selects among the convs of the active block. The pieces (costs,
velocity, budget filling, Sparse Update, exact freezing) are pure PyTorch in
:mod:`nf_lightning.core.neuron_budget`.

Example:
    >>> import lightning.pytorch as pl
    >>> budget = NeuronUpdateBudget(policy="velocity", budget=0.2, first_epoch="sparse_update")
    >>> trainer = pl.Trainer(callbacks=[budget], accelerator="cpu", logger=False, enable_progress_bar=False)
    >>> budget.policy, budget.budget
    ('velocity', 0.2)
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from nf_lightning.core.train.batches import split_batch
from nf_lightning.core.neuron_budget import (
    FIRST_EPOCH_POLICIES,
    NORM_POLICIES,
    POLICIES,
    RECURSIONS,
    ConvNeurons,
    ExactFreezer,
    VelocityTracker,
    auto_sparse_update,
    budget_params,
    conv_neurons,
    fill_budget,
    masks_params,
    neuron_costs,
    norm_params_below,
    parse_sparse_update,
    probe_forward,
    random_order,
    sparse_update_masks,
    split_by_layer,
    velocity_order,
)
from nf_lightning.core.train.run import BlockwiseRun

STATE_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class NeuronUpdateBudget(pl.Callback):
    """Update only a budget of conv neurons (output channels); freeze the rest exactly.

    Every epoch uses one selection of neurons; the others are frozen for that
    epoch: their weights, biases and optimizer state do not change by a single
    bit (:class:`~nf_lightning.core.neuron_budget.ExactFreezer`), and a conv
    with no selected neuron gets ``requires_grad=False`` (no weight gradient,
    no optimizer state, the backward pass stops below the lowest layer that
    needs a gradient). BatchNorm, linear classifiers and NeuroFlux's auxiliary
    heads are always updated and not counted.

    Policies:

    - ``"velocity"``: NEq's velocity of every neuron's outputs on a fixed probe
      set, ranked by ``|v| / cost`` and filled greedily to the budget; the first
      epoch (and the first epoch of each NeuroFlux block) uses ``first_epoch``;
    - ``"random"``: a fresh random permutation each epoch, filled to the budget;
    - ``"sparse_update"``: a static scheme (``sparse_update``: layer indices and
      channel ratios, channels by weight norm), fixed for the run; a top-down
      scheme filling the budget if None;
    - ``"full"``: everything (the reference).

    The budget is never exceeded, except by ``first_epoch="full"`` (asked for).

    **Where the budget applies.** With BP, to the whole network: ``budget`` is a
    fraction of all conv parameters of the module. Under NeuroFlux, per block:
    only the active block trains, so the budget is a fraction of the conv
    parameters of the active block's units (and of the model's head when the
    last unit is active), and the selection, velocity and first epoch start
    anew at every block. Auxiliary heads are trained in full and not counted,
    unless ``count_aux_heads=True``.

    **Velocity's recorded outputs** live on the CPU (host memory, ``record_dtype``),
    never on the training device, and do not count against the budget (which is
    about parameters that change); their size is logged as
    ``neuron_budget/velocity_bytes``. They are saved in the callback's state so a
    resumed run computes the same velocities.

    Logged every epoch (``pl_module.log``, epoch-level): ``neuron_budget/updated_params``,
    ``.../budget_params``, ``.../updated_fraction``, ``.../updated_neurons``,
    ``.../frozen_layers``, ``.../velocity_bytes`` and, with ``log_layers``,
    ``neuron_budget/layer/<conv name>`` (the fraction of its channels updated).
    :attr:`history` keeps the same per epoch, with the policy that chose it.

    Args:
        policy: ``"velocity"``, ``"random"``, ``"sparse_update"`` or ``"full"``.
        budget: fraction of the conv parameters (in scope) that may change, in [0, 1].
        first_epoch: what velocity uses before it has one: ``"sparse_update"``, ``"random"`` or ``"full"``.
        sparse_update: the SU scheme (see :func:`~nf_lightning.core.neuron_budget.parse_sparse_update`;
            indices count the convs in scope, so under NeuroFlux those of the active block);
            None builds a top-down one that fills ``budget``.
        mu: velocity momentum.
        recursion: ``"paper"`` (``v_t = delta_t - mu v_(t-1)``) or ``"public_code"``.
        probe_size: probe samples, taken in order from the validation data: an int
            is a count, a float a fraction of the training set's size.
        probe: the probe inputs themselves (a tensor), instead of validation data.
        probe_batch: batch size of the probe passes.
        record_dtype: ``"float32"`` or ``"float16"`` storage of the recorded outputs.
        norm: ``"always"`` updates every normalization layer (as the paper's
            method); ``"range"`` freezes those below the lowest updated conv too,
            so the backward pass stops there.
        count_aux_heads: under NeuroFlux, count the auxiliary heads' convs as neurons.
        exclude: ``fnmatch`` patterns of conv names (as in ``named_modules``) kept
            out of the selection (always updated, not counted).
        seed: seed of the random policy.
        log_layers: log the per-layer fractions too.
    """

    def __init__(
        self,
        policy: str = "velocity",
        budget: float = 0.2,
        *,
        first_epoch: str = "sparse_update",
        sparse_update: Any = None,
        mu: float = 0.5,
        recursion: str = "paper",
        probe_size: int | float = 0.01,
        probe: Tensor | None = None,
        probe_batch: int = 64,
        record_dtype: str = "float32",
        norm: str = "always",
        count_aux_heads: bool = False,
        exclude: Sequence[str] = (),
        seed: int = 0,
        log_layers: bool = True,
    ) -> None:
        for name, value, allowed in (
            ("policy", policy, POLICIES),
            ("first_epoch", first_epoch, FIRST_EPOCH_POLICIES),
            ("recursion", recursion, RECURSIONS),
            ("norm", norm, NORM_POLICIES),
            ("record_dtype", record_dtype, tuple(_DTYPES)),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= float(budget) <= 1.0:
            raise ValueError(f"budget is a fraction of the conv parameters in [0, 1], got {budget}")
        if isinstance(probe_size, bool) or not probe_size > 0:
            raise ValueError(f"probe_size must be a positive count or fraction, got {probe_size!r}")
        self.policy = policy
        self.budget = float(budget)
        self.first_epoch = first_epoch
        self.sparse_update = sparse_update
        self.mu = float(mu)
        self.recursion = recursion
        self.probe_size = probe_size
        self.probe = probe
        self.probe_batch = int(probe_batch)
        self.record_dtype = record_dtype
        self.norm = norm
        self.count_aux_heads = count_aux_heads
        self.exclude = tuple(exclude)
        self.seed = int(seed)
        self.log_layers = log_layers

        self.history: list[dict[str, Any]] = []
        self._layers: list[ConvNeurons] = []
        self._named: list[tuple[str, nn.Module]] = []
        self._masks: list[Tensor] = []
        self._su_masks: list[Tensor] | None = None
        self._selected_by: str | None = None
        self._block: int | None = None
        self._epoch_done = -1
        self._tracker: VelocityTracker | None = None
        self._generator = torch.Generator().manual_seed(self.seed)
        self._freezer = ExactFreezer()
        self._applied_to: tuple[int, ...] | None = None
        self._probe_x: Tensor | None = None
        self._restored: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public view
    @property
    def layers(self) -> list[ConvNeurons]:
        """The convs whose neurons are selected now (the active block's under NeuroFlux)."""
        return list(self._layers)

    @property
    def masks(self) -> dict[str, Tensor]:
        """The selection in effect: per conv name, which output channels are updated."""
        return {layer.name: mask.clone() for layer, mask in zip(self._layers, self._masks)}

    @property
    def budget_params(self) -> int:
        return budget_params(self._layers, self.budget)

    @property
    def freezer(self) -> ExactFreezer:
        return self._freezer

    @property
    def velocity_bytes(self) -> int:
        """Host memory of velocity's recorded outputs."""
        return self._tracker.nbytes if self._tracker is not None else 0

    def summary(self, epoch: int | None = None) -> dict[str, Any]:
        """What the current selection updates (as logged and kept in :attr:`history`)."""
        updated = masks_params(self._layers, self._masks)
        total = sum(layer.params for layer in self._layers)
        return {
            "epoch": epoch,
            "block": self._block,
            "policy": self._selected_by,
            "updated_params": updated,
            "budget_params": self.budget_params,
            "total_params": total,
            "updated_fraction": updated / total if total else 0.0,
            "updated_neurons": int(sum(int(mask.sum()) for mask in self._masks)),
            "frozen_layers": sum(1 for mask in self._masks if not bool(mask.any())),
            "velocity_bytes": self.velocity_bytes,
            "layers": {layer.name: float(mask.float().mean()) for layer, mask in zip(self._layers, self._masks)},
        }

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers, block, named = self._scope(trainer, pl_module)
        restored, self._restored = self._restored, None
        if restored is not None:
            self.history = list(restored["history"])
            self._epoch_done = int(restored["epoch_done"])
            self._generator.set_state(restored["generator"])
            if restored["block"] == block and restored["layers"] == [layer.name for layer in layers]:
                self._layers, self._named, self._block = layers, named, block
                self._masks = [mask.clone().bool() for mask in restored["masks"]]
                self._su_masks = None if restored["su_masks"] is None else [m.bool() for m in restored["su_masks"]]
                self._selected_by = restored["selected_by"]
                tracker = restored["tracker"]
                self._tracker = VelocityTracker.from_state(tracker) if tracker is not None else None
                self._apply(trainer)
                last = trainer.current_epoch - 1  # a checkpoint taken before that epoch's end was handled
                if last > self._epoch_done and not self._finished(trainer):
                    self._end_epoch(trainer, pl_module, last)
                return
        self._enter(trainer, pl_module, layers, block, named)
        self._apply(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._layers:
            return
        self._ensure_applied(trainer)
        epoch = trainer.current_epoch
        record = self.summary(epoch)
        if not self.history or self.history[-1]["epoch"] != epoch:
            self.history.append(record)
            rank_zero_info(
                f"[neuron budget] epoch {epoch}: {record['policy']} updates {record['updated_params']} of "
                f"{record['total_params']} conv parameters ({record['updated_fraction']:.1%}; budget "
                f"{record['budget_params']}), {record['frozen_layers']} of {len(self._layers)} convs frozen"
            )
        for key in ("updated_params", "budget_params", "updated_fraction", "updated_neurons", "frozen_layers",
                    "velocity_bytes"):
            pl_module.log(f"neuron_budget/{key}", float(record[key]), on_epoch=True)
        if self.log_layers:
            for name, fraction in record["layers"].items():
                pl_module.log(f"neuron_budget/layer/{name}", fraction, on_epoch=True)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._ensure_applied(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > self._epoch_done and not self._finished(trainer):
            self._end_epoch(trainer, pl_module, trainer.current_epoch)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._freezer.release()
        self._applied_to = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._freezer.release()
        self._applied_to = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "block": self._block,
            "layers": [layer.name for layer in self._layers],
            "masks": [mask.clone() for mask in self._masks],
            "su_masks": None if self._su_masks is None else [mask.clone() for mask in self._su_masks],
            "selected_by": self._selected_by,
            "epoch_done": self._epoch_done,
            "generator": self._generator.get_state(),
            "tracker": self._tracker.state_dict() if self._tracker is not None else None,
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"NeuronUpdateBudget state version {state_dict.get('version')!r} is not supported")
        self._restored = dict(state_dict)
        self.history = list(state_dict["history"])

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _run(trainer: pl.Trainer) -> BlockwiseRun | None:
        run = getattr(trainer.strategy, "run", None)
        return run if isinstance(run, BlockwiseRun) else None

    def _finished(self, trainer: pl.Trainer) -> bool:
        run = self._run(trainer)
        return run is not None and run.finished

    def _excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def _scope(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[list[ConvNeurons], int | None, list[tuple[str, nn.Module]]]:
        """The convs to select among, the NeuroFlux block (None with BP) and the modules in order."""
        run = self._run(trainer)
        if run is None:
            named = list(pl_module.named_modules())
        else:
            names = {id(module): name for name, module in pl_module.named_modules()}
            named = []
            last = len(run.units) - 1
            for unit in run.active_units:
                parts = [("unit", run.units[unit])]
                if unit == last or self.count_aux_heads:
                    parts.append(("head" if unit == last else f"aux{unit}", run.exits[unit]))
                for prefix, part in parts:
                    for sub, module in part.named_modules():
                        fallback = f"{prefix}{unit if prefix == 'unit' else ''}" + (f".{sub}" if sub else "")
                        named.append((names.get(id(module), fallback), module))
        layers = [layer for layer in conv_neurons(named) if not self._excluded(layer.name)]
        return layers, (run.active_block if run is not None else None), named

    def _enter(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        layers: list[ConvNeurons],
        block: int | None,
        named: list[tuple[str, nn.Module]],
    ) -> None:
        """Start selecting among ``layers``: the first selection, and the velocity's first record."""
        if not layers:
            warnings.warn("NeuronUpdateBudget found no Conv2d to select neurons among; it does nothing", stacklevel=2)
        self._layers, self._named, self._block = layers, named, block
        self._su_masks = None
        self._tracker = None
        if self.policy == "velocity" and layers:
            self._tracker = VelocityTracker(
                [layer.name for layer in layers], self.mu, self.recursion, _DTYPES[self.record_dtype]
            )
            self._probe_pass(trainer, pl_module)
        first = self.first_epoch if self.policy == "velocity" else self.policy
        self._select(first)

    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """After epoch ``epoch``: the next epoch's selection (a new scope if NeuroFlux changed blocks)."""
        self._epoch_done = epoch
        layers, block, named = self._scope(trainer, pl_module)
        if block != self._block or [layer.name for layer in layers] != [layer.name for layer in self._layers]:
            self._enter(trainer, pl_module, layers, block, named)
        elif self.policy == "velocity" and self._tracker is not None:
            self._probe_pass(trainer, pl_module)
            self._select("velocity")
        elif self.policy == "random":
            self._select("random")
        self._apply(trainer)

    def _select(self, policy: str) -> None:
        layers = self._layers
        costs = neuron_costs(layers)
        budget = budget_params(layers, self.budget)
        if policy == "full":
            masks = [torch.ones(layer.out_channels, dtype=torch.bool) for layer in layers]
        elif policy == "sparse_update":
            masks = self._sparse_update_masks(budget)
        elif policy == "random":
            masks = split_by_layer(fill_budget(random_order(len(costs), self._generator), costs, budget), layers)
        else:
            assert self._tracker is not None and self._tracker.velocity
            velocity = self._tracker.flat_velocity([layer.name for layer in layers])
            masks = split_by_layer(fill_budget(velocity_order(velocity, costs), costs, budget), layers)
        if policy != "full" and masks_params(layers, masks) > budget:  # the fills cannot; a given SU scheme can
            raise AssertionError("a selection went over the budget")
        self._masks = [mask.clone() for mask in masks]
        self._selected_by = policy

    def _sparse_update_masks(self, budget: int) -> list[Tensor]:
        if self._su_masks is None:  # static: chosen once per scope, from the weights as they are then
            layers = self._layers
            if self.sparse_update is None:
                scheme = auto_sparse_update(layers, budget)
            else:
                scheme = parse_sparse_update(_plain(self.sparse_update), len(layers))
            masks = sparse_update_masks(layers, scheme)
            used = masks_params(layers, masks)
            if used > budget:
                raise ValueError(
                    f"the sparse update scheme {scheme} updates {used} conv parameters, over the budget of {budget} "
                    f"({self.budget:.1%} of {sum(layer.params for layer in layers)})"
                )
            self._su_masks = masks
        return [mask.clone() for mask in self._su_masks]

    def _apply(self, trainer: pl.Trainer) -> None:
        """Freeze what the selection leaves out, for the optimizers Lightning steps now."""
        optimizers = [getattr(opt, "optimizer", opt) for opt in trainer.optimizers]
        rows = {param: mask for layer, mask in zip(self._layers, self._masks) for param in layer.parameters()}
        frozen: list[nn.Parameter] = []
        if self.norm == "range" and self._layers:
            lowest = next((layer.name for layer, mask in zip(self._layers, self._masks) if bool(mask.any())), None)
            frozen = norm_params_below(self._named, lowest)
        self._freezer.apply(rows, optimizers, frozen)
        self._applied_to = tuple(id(opt) for opt in trainer.optimizers)

    def _ensure_applied(self, trainer: pl.Trainer) -> None:
        """Re-apply on new optimizers (NeuroFlux builds them anew at every block)."""
        if self._layers and self._applied_to != tuple(id(opt) for opt in trainer.optimizers):
            self._apply(trainer)

    # ------------------------------------------------------------------ velocity probe
    def _probe_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record every selected layer's outputs on the probe set (eval mode, no gradients)."""
        tracker = self._tracker
        assert tracker is not None
        x_all = self._probe_inputs(trainer)
        modules = {layer.name: layer.module for layer in self._layers}
        handles = [
            module.register_forward_hook(lambda _m, _i, out, name=name: tracker.observe(name, out))
            for name, module in modules.items()
        ]
        tracker.begin_pass()
        try:
            run = self._run(trainer)
            for x in x_all.split(self.probe_batch):
                if run is None:
                    probe_forward([pl_module], x.to(pl_module.device))
                else:
                    self._probe_blockwise(run, x)
        finally:
            for handle in handles:
                handle.remove()
        tracker.end_pass()

    def _probe_blockwise(self, run: BlockwiseRun, x: Tensor) -> None:
        last = len(run.units) - 1
        for unit in range(run.active_units[-1] + 1):
            x = probe_forward([run.units[unit]], x)
            if unit in run.active_units and (unit == last or self.count_aux_heads):
                probe_forward([run.exits[unit]], x)

    def _probe_inputs(self, trainer: pl.Trainer) -> Tensor:
        """The fixed probe inputs (on the CPU): ``probe``, else the first validation samples in order."""
        if self._probe_x is not None:
            return self._probe_x
        if self.probe is not None:
            self._probe_x = torch.as_tensor(self.probe).detach().cpu()
            return self._probe_x
        loader = trainer.val_dataloaders
        if isinstance(loader, dict):
            loader = list(loader.values())
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None and trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
            loader = trainer.datamodule.val_dataloader()
        if loader is None:
            raise ValueError("the velocity policy needs validation data to probe, or NeuronUpdateBudget(probe=...)")
        available = len(loader.dataset) if hasattr(loader, "dataset") else None
        wanted = self._probe_count(trainer, available)
        chunks, count = [], 0
        for batch in loader:
            x, _ = split_batch(batch)
            chunks.append(x.detach().cpu())
            count += len(x)
            if count >= wanted:
                break
        self._probe_x = torch.cat(chunks)[:wanted]
        rank_zero_info(f"[neuron budget] velocity probes {len(self._probe_x)} validation samples")
        return self._probe_x

    def _probe_count(self, trainer: pl.Trainer, available: int | None) -> int:
        if isinstance(self.probe_size, int):
            wanted = self.probe_size
        else:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            size = len(dataset) if dataset is not None else available
            if size is None:
                raise ValueError("cannot size the probe set from a fraction: give probe_size as a count")
            wanted = math.ceil(self.probe_size * size)
        return max(1, min(wanted, available) if available is not None else wanted)


def _plain(config: Any) -> Any:
    """An OmegaConf node as plain containers (Hydra passes them through)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return config
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    return config


def load_pretrained(module: nn.Module, path: str | Path) -> dict[str, Any]:
    """Start ``module`` from the weights in ``path`` (a Lightning checkpoint or a state dict).

    Keys are matched as they are, else with the module's ``net.`` prefix added
    (a state dict of the bare network). Tensors whose shape differs (a head for
    another number of classes) are skipped and listed. Load checkpoints you
    trust: they are unpickled. Returns what was loaded, for ``results.json``.

    Example (``nf-train ... pretrained=path/to/last.ckpt``)::

        report = load_pretrained(module, "outputs/.../checkpoints/last.ckpt")
    """
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds neither a Lightning checkpoint nor a state dict of tensors")
    own = module.state_dict()
    if not set(state) & set(own) and {f"net.{k}" for k in state} & set(own):
        state = {f"net.{k}": v for k, v in state.items()}
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(k for k in own if k not in loadable)
    if not loadable:
        raise ValueError(f"no tensor of {path} matches the model (its keys start {sorted(state)[:3]})")
    module.load_state_dict(loadable, strict=False)
    return {"path": str(path), "loaded": len(loadable), "skipped": skipped, "missing": missing}
