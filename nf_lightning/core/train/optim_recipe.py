"""The user's optimizer recipe, replicated for every unit of a block.

NeuroFlux gives each unit (with its exit head) an optimizer of its own. The
user wrote one recipe for the whole network (``configure_optimizers``), so a
unit's copy is that recipe built afresh and pointed at the unit's parameters:

- every param group keeps its settings (``lr``, ``weight_decay``, ``betas``,
  ...) and keeps only the unit's parameters that the user put in it; groups a
  unit has no parameter of stay, empty, so schedulers that hold one value per
  group (``base_lrs``, ``min_lrs``) still line up;
- the exit head's parameters join the group that holds most of the unit's own
  parameters (the recipe's main group for that unit);
- unit parameters the user left out of every group stay untrained, as in the
  user's own run;
- schedulers are built by the same recipe call, so every kind works,
  ``ReduceLROnPlateau`` included.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> def recipe():
    ...     opt = torch.optim.SGD([{"params": [net[0].weight, net[1].weight], "weight_decay": 1e-4},
    ...                            {"params": [net[0].bias, net[1].bias], "weight_decay": 0.0}], lr=0.1)
    ...     return opt, []
    >>> opt, _ = replicate_recipe(recipe, net[1], extra=nn.Linear(2, 3))
    >>> [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
    [(3, 0.0001), (1, 0.0)]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau


@dataclass
class SchedulerSpec:
    """A learning-rate scheduler and when to step it (Lightning's ``lr_scheduler`` dict, without Lightning).

    Args:
        scheduler: the scheduler object.
        interval: ``"epoch"`` or ``"step"``.
        frequency: step it every this many intervals.
        monitor: metric a ``ReduceLROnPlateau`` watches.
        strict: a missing ``monitor`` metric is an error (else a warning and no step).
        name: a display name.
        extra: anything else the caller wants carried along (e.g. Lightning's own config).
    """

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    strict: bool = True
    name: str | None = None
    extra: Any = field(default=None, repr=False)

    @property
    def reduce_on_plateau(self) -> bool:
        return isinstance(self.scheduler, ReduceLROnPlateau)


Recipe = Callable[[], tuple[Optimizer, list[SchedulerSpec]]]


def replicate_recipe(
    recipe: Recipe, unit: nn.Module, extra: nn.Module | None = None, lr_scale: float = 1.0
) -> tuple[Optimizer, list[SchedulerSpec]]:
    """A fresh optimizer and schedulers from ``recipe`` over ``unit`` (and ``extra``, its exit head).

    ``lr_scale`` multiplies every group's learning rate and every scheduler's
    base rates (the linear scaling rule for a block's batch size).
    """
    optimizer, schedulers = recipe()
    unit_params = {id(p): p for p in unit.parameters()}
    groups = optimizer.param_groups
    owned = [[p for p in group["params"] if id(p) in unit_params] for group in groups]
    known = {id(p) for group in groups for p in group["params"]}
    if not known.intersection(unit_params) and unit_params:
        raise ValueError(
            f"the optimizer recipe holds none of the parameters of unit {type(unit).__name__}; "
            "configure_optimizers must optimize the network NeuroFlux decomposed (e.g. self.parameters())"
        )
    main = max(range(len(groups)), key=lambda i: sum(p.numel() for p in owned[i]))
    if extra is not None:
        owned[main] = owned[main] + [p for p in extra.parameters() if id(p) not in unit_params]
    for group, params in zip(groups, owned):
        group["params"] = params
        for key in ("lr", "initial_lr"):
            if key in group:
                group[key] = group[key] * lr_scale
    optimizer.state.clear()
    for spec in schedulers:
        if hasattr(spec.scheduler, "base_lrs"):
            spec.scheduler.base_lrs = [lr * lr_scale for lr in spec.scheduler.base_lrs]
        if getattr(spec.scheduler, "optimizer", optimizer) is not optimizer:
            raise ValueError("a scheduler of the recipe is bound to another optimizer than the one it returned")
    return optimizer, schedulers


def optimizer_factory(recipe: Recipe) -> Callable[[list[nn.Parameter]], Optimizer]:
    """The recipe's optimizer class and first group's settings over other parameters.

    Profiling needs the size of the optimizer's state, which its class and settings decide. Only the
    settings its constructor takes are passed: a group also holds keys it sets itself (AdamW's
    ``decoupled_weight_decay``), a scheduler's (``initial_lr``) or the user's own.

    >>> import torch
    >>> adamw = torch.optim.AdamW([nn.Parameter(torch.ones(1))], lr=1e-3, weight_decay=0.05)
    >>> built = optimizer_factory(lambda: (adamw, []))([nn.Parameter(torch.ones(2))])
    >>> type(built).__name__, built.defaults["weight_decay"]
    ('AdamW', 0.05)
    """
    template, _ = recipe()
    cls = type(template)
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    group = template.param_groups[0]
    hparams = {k: v for k, v in group.items() if k not in ("params", "initial_lr") and (k in accepted or takes_any)}
    return lambda params: cls(params, **hparams)
