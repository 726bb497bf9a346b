"""Per unit of a model: its output's size and the forward FLOPs of its auxiliary head (the data of Figure 13).

Counted by ``torch.utils.flop_counter.FlopCounterMode`` on the heads the project
builds (two FLOPs per multiply-add), not by hand.

Example:
    >>> first = unit_profile("vgg11", width_mult=0.25)[0]
    >>> first["channels"], first["activation_elements"]
    (16, 4096)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nf_lightning import models
from nf_lightning.core.exits.aux_heads import build_aux_heads, unit_shapes
from nf_lightning.core.network.decompose import decompose

AUX_POLICIES = ("adaptive", "classic")


def head_flops(head: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward FLOPs of ``head`` for one sample of ``input_shape`` (``FlopCounterMode``: 2 per multiply-add)."""
    head.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        head(torch.zeros(1, *input_shape))
    return counter.get_total_flops()


def unit_profile(model: str, num_classes: int = 10, width_mult: float = 1.0) -> list[dict[str, Any]]:
    """Per unit of ``model``: output shape, activation elements, and its aux head's FLOPs per policy.

    The last unit has no auxiliary head (its exit is the model's classifier), so its FLOPs are ``None``.
    """
    units = decompose(models.create(model, num_classes=num_classes, width_mult=width_mult)).units
    shapes = unit_shapes(units)
    flops = {
        policy: [
            head_flops(head, shape)
            for head, shape in zip(build_aux_heads(units, num_classes, policy=policy), shapes[:-1], strict=True)
        ]
        for policy in AUX_POLICIES
    }
    profile = []
    for unit, (c, h, w) in enumerate(shapes):
        entry: dict[str, Any] = {"model": model, "unit": unit, "channels": c, "height": h, "width": w,
                                 "activation_elements": c * h * w}
        for policy in AUX_POLICIES:
            entry[f"aux_flops_{policy}"] = flops[policy][unit] if unit < len(flops[policy]) else None
        profile.append(entry)
    return profile
