"""Figure 12: the deployable model's validation accuracy against wall time, every seed of every method.

Example:
    >>> figure12(summary, Path("experiments/results/compare/quick/figure12.png"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nf_lightning.benchmark.presets import COLOURS, LABELS


def figure12(summary: Mapping[str, Any], path: Path) -> None:
    """Curves of every seed of every method at its best rate, with the target and NeuroFlux's mean total time."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    results = summary["results"]
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for method in results["methods"]:
        runs = [r for r in results["runs"] if r["method"] == method and r["lr"] == results["lrs"].get(method)
                and r["status"] == "ok" and r["seed"] < summary["settings"]["seeds"]]  # fmt: skip
        for index, run in enumerate(sorted(runs, key=lambda r: (r["seed"], r["unit"] or 0))):
            seconds, accuracy = zip(*run["curve"]) if run["curve"] else ((), ())
            ax.plot(seconds, [100 * a for a in accuracy], color=COLOURS.get(method), alpha=0.85, linewidth=1.4,
                    marker=".", markersize=3, label=LABELS.get(method, method) if index == 0 else None)  # fmt: skip
    if results["target"] is not None:
        ax.axhline(100 * results["target"], color="grey", linestyle="--", linewidth=1, label="target (BP best - 1)")
    if results["equal_time_seconds"]:
        ax.axvline(results["equal_time_seconds"], color="tab:green", linestyle=":", linewidth=1,
                   label="NeuroFlux mean total time")  # fmt: skip
    ax.set_xlabel("wall time of the run (s); depth search: each depth's own clock")
    ax.set_ylabel("validation accuracy of the deployable model (%)")
    ax.set_title(f"{summary['settings']['model']} x{summary['settings']['width']} on {summary['settings']['data']}, "
                 f"budget {summary['budget']['text']}")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
