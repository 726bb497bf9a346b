"""Trainer settings NeuroFlux cannot honour, refused before any work with what to do instead.

They all assume end-to-end training by ``training_step``, which NeuroFlux replaces: Lightning
would otherwise fail deep inside the run, or with an error about manual optimization, a mode
the user never chose.

Example:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(accumulate_grad_batches=2, logger=False)
    >>> refuse_unsupported_settings(trainer, trainer.strategy.precision_plugin)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Trainer(accumulate_grad_batches=2) does not apply to NeuroFlux: it updates every unit ...
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BatchSizeFinder, GradientAccumulationScheduler, LearningRateFinder
from lightning.pytorch.plugins.precision import MixedPrecision, Precision


def refuse_unsupported_settings(trainer: pl.Trainer, precision: Precision, fitting: bool = True) -> None:
    """Raise ``ValueError`` on a precision that converts the weights and, when ``fitting``, on gradient
    accumulation or a callback that tunes end-to-end training."""
    _refuse_whole_network_precision(precision, trainer)
    if fitting:
        _refuse_gradient_accumulation(trainer)
        _refuse_backprop_tuning(trainer)


def _refuse_whole_network_precision(plugin: Precision, trainer: pl.Trainer) -> None:
    """Fail before any work on a precision that converts the network's weights ("bf16-true", "64-true"...)."""
    if type(plugin) is not Precision and not isinstance(plugin, MixedPrecision):
        raise ValueError(
            f"Trainer(precision={trainer.precision!r}) converts the network's weights, but not the exit heads "
            "NeuroFlux adds nor its cached activations. Use precision='32-true' (the default), 'bf16-mixed' "
            "(bfloat16 compute, on CPU too) or '16-mixed'"
        )


def _refuse_gradient_accumulation(trainer: pl.Trainer) -> None:
    """Fail before any work on ``accumulate_grad_batches``: NeuroFlux updates every unit on every batch."""
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) does not apply to NeuroFlux: it "
            "updates every unit once per batch, at the batch size its plan gives each block under the memory "
            "budget, up to NeuroFluxStrategy(batch_limit=...). Remove the setting"
        )


_BACKPROP_TUNING = {  # Lightning callbacks that tune or change the end-to-end training NeuroFlux replaces
    LearningRateFinder: "it (Tuner.lr_find) trains the whole network by training_step, which NeuroFlux does not "
    "call. Run it with Lightning's default strategy and give NeuroFlux the rate it suggests (NeuroFlux scales "
    "the rate to each block's batch)",
    BatchSizeFinder: "it (Tuner.scale_batch_size) tunes the batch size, and NeuroFlux gives each block the largest "
    "batch its memory budget allows, up to NeuroFluxStrategy(batch_limit=...)",
    GradientAccumulationScheduler: "it schedules gradient accumulation, and NeuroFlux updates every unit once per "
    "batch, at the batch size the memory budget gives its block",
}


def _refuse_backprop_tuning(trainer: pl.Trainer) -> None:
    """Fail before any work on a callback that tunes end-to-end training (it failed deep inside the run)."""
    for callback in trainer.callbacks:
        for kind, why in _BACKPROP_TUNING.items():
            if isinstance(callback, kind):
                raise ValueError(f"{type(callback).__name__} with NeuroFluxStrategy: {why}")
