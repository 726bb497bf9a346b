"""The baselines a user without NeuroFlux would try: a smaller network, BP-trained from scratch.

- ``scratch_exit``: BP from a fresh initialisation on the exact architecture
  NeuroFlux deployed in the same seed (units ``0..k`` and unit ``k``'s head,
  :func:`exit_network`), with BP's rate grid and epochs. An oracle: it knows the depth.
- ``depth_search``: scratch exits of depth 0, 1, 2... at ``scratch_exit``'s rate
  and BP's epochs, each stopped at its first validation that reaches the target;
  the search stops at the first depth that crosses and costs the sum of its runs'
  times (:func:`depth_search_seed`).

Example:
    >>> net = exit_network("vgg11", num_classes=10, width_mult=0.25, unit=1)
    >>> net(__import__("torch").zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn


def exit_network(
    name: str, num_classes: int, unit: int, width_mult: float = 1.0, input_shape: Sequence[int] = (3, 32, 32),
    aux: str = "adaptive",
) -> nn.Module:
    """A freshly initialised exit of model ``name``: its units ``0..unit`` and unit ``unit``'s auxiliary head.

    The heads are NeuroFlux's (``build_exits(..., aux)``, its ``aux`` policy), so the network is
    the one NeuroFlux deploys at that unit; the last unit's exit is the whole model.
    A Hydra ``model`` target: ``model._target_=nf_lightning.benchmark.baselines.exit_network +model.unit=3``
    (``+model.aux=pooled`` for a NeuroFlux run with ``aux="pooled"``).
    """
    from nf_lightning import models
    from nf_lightning.core.exits.aux_heads import build_exits
    from nf_lightning.core.exits.selection import ExitModel
    from nf_lightning.core.network.decompose import decompose

    net = models.create(name, num_classes=num_classes, width_mult=width_mult)
    parts = decompose(net)
    return ExitModel(parts.units, build_exits(parts, tuple(input_shape), aux), unit).train()


def depth_search_seed(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One seed's depth search from its runs' rows (``unit``, ``status``, ``time_to_target``, ``last_seconds``).

    The time is the sum over depths of each run's time to the target, or its
    whole time when it missed; ``crossed`` is the first depth that reached the
    target (``None``: none did so far, and the time is a lower bound).

    >>> depth_search_seed([{"unit": 1, "status": "ok", "time_to_target": 30.0, "last_seconds": 30.0},
    ...                    {"unit": 0, "status": "ok", "time_to_target": None, "last_seconds": 50.0}])["seconds"]
    80.0
    """
    ordered = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["unit"])
    seconds, crossed = 0.0, None
    for row in ordered:
        reached = row["time_to_target"] is not None
        seconds += row["time_to_target"] if reached else row["last_seconds"]
        if reached:
            crossed = row["unit"]
            break
    depths = [{k: row.get(k) for k in ("unit", "time_to_target", "last_seconds", "best_val", "test_acc",
                                      "batch_sizes", "parameters")} for row in ordered]  # fmt: skip
    return {"seconds": seconds, "crossed_unit": crossed, "depths": depths, "failed": len(rows) - len(ordered)}
