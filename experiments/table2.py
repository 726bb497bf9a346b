"""The paper's Table 2 (and Table 3's throughput) for our own NeuroFlux runs.

Trains VGG-16, VGG-19 and ResNet-18 with NeuroFlux on the CIFAR-10 JPEG copy
through ``nf-train``'s ``run()`` and prints, per model, the parameters of the
full model and of the selected early exit, the compression factor, and both
validation accuracies: the full model's is that of the last exit (the model's
own head), the exit's that of the selected one. The exported exit is then
timed against the full model at batch 1 and 64 (``nf-throughput``'s measure), on
the GPU if there is one, else on one CPU thread (robust on a shared CPU).

    python experiments/table2.py                   # width 0.25, 5,000 training images: CPU-sized
    python experiments/table2.py --train-subset 1000 --val-subset 500 --epochs 1 --models vgg16
    python experiments/table2.py --full            # full widths and data, 300MB, 10 epochs per block (GPU)

Runs go to ``experiments/out/table2/<model>/`` (each an ordinary nf-train run
directory) and the table to ``experiments/out/table2/table2.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from nf_lightning.cli.common import compose_config as compose_app_config
from nf_lightning.cli.throughput import format_table, measure_run
from nf_lightning.cli.train import run

REPO = Path(__file__).resolve().parents[1]
MODELS = ("vgg16", "vgg19", "resnet18")
# The paper's Table 2 on CIFAR-10, millions of parameters: (BP/classic LL, NeuroFlux).
PAPER_CIFAR10 = {"vgg16": (14.7, 0.5), "vgg19": (20.0, 1.7), "resnet18": (11.0, 0.8)}


def compose_config(model: str, args: argparse.Namespace) -> DictConfig:
    """nf-train's configuration for one model of the table."""
    overrides = [
        f"model={model}",
        "data=cifar10_folder",
        "method=neuroflux",
        f"model.width_mult={args.width}",
        f"budget={args.budget}",
        f"epochs={args.epochs}",
        f"data.data_dir={args.data_dir}",
        f"data.train_subset={_or_null(args.train_subset)}",
        f"data.val_subset={_or_null(args.val_subset)}",
        "trainer.enable_progress_bar=false",
        f"exit.tolerance={args.tolerance}",
    ]
    return compose_app_config("train", overrides)


def table_row(model: str, results: dict[str, Any]) -> dict[str, Any]:
    """One line of Table 2 from a run's ``results.json``."""
    chosen = results["exit"]
    return {
        "model": model,
        "full_parameters": chosen["full_parameters"],
        "exit_parameters": chosen["parameters"],
        "compression": chosen["compression"],
        "full_accuracy": chosen["full_accuracy"],
        "exit_accuracy": chosen["accuracy"],
        "exit_unit": chosen["unit"],
        "num_units": chosen["num_units"],
        "train_seconds": results["train_seconds"],
    }


def format_table2(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'model':<9}{'params full':>12}{'params exit':>12}{'compression':>12}"
        f"{'acc full':>10}{'acc exit':>10}{'exit':>7}{'train s':>9}   paper (full / exit, 10^6)"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        full, exit_ = PAPER_CIFAR10[row["model"]]
        lines.append(
            f"{row['model']:<9}{row['full_parameters'] / 1e6:>11.3f}M{row['exit_parameters'] / 1e6:>11.3f}M"
            f"{row['compression']:>11.1f}x{row['full_accuracy']:>10.2%}{row['exit_accuracy']:>10.2%}"
            f"{row['exit_unit']:>4}/{row['num_units']:<2}{row['train_seconds']:>9.0f}"
            f"   {full} / {exit_} ({full / exit_:.1f}x)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--full", action="store_true", help="full widths and data, 300MB, 10 epochs per block")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--budget", default="20MB")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per block")
    parser.add_argument("--train-subset", type=int, default=5000)
    parser.add_argument("--val-subset", type=int, default=1000)
    parser.add_argument("--tolerance", type=float, default=0.0, help="exit tolerance, a fraction (0.01 = 1 point)")
    parser.add_argument("--data-dir", default=os.environ.get("NF_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "out" / "table2")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes per throughput measurement")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the throughput measurement")
    args = parser.parse_args()
    if args.full:
        args.width, args.budget, args.epochs, args.train_subset, args.val_subset = 1.0, "300MB", 10, None, None

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    rows, speeds = [], []
    for model in args.models:
        run_dir = args.out / model
        results = run(compose_config(model, args), run_dir)
        if not results["could_run"]:
            print(f"{model}: cannot run under {args.budget}: {results['reason']}")
            continue
        rows.append(table_row(model, results))
        speeds.append(measure_run(run_dir, (1, 64), device, 5, args.repeats, args.threads))

    subset = "all" if args.train_subset is None else f"{args.train_subset:,}"
    print(
        f"\nTable 2 (ours): NeuroFlux on the CIFAR-10 JPEG copy, width {args.width}, {subset} training images, "
        f"budget {args.budget}, {args.epochs} epoch(s) per block, exit tolerance {args.tolerance}"
    )
    print(format_table2(rows))
    for speed in speeds:
        print(f"\nThroughput on {device}, {speed['model']}: exit (unit {speed['exit_unit']}) vs full model")
        print(format_table(speed["rows"]))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items()}
    table = {"settings": settings, "rows": rows, "throughput": speeds}
    (args.out / "table2.json").write_text(json.dumps(table, indent=2))


def _or_null(value: int | None) -> str:
    return "null" if value is None else str(value)


if __name__ == "__main__":
    main()
