"""CIFAR ResNet-18: a 3x3 stem without max-pool, four stages of basic blocks.

Example:
    >>> import torch
    >>> model = resnet18(num_classes=10, width_mult=0.125)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from nf_lightning.core.network.decompose import Decomposition
from nf_lightning.models.mobilenetv2 import scale_channels

STAGE_CHANNELS = (64, 128, 256, 512)


def conv3x3_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (same padding, no bias) -> BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity shortcut, or a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            conv3x3_bn(in_channels, out_channels, stride),
            nn.ReLU(inplace=True),
            conv3x3_bn(out_channels, out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet of basic blocks: ``stem -> stages -> classifier``.

    Its decomposition has one unit per residual block, the stem merged into the
    first, and ``classifier`` (global average pooling -> flatten -> Linear) as head.
    """

    def __init__(self, blocks_per_stage: Sequence[int], num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        if len(blocks_per_stage) != len(STAGE_CHANNELS) or min(blocks_per_stage) < 1:
            raise ValueError(f"need a positive block count for each of 4 stages, got {list(blocks_per_stage)}")
        channels = scale_channels(STAGE_CHANNELS[0], width_mult)
        self.stem = nn.Sequential(conv3x3_bn(3, channels), nn.ReLU(inplace=True))
        stages = []
        for index, (stage_channels, num_blocks) in enumerate(zip(STAGE_CHANNELS, blocks_per_stage)):
            out_channels = scale_channels(stage_channels, width_mult)
            blocks = [BasicBlock(channels, out_channels, stride=1 if index == 0 else 2)]
            blocks += [BasicBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.stages(self.stem(x)))

    def neuroflux_decomposition(self) -> Decomposition:
        """One unit per residual block, the first as ``nn.Sequential(stem, block)``."""
        first, *rest = (block for stage in self.stages for block in stage)
        return Decomposition(units=[nn.Sequential(self.stem, first), *rest], head=self.classifier)


def resnet18(num_classes: int = 10, width_mult: float = 1.0) -> ResNet:
    """CIFAR ResNet-18 (11.2M parameters with 10 classes)."""
    return ResNet((2, 2, 2, 2), num_classes, width_mult)
