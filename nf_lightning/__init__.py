"""nf_lightning: NeuroFlux adaptive local learning for PyTorch Lightning.

Importing the package registers its strategy names with Lightning's
``StrategyRegistry``: ``"neuroflux"``, ``"neuroflux_ddp"``, ``"budgeted_bp"``
and ``"budgeted_bp_ddp"``.

Example:
    >>> import lightning.pytorch as pl
    >>> import nf_lightning as nf
    >>> trainer = pl.Trainer(strategy=nf.NeuroFluxStrategy(memory_budget="300MB", epochs_per_block=10),
    ...                      accelerator="cpu", logger=False, enable_progress_bar=False)
    >>> type(pl.Trainer(strategy="neuroflux", accelerator="cpu", logger=False).strategy).__name__
    'NeuroFluxStrategy'
"""

from __future__ import annotations

from nf_lightning import models
from nf_lightning.core.memory.budget import MemoryBudget
from nf_lightning.core.network.decompose import Decomposition, decompose
from nf_lightning.core.options import NeuroFluxOptions
from nf_lightning.core.train.run import BlockwiseRun
from nf_lightning.lightning.backprop import BudgetedBackpropDDPStrategy, BudgetedBackpropStrategy
from nf_lightning.lightning.classifier import ClassifierModule
from nf_lightning.lightning.early_exit import EarlyExitSelector
from nf_lightning.lightning.memory_profiler import MemoryProfiler
from nf_lightning.neuron_budget.callback import NeuronUpdateBudget
from nf_lightning.lightning.strategy import NeuroFluxDDPStrategy, NeuroFluxStrategy

__all__ = [
    "BlockwiseRun",
    "BudgetedBackpropDDPStrategy",
    "BudgetedBackpropStrategy",
    "ClassifierModule",
    "Decomposition",
    "EarlyExitSelector",
    "MemoryBudget",
    "MemoryProfiler",
    "NeuroFluxDDPStrategy",
    "NeuroFluxOptions",
    "NeuroFluxStrategy",
    "NeuronUpdateBudget",
    "decompose",
    "models",
]
__version__ = "0.1.0"
