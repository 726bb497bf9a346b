"""The paper's Figure 13 as a PNG with its data as CSV: ``fig13_activations_aux_flops``.

Per unit of VGG-19 and ResNet-18 at width 1.0, the activation size (elements of
one sample's unit output) and the forward FLOPs of its auxiliary head for one
sample, adaptive (NeuroFlux) and classic (256 filters), per unit and cumulative.
Counted by ``nf_lightning.benchmark.unit_profile`` on the heads the project
builds (two FLOPs per multiply-add), not by hand. The comparison's Figure 12
(accuracy against wall time) is ``compare.py``'s ``figure12.png``.

    python experiments/figures.py experiments/results/figures
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterable, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

from nf_lightning.benchmark.unit_profile import AUX_POLICIES, unit_profile

FIG13_MODELS = ("vgg19", "resnet18")


def activation_flops_figure(out: Path, model_names: Iterable[str] = FIG13_MODELS) -> list[Path]:
    """Activation size, aux-head FLOPs and cumulative aux-head FLOPs per unit, per model."""
    profiles = {model: unit_profile(model) for model in model_names}
    fig = Figure(figsize=(15, 4))
    sizes, per_unit, cumulative = fig.subplots(1, 3)
    for index, (model, profile) in enumerate(profiles.items()):
        colour = f"C{index}"
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
    parser.add_argument("out", type=Path, help="the directory the PNG and CSV go to")
    args = parser.parse_args(argv)
    for path in activation_flops_figure(args.out):
        print(path)


if __name__ == "__main__":
    main()
