"""nf_lightning: NeuroFlux adaptive local learning for PyTorch Lightning.

Example:
    >>> import lightning.pytorch as pl
    >>> import nf_lightning as nf
    >>> trainer = pl.Trainer(strategy=nf.NeuroFluxStrategy(memory_budget="300MB", epochs_per_block=10),
    ...                      accelerator="cpu", logger=False, enable_progress_bar=False)
"""

from nf_lightning import models
from nf_lightning.core.decompose import Decomposition, decompose
from nf_lightning.lightning.activation_cache import ActivationCache
from nf_lightning.lightning.classifier import ClassifierModule
from nf_lightning.lightning.early_exit import EarlyExitSelector
from nf_lightning.lightning.memory_profiler import MemoryProfiler
from nf_lightning.lightning.strategy import NeuroFluxStrategy

__all__ = [
    "ActivationCache",
    "ClassifierModule",
    "Decomposition",
    "EarlyExitSelector",
    "MemoryProfiler",
    "NeuroFluxStrategy",
    "decompose",
    "models",
]
__version__ = "0.1.0"
