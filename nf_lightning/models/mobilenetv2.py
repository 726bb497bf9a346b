"""MobileNetV2 for 32x32 inputs, plus the channel rounding rule all zoo models share.

The layer table is torchvision's (same parameter count); only strides change for
CIFAR: the stem and the first 24-channel stage keep stride 1, so a 32x32 input is
downsampled three times, to 4x4.

Example:
    >>> import torch
    >>> model = mobilenetv2(num_classes=10, width_mult=0.25)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from torch import Tensor, nn

from nf_lightning.core.network.decompose import Decomposition

# (expansion t, output channels c, blocks n, stride of the first block s)
INVERTED_RESIDUAL_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 on ImageNet
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def scale_channels(channels: int, width_mult: float, divisor: int = 8) -> int:
    """``channels * width_mult`` rounded to a multiple of ``divisor`` (at least ``divisor``).

    MobileNet's rule: round to the nearest multiple, but never more than 10% below
    the exact value. Multiples of 8 are unchanged at ``width_mult=1``.

    Example:
        >>> scale_channels(64, 0.5), scale_channels(64, 0.01), scale_channels(24, 0.3)
        (32, 8, 8)
    """
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    exact = channels * width_mult
    rounded = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * exact else rounded


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (same padding, no bias) -> BatchNorm -> ReLU6."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise -> 1x1 linear projection, residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        expand = [conv_bn_relu6(in_channels, hidden, kernel_size=1)] if expansion != 1 else []
        self.conv = nn.Sequential(
            *expand,
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2: ``stem -> blocks -> classifier``.

    ``classifier`` is the final 1x1 conv to 1280 channels, global average pooling,
    dropout and the Linear layer. Its decomposition has one unit per inverted
    residual block (the stem merged into the first) and ``classifier`` as head.
    """

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        channels = scale_channels(STEM_CHANNELS, width_mult)
        self.stem = conv_bn_relu6(3, channels)
        blocks = []
        for expansion, out_channels, num_blocks, first_stride in INVERTED_RESIDUAL_SETTINGS:
            out_channels = scale_channels(out_channels, width_mult)
            for index in range(num_blocks):
                stride = first_stride if index == 0 else 1
                blocks.append(InvertedResidual(channels, out_channels, stride, expansion))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        last_channels = scale_channels(LAST_CHANNELS, width_mult)
        self.classifier = nn.Sequential(
            conv_bn_relu6(channels, last_channels, kernel_size=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Dropout(dropout),
            nn.Linear(last_channels, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.blocks(self.stem(x)))

    def neuroflux_decomposition(self) -> Decomposition:
        """One unit per inverted residual block, the stem merged into the first.

        The final 1x1 conv stays in the head: with it, the head has the shape of an
        auxiliary network (conv -> pool -> linear, eq. 2), and the adaptive aux widths
        follow the blocks (up to 320 channels) rather than the 1280-channel classifier conv.
        """
        first, *rest = self.blocks
        return Decomposition(units=[nn.Sequential(self.stem, first), *rest], head=self.classifier)


def mobilenetv2(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2:
    """CIFAR MobileNetV2 (2.24M parameters with 10 classes)."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)
