"""The comparison's figures (the paper's Figures 11-13), each a PNG with its data as CSV.

- ``fig11_training_time``: training wall time and time to the target accuracy
  per budget and method; a budget a method cannot run at is marked "x".
- ``fig12_accuracy_vs_time``: accuracy reached (best exit evaluated so far)
  against wall time at one budget, with the target.
- ``fig13_activations_aux_flops``: per unit of VGG-19 and ResNet-18 at width 1.0,
  the activation size (elements of one sample's unit output) and the forward
  FLOPs of its auxiliary head for one sample, adaptive (NeuroFlux) and classic
  (256 filters), per unit and cumulative. Counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the heads the project builds
  (two FLOPs per multiply-add), not by hand.

``compare.py`` writes them all; to redraw from a finished comparison:

    python experiments/figures.py experiments/out/compare [--curve-budget 20MB]
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterable, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
from matplotlib.patches import Patch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nf_lightning import models
from nf_lightning.core.aux_heads import build_aux_heads, unit_shapes
from nf_lightning.core.decompose import decompose

METHOD_STYLE = {  # label, colour, marker
    "bp": ("BP", "tab:blue", "o"),
    "classic_ll": ("classic LL", "tab:orange", "s"),
    "neuroflux": ("NeuroFlux", "tab:green", "^"),
}
FIG13_MODELS = ("vgg19", "resnet18")
AUX_POLICIES = ("adaptive", "classic")


def write_all(summary: dict[str, Any], out: Path, curve_budget: str | None = None) -> list[Path]:
    """Every figure of a comparison summary (``compare.py``'s) into ``out``; the files written."""
    rows = summary["rows"]
    return [
        *training_time_figure(rows, out),
        *accuracy_time_figure(rows, summary["target_accuracy"], out, curve_budget or curve_budget_of(rows)),
        *activation_flops_figure(out),
    ]


# --------------------------------------------------------------------------- Figure 11
def training_time_figure(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Grouped bars per budget: training wall time (left) and time to target (right)."""
    budgets = _budgets(rows)
    methods = _methods(rows)
    by_key = {(r["budget"], r["method"]): r for r in rows}
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / len(methods)
    panels = (("train_seconds", "training wall time"), ("time_to_target_seconds", "time to target accuracy"))
    for panel, (key, title) in zip(axes, panels, strict=True):
        for m, method in enumerate(methods):
            colour = METHOD_STYLE[method][1]
            for b, budget in enumerate(budgets):
                x = b - 0.4 + width * (m + 0.5)
                row = by_key.get((budget, method))
                value = row.get(key) if row and row["could_run"] else None
                if value is not None:
                    panel.bar(x, value, width, color=colour)
                else:  # cannot run (x) or never reached the target (-)
                    mark = "x" if row is None or not row["could_run"] else "_"
                    panel.plot(x, 0, marker=mark, color=colour, markersize=9, clip_on=False)
        panel.set_xticks(range(len(budgets)), budgets)
        panel.set_xlabel("memory budget")
        panel.set_title(title)
    axes[0].set_ylabel("seconds")
    handles = [Patch(color=METHOD_STYLE[m][1], label=METHOD_STYLE[m][0]) for m in methods]
    axes[0].legend(handles=handles, title="x: cannot run, -: target not reached", fontsize=8, title_fontsize=8)
    fields = ("budget", "budget_bytes", "method", "could_run", "train_seconds", "time_to_target_seconds")
    csv_rows = [{k: r.get(k) for k in fields} for r in rows]
    return _save(fig, csv_rows, out / "fig11_training_time")


# --------------------------------------------------------------------------- Figure 12
def curve_budget_of(rows: Sequence[dict[str, Any]]) -> str:
    """The tightest budget at which the most methods ran."""
    ran: dict[str, int] = {}
    for row in rows:
        ran[row["budget"]] = ran.get(row["budget"], 0) + int(row["could_run"])
    bytes_of = {r["budget"]: r["budget_bytes"] for r in rows}
    return min(ran, key=lambda budget: (-ran[budget], bytes_of[budget]))


def accuracy_time_figure(rows: Sequence[dict[str, Any]], target: float, out: Path, budget: str) -> list[Path]:
    """Accuracy reached vs wall time for every method that ran at ``budget``."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    csv_rows = []
    for row in rows:
        if row["budget"] != budget or not row["could_run"]:
            continue
        label, colour, marker = METHOD_STYLE[row["method"]]
        seconds, accuracy = zip(*row["curve"], strict=True) if row["curve"] else ((), ())
        ax.step(seconds, accuracy, where="post", marker=marker, color=colour, label=label)
        csv_rows += [{"budget": budget, "method": row["method"], "seconds": s, "accuracy": a} for s, a in row["curve"]]
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.1%}")
    ax.set_xlabel("wall time since fit began (s)")
    ax.set_ylabel("validation accuracy (best exit so far)")
    ax.set_title(f"accuracy vs time at {budget}")
    ax.legend(fontsize=8)
    return _save(fig, csv_rows, out / "fig12_accuracy_vs_time")


# --------------------------------------------------------------------------- Figure 13
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


def activation_flops_figure(out: Path, model_names: Iterable[str] = FIG13_MODELS) -> list[Path]:
    """Activation size, aux-head FLOPs and cumulative aux-head FLOPs per unit, per model."""
    profiles = {model: unit_profile(model) for model in model_names}
    fig = Figure(figsize=(15, 4))
    sizes, per_unit, cumulative = fig.subplots(1, 3)
    for index, (model, profile) in enumerate(profiles.items()):
        colour = f"C{index + 4}"  # clear of the methods' colours (C0-C2)
        units = [e["unit"] for e in profile]
        sizes.plot(units, [e["activation_elements"] for e in profile], marker="o", color=colour, label=model)
        for policy, style in zip(AUX_POLICIES, ("-", "--"), strict=True):
            flops = [e[f"aux_flops_{policy}"] for e in profile if e[f"aux_flops_{policy}"] is not None]
            label = f"{model}, {policy} heads"
            per_unit.plot(units[: len(flops)], flops, style, marker=".", color=colour, label=label)
            running = list(accumulate(flops))
            cumulative.plot(units[: len(flops)], running, style, color=colour, label=label)
    sizes.set(title="activation size per unit", xlabel="unit", ylabel="elements per sample", yscale="log")
    per_unit.set(title="aux-head forward FLOPs per unit", xlabel="unit", ylabel="FLOPs per sample", yscale="log")
    cumulative.set(title="cumulative aux-head FLOPs", xlabel="unit", ylabel="FLOPs per sample")
    for ax in (sizes, per_unit, cumulative):
        ax.legend(fontsize=7)
    return _save(fig, [e for profile in profiles.values() for e in profile], out / "fig13_activations_aux_flops")


# --------------------------------------------------------------------------- helpers
def _budgets(rows: Sequence[dict[str, Any]]) -> list[str]:
    bytes_of = {r["budget"]: r["budget_bytes"] for r in rows}
    return sorted(bytes_of, key=bytes_of.__getitem__)


def _methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [m for m in METHOD_STYLE if any(r["method"] == m for r in rows)]


def _save(fig: Figure, csv_rows: list[dict[str, Any]], stem: Path) -> list[Path]:
    """``stem.png`` and ``stem.csv``; returns both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    with stem.with_suffix(".csv").open("w", newline="") as handle:
        fields = list(dict.fromkeys(k for r in csv_rows for k in r))
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(csv_rows)
    return [stem.with_suffix(".png"), stem.with_suffix(".csv")]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a compare.py output directory (with summary.json)")
    parser.add_argument("--curve-budget", default=None, help="budget of Figure 12 (default: see curve_budget_of)")
    args = parser.parse_args(argv)
    summary = json.loads((args.out / "summary.json").read_text())
    for path in write_all(summary, args.out, args.curve_budget):
        print(path)


if __name__ == "__main__":
    main()
