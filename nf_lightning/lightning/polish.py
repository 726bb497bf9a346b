"""End-to-end polish of a deployed exit: backpropagation through the exit alone, under the same budget.

Block-wise training leaves each unit tuned to its own auxiliary head; the
units never adapt to one another. The exit chosen for deployment (units
``0..k`` and the head of unit ``k``) is a much smaller network than the whole
model, so backpropagation through it alone often fits the budget at a useful
batch size. :func:`polish_exit` fine-tunes it end to end for a few epochs:

- the batch is the largest at which a BP step of the exit fits the budget
  (:func:`~nf_lightning.lightning.backprop_batch.size_backprop_batch`), the
  learning rate follows it linearly from the recipe's reference batch, rises
  over an optional warm-up and decays to zero on a cosine over the polish;
- BatchNorm either keeps adapting its statistics to the polish's batches
  (``batchnorm="train"``) or keeps those the block-wise run left and normalizes
  with them (``"frozen"``; its scale and shift still train);
- the exit's first ``freeze_units`` units may stay as the run left them (weights
  and statistics): no backward pass through them and none of their activations
  held for one, so the epochs are cheaper and the batch the budget allows larger;
- every step is held to the budget by
  :class:`~nf_lightning.lightning.backprop.BudgetedBackpropStrategy` (the
  guard NeuroFlux's unit steps run under);
- the data is the datamodule's, augmented as block 0 saw it (``augment=True``), or
  un-augmented as the cache fed every later block (``augment=False``: its
  ``augment`` attribute is switched off for the polish and back after);
- the polished weights are kept only if their validation accuracy is at
  least the exit's own; otherwise the exit comes back unchanged.

Only the exit is polished: units past ``k`` and the other heads are left as
they were (their inputs would have changed under them), so the polished exit
is a model of its own, not a part of the full network.

Example:
    >>> polished, report = polish_exit(run.exit_model(), datamodule, "10MB", epochs=10, lr=0.05)  # doctest: +SKIP
    >>> report.kept, report.val_before, report.val_after  # doctest: +SKIP
    (True, 0.643, 0.689)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
from torch import nn

from nf_lightning.core.exits.selection import loader_accuracy
from nf_lightning.core.memory.budget import MemoryBudget
from nf_lightning.core.plan.partitioner import BATCH_LIMIT
from nf_lightning.lightning._internals import eval_mode_on_purpose
from nf_lightning.lightning.backprop import BudgetedBackpropStrategy
from nf_lightning.lightning.backprop_batch import size_backprop_batch
from nf_lightning.lightning.classifier import ClassifierModule, check_lr_warmup

BATCHNORM = ("train", "frozen")
"""How the polish treats BatchNorm: statistics that follow its batches, or those the run left."""


@dataclass(frozen=True)
class PolishReport:
    """What :func:`polish_exit` did: batch, rate, accuracies before and after, whether it kept the result."""

    epochs: int
    batch_size: int
    lr: float
    warmup: float
    batchnorm: str
    augment: bool
    freeze_units: int
    predicted_peak_bytes: int
    measured_peak_bytes: int | None
    val_before: float
    val_after: float
    kept: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def polish_exit(
    exit_model: nn.Module,
    datamodule: Any,
    budget: MemoryBudget | str | int,
    *,
    epochs: int,
    lr: float,
    reference_batch: int = 128,
    momentum: float | None = None,
    weight_decay: float | None = None,
    nesterov: bool = True,
    warmup: float = 0.0,
    batchnorm: str = "train",
    augment: bool = True,
    freeze_units: int = 0,
    batch_limit: int = BATCH_LIMIT,
    callbacks: Sequence[pl.Callback] = (),
    trainer_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, PolishReport]:
    """Fine-tune ``exit_model`` end to end by budgeted BP; return the better of it and the result.

    Args:
        exit_model: the deployed exit (``BlockwiseRun.exit_model()``); a copy is trained.
        datamodule: a LightningDataModule with ``num_classes``, ``input_shape`` and a settable
            ``batch_size`` (every ``nf_lightning.data`` module); its batch size comes back after.
        budget: what every BP step must fit, as for the run (``"20MB"``, bytes or a ``MemoryBudget``).
        epochs: polish epochs (the cosine's horizon); at least 1.
        lr: SGD rate at ``reference_batch``, scaled linearly to the batch used.
        momentum, weight_decay, nesterov: the rest of the SGD recipe (``ClassifierModule``'s where None).
        warmup: fraction of the polish's steps with a linear warm-up first (0: full rate at once).
        batchnorm: ``"train"`` (statistics follow the batches) or ``"frozen"`` (those it came with stay).
        augment: False trains on un-augmented batches (the datamodule's ``augment`` attribute, switched off).
        freeze_units: the exit's first units (``ExitModel.units``) kept as they are, statistics too.
        callbacks: more callbacks for the polish's Trainer (a ``ValidationHistory`` spans run and polish).
        trainer_options: more ``pl.Trainer`` arguments (``accelerator``, ``logger``...).

    Raises:
        BudgetTooSmall: if BP through the exit does not fit at batch 1.
        ValueError: for settings it cannot use (:func:`check_settings`).
    """
    check_settings(epochs, lr, warmup, batchnorm, augment, datamodule, freeze_units)
    start = time.perf_counter()
    original = copy.deepcopy(exit_model).cpu()
    budget = MemoryBudget.parse(budget)
    module = _module(exit_model, datamodule.num_classes, lr, warmup, momentum, weight_decay, nesterov, freeze_units)
    sized = size_backprop_batch(module, tuple(datamodule.input_shape), budget, batch_limit, lr=lr,
                                reference_batch=reference_batch,
                                needed_by="backpropagation through the deployed exit")  # fmt: skip
    module.hparams.lr = sized.lr
    trainer = _trainer(budget, epochs, batchnorm, callbacks, trainer_options)
    overrides = {"batch_size": sized.batch_size, **({} if augment else {"augment": False})}
    val_before, val_after = _fit_and_score(trainer, module, datamodule, overrides, original)
    _thaw(module.net, exit_model)
    report = PolishReport(
        epochs=epochs, batch_size=sized.batch_size, lr=module.hparams.lr, warmup=warmup, batchnorm=batchnorm,
        augment=augment, freeze_units=freeze_units, predicted_peak_bytes=sized.predicted_peak,
        measured_peak_bytes=trainer.strategy.guard.peak, val_before=val_before, val_after=val_after,
        kept=val_after >= val_before, seconds=time.perf_counter() - start,
    )  # fmt: skip
    return (module.net if report.kept else original.eval()), report


def _module(
    exit_model: nn.Module, num_classes: int, lr: float, warmup: float, momentum: float | None,
    weight_decay: float | None, nesterov: bool, freeze_units: int,
) -> ClassifierModule:
    """A copy of ``exit_model`` to train, cosine-decayed after ``warmup``, its first ``freeze_units`` units
    frozen; ``ClassifierModule``'s defaults where ``momentum`` or ``weight_decay`` is None."""
    recipe = {k: v for k, v in {"momentum": momentum, "weight_decay": weight_decay}.items() if v is not None}
    net = copy.deepcopy(exit_model).train()
    _freeze(net, freeze_units)
    return ClassifierModule(net, num_classes, lr=lr, nesterov=nesterov, lr_schedule="cosine", lr_warmup=warmup,
                            **recipe)  # fmt: skip


def _freeze(net: nn.Module, count: int) -> None:
    """Freeze the first ``count`` of ``net.units``: no gradients, and eval mode, which Lightning keeps
    through fit and validation (``_internals.eval_mode_on_purpose``), so their BatchNorm statistics stay."""
    if count == 0:
        return
    units = getattr(net, "units", None)
    if not isinstance(units, nn.Sequential) or len(units) < count:
        have = f"{len(units)} units" if isinstance(units, nn.Sequential) else "no `units` sequence"
        raise ValueError(f"freeze_units={count} needs an exit with at least {count} units "
                         f"(an ExitModel's `units`); this one has {have}")  # fmt: skip
    for unit in list(units)[:count]:
        unit.requires_grad_(False).eval()


def _thaw(net: nn.Module, like: nn.Module) -> None:
    """Give ``net``'s parameters the ``requires_grad`` of ``like``'s (the exit it was copied from)."""
    for parameter, original in zip(net.parameters(), like.parameters(), strict=True):
        parameter.requires_grad_(original.requires_grad)


def _trainer(
    budget: MemoryBudget, epochs: int, batchnorm: str, callbacks: Sequence[pl.Callback],
    trainer_options: dict[str, Any] | None,
) -> pl.Trainer:
    options = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
               "num_sanity_val_steps": 0, **(trainer_options or {})}  # fmt: skip
    callbacks = [*([FrozenBatchNormStatistics()] if batchnorm == "frozen" else []), *callbacks]
    strategy = BudgetedBackpropStrategy(memory_budget=budget)
    return pl.Trainer(strategy=strategy, max_epochs=epochs, callbacks=callbacks, **options)


class FrozenBatchNormStatistics(pl.Callback):
    """Keep every BatchNorm of the trained module in eval mode: it normalizes with its running statistics,
    which no training step changes; its affine weights still train.

    The module comes to ``fit`` in training mode, and its own code or a ``train()`` call may put it back
    there (Lightning itself keeps each submodule's mode, ``_internals.eval_mode_on_purpose``), so this
    does it before each training batch (cheap: a walk over the modules).
    """

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for module in pl_module.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                module.eval()


def check_settings(
    epochs: int, lr: float, warmup: float = 0.0, batchnorm: str = "train", augment: bool = True,
    datamodule: Any = None, freeze_units: int = 0,
) -> None:
    """Refuse polish settings :func:`polish_exit` cannot use (with ``datamodule``, on it), before anything trains.

    Example:
        >>> check_settings(2, 0.05, batchnorm="fixed")
        Traceback (most recent call last):
        ...
        ValueError: batchnorm must be one of ('train', 'frozen'), got 'fixed'
    """
    check_lr_warmup(warmup)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if batchnorm not in BATCHNORM:
        raise ValueError(f"batchnorm must be one of {BATCHNORM}, got {batchnorm!r}")
    if not isinstance(augment, bool):
        raise ValueError(f"augment must be true or false, got {augment!r}")
    if isinstance(freeze_units, bool) or not isinstance(freeze_units, int) or freeze_units < 0:
        raise ValueError(f"freeze_units must be a non-negative integer, got {freeze_units!r}")
    if not augment and datamodule is not None and not hasattr(datamodule, "augment"):
        raise ValueError(f"augment=False needs a datamodule with an `augment` attribute that its training loader "
                         f"follows (every nf_lightning.data module has one); {type(datamodule).__name__} has none")


def _fit_and_score(
    trainer: pl.Trainer, module: ClassifierModule, datamodule: Any, overrides: dict[str, Any], original: nn.Module
) -> tuple[float, float]:
    """Fit ``module`` with the datamodule's attributes set to ``overrides`` (its own values come back after);
    the validation accuracy of ``original`` before and of the trained network after (in eval mode, on the CPU)."""
    saved = {name: getattr(datamodule, name) for name in overrides}
    for name, value in overrides.items():
        setattr(datamodule, name, value)
    try:
        val_before = _accuracy(datamodule, original)
        with eval_mode_on_purpose():  # the frozen units (freeze_units) are the only ones in eval mode
            trainer.fit(module, datamodule=datamodule)
    finally:
        for name, value in saved.items():
            setattr(datamodule, name, value)
    return val_before, _accuracy(datamodule, module.net)


def _accuracy(datamodule: Any, model: nn.Module) -> float:
    """Validation accuracy of ``model`` on the datamodule's validation split (eval mode, no grad, CPU)."""
    datamodule.setup("fit")
    try:
        return loader_accuracy(model.cpu().eval(), datamodule.val_dataloader())
    except ValueError as error:
        raise ValueError("the validation split is empty: the polish cannot judge its result") from error
