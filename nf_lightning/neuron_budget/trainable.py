"""Putting a selection of neurons into a model and its optimizers, and taking it out again.

:class:`SelectiveTraining` turns the convs of a selection into
:class:`~nf_lightning.neuron_budget.partial.PartialConv2d` (gradients and
optimizer state only for the selected channels), the frozen BatchNorms into
affine maps and the ReLUs into mask-saving ones, and swaps the parameters in
the optimizers' groups. Optimizer state follows the channels: on a new
selection, a channel that stays keeps its state; a newly selected one starts
from zero (as a frozen row's state did under the old copy-and-restore freezer).
Each parameter keeps one slot in its optimizer's group, so the optimizer's
``state_dict`` keeps its layout (a resumed run lines it up again).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    >>> sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> training = SelectiveTraining()
    >>> training.apply({net[0]: torch.tensor([True, False, False, False]), net[3]: torch.ones(2, dtype=torch.bool)},
    ...                [sgd], frozen_norms=[net[1]])
    >>> net(torch.randn(2, 3, 5, 5)).sum().backward(); sgd.step()
    >>> [tuple(sgd.state[p]["momentum_buffer"].shape) for p in net[0].parameters()]
    [(1, 3, 3, 3), (1,)]
    >>> training.release(); type(net[0]).__name__, net[1].weight.requires_grad
    ('Conv2d', True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from nf_lightning.neuron_budget.partial import (
    SWAPS,
    AffineBatchNorm2d,
    PartialConv2d,
    make_partial,
    make_whole,
    swap_class,
)

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class SelectiveTraining:
    """Owns the swapped modules and the optimizer hooks of one selection at a time."""

    def __init__(self) -> None:
        self._convs: dict[int, PartialConv2d] = {}
        self._swapped: list[tuple[nn.Module, type[nn.Module], list[tuple[nn.Parameter, bool]]]] = []
        self._optimizers: list[Optimizer] = []
        self._handles: list[Any] = []

    def apply(
        self,
        masks: Mapping[nn.Conv2d, Tensor],
        optimizers: Sequence[Optimizer],
        frozen_norms: Iterable[nn.Module] = (),
        activations: Iterable[nn.Module] = (),
    ) -> None:
        """Train the channels of each conv whose mask is True; freeze ``frozen_norms``; mask ``activations``.

        A conv already partial keeps its selected channels' optimizer state
        where they stay selected. ``optimizers`` (raw or Lightning-wrapped) get
        the new parameters in place of the old ones.
        """
        self._unswap()
        optimizers = [getattr(opt, "optimizer", opt) for opt in optimizers]
        for conv, mask in masks.items():
            mask = torch.as_tensor(mask, dtype=torch.bool)
            old_rows = conv.selected_rows.cpu() if isinstance(conv, PartialConv2d) else None
            previous = make_partial(conv, mask.nonzero().flatten())
            self._convs[id(conv)] = conv
            for name, old in previous.items():
                _swap_in_optimizers(optimizers, old, getattr(conv, f"{name}_selected"), old_rows, mask)
        for norm in frozen_norms:
            if type(norm) is nn.BatchNorm2d:
                self._swapped.append((norm, swap_class(norm, AffineBatchNorm2d), _freeze(norm, optimizers)))
        for act in activations:
            if type(act) in SWAPS:
                self._swapped.append((act, swap_class(act, SWAPS[type(act)]), []))
        self._bind(optimizers)

    def release(self) -> None:
        """Plain modules again, the original parameters back in the optimizers (their state grown to full rows)."""
        self._unswap()
        for conv in self._convs.values():
            rows = conv.selected_rows.cpu()
            selected = make_whole(conv)
            for name, param in selected.items():
                original = conv._parameters[name]
                mask = torch.zeros(len(original), dtype=torch.bool)
                mask[rows] = True
                _swap_in_optimizers(self._optimizers, param, original, rows, None, full_rows=mask)
        self._convs = {}
        self._remove_hooks()
        self._optimizers = []

    def _bind(self, optimizers: list[Optimizer]) -> None:
        """Keep the full weight buffers equal to the selected rows after every step of these optimizers."""
        self._remove_hooks()
        self._optimizers = optimizers
        for opt in optimizers:
            self._handles.append(opt.register_step_post_hook(lambda *_: self.sync()))

    def sync(self) -> None:
        for conv in self._convs.values():
            conv.sync_rows()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _unswap(self) -> None:
        for module, old_class, frozen in reversed(self._swapped):
            module.__class__ = old_class
            for param, requires_grad in frozen:
                param.requires_grad_(requires_grad)
        self._swapped = []


def _freeze(module: nn.Module, optimizers: Sequence[Optimizer]) -> list[tuple[nn.Parameter, bool]]:
    """``requires_grad=False`` on the module's own parameters, their gradients and optimizer state dropped."""
    frozen = []
    for param in module.parameters(recurse=False):
        frozen.append((param, param.requires_grad))
        param.requires_grad_(False)
        param.grad = None
        for opt in optimizers:
            opt.state.pop(param, None)
    return frozen


def _swap_in_optimizers(
    optimizers: Sequence[Optimizer],
    old: nn.Parameter,
    new: nn.Parameter,
    old_rows: Tensor | None,
    new_mask: Tensor | None,
    full_rows: Tensor | None = None,
) -> None:
    """Put ``new`` in ``old``'s slot of every optimizer holding it, its state carried over row by row.

    ``old_rows``: the channels ``old`` holds (None: all of them); ``new_mask``:
    the channels ``new`` holds (None with ``full_rows``: ``new`` is the whole
    parameter and ``old`` held the rows where ``full_rows`` is True).
    """
    for opt in optimizers:
        found = False
        for group in opt.param_groups:
            for i, param in enumerate(group["params"]):
                if param is old:
                    group["params"][i], found = new, True
        if not found:
            continue
        state = opt.state.pop(old, None)
        if state and new.requires_grad:
            opt.state[new] = {k: _carry(v, old, new, old_rows, new_mask, full_rows) for k, v in state.items()}


def _carry(
    value: Any, old: Tensor, new: Tensor, old_rows: Tensor | None, new_mask: Tensor | None, full_rows: Tensor | None
) -> Any:
    """One optimizer state entry moved from ``old``'s rows to ``new``'s (zero where a row had none)."""
    if not isinstance(value, Tensor) or value.ndim == 0:
        return value
    if value.shape == new.shape and value.shape != old.shape:
        return value  # restored from a checkpoint of this very selection
    if value.shape != old.shape:
        return torch.zeros_like(new)
    if full_rows is not None:  # back to the whole parameter
        grown = value.new_zeros(new.shape)
        grown[full_rows.to(value.device)] = value
        return grown
    assert new_mask is not None
    position = torch.full((len(new_mask),), -1, dtype=torch.int64)
    position[old_rows if old_rows is not None else torch.arange(len(new_mask))] = torch.arange(len(value))
    source = position[new_mask.nonzero().flatten()]
    carried = value.new_zeros(new.shape)
    kept = (source >= 0).nonzero().flatten()
    carried[kept.to(value.device)] = value[source[kept].to(value.device)]
    return carried


def norms_to_freeze(modules: Sequence[nn.Module], masks: Mapping[nn.Module, Tensor], norm: str) -> list[nn.Module]:
    """The norm layers a policy freezes: none (``"always"``), those before the lowest updated conv in
    ``modules``' order (``"range"``) or all (``"frozen"``).

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    >>> masks = {net[0]: torch.zeros(2, dtype=torch.bool), net[2]: torch.ones(2, dtype=torch.bool)}
    >>> [list(net).index(m) for m in norms_to_freeze(list(net), masks, "range")]
    [1]
    """
    if norm == "always":
        return []
    updated = [m for m, mask in masks.items() if bool(mask.any())]
    below = len(modules) if norm == "frozen" or not updated else min(
        i for i, m in enumerate(modules) if any(m is u for u in updated))
    return [m for m in modules[:below] if isinstance(m, _NORMS)]


def activations_of(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """The activations whose backward can keep a bit mask instead of their output (those that do already too)."""
    return [m for m in modules if type(m) in SWAPS or type(m) in SWAPS.values()]
