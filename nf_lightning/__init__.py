"""nf_lightning: NeuroFlux adaptive local learning for PyTorch Lightning.

Names are imported on first use, so ``import nf_lightning.core`` (pure PyTorch)
does not load Lightning.

Example:
    >>> import lightning.pytorch as pl
    >>> import nf_lightning as nf
    >>> trainer = pl.Trainer(strategy=nf.NeuroFluxStrategy(memory_budget="300MB", epochs_per_block=10),
    ...                      accelerator="cpu", logger=False, enable_progress_bar=False)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ActivationCache": "nf_lightning.lightning.activation_cache",
    "BlockwiseRun": "nf_lightning.core.run",
    "BudgetedBackpropDDPStrategy": "nf_lightning.lightning.backprop",
    "BudgetedBackpropStrategy": "nf_lightning.lightning.backprop",
    "ClassifierModule": "nf_lightning.lightning.classifier",
    "Decomposition": "nf_lightning.core.decompose",
    "EarlyExitSelector": "nf_lightning.lightning.early_exit",
    "MemoryProfiler": "nf_lightning.lightning.memory_profiler",
    "NeuroFluxDDPStrategy": "nf_lightning.lightning.strategy",
    "NeuroFluxStrategy": "nf_lightning.lightning.strategy",
    "NeuronUpdateBudget": "nf_lightning.neuron_budget.callback",
    "decompose": "nf_lightning.core.decompose",
    "models": "nf_lightning.models",
}

if TYPE_CHECKING:
    from nf_lightning import models
    from nf_lightning.core.decompose import Decomposition, decompose
    from nf_lightning.core.run import BlockwiseRun
    from nf_lightning.lightning.activation_cache import ActivationCache
    from nf_lightning.lightning.backprop import BudgetedBackpropDDPStrategy, BudgetedBackpropStrategy
    from nf_lightning.lightning.classifier import ClassifierModule
    from nf_lightning.lightning.early_exit import EarlyExitSelector
    from nf_lightning.lightning.memory_profiler import MemoryProfiler
    from nf_lightning.neuron_budget.callback import NeuronUpdateBudget
    from nf_lightning.lightning.strategy import NeuroFluxDDPStrategy, NeuroFluxStrategy


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nf_lightning' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "models" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
