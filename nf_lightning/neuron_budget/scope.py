"""What a budget selects among and what its probe reads (no Lightning import).

With ordinary training (no NeuroFlux run) the scope is every ``Conv2d`` of the
module; under NeuroFlux (a :class:`~nf_lightning.core.train.run.BlockwiseRun`)
it is the convs of the active block's units (and the model's head in the last
block, or every auxiliary head with ``count_aux_heads``).

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    >>> found = Scope.of(None, net, count_aux_heads=False)   # no NeuroFlux run: the whole module
    >>> [layer.name for layer in found.layers], found.block
    (['0', '2'], None)
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nf_lightning.core.train.batches import split_batch
from nf_lightning.core.train.run import BlockwiseRun
from nf_lightning.neuron_budget.selection import ConvNeurons, conv_neurons


@dataclass
class Scope:
    """The convs in scope, the NeuroFlux block (None with BP), every module in scope in order, and their roots."""

    layers: list[ConvNeurons]
    block: int | None
    named: list[tuple[str, nn.Module]]
    roots: list[nn.Module]

    @classmethod
    def of(cls, run: BlockwiseRun | None, module: nn.Module, count_aux_heads: bool, exclude: Sequence[str] = ()) -> Scope:
        if run is None:
            named, roots = list(module.named_modules()), [module]
        else:
            named, roots = _blockwise_named(run, module, count_aux_heads)
        layers = [layer for layer in conv_neurons(named)
                  if not any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in exclude)]
        return cls(layers, run.active_block if run is not None else None, named, roots)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def _blockwise_named(run: BlockwiseRun, module: nn.Module, count_aux_heads: bool) -> tuple[list, list[nn.Module]]:
    names = {id(m): name for name, m in module.named_modules()}
    named, roots = [], []
    last = len(run.units) - 1
    for unit in run.active_units:
        parts = [("unit", run.units[unit])]
        if unit == last or count_aux_heads:
            parts.append(("head" if unit == last else f"aux{unit}", run.exits[unit]))
        for prefix, part in parts:
            roots.append(part)
            for sub, m in part.named_modules():
                fallback = f"{prefix}{unit if prefix == 'unit' else ''}" + (f".{sub}" if sub else "")
                named.append((names.get(id(m), fallback), m))
    return named, roots


def probe_forward(run: BlockwiseRun | None, module: nn.Module, count_aux_heads: bool) -> Any:
    """The function that runs one probe batch through what is in scope (the module, or the block's units)."""
    if run is None:
        return lambda x: module(x.to(_device(module)))

    def blockwise(x: Tensor) -> None:
        last = len(run.units) - 1
        for unit in range(run.active_units[-1] + 1):
            x = run.units[unit](x.to(_device(run.units[unit])))
            if unit in run.active_units and (unit == last or count_aux_heads):
                run.exits[unit](x)

    return blockwise


def _device(module: nn.Module) -> torch.device:
    return next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))


def first_inputs(loader: Any) -> Tensor:
    """The inputs of ``loader``'s first batch (to size the step a byte budget is about)."""
    return split_batch(next(iter(loader)))[0]


def probe_inputs(trainer: Any, probe_size: int | float) -> Tensor:
    """The first ``probe_size`` validation inputs in order (on the CPU); a float is a fraction of the training set."""
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
    wanted = _probe_count(trainer, probe_size, available)
    chunks, count = [], 0
    for x in _inputs(loader):
        chunks.append(x.detach().cpu())
        count += len(x)
        if count >= wanted:
            break
    return torch.cat(chunks)[:wanted]


def _inputs(loader: Any) -> Iterator[Tensor]:
    for batch in loader:
        yield split_batch(batch)[0]


def _probe_count(trainer: Any, probe_size: int | float, available: int | None) -> int:
    if isinstance(probe_size, int):
        wanted = probe_size
    else:
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        size = len(dataset) if dataset is not None else available
        if size is None:
            raise ValueError("cannot size the probe set from a fraction: give probe_size as a count")
        wanted = math.ceil(probe_size * size)
    return max(1, min(wanted, available) if available is not None else wanted)
