"""Split a CNN into the ordered units NeuroFlux trains one by one, plus its final head.

Units and head are the very modules of the given model (a merged unit is a new
``nn.Sequential`` around them), so training them trains the model. Running the
units then the head reproduces the model's output. Forms, tried in this order:

1. a :class:`Decomposition`, returned as is, or an explicit list
   ``[unit_1, ..., unit_n, head]``;
2. a model defining ``neuroflux_decomposition(self) -> Decomposition``, as every
   ``nf_lightning.models`` model does;
3. torchvision's CNN families: ``VGG``, ``AlexNet`` and ``SqueezeNet`` (a unit per conv
   or Fire module with its BN/ReLU/pool); ``ResNet`` (ResNeXt and Wide ResNet too),
   ``RegNet``, ``ShuffleNetV2``, ``MobileNetV2``/``V3``, ``MNASNet``, ``EfficientNet`` (V1,
   V2) and ``ConvNeXt`` (a unit per block, the stem or downsampling layer merged into the block
   after it); ``DenseNet`` (a unit per dense block, each transition merged into the
   next). The head holds the rest of their forward: any final 1x1 conv, the pooling,
   flatten and classifier;
4. an ``nn.Sequential``: the classifier is the head: after the last conv, everything
   from the first global pool, Flatten, Dropout or Linear on (a hidden MLP included);
   without convs, the last child holding a Linear, with any Flatten, Dropout or global
   pool right before it; without a Linear, ending in a Flatten (all-convolutional), the
   last conv and what follows. The children before it are units, except that children without
   a conv or Linear (ReLU, BN, pooling...) join the unit before them, since they have
   nothing to train by themselves;
5. a wrapper, e.g. a LightningModule holding ``self.net``, with exactly one direct
   child of forms 2-4 and no convolution outside it: that child is decomposed, the
   wrapper's forward is not used. (A model whose ``classifier`` alone has a form, its
   convolutions in another child, is refused rather than cut down to its classifier.)

A ``torch.compile``'d module of forms 2-5 is decomposed as the module it compiled.

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
  - torchvision VGG, AlexNet, SqueezeNet, ResNet (ResNeXt, Wide ResNet), RegNet, ShuffleNetV2,
    MobileNetV2, MobileNetV3, MNASNet, EfficientNet (V1, V2), ConvNeXt or DenseNet
  - an nn.Sequential ending in a Linear classifier, or all-convolutional (a conv classifier, then Flatten)
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
    """Forms 2-4 with ``model`` as their network, or None when ``model`` has none of them.
    A ``torch.compile``'d module counts as the module it compiled."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule wraps the module there
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
    torchvision_parts = _decompose_torchvision(model)
    if torchvision_parts is not None:
        return torchvision_parts
    if isinstance(model, nn.Sequential):
        return _decompose_sequential(list(model))
    return None


def _decompose_torchvision(model: nn.Module) -> Decomposition | None:
    """Form 3: a unit per block of a torchvision CNN, or None for any other model.

    Each family's units and head replay its ``forward``; stems and downsampling layers join the block after them.
    """
    tv = sys.modules.get("torchvision.models")  # a torchvision model implies torchvision is loaded
    if tv is None:
        return None
    if isinstance(model, (tv.VGG, tv.AlexNet)):
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
        return Decomposition(_group_units(list(model.features)), head)
    if isinstance(model, tv.SqueezeNet):
        return Decomposition(_group_units(list(model.features)), nn.Sequential(model.classifier, nn.Flatten(1)))
    if isinstance(model, tv.ResNet):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        blocks = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
        return Decomposition(_led_blocks(stem, blocks), nn.Sequential(model.avgpool, nn.Flatten(1), model.fc))
    if isinstance(model, (tv.MobileNetV2, tv.MobileNetV3, tv.EfficientNet)):
        stem, *middle, last_conv = model.features  # EfficientNet's middle children are stages of blocks
        blocks = [block for child in middle for block in (child if type(child) is nn.Sequential else [child])]
        pool = getattr(model, "avgpool", nn.AdaptiveAvgPool2d(1))  # MobileNetV2 pools in its forward
        return Decomposition(_led_blocks(stem, blocks), nn.Sequential(last_conv, pool, nn.Flatten(1), model.classifier))
    if isinstance(model, tv.ConvNeXt):  # features: stem, stage, downsampling, stage, ..., stage
        stem, *rest = model.features
        leaders = [stem, *rest[1::2]]
        units = [unit for leader, stage in zip(leaders, rest[0::2]) for unit in _led_blocks(leader, list(stage))]
        return Decomposition(units, nn.Sequential(model.avgpool, model.classifier))
    if isinstance(model, tv.RegNet):
        blocks = [block for stage in model.trunk_output for block in stage]
        return Decomposition(_led_blocks(model.stem, blocks), nn.Sequential(model.avgpool, nn.Flatten(1), model.fc))
    if isinstance(model, tv.ShuffleNetV2):
        blocks = [block for stage in (model.stage2, model.stage3, model.stage4) for block in stage]
        head = nn.Sequential(model.conv5, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.fc)
        return Decomposition(_led_blocks(nn.Sequential(model.conv1, model.maxpool), blocks), head)
    if isinstance(model, tv.MNASNet):  # layers: stem layers, stacks of blocks, final conv layers
        stacks = [index for index, child in enumerate(model.layers) if type(child) is nn.Sequential]
        stem, tail = nn.Sequential(*model.layers[: stacks[0]]), list(model.layers[stacks[-1] + 1 :])
        blocks = [block for index in stacks for block in model.layers[index]]
        head = nn.Sequential(*tail, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)
        return Decomposition(_led_blocks(stem, blocks), head)
    if isinstance(model, tv.DenseNet):  # dense blocks concatenate inside: each is one unit, a transition leads the next
        *body, norm = model.features
        leaders = [list(body[:4]), *([transition] for transition in body[5::2])]
        units = [_as_module([*leader, block]) for leader, block in zip(leaders, body[4::2])]
        head = nn.Sequential(norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)
        return Decomposition(units, head)
    return None


def _led_blocks(leader: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """A unit per block, ``leader`` (a stem or a downsampling layer) merged into the first."""
    first, *rest = blocks
    return [nn.Sequential(leader, first), *rest]


def _decompose_sequential(children: list[nn.Module]) -> Decomposition | None:
    """Form 4, or None without a classifier or without a conv/Linear before it.

    After the last conv, the head starts at the first global pool, Flatten, Dropout or Linear: a
    hidden MLP (``Flatten, Linear, ReLU, Dropout, Linear``) is the head, as torchvision's VGG has it.
    Without a Linear, a Sequential that ends in a Flatten is all-convolutional: its last conv is
    the classifier and starts the head.
    """
    classifiers = [index for index, child in enumerate(children) if _is_classifier(child)]
    convs = [index for index, child in enumerate(children) if _contains(child, _CONVS)]
    if not classifiers:
        return _decompose_all_convolutional(children, convs)
    if convs and convs[-1] < classifiers[-1]:
        after = range(convs[-1] + 1, classifiers[-1] + 1)
        start = next(i for i in after if _is_classifier(children[i]) or isinstance(children[i], _BEFORE_CLASSIFIER))
    else:
        start = classifiers[-1]
        while start > 0 and isinstance(children[start - 1], _BEFORE_CLASSIFIER):
            start -= 1
    units = _group_units(children[:start])
    if not units:
        return None
    return Decomposition(units=units, head=_as_module(children[start:]))


def _decompose_all_convolutional(children: list[nn.Module], convs: list[int]) -> Decomposition | None:
    """``..., Conv(k, classes), [ReLU, global pool,] Flatten`` (``convs``: the children holding a conv): the
    last conv and what follows is the head."""
    if not children or not isinstance(children[-1], nn.Flatten) or len(convs) < 2:
        return None
    units = _group_units(children[: convs[-1]])
    return Decomposition(units=units, head=_as_module(children[convs[-1] :])) if units else None


def _decompose_wrapper(model: nn.Module) -> Decomposition:
    """Form 5: the decomposition of the only direct child of forms 2-4."""
    found: dict[str, Decomposition] = {}
    for name, child in model.named_children():
        parts = _decompose_module(child)
        if parts is not None:
            found[name] = parts
    name = type(model).__name__
    if len(found) == 1:
        (child, parts), = found.items()
        inside = {id(module) for module in getattr(model, child).modules()}
        outside = [path for path, m in model.named_modules() if isinstance(m, _CONVS) and id(m) not in inside]
        if outside:
            raise UndecomposableModelError(
                f"{name}'s only decomposable child is {child!r}, but convolutions lie outside it "
                f"({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}): training {child!r} alone "
                f"would leave them out. Define neuroflux_decomposition() on {name}.\n{SUPPORTED_FORMS}"
            )
        return parts
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
