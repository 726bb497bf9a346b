"""Training cost per sample against batch size: what NeuroFlux's larger batches buy on this device (issue 21).

In the paper, NeuroFlux's speed comes from batch size: under a budget, BP through the whole network
fits only a small batch, each NeuroFlux block a large one, and a GPU runs a large batch at a far lower
cost per sample. This measures that cost here, one training step (forward, backward, SGD with
momentum) of each network the benchmark trains, at batch sizes 1 to 256:

- ``whole network``: every unit and the model's head, as BP trains it;
- ``exit k``: units ``0..k`` and unit ``k``'s auxiliary head, the exit NeuroFlux deploys (what
  ``scratch_exit`` and the polish train; unit 3 in the default benchmark);
- ``unit u (local)``: unit ``u`` and its head on unit ``u-1``'s output, NeuroFlux's local step (its input
  read from the cache).

    OMP_NUM_THREADS=1 python experiments/batch_throughput.py                  # one CPU thread, as the benchmark
    python experiments/batch_throughput.py --device cuda                      # where a GPU is lent

Writes ``experiments/results/batch_throughput/<device>/summary.json``, ``summary.md`` and
``per_sample.png``. Times are medians of ``--steps`` steps after ``--warmup`` (``measure.bp_step``, the
benchmark's bare loop).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from nf_lightning.benchmark.measure import bp_step, median_seconds
from nf_lightning.core.exits.aux_heads import build_exits, unit_shapes
from nf_lightning.core.exits.selection import ExitModel
from nf_lightning.core.network.decompose import decompose
from nf_lightning.models import create

RESULTS = Path(__file__).resolve().parent / "results" / "batch_throughput"
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
INPUT_SHAPE = (3, 32, 32)


def networks(model: str, width: float, exit_unit: int, classes: int) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """The networks a benchmark run trains, each with the shape of one input sample."""
    parts = decompose(create(model, num_classes=classes, width_mult=width))
    exits = build_exits(parts, INPUT_SHAPE)
    shapes = [INPUT_SHAPE, *unit_shapes(parts.units, INPUT_SHAPE)]
    found = {"whole network": (nn.Sequential(*parts.units, parts.head), INPUT_SHAPE),
             f"exit {exit_unit}": (ExitModel(parts.units, exits, exit_unit), INPUT_SHAPE)}  # fmt: skip
    for unit, (block, head) in enumerate(zip(parts.units, exits, strict=True)):
        found[f"unit {unit} (local)"] = (nn.Sequential(block, head), tuple(shapes[unit]))
    return found


def step_seconds(net: nn.Module, shape: Sequence[int], batch: int, classes: int, device: torch.device,
                 steps: int, warmup: int) -> float:  # fmt: skip
    """Median wall time of one SGD step of ``net`` on a random batch (the benchmark's bare-loop step)."""
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return median_seconds(bp_step(net.to(device).train(), batch, shape, classes, device), steps, warmup, sync)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    load_before, rows = os.getloadavg()[0], []
    for model in args.models:
        for name, (net, shape) in networks(model, args.width, args.exit_unit, args.classes).items():
            per_sample = [step_seconds(net, shape, batch, args.classes, device, args.steps, args.warmup) / batch
                          for batch in args.batches]  # fmt: skip
            rows.append({"model": model, "network": name, "per_sample_seconds": per_sample})
            costs = ", ".join(f"{b}: {1e3 * s:.3f}" for b, s in zip(args.batches, per_sample, strict=True))
            print(f"[batch_throughput] {model} {name}: {costs} ms/sample", flush=True)
    return {"device": str(device), "threads": torch.get_num_threads(), "width": args.width,
            "input_shape": list(INPUT_SHAPE), "classes": args.classes, "batches": list(args.batches),
            "gain_from": args.gain_from, "steps": args.steps, "warmup": args.warmup,
            "torch": torch.__version__, "load": [load_before, os.getloadavg()[0]], "rows": rows}  # fmt: skip


def gain(row: dict[str, Any], batches: Sequence[int], small: int) -> float:
    """How many times cheaper a sample is at the largest batch than at batch ``small``.

    >>> gain({"per_sample_seconds": [2.0, 1.0, 0.5]}, [8, 64, 256], small=8)
    4.0
    """
    per_sample = row["per_sample_seconds"]
    return per_sample[batches.index(small)] / per_sample[batches.index(max(batches))]


def markdown(summary: dict[str, Any]) -> str:
    batches, small = summary["batches"], summary["gain_from"]
    lines = [
        f"# Training cost per sample against batch size ({summary['device']}, {summary['threads']} thread(s))",
        "",
        f"One SGD step (forward, backward, update) of each network the benchmark trains, width "
        f"{summary['width']}, input {tuple(summary['input_shape'])}, {summary['classes']} classes; milliseconds "
        f"per sample, median of {summary['steps']} timed steps after {summary['warmup']} untimed (nf-train's SGD "
        f"recipe, the benchmark's bare loop); "
        f"1-minute load {summary['load'][0]:.1f} before, {summary['load'][1]:.1f} after. "
        f"Gain: the cost per sample at batch {small} (BP fits the benchmark's budget at batch 8) over that at "
        f"batch {max(batches)}.",
        "",
        "| model | network | " + " | ".join(f"batch {b}" for b in batches) + f" | gain {small} -> {max(batches)} |",
        "| --- | --- |" + " --- |" * (len(batches) + 1),
    ]
    for row in summary["rows"]:
        costs = " | ".join(f"{1e3 * s:.3f}" for s in row["per_sample_seconds"])
        lines.append(f"| {row['model']} | {row['network']} | {costs} | {gain(row, batches, small):.2f}x |")
    return "\n".join(lines) + "\n"


def figure(summary: dict[str, Any], path: Path) -> None:
    models = sorted({row["model"] for row in summary["rows"]})
    fig = Figure(figsize=(6 * len(models), 4.5))
    for ax, model in zip(fig.subplots(1, len(models), squeeze=False)[0], models, strict=True):
        for row in (r for r in summary["rows"] if r["model"] == model):
            costs = [1e3 * s for s in row["per_sample_seconds"]]
            ax.plot(summary["batches"], costs, marker="o", label=row["network"],
                    linestyle="-" if "local" in row["network"] else "--")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per sample (one training step)",
               title=f"{model} x{summary['width']}, {summary['device']}, {summary['threads']} thread(s)")  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet18"])
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--exit-unit", type=int, default=3, help="the deployed exit (unit 3 in the benchmark)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--gain-from", type=int, default=8, help="the gain column: this batch against the largest")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per network and batch (the median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--out", type=Path, default=None, help="default: results/batch_throughput/<device>")
    args = parser.parse_args(argv)
    if args.gain_from not in args.batches or min(args.batches) < 1:
        parser.error(f"--batches must be positive and include --gain-from ({args.gain_from})")
    if args.device == "cpu" and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    summary = measure(args)
    out = args.out or RESULTS / torch.device(args.device).type
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    figure(summary, out / "per_sample.png")
    print(f"[batch_throughput] -> {out / 'summary.md'}")
    return out


if __name__ == "__main__":
    main()
