"""How a callback finds the NeuroFlux run: one helper, duck-typed on the strategy, never importing it.

Example:
    >>> import lightning.pytorch as pl
    >>> neuroflux_run(pl.Trainer(logger=False, enable_progress_bar=False)) is None  # not a NeuroFlux Trainer
    True
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

from nf_lightning.core.train.run import BlockwiseRun


def neuroflux_run(trainer: pl.Trainer, fitting: bool = False) -> BlockwiseRun | None:
    """The block-wise run of ``trainer``'s strategy (``strategy.run``), or None when it has none.

    With ``fitting``, only while ``trainer.fit`` runs (the run also exists after it, for evaluation).
    """
    run = getattr(trainer.strategy, "run", None)
    if not isinstance(run, BlockwiseRun):
        return None
    if fitting and trainer.state.fn != TrainerFn.FITTING:
        return None
    return run
