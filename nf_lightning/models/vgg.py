"""CIFAR VGG-11/16/19 with BatchNorm: a configuration table plus one builder.

Each convolution becomes one unit, ``conv3x3 -> BN -> ReLU`` followed by the
max-pool when the table has one after it, so ``features`` already is the list of
units NeuroFlux trains. The classifier is a single Linear after global pooling
(the standard CIFAR VGG: 14.7M parameters for VGG-16 with 10 classes).

Example:
    >>> import torch
    >>> model = vgg16(num_classes=10, width_mult=0.125)
    >>> len(model.features), model(torch.randn(2, 3, 32, 32)).shape
    (13, torch.Size([2, 10]))
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from nf_lightning.core.network.decompose import Decomposition
from nf_lightning.models.mobilenetv2 import scale_channels

POOL = "M"
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "vgg16": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    "vgg19": (
        64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
        512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL,
    ),
}  # fmt: skip


def conv_units(config: Sequence[int | str], width_mult: float = 1.0, in_channels: int = 3) -> list[nn.Sequential]:
    """One ``conv3x3 -> BN -> ReLU [-> MaxPool2d(2)]`` unit per channel count in ``config``.

    Example:
        >>> [len(unit) for unit in conv_units((64, "M", 128))]
        [4, 3]
    """
    units: list[nn.Sequential] = []
    for entry in config:
        if entry == POOL:
            if not units:
                raise ValueError(f"VGG config must start with a channel count, got {list(config)}")
            units[-1].append(nn.MaxPool2d(2))
        elif isinstance(entry, int) and entry > 0:
            out_channels = scale_channels(entry, width_mult)
            units.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                )
            )
            in_channels = out_channels
        else:
            raise ValueError(f"VGG config entries are positive channel counts or {POOL!r}, got {entry!r}")
    if not units:
        raise ValueError("VGG config has no convolution")
    return units


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: ``features`` (the units) -> ``classifier``.

    ``classifier`` is global average pooling (a no-op on the 1x1 maps of a 32x32
    input, and what keeps other resolutions working) -> flatten -> Linear.
    """

    def __init__(self, config: Sequence[int | str], num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        units = conv_units(config, width_mult)
        self.features = nn.Sequential(*units)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(units[-1][0].out_channels, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def neuroflux_decomposition(self) -> Decomposition:
        """One unit per convolution (with its BN, ReLU and pool); ``classifier`` is the head."""
        return Decomposition(units=list(self.features), head=self.classifier)


def vgg11(num_classes: int = 10, width_mult: float = 1.0) -> VGG:
    """CIFAR VGG-11 with BatchNorm (9.2M parameters with 10 classes)."""
    return VGG(CONFIGS["vgg11"], num_classes, width_mult)


def vgg16(num_classes: int = 10, width_mult: float = 1.0) -> VGG:
    """CIFAR VGG-16 with BatchNorm (14.7M parameters with 10 classes)."""
    return VGG(CONFIGS["vgg16"], num_classes, width_mult)


def vgg19(num_classes: int = 10, width_mult: float = 1.0) -> VGG:
    """CIFAR VGG-19 with BatchNorm (20.0M parameters with 10 classes)."""
    return VGG(CONFIGS["vgg19"], num_classes, width_mult)
