"""The paper's memory Figures 4, 6 and 8 (§3, §5.2) for the nf_lightning models.

Every peak is measured by the profiler (``nf_lightning.core.memory.profiler``) on fake tensors:
the exact storage bytes of one step, with the profiler's default optimizer (SGD with
momentum), on CIFAR-10 shapes (3x32x32 inputs, 10 classes), at the batch sizes the
planner profiles at for ``--batch-limit`` (``plan.profile_batch_sizes``: powers of two
from 2 to the limit), so the unit memory models are the ones ``nf-plan`` partitions
with. MB is 10**6 bytes, as budgets are parsed. Units are numbered from 1, like the
paper's layers.

- Figure 4, ``fig4_memory_vs_batch``: peak memory vs batch size of inference, backprop
  (BP), classic local learning (LL, 256-filter heads) and AAN-LL (adaptive heads).
- Figure 6, ``fig6_max_batch_per_unit``: each unit's largest batch under ``--budget`` with
  AAN heads, uncapped and capped at ``--batch-limit`` (Algorithm 1, lines 2-4), and the
  blocks the partitioner makes of them.
- Figure 8, ``fig8_unit_linear_fits``: each unit's measured peaks (AAN heads) vs batch
  size, with its memory model: the least-squares line, floored at small batches.

The paper draws Figures 4 and 6 for VGG-19 and Figure 8 for VGG-11; ``--model`` puts
one model in all three. Each figure is written as a PNG and a CSV of its numbers.

    python experiments/memory_figures.py                         # paper's models, full width, 630MB
    python experiments/memory_figures.py --model resnet18 --width 0.5 --budget 300MB
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from nf_lightning import models
from nf_lightning.core.exits.aux_heads import build_aux_heads
from nf_lightning.core.memory.budget import format_bytes, parse_bytes
from nf_lightning.core.network.decompose import decompose
from nf_lightning.core.plan.partitioner import Block, block_peak, max_batch_sizes, partition
from nf_lightning.core.plan.training_plan import profile_batch_sizes
from nf_lightning.core.memory.profiler import LinearMemoryModel, profile_backprop, profile_inference, profile_units

MB = 1e6
INPUT_SHAPE = (3, 32, 32)  # CIFAR-10, as in the paper's figures
NUM_CLASSES = 10
FIGURE_4_6_MODEL, FIGURE_8_MODEL = "vgg19", "vgg11"
Row = dict[str, Any]


def unit_fits(name: str, width: float, policy: str, batches: Sequence[int]) -> list[LinearMemoryModel]:
    """Memory model of each unit of ``name`` with ``policy`` aux heads (the last: the model's head)."""
    parts = decompose(models.create(name, NUM_CLASSES, width))
    heads = build_aux_heads(parts.units, NUM_CLASSES, INPUT_SHAPE, policy=policy)
    return profile_units(parts.units, heads, parts.head, INPUT_SHAPE, batches, num_classes=NUM_CLASSES)


def figure4_rows(name: str, width: float, aan: Sequence[LinearMemoryModel], batches: Sequence[int]) -> list[Row]:
    """Peak MB per batch size of inference, BP, classic LL and AAN-LL (Figure 4).

    - ``inference_mb`` and ``bp_mb``: measured peaks of an eval forward pass under
      ``no_grad`` and of a backprop step of the whole model.
    - ``classic_ll_mb``: classic LL trains all units at once, each on the detached output
      of the one before, with a 256-filter head each. All units, heads and optimizer
      states stay resident while one unit's activations are live at a time: that is
      ``block_peak`` of all units as one block, on their classic-head memory models.
    - ``aan_ll_mb``: AAN-LL as the paper measures it (§3, Figure 5) trains one unit at a
      time, with only that unit and its adaptive head resident. Training the CNN at
      batch ``b`` then needs the largest of the units' measured peaks at ``b``: the
      budget at which every unit fits batch ``b`` on its own, as the paper's 630MB is for
      VGG-19 at batch 30. ``aan_ll_peak_unit`` names the unit that sets it.

    So classic vs AAN-LL differ both in head widths and in what is resident.
    """
    model = models.create(name, NUM_CLASSES, width)
    inference = profile_inference(model, INPUT_SHAPE, batches)
    backprop = profile_backprop(model, INPUT_SHAPE, batches, num_classes=NUM_CLASSES)
    classic = unit_fits(name, width, "classic", batches)
    everything = range(len(classic))
    rows = []
    for batch in batches:
        unit_peaks = [_measured(fit, batch) for fit in aan]
        peak_unit = max(everything, key=unit_peaks.__getitem__)
        rows.append(
            {
                "batch": batch,
                "inference_mb": _measured(inference, batch) / MB,
                "bp_mb": _measured(backprop, batch) / MB,
                "classic_ll_mb": block_peak(classic, everything, batch) / MB,
                "aan_ll_mb": unit_peaks[peak_unit] / MB,
                "aan_ll_peak_unit": peak_unit + 1,
            }
        )
    return rows


def _measured(fit: LinearMemoryModel, batch: int) -> int:
    """The peak bytes profiled at ``batch``."""
    return dict(fit.samples)[batch]


def figure6_rows(aan: Sequence[LinearMemoryModel], budget: int, batch_limit: int) -> tuple[list[Row], list[Block]]:
    """Each unit's largest batch within ``budget``, uncapped and capped, and its block (Figure 6)."""
    uncapped = [fit.max_batch(budget) for fit in aan]
    capped = max_batch_sizes(aan, budget, batch_limit)
    blocks = partition(aan, budget, batch_limit)
    block_of = {unit: (number, block) for number, block in enumerate(blocks, 1) for unit in block.units}
    rows = [
        {
            "unit": unit + 1,
            "max_batch": uncapped[unit],
            "max_batch_capped": capped[unit],
            "block": block_of[unit][0],
            "block_batch": block_of[unit][1].batch_size,
            "block_peak_mb": block_of[unit][1].predicted_peak / MB,
        }
        for unit in range(len(aan))
    ]
    return rows, blocks


def figure8_rows(aan: Sequence[LinearMemoryModel]) -> list[Row]:
    """Each unit's measured peak and its model's prediction at every profiled batch (Figure 8).

    The model is ``max(slope * batch + intercept, floor)``: its parameters are repeated on
    every row of the unit, so the CSV alone redraws the lines.
    """
    return [
        {
            "unit": unit + 1,
            "batch": batch,
            "measured_mb": peak / MB,
            "predicted_mb": fit.predict(batch) / MB,
            "slope_mb_per_sample": fit.slope / MB,
            "intercept_mb": fit.intercept / MB,
            "floor_mb": fit.floor / MB,
        }
        for unit, fit in enumerate(aan)
        for batch, peak in fit.samples
    ]


def plot_figure4(rows: Sequence[Row], title: str) -> Figure:
    """Four curves of peak MB vs batch size, batch on a log2 axis."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    batches = [row["batch"] for row in rows]
    curves = {
        "inference_mb": "Inference",
        "bp_mb": "BP",
        "classic_ll_mb": "Classic LL (256 filters, all units at once)",
        "aan_ll_mb": "AAN-LL (one unit at a time)",
    }
    for column, label in curves.items():
        axes.plot(batches, [row[column] for row in rows], marker="o", label=label)
    _batch_axis(axes, batches)
    axes.set_ylabel("peak memory of a step (MB)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def plot_figure6(rows: Sequence[Row], blocks: Sequence[Block], batch_limit: int, title: str) -> Figure:
    """Bars of uncapped and capped max batch per unit (log scale), blocks shaded and labelled."""
    figure = Figure(figsize=(max(7.0, 0.45 * len(rows) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    units = [row["unit"] for row in rows]
    axes.bar([u - 0.2 for u in units], [row["max_batch"] for row in rows], 0.4, label="max batch")
    capped = [row["max_batch_capped"] for row in rows]
    axes.bar([u + 0.2 for u in units], capped, 0.4, label=f"capped at batch limit {batch_limit}")
    axes.axhline(batch_limit, color="grey", linestyle="--", linewidth=1)
    axes.set_yscale("log")
    for number, block in enumerate(blocks, 1):
        first, last = block.units[0] + 1, block.units[-1] + 1
        axes.axvspan(first - 0.5, last + 0.5, color="C2" if number % 2 else "C4", alpha=0.12, linewidth=0)
        label = "block batch" if number == 1 else None
        axes.hlines(block.batch_size, first - 0.45, last + 0.45, color="black", label=label)
        top = axes.get_xaxis_transform()  # x in data, y in axes coordinates
        axes.text((first + last) / 2, 1.01, f"B{number}\nbatch {block.batch_size}", ha="center", va="bottom",
                  fontsize=7, transform=top)
    axes.set_xticks(units)
    axes.set_xlim(units[0] - 0.6, units[-1] + 0.6)
    axes.set_xlabel("unit (layer)")
    axes.set_ylabel("largest batch within budget")
    axes.set_title(title, pad=30)
    axes.legend(loc="upper left")
    return figure


def plot_figure8(rows: Sequence[Row], title: str) -> Figure:
    """Per unit: measured peaks as points and the model (floored line) as a line; the
    right panel zooms on the smaller half of the profiled batches, where the floor acts."""
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    full, zoom = figure.subplots(1, 2)
    batches = sorted({row["batch"] for row in rows})
    _draw_unit_models(full, rows, batches[-1])
    _draw_unit_models(zoom, rows, batches[len(batches) // 2])
    full.set_ylabel("peak training memory (MB)")
    full.set_title("all profiled batch sizes")
    zoom.set_title(f"batch <= {batches[len(batches) // 2]}")
    figure.suptitle(title)
    units = len({row["unit"] for row in rows})
    figure.legend(*full.get_legend_handles_labels(), fontsize=7, ncols=units // 12 + 1, loc="outside right upper")
    return figure


def _draw_unit_models(axes: Axes, rows: Sequence[Row], largest: int) -> None:
    """Each unit's measured peaks and model up to batch ``largest`` on ``axes``."""
    for unit in sorted({row["unit"] for row in rows}):
        own = [row for row in rows if row["unit"] == unit and row["batch"] <= largest]
        first = own[0]
        line = range(first["batch"], largest + 1)
        model = [max(first["slope_mb_per_sample"] * b + first["intercept_mb"], first["floor_mb"]) for b in line]
        label = f"unit {unit} ({first['slope_mb_per_sample']:.2f} MB/sample)"
        color = axes.plot(line, model, label=label)[0].get_color()
        axes.scatter([row["batch"] for row in own], [row["measured_mb"] for row in own], color=color, s=14, zorder=3)
    axes.set_xlabel("batch size (points: measured, lines: memory model)")
    axes.grid(alpha=0.3)


def _batch_axis(axes: Axes, batches: Sequence[int]) -> None:
    """A log2 batch axis spanning ``batches``, ticks at powers of two written as numbers."""
    axes.set_xscale("log", base=2)
    axes.set_xlim(min(batches) / 1.2, max(batches) * 1.2)
    axes.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axes.set_xlabel("batch size")


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """``rows`` as a CSV with a header, floats (MB) to the byte."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()} for row in rows)


def print_table(rows: Sequence[Row]) -> None:
    """``rows`` as an aligned text table on stdout."""
    columns = list(rows[0])
    cells = [[f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    for line in [columns, *cells]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``sys.argv`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        choices=models.KNOWN_MODELS,
        help=f"model of all figures (default: {FIGURE_4_6_MODEL} for 4 and 6, {FIGURE_8_MODEL} for 8, as the paper)",
    )
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of the model(s)")
    parser.add_argument("--budget", type=parse_bytes, default=parse_bytes("630MB"), help="Figure 6's memory budget")
    parser.add_argument(
        "--batch-limit", type=int, default=256, help="Algorithm 1's batch size limit B, also the largest batch profiled"
    )
    parser.add_argument("--out", type=Path, default=Path("experiments/out/memory_figures"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Write the three figures' PNGs and CSVs into ``--out``; return their paths."""
    args = parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    batches = profile_batch_sizes(args.batch_limit, "cpu")  # the profiler runs on fake tensors here
    model_4_6, model_8 = args.model or FIGURE_4_6_MODEL, args.model or FIGURE_8_MODEL
    aan = {name: unit_fits(name, args.width, "adaptive", batches) for name in {model_4_6, model_8}}
    setting = f"width {args.width:g}, CIFAR-10"
    budget = format_bytes(args.budget)

    fig4 = figure4_rows(model_4_6, args.width, aan[model_4_6], batches)
    fig6, blocks = figure6_rows(aan[model_4_6], args.budget, args.batch_limit)
    fig8 = figure8_rows(aan[model_8])
    figures = {
        "fig4_memory_vs_batch": (fig4, plot_figure4(fig4, f"Fig. 4: {model_4_6} ({setting})")),
        "fig6_max_batch_per_unit": (
            fig6,
            plot_figure6(fig6, blocks, args.batch_limit, f"Fig. 6: {model_4_6} ({setting}), AAN-LL within {budget}"),
        ),
        "fig8_unit_linear_fits": (fig8, plot_figure8(fig8, f"Fig. 8: {model_8} ({setting}), AAN-LL units")),
    }
    paths = [path for stem, (rows, figure) in figures.items() for path in save(rows, figure, args.out / stem)]

    print(f"Figure 4 ({model_4_6}, MB):")
    print_table(fig4)
    print(f"\nFigure 6 ({model_4_6}, budget {budget}, batch limit {args.batch_limit}):")
    print_table(fig6)
    worst = max(fit.rel_error for fit in aan[model_8])
    print(f"\nFigure 8 ({model_8}): largest relative error of a unit's model on its samples {worst:.1%}")
    print(f"\n{time.perf_counter() - start:.1f} s; wrote:", *paths, sep="\n  ")
    return paths


def save(rows: Sequence[Row], figure: Figure, stem: Path) -> list[Path]:
    """Write ``rows`` to ``stem.csv`` and ``figure`` to ``stem.png``; return both paths."""
    csv_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".png")
    write_csv(rows, csv_path)
    figure.savefig(png_path, dpi=150)
    return [csv_path, png_path]


if __name__ == "__main__":
    main()
