"""``ActivationCache``: deprecated; the cache belongs to the run, configured on the strategy.

Example:
    >>> from nf_lightning import NeuroFluxStrategy
    >>> strategy = NeuroFluxStrategy("300MB", cache_workers=2, cache_seed=1)   # instead of ActivationCache(2, 1)
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl


class ActivationCache(pl.Callback):
    """Deprecated: pass ``cache_workers``/``cache_seed`` to ``NeuroFluxStrategy`` instead.

    Still honoured: its options are handed to the strategy when ``fit`` sets up.
    """

    def __init__(self, num_workers: int = 0, seed: int = 0) -> None:
        warnings.warn(
            "ActivationCache is deprecated: the activation cache is part of NeuroFluxStrategy; "
            "pass NeuroFluxStrategy(cache_workers=..., cache_seed=...) instead",
            FutureWarning,
            stacklevel=2,
        )
        self.num_workers = num_workers
        self.seed = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if hasattr(strategy, "cache_workers"):
            strategy.cache_workers = self.num_workers
            strategy.cache_seed = self.seed
