"""CIFAR-style (32x32 input) model zoo with a width multiplier for CPU-sized runs.

Every model defines ``neuroflux_decomposition()``, so
:func:`nf_lightning.core.network.decompose.decompose` splits it into trainable units.

Example:
    >>> from nf_lightning.models import create
    >>> model = create("vgg16", num_classes=100, width_mult=0.25)
    >>> model.classifier[-1].out_features
    100
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from nf_lightning.models import mobilenetv2, resnet, vgg
from nf_lightning.models.mobilenetv2 import MobileNetV2, scale_channels
from nf_lightning.models.resnet import ResNet
from nf_lightning.models.vgg import VGG

_BUILDERS: dict[str, Callable[[int, float], nn.Module]] = {
    "vgg11": vgg.vgg11,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "resnet18": resnet.resnet18,
    "mobilenetv2": mobilenetv2.mobilenetv2,
}
KNOWN_MODELS: tuple[str, ...] = tuple(_BUILDERS)


def create(name: str, num_classes: int = 10, width_mult: float = 1.0) -> nn.Module:
    """Build the zoo model ``name`` (one of :data:`KNOWN_MODELS`).

    ``width_mult`` scales every channel count, rounded to a multiple of 8 (at least 8).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _BUILDERS[name](num_classes, width_mult)


__all__ = ["KNOWN_MODELS", "VGG", "MobileNetV2", "ResNet", "create", "scale_channels"]
