"""One selection per epoch: a policy's order of the neurons, filled to a budget in parameters or bytes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from nf_lightning.neuron_budget.selection import conv_neurons
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 1))
    >>> selector = Selector(fraction=0.5, seed=0)
    >>> layers = conv_neurons(net.named_modules())
    >>> selector.enter(layers)
    >>> [int(mask.sum()) for mask in selector.select("sparse_update", layers)]   # the top conv, then 1 of 4
    [1, 8]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nf_lightning.neuron_budget.budget import NeuronBytes, fill_bytes
from nf_lightning.neuron_budget.selection import (
    ConvNeurons,
    auto_sparse_update,
    budget_params,
    fill_budget,
    masks_params,
    neuron_costs,
    parse_sparse_update,
    random_order,
    sparse_update_masks,
    split_by_layer,
    velocity_order,
    velocity_per_byte_order,
)


class Selector:
    """Chooses the neurons of ``fraction`` of the conv parameters, or of ``budget_bytes`` of training memory."""

    def __init__(self, fraction: float | None = None, budget_bytes: int | None = None, sparse_update: Any = None,
                 seed: int = 0) -> None:
        if (fraction is None) == (budget_bytes is None):
            raise ValueError("give a fraction of the conv parameters or a budget in bytes")
        self.fraction, self.budget_bytes, self.sparse_update = fraction, budget_bytes, sparse_update
        self.generator = torch.Generator().manual_seed(seed)
        self._static: list[Tensor] | None = None

    def enter(self, layers: Sequence[ConvNeurons]) -> None:
        """A new scope: the static Sparse Update selection is chosen again from the weights as they are now."""
        self._static = None

    def budget_params(self, layers: Sequence[ConvNeurons]) -> int | None:
        return budget_params(layers, self.fraction) if self.fraction is not None else None

    def select(self, policy: str, layers: Sequence[ConvNeurons], costs: NeuronBytes | None = None,
               velocity: Tensor | None = None, reserve: int = 0) -> list[Tensor]:
        """Per conv, the channels ``policy`` updates (``costs`` prices a byte budget, less ``reserve``)."""
        if policy == "full":
            return [torch.ones(layer.out_channels, dtype=torch.bool) for layer in layers]
        if policy == "sparse_update":
            if self._static is None:
                self._static = self._sparse_update(layers, costs, reserve)
            return [mask.clone() for mask in self._static]
        if policy == "random":
            order = random_order(sum(layer.out_channels for layer in layers), self.generator)
        elif policy == "velocity":
            if velocity is None:
                raise ValueError("the velocity policy needs a velocity")
            if self.fraction is None and costs is not None:
                order = velocity_per_byte_order(velocity, costs.neuron_bytes(), self.generator)
            else:
                order = velocity_order(velocity, neuron_costs(layers), self.generator)
        else:
            raise ValueError(f"unknown policy {policy!r}")
        return self._fill(order, layers, costs, reserve)

    def _fill(self, order: Tensor, layers: Sequence[ConvNeurons], costs: NeuronBytes | None, reserve: int) -> list[Tensor]:
        if self.fraction is not None:
            return split_by_layer(fill_budget(order, neuron_costs(layers), self.budget_params(layers)), layers)
        if reserve > self.budget_bytes:
            raise ValueError(f"the byte budget of {self.budget_bytes} is smaller than the velocity probe's copy "
                             f"of the weights, {reserve} bytes")
        if costs is None:
            raise ValueError("a byte budget needs the layers' byte costs")
        return fill_bytes(order, costs, self.budget_bytes - reserve)

    def _sparse_update(self, layers: Sequence[ConvNeurons], costs: NeuronBytes | None, reserve: int) -> list[Tensor]:
        if self.sparse_update is not None:
            masks = sparse_update_masks(layers, parse_sparse_update(_plain(self.sparse_update), len(layers)))
            self._check(layers, masks, costs, reserve)
            return masks
        if self.fraction is not None:
            return sparse_update_masks(layers, auto_sparse_update(layers, self.budget_params(layers)))
        return self._fill(top_down_order(layers), layers, costs, reserve)

    def _check(self, layers: Sequence[ConvNeurons], masks: list[Tensor], costs: NeuronBytes | None, reserve: int) -> None:
        if self.fraction is not None:
            used, budget, unit = masks_params(layers, masks), self.budget_params(layers), "conv parameters"
        else:
            assert costs is not None
            used, budget, unit = costs.selection_bytes(masks) + reserve, self.budget_bytes, "bytes"
        if used > budget:
            raise ValueError(f"the sparse update scheme uses {used} {unit}, over the budget of {budget}")

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(),
                "static": None if self._static is None else [m.clone() for m in self._static]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._static = None if state["static"] is None else [m.bool() for m in state["static"]]


def top_down_order(layers: Sequence[ConvNeurons]) -> Tensor:
    """Neurons from the last conv down, each conv's channels by decreasing filter norm (Sparse Update's order)."""
    starts = torch.tensor([0, *[layer.out_channels for layer in layers]]).cumsum(0)
    parts = []
    for index in range(len(layers) - 1, -1, -1):
        norms = layers[index].module.weight.detach().float().flatten(1).norm(dim=1).cpu()
        parts.append(starts[index] + torch.sort(-norms, stable=True).indices)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _plain(config: Any) -> Any:
    """An OmegaConf node as plain containers (Hydra passes them through)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return config
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    return config
