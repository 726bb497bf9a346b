"""Backpropagation with activation checkpointing over a network's units (the ``bp_ckpt`` baseline).

Under a memory budget, the first thing most users try with plain backpropagation
is :func:`torch.utils.checkpoint.checkpoint`: keep only each unit's input during
the forward pass and recompute the unit's inside during the backward pass. Peak
memory then holds the parameters, gradients and optimizer state, the unit
boundaries and one unit's activations at a time, at the price of a second
forward pass per step. :class:`CheckpointedNetwork` does exactly that over the
units :func:`~nf_lightning.core.network.decompose.decompose` finds (every conv unit of a
VGG, every residual block of a ResNet, ...), then runs the head as usual. It is
the same network (the same parameter objects), so it trains the user's model.

Differences from a hand-written ``checkpoint`` loop, all deliberate:

- the recomputation leaves module state alone: buffers (BatchNorm's running
  statistics) are restored after it, so they are updated once per step, as in
  the plain network, and outputs, gradients and buffers match it exactly;
- it checkpoints only where autograd records (``torch.is_grad_enabled()``);
  validation and inference run the units plainly;
- ``state_dict`` keys are the wrapped network's, so its checkpoints load into
  the plain network and back.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from nf_lightning.models import create
    >>> torch.manual_seed(0) and None
    >>> net = create("vgg11", num_classes=10, width_mult=0.125)
    >>> ckpt = CheckpointedNetwork(net)
    >>> len(ckpt.units), set(ckpt.state_dict()) == set(net.state_dict())
    (8, True)
    >>> x = torch.randn(4, 3, 32, 32)
    >>> ckpt(x).sum().backward()
    >>> all(p.grad is not None for p in net.parameters())
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nf_lightning.core.network.decompose import Decomposition, decompose

__all__ = ["CheckpointedNetwork"]

_PREFIX = "network."


class CheckpointedNetwork(nn.Module):
    """``model`` run unit by unit, each unit under ``checkpoint(unit, x, use_reentrant=False)``, then its head.

    Args:
        model: the network, in any form :func:`~nf_lightning.core.network.decompose.decompose`
            accepts. A module is held as is (a wrapper such as a LightningModule holding
            ``self.net`` runs its child's decomposition); an explicit ``Decomposition``
            is held through its ``network``, or through its units and head.
        preserve_rng_state: restore the RNG state for the recomputation, so units with
            dropout recompute the same mask (``torch.utils.checkpoint``'s option).

    The wrapped module is :attr:`network` (registered, so ``.to()``, ``.train()`` and
    ``parameters()`` reach it); :attr:`units` and :attr:`head` are its own modules,
    not copies.
    """

    def __init__(self, model: nn.Module | Decomposition, preserve_rng_state: bool = True) -> None:
        super().__init__()
        parts = decompose(model)
        network = model if isinstance(model, nn.Module) else parts.network
        if network is None:  # an explicit Decomposition without a network: hold its modules
            network = nn.ModuleDict({"units": nn.ModuleList(parts.units), "head": parts.head})
        self.network = network
        # Plain lists, not registered: the modules are already reachable through `network`.
        self.__dict__["units"] = list(parts.units)
        self.__dict__["head"] = parts.head
        self.preserve_rng_state = preserve_rng_state
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    units: list[nn.Module]
    head: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            for unit in self.units:
                x = unit(x)
            return self.head(x)
        for unit in self.units:
            x = checkpoint(
                unit,
                x,
                use_reentrant=False,
                preserve_rng_state=self.preserve_rng_state,
                context_fn=lambda unit=unit: (contextlib.nullcontext(), _buffers_restored(unit)),
            )
        return self.head(x)


@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    """Run the block, then put every buffer of ``module`` back as it was (the recomputation's context)."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _strip_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook: ``<prefix>network.<key>`` becomes ``<prefix><key>``."""
    _rename(state_dict, prefix + _PREFIX, prefix)


def _add_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: the plain network's keys (what ``state_dict`` writes) go to ``network``."""
    _rename(state_dict, prefix, prefix + _PREFIX)


def _rename(state_dict: dict[str, Any], old: str, new: str) -> None:
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[new + key[len(old) :]] = state_dict.pop(key)
