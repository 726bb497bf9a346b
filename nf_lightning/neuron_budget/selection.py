"""Which neurons to update: costs, budget filling, velocity ranking, Sparse Update schemes.

A neuron is one output channel of a ``Conv2d``; its cost is its parameter
count, ``in_channels / groups * kh * kw`` (+1 with a bias). BatchNorm and
classifiers are not neurons. The pieces are pure PyTorch (no Lightning):

- :func:`fill_budget` takes neurons in a given order while their total cost
  stays within a parameter budget (the reference code's rule: stop at the first
  that does not fit); :mod:`nf_lightning.neuron_budget.budget` fills a budget in
  bytes, where a layer's first neuron also pays for the activations it keeps.
- :func:`velocity_order` ranks by ``|v| / cost`` (:func:`velocity_per_byte_order`
  by ``|v| / bytes`` for a byte budget); :func:`random_order` is a fresh
  permutation; :func:`sparse_update_masks` is Lin et al.'s static scheme.
- :func:`velocity_step` is NEq's recursion. The papers (NEq and the budgeted
  version) write ``v_t = delta_t - mu * v_(t-1)``; the public code of the
  budgeted version stores ``V = mu * (V + delta_t) - delta_t``, which unrolls to
  ``v_t = delta_t - delta_(t-1) + mu * v_(t-1)``. ``recursion="paper"`` is the
  method as published, ``"public_code"`` reproduces the code. Both start from
  ``phi_0 = 1`` and ``v_0 = 0``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 1, bias=False))
    >>> layers = conv_neurons(net.named_modules())
    >>> [(layer.name, layer.out_channels, layer.cost) for layer in layers]
    [('0', 4, 28), ('1', 8, 4)]
    >>> costs = neuron_costs(layers)
    >>> budget = budget_params(layers, 0.5)            # half of 4*28 + 8*4 = 144 parameters
    >>> selected = fill_budget(torch.arange(12), costs, budget)
    >>> budget, int(costs[selected].sum()), selected.int().tolist()
    (72, 56, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

POLICIES = ("velocity", "random", "sparse_update", "full")
FIRST_EPOCH_POLICIES = ("sparse_update", "random", "full")
RECURSIONS = ("paper", "public_code")
NORM_POLICIES = ("always", "range", "frozen")


# ---------------------------------------------------------------- neurons and costs
@dataclass(frozen=True)
class ConvNeurons:
    """The neurons (output channels) of one ``Conv2d``, named as in its model."""

    name: str
    module: nn.Conv2d

    @property
    def out_channels(self) -> int:
        return self.module.out_channels

    @property
    def cost(self) -> int:
        """Parameters of one neuron: its filter (``in_channels / groups * kh * kw``) and its bias."""
        return neuron_cost(self.module)

    @property
    def params(self) -> int:
        return self.out_channels * self.cost


def neuron_cost(conv: nn.Conv2d) -> int:
    """Parameters of one output channel of ``conv``.

    >>> neuron_cost(nn.Conv2d(16, 32, 3)), neuron_cost(nn.Conv2d(16, 16, 3, groups=16, bias=False))
    (145, 9)
    """
    kh, kw = conv.kernel_size
    return conv.in_channels // conv.groups * kh * kw + (1 if conv.bias is not None else 0)


def conv_neurons(named_modules: Iterable[tuple[str, nn.Module]]) -> list[ConvNeurons]:
    """Every ``Conv2d`` among ``named_modules``, in the order given (each module once)."""
    seen: set[int] = set()
    layers = []
    for name, module in named_modules:
        if isinstance(module, nn.Conv2d) and id(module) not in seen:
            seen.add(id(module))
            layers.append(ConvNeurons(name, module))
    return layers


def neuron_costs(layers: Sequence[ConvNeurons]) -> Tensor:
    """The cost of every neuron, layer after layer (int64)."""
    if not layers:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.full((layer.out_channels,), layer.cost, dtype=torch.int64) for layer in layers])


def budget_params(layers: Sequence[ConvNeurons], budget: float) -> int:
    """``budget`` (a fraction in [0, 1]) of all conv parameters of ``layers``, rounded down."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget is a fraction of the conv parameters in [0, 1], got {budget}")
    return math.floor(budget * sum(layer.params for layer in layers) + 1e-9)


def split_by_layer(flat: Tensor, layers: Sequence[ConvNeurons]) -> list[Tensor]:
    """A per-neuron vector cut into one piece per layer."""
    return list(flat.split([layer.out_channels for layer in layers]))


# ---------------------------------------------------------------- filling a budget
def fill_budget(order: Tensor, costs: Tensor, budget: int) -> Tensor:
    """Neurons taken in ``order`` while their total cost stays within ``budget``.

    The fill stops at the first neuron that does not fit (as the public code
    does), so the selection is a prefix of ``order`` and never over budget.
    Returns a boolean mask over all neurons.

    >>> fill_budget(torch.tensor([2, 0, 1]), torch.tensor([5, 3, 4]), 8).tolist()  # 4, then 4 + 5 > 8: stop
    [False, False, True]
    """
    order = torch.as_tensor(order, dtype=torch.int64)
    costs = torch.as_tensor(costs, dtype=torch.int64)
    if budget < 0:
        raise ValueError(f"budget must be >= 0 parameters, got {budget}")
    if sorted(order.tolist()) != list(range(len(costs))):
        raise ValueError("order must be a permutation of the neurons")
    selected = torch.zeros(len(costs), dtype=torch.bool)
    taken = int((costs[order].cumsum(0) <= budget).sum()) if len(costs) else 0
    selected[order[:taken]] = True
    return selected


def velocity_order(velocity: Tensor, costs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Neurons by decreasing ``|velocity| / cost``; ties keep the neurons' own order.

    A NaN velocity marks a neuron nothing is known of yet (it has neither
    trained nor moved since the probe began). Such neurons come first, as NEq trains every
    neuron until its velocity is measured: in a random order from ``generator``,
    else in their own order.

    >>> velocity_order(torch.tensor([0.1, -0.4, 0.2]), torch.tensor([1, 2, 1])).tolist()  # 0.1, 0.2, 0.2
    [1, 2, 0]
    >>> velocity_order(torch.tensor([0.1, float("nan"), 0.2]), torch.tensor([1, 2, 1])).tolist()
    [1, 2, 0]
    """
    score = velocity.abs().double() / costs.double()
    unknown = score.isnan().nonzero().flatten()
    if generator is not None:
        unknown = unknown[torch.randperm(len(unknown), generator=generator)]
    known = torch.sort(-score.nan_to_num(nan=0.0), stable=True).indices
    return torch.cat([unknown, known[~score[known].isnan()]])


def velocity_per_byte_order(velocity: Tensor, neuron_bytes: Tensor, generator: torch.Generator) -> Tensor:
    """Neurons by decreasing ``|velocity| / bytes`` (a byte budget's order), ties in a random order.

    A neuron nothing is known of yet (NaN) counts as fast as the fastest known
    one: it is tried where it is cheap, not wherever it is (exploring a layer
    whose input fills the budget would leave it nearly empty). Nothing known:
    the cheapest first.

    >>> g = torch.Generator().manual_seed(0)
    >>> velocity_per_byte_order(torch.tensor([0.1, float("nan"), 0.4]), torch.tensor([1.0, 2.0, 8.0]), g).tolist()
    [1, 0, 2]
    """
    speed = velocity.abs().double()
    fastest = speed.nan_to_num(nan=0.0).max() if bool((~speed.isnan()).any()) else torch.tensor(1.0)
    score = speed.nan_to_num(nan=float(fastest)) / neuron_bytes.double()
    shuffled = torch.randperm(len(score), generator=generator)
    return shuffled[torch.sort(-score[shuffled], stable=True).indices]


def random_order(num_neurons: int, generator: torch.Generator) -> Tensor:
    """A fresh random permutation of the neurons (their sizes travel with them)."""
    return torch.randperm(num_neurons, generator=generator)


# ---------------------------------------------------------------- sparse update
def parse_sparse_update(config: Any, num_layers: int) -> dict[int, float]:
    """A Sparse Update scheme as ``{layer index: fraction of its channels}``.

    ``config`` is ``{"layers": [...], "ratios": [...]}`` (one ratio, or one per
    layer), a mapping ``{index: ratio}`` (keys may be strings, as YAML and Hydra
    give them) or a list of ``[index, ratio]`` pairs. Indices count the model's
    convs in order (negative ones from the last); ratios lie in [0, 1].

    >>> parse_sparse_update({"layers": [-1, -2], "ratios": [1.0, 0.5]}, num_layers=5)
    {4: 1.0, 3: 0.5}
    >>> parse_sparse_update({"-1": 0.25, "0": 1}, num_layers=5)
    {4: 0.25, 0: 1.0}
    """
    if hasattr(config, "items") and set(config) == {"layers", "ratios"}:
        layers, ratios = list(config["layers"]), config["ratios"]
        ratios = [ratios] * len(layers) if isinstance(ratios, (int, float)) else list(ratios)
        if len(layers) != len(ratios):
            raise ValueError(f"sparse update: {len(layers)} layers but {len(ratios)} ratios")
        pairs = list(zip(layers, ratios))
    elif hasattr(config, "items"):
        pairs = list(config.items())
    elif isinstance(config, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in config):
        pairs = [tuple(p) for p in config]
    else:
        raise ValueError(
            "a sparse update scheme is {'layers': [...], 'ratios': [...]}, {index: ratio} or [[index, ratio], ...]; "
            f"got {config!r}"
        )
    scheme: dict[int, float] = {}
    for raw_index, raw_ratio in pairs:
        try:
            index, ratio = int(raw_index), float(raw_ratio)
        except (TypeError, ValueError):
            raise ValueError(f"sparse update: bad entry {raw_index!r}: {raw_ratio!r}") from None
        if not -num_layers <= index < num_layers:
            raise ValueError(f"sparse update: layer {index} does not exist (the model has {num_layers} convs)")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"sparse update: the ratio of layer {index} must lie in [0, 1], got {ratio}")
        index %= num_layers
        if index in scheme:
            raise ValueError(f"sparse update: layer {index} is given twice")
        scheme[index] = ratio
    return scheme


def channels_for(ratio: float, out_channels: int) -> int:
    """Channels a ratio stands for: ``ratio * out_channels`` rounded half up.

    >>> channels_for(0.5, 3), channels_for(0.1, 8), channels_for(1.0, 8)
    (2, 1, 8)
    """
    return min(out_channels, math.floor(ratio * out_channels + 0.5))


def sparse_update_masks(layers: Sequence[ConvNeurons], scheme: Mapping[int, float]) -> list[Tensor]:
    """Per layer, which channels the scheme updates: those with the largest filter norm (ties: lower index)."""
    masks = [torch.zeros(layer.out_channels, dtype=torch.bool) for layer in layers]
    for index, ratio in scheme.items():
        layer = layers[index]
        k = channels_for(ratio, layer.out_channels)
        if k == 0:
            continue
        norms = layer.module.weight.detach().float().flatten(1).norm(dim=1).cpu()
        top = torch.sort(-norms, stable=True).indices[:k]
        masks[index][top] = True
    return masks


def auto_sparse_update(layers: Sequence[ConvNeurons], budget: int) -> dict[int, float]:
    """A top-down Sparse Update scheme filling ``budget``: whole layers from the last one down,
    then the largest fraction of the next layer that still fits.

    Lin et al. search their scheme per model; this is the simple static rule we
    use where no scheme is given (the layers nearest the classifier first).

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 1))
    >>> auto_sparse_update(conv_neurons(net.named_modules()), 40 + 56)   # layer 1 costs 40, layer 0 4x28
    {1: 1.0, 0: 0.5}
    """
    scheme: dict[int, float] = {}
    left = budget
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        if layer.params <= left:
            scheme[index] = 1.0
            left -= layer.params
            continue
        k = left // layer.cost
        if k > 0:
            scheme[index] = k / layer.out_channels
        break
    return scheme


def masks_params(layers: Sequence[ConvNeurons], masks: Sequence[Tensor]) -> int:
    """Conv parameters the masks update."""
    return sum(int(mask.sum()) * layer.cost for layer, mask in zip(layers, masks))


# ---------------------------------------------------------------- velocity
def channel_cosine(previous: Tensor, current: Tensor) -> Tensor:
    """Per sample and channel, the cosine similarity of two ``(N, C, L)`` outputs over the ``L`` positions.

    As in the public code, two all-zero vectors count as identical (1) and one
    all-zero vector against a non-zero one as orthogonal (0).

    >>> channel_cosine(torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]]), torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]]))
    tensor([[0.7071],
            [1.0000]])
    """
    previous, current = previous.float(), current.float()
    dot = (previous * current).sum(-1)
    norms = previous.norm(dim=-1) * current.norm(dim=-1)
    cosine = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(dot))
    both_zero = (previous.abs().sum(-1) == 0) & (current.abs().sum(-1) == 0)
    return torch.where(both_zero, torch.ones_like(cosine), cosine)


def velocity_step(
    phi: Tensor, phi_prev: Tensor, velocity_prev: Tensor, delta_prev: Tensor, mu: float, recursion: str = "paper"
) -> tuple[Tensor, Tensor]:
    """One epoch of the velocity recursion; returns ``(delta_t, v_t)``.

    ``paper``: ``v_t = delta_t - mu * v_(t-1)``; ``public_code``:
    ``v_t = delta_t - delta_(t-1) + mu * v_(t-1)`` (see the module docstring).

    >>> one = torch.tensor([1.0])
    >>> velocity_step(torch.tensor([0.9]), one, torch.tensor([0.0]), torch.tensor([0.0]), 0.5)
    (tensor([-0.1000]), tensor([-0.1000]))
    """
    if recursion not in RECURSIONS:
        raise ValueError(f"recursion must be one of {RECURSIONS}, got {recursion!r}")
    delta = phi - phi_prev
    if recursion == "paper":
        return delta, delta - mu * velocity_prev
    return delta, delta - delta_prev + mu * velocity_prev


