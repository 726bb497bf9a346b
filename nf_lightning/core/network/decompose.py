"""Split a CNN into the ordered units NeuroFlux trains one by one, plus its final head.

Units and head are the very modules of the given model (a merged unit is a new
``nn.Sequential`` around them), so training them trains the model. Running the
units then the head reproduces the model's output. Forms, tried in this order:

1. a :class:`Decomposition`, returned as is, or an explicit list
   ``[unit_1, ..., unit_n, head]``;
2. a model defining ``neuroflux_decomposition(self) -> Decomposition``, as every
   ``nf_lightning.models`` model does;
3. torchvision ``VGG`` (a unit per conv with its BN/ReLU/pool), ``ResNet`` (a unit per
   residual block, the stem merged into the first) and ``MobileNetV2`` (a unit per
   inverted residual block, the stem merged into the first, the final 1x1 conv in
   the head); the head holds the pooling, flatten and classifier of their forward;
4. an ``nn.Sequential``: the classifier (its last child holding a Linear and no conv,
   with any Flatten, Dropout or global pool right before it, and all after it) is
   the head; the children before it are units, except that children without a conv
   or Linear (ReLU, BN, pooling...) join the unit before them, since they have
   nothing to train by themselves;
5. a wrapper, e.g. a LightningModule holding ``self.net``, with exactly one direct
   child of forms 2-4: that child is decomposed, the wrapper's forward is not used.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(
    ...     nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
    ...     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    >>> parts = decompose(model)
    >>> len(parts), [len(unit) for unit in parts.units], len(parts.head)
    (2, [2, 2], 3)
    >>> x = torch.randn(2, 3, 16, 16)
    >>> torch.equal(parts.forward(x), model(x))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass, field

import sys

from torch import Tensor, nn

SUPPORTED_FORMS = """Supported forms:
  - a model defining neuroflux_decomposition(self) -> Decomposition (all nf_lightning.models do)
  - torchvision VGG, ResNet or MobileNetV2
  - an nn.Sequential ending in a Linear classifier
  - a module (e.g. a LightningModule holding self.net) with exactly one direct child of these forms
Otherwise pass the units explicitly: decompose(Decomposition(units=[...], head=...))
or decompose([unit_1, ..., unit_n, head])."""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHT_LAYERS = (*_CONVS, nn.Linear)
_BEFORE_CLASSIFIER = (
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


class UndecomposableModelError(TypeError):
    """The model has none of the forms :func:`decompose` understands."""


@dataclass
class Decomposition:
    """Ordered trainable units and the final classifier head of a model.

    Example:
        >>> from torch import nn
        >>> head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        >>> parts = Decomposition(units=[nn.Conv2d(3, 8, 3)], head=head)
        >>> len(parts)
        1
    """

    units: list[nn.Module]
    head: nn.Module
    network: nn.Module | None = field(default=None, compare=False, repr=False)
    """The module whose forward is units then head (set by :func:`decompose`; None for explicit units)."""

    def __post_init__(self) -> None:
        self.units = list(self.units)
        if not self.units:
            raise ValueError("a Decomposition needs at least one unit")
        for index, unit in enumerate(self.units):
            if not isinstance(unit, nn.Module):
                raise TypeError(f"unit {index} must be an nn.Module, got {type(unit).__name__}")
        if not isinstance(self.head, nn.Module):
            raise TypeError(f"head must be an nn.Module, got {type(self.head).__name__}")

    def __len__(self) -> int:
        return len(self.units)

    def forward(self, x: Tensor) -> Tensor:
        """Run every unit in order, then the head."""
        for unit in self.units:
            x = unit(x)
        return self.head(x)


def decompose(model: nn.Module | Decomposition | Sequence[nn.Module]) -> Decomposition:
    """Units and head of ``model`` in one of the forms listed in the module docstring.

    Raises:
        UndecomposableModelError: ``model`` has none of those forms.
    """
    if isinstance(model, Decomposition):
        return model
    if isinstance(model, (list, tuple)):
        if len(model) < 2:
            raise ValueError(f"an explicit list is [unit_1, ..., unit_n, head], got {len(model)} item(s)")
        return Decomposition(units=list(model[:-1]), head=model[-1])
    if not isinstance(model, nn.Module):
        raise UndecomposableModelError(f"cannot decompose a {type(model).__name__}.\n{SUPPORTED_FORMS}")
    decomposition = _decompose_module(model)
    return decomposition if decomposition is not None else _decompose_wrapper(model)


def _rooted(decomposition: Decomposition, network: nn.Module) -> Decomposition:
    return decomposition if decomposition.network is not None else dataclasses.replace(decomposition, network=network)


def _decompose_module(model: nn.Module) -> Decomposition | None:
    """Forms 2-4 with ``model`` as their network, or None when ``model`` has none of them."""
    parts = _decompose_form(model)
    return _rooted(parts, model) if parts is not None else None


def _decompose_form(model: nn.Module) -> Decomposition | None:
    explicit = getattr(model, "neuroflux_decomposition", None)
    if callable(explicit):
        decomposition = explicit()
        if not isinstance(decomposition, Decomposition):
            raise TypeError(
                f"{type(model).__name__}.neuroflux_decomposition() must return a Decomposition, "
                f"got {type(decomposition).__name__}"
            )
        return decomposition
    tv = sys.modules.get("torchvision.models")  # a torchvision model implies torchvision is loaded
    if tv is not None and isinstance(model, tv.VGG):
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
        return Decomposition(units=_group_units(list(model.features)), head=head)
    if tv is not None and isinstance(model, tv.ResNet):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        first, *rest = (block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer)
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
        return Decomposition(units=[nn.Sequential(stem, first), *rest], head=head)
    if tv is not None and isinstance(model, tv.MobileNetV2):
        stem, first, *rest, last_conv = model.features
        head = nn.Sequential(last_conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)
        return Decomposition(units=[nn.Sequential(stem, first), *rest], head=head)
    if isinstance(model, nn.Sequential):
        return _decompose_sequential(list(model))
    return None


def _decompose_sequential(children: list[nn.Module]) -> Decomposition | None:
    """Form 4, or None without a Linear classifier or without a conv/Linear before it."""
    classifiers = [index for index, child in enumerate(children) if _is_classifier(child)]
    if not classifiers:
        return None
    start = classifiers[-1]
    while start > 0 and isinstance(children[start - 1], _BEFORE_CLASSIFIER):
        start -= 1
    units = _group_units(children[:start])
    if not units:
        return None
    return Decomposition(units=units, head=_as_module(children[start:]))


def _decompose_wrapper(model: nn.Module) -> Decomposition:
    """Form 5: the decomposition of the only direct child of forms 2-4."""
    found: dict[str, Decomposition] = {}
    for name, child in model.named_children():
        parts = _decompose_module(child)
        if parts is not None:
            found[name] = parts
    if len(found) == 1:
        return next(iter(found.values()))
    name = type(model).__name__
    if found:
        raise UndecomposableModelError(
            f"{name} has several decomposable children ({', '.join(found)}); "
            f"define neuroflux_decomposition() on it to choose.\n{SUPPORTED_FORMS}"
        )
    raise UndecomposableModelError(f"cannot decompose {name} into trainable units.\n{SUPPORTED_FORMS}")


def _group_units(layers: list[nn.Module]) -> list[nn.Module]:
    """A unit per layer holding a conv or Linear, with the weightless layers after it.

    Weightless layers before the first weight layer join the first unit.
    """
    groups: list[list[nn.Module]] = []
    pending: list[nn.Module] = []
    for layer in layers:
        if _contains(layer, _WEIGHT_LAYERS):
            groups.append([*pending, layer])
            pending = []
        elif groups:
            groups[-1].append(layer)
        else:
            pending.append(layer)
    return [_as_module(group) for group in groups]


def _is_classifier(module: nn.Module) -> bool:
    return _contains(module, (nn.Linear,)) and not _contains(module, _CONVS)


def _contains(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    return any(isinstance(submodule, types) for submodule in module.modules())


def _as_module(layers: list[nn.Module]) -> nn.Module:
    """The layer itself when alone (no new container), else an ``nn.Sequential`` of them."""
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def check_input_shape(decomposition: Decomposition, input_shape: Sequence[int]) -> None:
    """A clear error when the data's channels do not match the network's first convolution.

    >>> check_input_shape(Decomposition([nn.Conv2d(3, 4, 3)], nn.Linear(4, 2)), (1, 32, 32))
    Traceback (most recent call last):
    ...
    ValueError: the data has 1 input channel(s) (samples of shape (1, 32, 32)), but the network's first convolution expects 3
    """
    first = next((m for m in decomposition.units[0].modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and len(input_shape) == 3 and input_shape[0] != first.in_channels:
        raise ValueError(
            f"the data has {input_shape[0]} input channel(s) (samples of shape {tuple(input_shape)}), "
            f"but the network's first convolution expects {first.in_channels}"
        )
