"""Validation curves of a run and when they cross a target: the deployable model's accuracy, not the best exit's.

A run's ``history`` (``results.json``) holds one record per validation with
``seconds`` on the run's clock. What a user could deploy at that moment is:

- for BP and every BP-trained network: the model itself, its ``val/acc``;
- for local learning, during the block-wise phase: the exit the selection rule
  (:func:`~nf_lightning.core.exits.select_exit` with the run's ``exit.tolerance``)
  picks from every exit's latest accuracy, not the best of all exits;
- during NeuroFlux's polish (records without exit accuracies): the polished exit, its ``val/acc``.

Example:
    >>> parameters = {0: 10, 1: 40}
    >>> record = {"seconds": 3.0, "val/acc": 0.9, "neuroflux/acc_exit_0": 0.50, "neuroflux/acc_exit_1": 0.51}
    >>> deployable_point(record, parameters, tolerance=0.02)  # within 2 points: the smaller exit
    (0, 0.5)
    >>> deployable_point(record, parameters)  # the module's own val/acc is not a deployable exit
    (1, 0.51)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from nf_lightning.benchmark.presets import ACCURACY_EPSILON, CONVERGENCE_FRACTION, CONVERGENCE_GAIN
from nf_lightning.core.exits.selection import ExitRecord, select_exit

EXIT_PREFIX = "neuroflux/acc_exit_"


def exit_accuracies(record: Mapping[str, Any]) -> dict[int, float]:
    """Each exit's accuracy in one history record, by unit.

    >>> exit_accuracies({"val/acc": 0.3, "neuroflux/acc_exit_2": 0.4})
    {2: 0.4}
    """
    return {int(k.removeprefix(EXIT_PREFIX)): float(v) for k, v in record.items() if k.startswith(EXIT_PREFIX)}


def deployable_point(
    record: Mapping[str, Any], parameters: Mapping[int, int] | None = None, tolerance: float = 0.0
) -> tuple[int | None, float] | None:
    """``(exit unit, accuracy)`` of what the run would deploy at this validation; unit ``None`` for a whole model.

    Exit accuracies decide when the record has them (``parameters`` maps a unit
    to its exit's parameters; without it every exit counts as the same size, so
    the best wins); otherwise ``val/acc``. ``None`` when the record has neither.
    """
    exits = exit_accuracies(record)
    if exits:
        records = [ExitRecord(u, min(max(a, 0.0), 1.0), (parameters or {}).get(u, 0)) for u, a in exits.items()]
        chosen = select_exit(records, tolerance)
        return chosen.unit, exits[chosen.unit]
    if "val/acc" in record:
        return None, float(record["val/acc"])
    return None


def raw_curve(
    history: Sequence[Mapping[str, Any]], parameters: Mapping[int, int] | None = None, tolerance: float = 0.0
) -> list[tuple[float, float]]:
    """``(seconds, deployable validation accuracy)`` per validation, in time order.

    >>> raw_curve([{"seconds": 2.0, "val/acc": 0.2}, {"seconds": 1.0, "val/acc": 0.3}])
    [(1.0, 0.3), (2.0, 0.2)]
    """
    points = [(r["seconds"], deployable_point(r, parameters, tolerance)) for r in history]
    return sorted((s, p[1]) for s, p in points if p is not None)


def accuracy_curve(curve: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """``(seconds, best accuracy so far)`` of a :func:`raw_curve`.

    >>> accuracy_curve([(1.0, 0.3), (2.0, 0.2)])
    [(1.0, 0.3), (2.0, 0.3)]
    """
    out, best = [], -math.inf
    for seconds, accuracy in curve:
        best = max(best, accuracy)
        out.append((seconds, best))
    return out


def crossing(curve: Sequence[tuple[float, float]], target: float) -> int | None:
    """Index of the first validation of a :func:`raw_curve` that reached ``target``; ``None`` if none did.

    >>> crossing([(5.0, 0.4), (9.0, 0.6), (12.0, 0.7)], 0.5)
    1
    """
    return next((i for i, (_, a) in enumerate(curve) if a >= target - ACCURACY_EPSILON), None)


def time_to_target(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """Seconds until a validation of a :func:`raw_curve` first reached ``target``; ``None`` if none did.

    >>> time_to_target([(5.0, 0.4), (9.0, 0.6)], 0.5)
    9.0
    """
    index = crossing(curve, target)
    return None if index is None else curve[index][0]


def accuracy_at(curve: Sequence[tuple[float, float]], seconds: float) -> float | None:
    """Best accuracy of a :func:`raw_curve` reached by ``seconds``; ``None`` before the first validation.

    >>> accuracy_at([(5.0, 0.4), (9.0, 0.6)], 8.0)
    0.4
    """
    reached = [a for s, a in accuracy_curve(curve) if s <= seconds]
    return reached[-1] if reached else None


def convergence(
    curve: Sequence[tuple[float, float]], fraction: float = CONVERGENCE_FRACTION, max_gain: float = CONVERGENCE_GAIN
) -> dict[str, Any]:
    """Whether a run converged: its last ``fraction`` of validations gained at most ``max_gain`` accuracy.

    The gain is the best accuracy of the last fifth (at least one validation)
    over the best before it; ``converged`` is ``None`` with fewer than two validations.

    >>> curve = [(float(i), a) for i, a in enumerate([.3, .5, .6, .62, .62])]
    >>> convergence(curve)["converged"], round(convergence(curve)["gain"], 3)
    (True, 0.0)
    >>> convergence(curve[:4])["converged"]
    False
    """
    accuracies = [a for _, a in curve]
    if len(accuracies) < 2:
        return {"converged": None, "gain": None, "window": len(accuracies)}
    window = max(1, math.ceil(fraction * len(accuracies)))
    gain = max(accuracies[-window:]) - max(accuracies[:-window])
    return {"converged": gain <= max_gain + ACCURACY_EPSILON, "gain": gain, "window": window}


def block_convergence(
    history: Sequence[Mapping[str, Any]], blocks: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """:func:`convergence` of each local-learning block on its own: its epochs, the best of its own exits.

    >>> history = [{"seconds": 1.0, "block": 0, "neuroflux/acc_exit_0": 0.3},
    ...            {"seconds": 2.0, "block": 0, "neuroflux/acc_exit_0": 0.302},
    ...            {"seconds": 3.0, "block": 1, "neuroflux/acc_exit_0": 0.31, "neuroflux/acc_exit_1": 0.2},
    ...            {"seconds": 4.0, "block": 1, "neuroflux/acc_exit_0": 0.31, "neuroflux/acc_exit_1": 0.4}]
    >>> [c["converged"] for c in block_convergence(history, [{"units": [0]}, {"units": [1]}])]
    [True, False]
    """
    out = []
    for index, block in enumerate(blocks):
        own = [
            (r["seconds"], max(a for u, a in exit_accuracies(r).items() if u in block["units"]))
            for r in history
            if r.get("block") == index and any(u in block["units"] for u in exit_accuracies(r))
        ]
        out.append(convergence(own))
    return out


def unit_ready(history: Sequence[Mapping[str, Any]], unit: int) -> tuple[float, float] | None:
    """``(seconds, accuracy)`` of ``unit``'s exit when the block that trained it ended; ``None`` if none did.

    >>> history = [{"seconds": 1.0, "block": 0, "neuroflux/acc_exit_0": 0.3},
    ...            {"seconds": 2.0, "block": 1, "neuroflux/acc_exit_0": 0.3, "neuroflux/acc_exit_1": 0.4},
    ...            {"seconds": 3.0, "block": 1, "neuroflux/acc_exit_0": 0.3, "neuroflux/acc_exit_1": 0.5},
    ...            {"seconds": 4.0, "block": 2, "neuroflux/acc_exit_1": 0.5, "neuroflux/acc_exit_2": 0.45}]
    >>> unit_ready(history, 1)
    (3.0, 0.5)
    """
    own = [r for r in history if r.get("block") is not None and unit in exit_accuracies(r)]
    if not own:
        return None
    last = [r for r in own if r["block"] == own[0]["block"]][-1]
    return float(last["seconds"]), exit_accuracies(last)[unit]
