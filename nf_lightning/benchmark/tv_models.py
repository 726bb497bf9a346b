"""torchvision's networks in a LightningModule as users write one, with the stems users give them on 32 px images.

On CIFAR-sized inputs users replace ImageNet's stem (a 7x7 stride-2
convolution and a max-pool for ResNet-18, a stride-2 first convolution for
MobileNetV2), which shrinks a 32 px image to 8 px before the first block, by a
3x3 stride-1 convolution and no max-pool: :func:`torchvision_network` does that
with ``cifar_stem=True``. The module imports nothing from ``nf_lightning``.

Example:
    >>> net = torchvision_network("resnet18", 10, cifar_stem=True)
    >>> net.conv1.kernel_size, net.conv1.stride, type(net.maxpool).__name__
    ((3, 3), (1, 1), 'Identity')
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
import torchvision
from torch import nn


def torchvision_network(arch: str, num_classes: int, width_mult: float = 1.0, cifar_stem: bool = True) -> nn.Module:
    """``resnet18`` or ``mobilenet_v2`` from torchvision, with a 3x3 stride-1 stem and no max-pool if ``cifar_stem``."""
    if arch == "mobilenet_v2":
        net = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult)
        if cifar_stem:
            first = net.features[0][0]
            net.features[0][0] = nn.Conv2d(3, first.out_channels, 3, stride=1, padding=1, bias=False)
        return net
    if arch == "resnet18":
        if width_mult != 1.0:
            raise ValueError("torchvision's resnet18 has no width_mult")
        net = torchvision.models.resnet18(num_classes=num_classes)
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        return net
    raise ValueError(f"unknown arch {arch!r}")


class TorchvisionClassifier(pl.LightningModule):
    """A classifier as people write one for Lightning around ``net`` (a torchvision network, or an exit of one).

    SGD with Nesterov momentum 0.9, weight decay 5e-4, ``lr`` tuned for batch 128;
    cosine decay over ``max_epochs`` when it is given, a constant rate otherwise.
    """

    def __init__(self, net: nn.Module, num_classes: int, lr: float = 0.05, max_epochs: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True,
                                    weight_decay=5e-4)  # fmt: skip
        if self.hparams.max_epochs is None:
            return optimizer
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}
