"""What capping the adaptive auxiliary heads at 256 filters does on a wide network (ResNet-50).

AAN's rule gives every head after the first downsampling half the widest unit's channels: 1,024
filters on a ResNet-50 (2,048 channels), heads with five times the parameters of the units they
serve. ``NeuroFluxOptions.aux_max_filters`` (256 by default, the paper's widest head) caps them.
This script measures both settings from the same code in one invocation:

- memory: the smallest budget NeuroFlux plans under with each setting, against the smallest one
  at which BP through the whole network takes a step (all on the profiler's fake tensors);
- training: two ``nf-train`` runs of NeuroFlux at one budget both fit, side by side (one torch
  thread each on the 2 cores), with their wall time, plan, measured peak and exit accuracies.

    OMP_NUM_THREADS=1 NF_DATA_DIR=../shared/datasets python experiments/aux_head_cap.py

Writes ``experiments/results/aux_head_cap/summary.json`` and ``summary.md``; the runs go under
``experiments/out/aux_head_cap/``. One seed and a short schedule: a check of the cap's cost and
effect, not a converged comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision

from nf_lightning.core.exits.aux_heads import AUX_MAX_FILTERS, build_aux_heads
from nf_lightning.core.memory.budget import format_bytes
from nf_lightning.core.memory.profiler import profile_units
from nf_lightning.core.network.decompose import decompose
from nf_lightning.core.network.smallest_batch import smallest_batches
from nf_lightning.core.plan.partitioner import minimum_budget
from nf_lightning.data import KNOWN_DATASETS
from nf_lightning.lightning.backprop_batch import backprop_need, largest_backprop_batch

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"capped": AUX_MAX_FILTERS, "uncapped": None}


def sgd(params: Any) -> torch.optim.Optimizer:
    """nf-train's default recipe."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def minimum_budgets(model: str, num_classes: int, shape: tuple[int, int, int]) -> dict[str, Any]:
    """NeuroFlux's smallest budget under each setting, BP's smallest, and the heads' sizes against the units'."""
    net = getattr(torchvision.models, model)(num_classes=num_classes)
    parts = decompose(net)
    unit_params = sum(p.numel() for unit in parts.units for p in unit.parameters())
    out: dict[str, Any] = {}
    for name, cap in SETTINGS.items():
        heads = build_aux_heads(parts.units, num_classes, shape, max_filters=cap)
        models = profile_units(parts.units, list(heads), parts.head, shape, batch_sizes=(2, 4), optimizer_factory=sgd)
        floors = smallest_batches(parts.units, [*heads, parts.head])
        out[name] = {"minimum_bytes": minimum_budget(models, floors),
                     "head_to_unit_parameters": sum(p.numel() for p in heads.parameters()) / unit_params,
                     "widest_head": max(head[0].out_channels for head in heads)}  # fmt: skip
    _, bp, peak = largest_backprop_batch(net, shape, 0, batch_limit=4, optimizer_factory=sgd)
    smallest, needed = backprop_need(net, bp, peak)
    out["bp"] = {"minimum_bytes": needed, "batch": smallest}
    return out


def train(args: argparse.Namespace) -> dict[str, Any]:
    """The two nf-train runs, started together, each on one torch thread; their results.json."""
    processes = {}
    for name, cap in SETTINGS.items():
        out = REPO / "experiments" / "out" / "aux_head_cap" / name
        overrides = [
            "method=neuroflux", "model=torchvision", f"model.name={args.model}", f"data={args.data}",
            f"data.train_subset={args.train_subset}", f"data.val_subset={args.val_subset}", f"seed={args.seed}",
            f"data.seed={args.seed}", f"epochs={args.epochs}", f"budget={args.budget}", "polish_epochs=0",
            f"+trainer.strategy.aux_max_filters={'null' if cap is None else cap}",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={out}",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out.parent.mkdir(parents=True, exist_ok=True)
        log = (out.parent / f"{name}.log").open("w")
        processes[name] = (subprocess.Popen([sys.executable, "-m", "nf_lightning.cli.train", *overrides], env=env,
                                            stdout=log, stderr=subprocess.STDOUT), out)  # fmt: skip
    results = {}
    for name, (process, out) in processes.items():
        if process.wait() != 0:
            raise RuntimeError(f"the {name} run failed: see {out.parent / (name + '.log')}")
        results[name] = json.loads((out / "results.json").read_text())
    return results


def summary(args: argparse.Namespace, memory: dict[str, Any], runs: dict[str, Any]) -> str:
    lines = [
        f"# Capped adaptive heads on {args.model} ({args.data}, {args.train_subset:,} / {args.val_subset:,} images, "
        f"{args.epochs} epochs per block, budget {args.budget}, seed {args.seed})", "",
        "Both settings from the same code in one invocation; the two runs side by side, one torch thread each.", "",
        "| heads | widest head | head / unit parameters | NeuroFlux's smallest budget | blocks (batch) | "
        "peak | training s | best exit (validation) | exits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name in SETTINGS:
        m, r = memory[name], runs[name]
        blocks = ", ".join(f"{b['units'][0]}-{b['units'][-1]} ({b['batch_size']})" for b in r["plan"]["blocks"])
        accs = r["exit_accuracies"]
        best = max(accs, key=lambda unit: accs[unit])
        lines.append(
            f"| {name} | {m['widest_head']} | {m['head_to_unit_parameters']:.2f}x | {format_bytes(m['minimum_bytes'])} "
            f"| {blocks} | {format_bytes(r['measured_peak_bytes'])} | {r['train_seconds']:.0f} | unit {best}: "
            f"{100 * accs[best]:.1f} % | {' / '.join(f'{100 * a:.0f}' for a in accs.values())} |"
        )  # fmt: skip
    bp = memory["bp"]
    lines += ["", f"BP through the whole network needs {format_bytes(bp['minimum_bytes'])} at batch {bp['batch']} "
              f"(its smallest, BatchNorm needing two samples).", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--data", default="cifar10_folder")
    parser.add_argument("--train-subset", type=int, default=2500)
    parser.add_argument("--val-subset", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--budget", default="600MB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "aux_head_cap")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = KNOWN_DATASETS[args.data]
    memory = minimum_budgets(args.model, info.num_classes, tuple(info.input_shape))
    runs = train(args)
    args.out.mkdir(parents=True, exist_ok=True)
    keep = ("train_seconds", "measured_peak_bytes", "exit_accuracies", "final_accuracy", "plan", "exit")
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "memory": memory,
              "runs": {name: {k: r.get(k) for k in keep} for name, r in runs.items()}}  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(record, indent=2))
    text = summary(args, memory, runs)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
