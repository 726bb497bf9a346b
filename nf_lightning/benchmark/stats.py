"""Aggregates over seeds: means with their spread, times to target, and NeuroFlux's speed-ups.

Example:
    >>> mean_std([0.5, 0.7, None])
    {'mean': 0.6, 'std': 0.1414, 'n': 2}
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation and count of the values that are not ``None``.

    >>> mean_std([None])
    {'mean': None, 'std': None, 'n': 0}
    """
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = round(statistics.stdev(present), 4) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "n": len(present)}


def mean_time_to_target(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean time to target over seeds; a seed that never reached it counts its last validation time (a lower bound).

    >>> mean_time_to_target([{"time_to_target": 10.0, "last_seconds": 50.0},
    ...                      {"time_to_target": None, "last_seconds": 40.0}])
    {'mean': 25.0, 'lower_bound': True, 'reached': 1, 'n': 2}
    """
    times = [r["time_to_target"] if r["time_to_target"] is not None else r["last_seconds"] for r in rows]
    reached = sum(r["time_to_target"] is not None for r in rows)
    mean = statistics.fmean(times) if times else None
    return {"mean": mean, "lower_bound": reached < len(rows), "reached": reached, "n": len(rows)}


def speedup(baseline: Mapping[str, Any] | None, neuroflux: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """How many times sooner NeuroFlux reached the target than ``baseline`` (two :func:`mean_time_to_target` results).

    ``bound`` is ``"="`` when both always reached it, ``">"`` when only NeuroFlux did
    (the baseline's time is a lower bound), ``"<"`` when only the baseline did; ``None``
    when neither did or a time is missing. A value under 1 means NeuroFlux was slower.

    >>> speedup({"mean": 30.0, "lower_bound": True, "reached": 1, "n": 2}, {"mean": 10.0, "lower_bound": False})
    {'value': 3.0, 'bound': '>'}
    """
    if not baseline or not neuroflux or not baseline.get("mean") or not neuroflux.get("mean"):
        return None
    if baseline["lower_bound"] and neuroflux["lower_bound"]:
        return None
    bound = ">" if baseline["lower_bound"] else "<" if neuroflux["lower_bound"] else "="
    return {"value": baseline["mean"] / neuroflux["mean"], "bound": bound}


def per_seed_speedups(
    baseline: Mapping[int, Mapping[str, Any]], neuroflux: Mapping[int, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """:func:`speedup` seed by seed, over the seeds both methods ran (rows keyed by seed).

    >>> per_seed_speedups({0: {"time_to_target": 30.0, "last_seconds": 40.0}},
    ...                   {0: {"time_to_target": 10.0, "last_seconds": 20.0}, 1: {}})
    [{'seed': 0, 'value': 3.0, 'bound': '='}]
    """
    out = []
    for seed in sorted(set(baseline) & set(neuroflux)):
        value = speedup(mean_time_to_target([baseline[seed]]), mean_time_to_target([neuroflux[seed]]))
        out.append({"seed": seed, **(value or {"value": None, "bound": None})})
    return out


def format_speedup(value: Mapping[str, Any] | None) -> str:
    """``3.00x``, ``>3.00x`` or ``<3.00x`` (``-`` when unknown).

    >>> format_speedup({"value": 0.5, "bound": "="}), format_speedup(None)
    ('0.50x', '-')
    """
    if value is None or value.get("value") is None:
        return "-"
    return f"{'' if value['bound'] == '=' else value['bound']}{value['value']:.2f}x"
