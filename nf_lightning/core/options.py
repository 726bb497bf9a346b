"""``NeuroFluxOptions``: every block-wise setting in one frozen value, each default written once.

The strategy takes one (or keyword arguments that build one) and hands it whole
to the run; the app's configs override only what differs from these defaults.
The memory budget is not an option here: it is a
:class:`~nf_lightning.core.memory.budget.MemoryBudget` of its own.

Example:
    >>> options = NeuroFluxOptions(epochs_per_block=[2, 3], block_patience=None)
    >>> options.epochs_per_block, options.rho, options.schedule.patience
    ((2, 3), 0.4, None)
    >>> options.replace(rho=0.0).rho
    0.0
    >>> NeuroFluxOptions(aux="wide")
    Traceback (most recent call last):
    ...
    ValueError: unknown aux policy 'wide'; choose one of ('adaptive', 'classic', 'pooled')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nf_lightning.core.cache.format import SUPPORTED_DTYPES
from nf_lightning.core.exits.aux_heads import AUX_MAX_FILTERS
from nf_lightning.core.exits.aux_heads import POLICIES as AUX_POLICIES
from nf_lightning.core.memory.enforcement import FULL_STEPS, SAMPLE_EVERY
from nf_lightning.core.plan.partitioner import BATCH_LIMIT, RHO
from nf_lightning.core.train.feature_augment import POLICIES as AUGMENT_POLICIES
from nf_lightning.core.train.schedule import BlockSchedule

EVALUATE = ("exit", "full")
CLIP_ALGORITHMS = ("norm", "value")


@dataclass(frozen=True)
class NeuroFluxOptions:
    """How NeuroFlux plans, trains, caches, meters and deploys (everything but the budget and the device).

    Args:
        epochs_per_block: each block's horizon in epochs (one number, or one per block): its
            learning rate decays over it and it ends there at the latest.
        batch_limit: largest batch size any block uses (``B`` in Algorithm 1).
        rho: grouping threshold of Algorithm 1.
        aux: ``"adaptive"`` (AAN, the paper's heads), ``"classic"`` (256 filters) or ``"pooled"``
            (AAN's filters on the unit's output averaged down to 4x4 first: cheaper heads on early units).
        aux_max_filters: the widest ``"adaptive"``/``"pooled"`` head (256, the paper's widest; None: AAN's
            rule uncapped, which gives a ResNet-50 1,024-filter heads five times the size of its units).
        single_block: all units as one block at one batch size (classic local learning).
        cache: write each finished block's outputs to disk and train the next block from
            them (§5.3). ``False`` runs every batch through the frozen units before the
            active block instead (kept on the device, outside the budget): slower, but
            later blocks see augmented data.
        cache_dir: where caches go; the strategy uses ``<default_root_dir>/neuroflux_cache`` if None.
        cache_dtype: ``"float16"`` or ``"float32"``.
        cache_workers: worker processes reading cached data (0: a background thread).
        cache_seed: base seed of the shuffling (and feature augmentation) of cached training data.
        input_shape: one sample's shape; from the data module's ``input_shape``, the
            module's ``example_input_array`` or the first batch if None.
        lr_reference_batch: the batch size the recipe's learning rate was tuned for; the
            training loader's batch size if None. Each block's rate follows its own batch
            size from there by ``lr_scaling`` (``"linear"``, ``"sqrt"`` or ``"none"``).
        lr_decay: ``"cosine"`` decays each block's rate to zero over its horizon, ``"none"``
            keeps it; either way only when ``configure_optimizers`` brings no scheduler
            (yours are stepped instead, fresh for every block).
        min_steps_per_block: lengthen a block's horizon until it gets at least this many
            steps, up to ``max_epochs_per_block``.
        min_epochs_per_block: epochs before ``block_patience`` may end a block.
        block_patience: end a block once its best exit has not improved by
            ``block_min_delta`` for this many epochs; None trains every horizon to its end.
        block_anneal_epochs: a block that stops improving before its horizon first decays
            its rate from where it is to zero over this many epochs, then ends (0: at once).
        patience_reference: ``"own"``: ``block_patience`` counts epochs without a gain over
            the block's own best exit. ``"deployed"``: a block must also beat the exit deployed
            when it started; one that has not for ``block_patience`` epochs ends at once, unannealed.
        feature_augment: random flips and shifted crops of cached activations, so blocks
            after the first see fresh views every epoch: ``"flip_crop"``, ``"flip"``,
            ``"crop"`` or ``"none"``.
        meter_full_steps, meter_sample_every: every unit step of a block's first
            ``meter_full_steps`` batches (and again after a shrink) is metered and held to
            the budget as a transaction, then one batch in ``meter_sample_every`` (1: all).
        gradient_clip_val, gradient_clip_algorithm: clip each unit's gradients before its update
            (after averaging across ranks), as Lightning's Trainer arguments of those names do for
            BP: ``"norm"`` (their total 2-norm to at most the value) or ``"value"`` (each entry to
            ``[-value, value]``); None does not clip. The strategy takes them from the Trainer.
        exit_tolerance: exits within this accuracy (a fraction) of the best count as
            equally good, and the one with the fewest parameters is deployed.
        evaluate: what ``validate``/``test``/``predict`` outside ``fit`` run: ``"exit"``
            (the selected exit) or ``"full"`` (the whole network).
    """

    epochs_per_block: int | tuple[int, ...] = 20
    batch_limit: int = BATCH_LIMIT
    rho: float = RHO
    aux: str = "adaptive"
    aux_max_filters: int | None = AUX_MAX_FILTERS
    single_block: bool = False
    cache: bool = True
    cache_dir: Path | None = None
    cache_dtype: str = "float16"
    cache_workers: int = 0
    cache_seed: int = 0
    input_shape: tuple[int, ...] | None = None
    lr_reference_batch: int | None = None
    lr_scaling: str = "linear"
    lr_decay: str = "cosine"
    min_steps_per_block: int = 0
    max_epochs_per_block: int = 1000
    min_epochs_per_block: int = 1
    block_patience: int | None = 2
    block_min_delta: float = 0.0
    block_anneal_epochs: int = 2
    patience_reference: str = "own"
    feature_augment: str = "none"
    meter_full_steps: int = FULL_STEPS
    meter_sample_every: int = SAMPLE_EVERY
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    exit_tolerance: float = 0.0
    evaluate: str = "exit"

    def __post_init__(self) -> None:
        if not isinstance(self.epochs_per_block, int):
            object.__setattr__(self, "epochs_per_block", tuple(int(e) for e in self.epochs_per_block))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        self._check()
        self.schedule  # noqa: B018  # checks the schedule's settings now, not when fit starts

    def _check(self) -> None:
        checks = [
            (self.aux in AUX_POLICIES, f"unknown aux policy {self.aux!r}; choose one of {AUX_POLICIES}"),
            (self.aux_max_filters is None or (type(self.aux_max_filters) is int and self.aux_max_filters >= 1),
             f"aux_max_filters must be None or a positive int, got {self.aux_max_filters!r}"),
            (self.evaluate in EVALUATE, f"evaluate must be one of {EVALUATE}, got {self.evaluate!r}"),
            (self.batch_limit >= 1 and self.rho >= 0,
             f"batch_limit must be >= 1 and rho >= 0, got {self.batch_limit} and {self.rho}"),
            (0.0 <= self.exit_tolerance <= 1.0,
             f"exit_tolerance is a fraction of accuracy in [0, 1], got {self.exit_tolerance}"),
            (self.cache_dtype in SUPPORTED_DTYPES, f"cache_dtype must be one of {SUPPORTED_DTYPES}, got {self.cache_dtype!r}"),
            (self.gradient_clip_val is None or self.gradient_clip_val > 0,
             f"gradient_clip_val must be None or > 0, got {self.gradient_clip_val}"),
            (self.gradient_clip_algorithm in CLIP_ALGORITHMS,
             f"gradient_clip_algorithm must be one of {CLIP_ALGORITHMS}, got {self.gradient_clip_algorithm!r}"),
            (self.feature_augment in AUGMENT_POLICIES,
             f"feature_augment must be one of {AUGMENT_POLICIES}, got {self.feature_augment!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def schedule(self) -> BlockSchedule:
        """Each block's horizon, patience and learning-rate decay, as the run applies them."""
        return BlockSchedule.from_epochs(
            self.epochs_per_block,
            min_steps=self.min_steps_per_block,
            max_epochs=self.max_epochs_per_block,
            min_epochs=self.min_epochs_per_block,
            patience=self.block_patience,
            min_delta=self.block_min_delta,
            anneal_epochs=self.block_anneal_epochs,
            patience_reference=self.patience_reference,
            decay=self.lr_decay,
            lr_scaling=self.lr_scaling,
        )

    def replace(self, **changes: Any) -> NeuroFluxOptions:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option's name."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def build(cls, options: NeuroFluxOptions | None = None, **overrides: Any) -> NeuroFluxOptions:
        """``options`` (the defaults if None) with ``overrides``; a clear error names an unknown option."""
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown NeuroFlux option(s) {unknown}; the options are {sorted(cls.names())}")
        return (options or cls()).replace(**overrides) if overrides else (options or cls())

