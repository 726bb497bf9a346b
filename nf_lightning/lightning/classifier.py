"""A plain image-classification LightningModule used by ``nf-train``.

Nothing in it knows about NeuroFlux: it is the kind of module users already
have, and the strategy trains it unchanged.

Example:
    >>> from nf_lightning.models import create
    >>> module = ClassifierModule(create("vgg11", width_mult=0.125), num_classes=10)
    >>> module.hparams.lr
    0.05
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from nf_lightning.core.train.batches import split_batch

LR_SCHEDULES = ("constant", "cosine")


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classifier around any ``nn.Module`` network.

    Args:
        net: the network (logits out).
        num_classes: number of classes (for the accuracy metric).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        nesterov: Nesterov momentum.
        lr_schedule: ``"constant"`` (the default) or ``"cosine"``: decay the rate to zero
            over the whole run, step by step, on the horizon the Trainer's ``max_epochs``
            sets (``trainer.estimated_stepping_batches``). For ordinary training
            (BP); leave it constant under NeuroFlux, which decays each block itself
            and would otherwise step this scheduler instead.
        lr_warmup: fraction of the run's steps (in ``[0, 1)``) over which the rate rises
            linearly from near zero before the schedule above takes the rest of the run;
            0 (the default) starts at the full rate (``polish_exit(warmup=...)`` passes it on).

    Example:
        >>> from nf_lightning.models import create
        >>> module = ClassifierModule(create("vgg11", width_mult=0.125), 10, lr_schedule="cosine", lr_warmup=0.1)
        >>> module.hparams.lr_warmup
        0.1
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        lr_schedule: str = "constant",
        lr_warmup: float = 0.0,
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        check_lr_warmup(lr_warmup)
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = split_batch(batch)
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = split_batch(batch)
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = split_batch(batch)
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Step, then free the gradients at once (``zero_grad(set_to_none=True)``).

        Lightning zeroes gradients inside the next step's closure, after its
        forward pass, so the last step's gradients would stay alive through
        that forward pass: one more parameter-sized set of tensors at the
        peak than the step the profiler sizes BP's batch with. Freeing them
        here keeps BP's measured peak to the profiled one. NeuroFlux (manual
        optimization) never calls this hook.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            [p for p in self.parameters() if p.requires_grad],  # frozen ones (the polish's freeze_units) stay out
            lr=hp.lr,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
            nesterov=hp.nesterov and hp.momentum > 0,
        )
        schedule, warmup = hp.get("lr_schedule", "constant"), hp.get("lr_warmup", 0.0)
        if schedule == "constant" and not warmup:
            return optimizer
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps) or steps < 1:
            raise ValueError(
                f"lr_schedule={schedule!r} with lr_warmup={warmup} needs a finite run (the Trainer's max_epochs "
                f"or max_steps), got {steps} steps"
            )
        factor = lr_factor(int(steps), warmup_steps=round(warmup * steps), cosine=schedule == "cosine")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_lr_warmup(fraction: float) -> None:
    """Refuse a warm-up that is not a fraction of the run's steps in ``[0, 1)``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"lr_warmup is a fraction of the run's steps in [0, 1), got {fraction!r}")


def lr_factor(steps: int, warmup_steps: int = 0, cosine: bool = True) -> Callable[[int], float]:
    """The rate's factor at each step of a ``steps``-step run: a linear warm-up, then a cosine to zero or constant.

    Example:
        >>> factor = lr_factor(10, warmup_steps=2)
        >>> [round(factor(s), 3) for s in (0, 1, 2, 6, 9)]
        [0.5, 1.0, 1.0, 0.5, 0.038]
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    return factor
