"""NeuroFlux on 1 and 2 processes over the same total data (issue 13).

Runs ``nf-train`` twice, side by side in one invocation: one process (``distributed=single``)
and two (``distributed=ddp trainer.devices=2``, Lightning's launcher starting the second), one
torch thread per process, the same data, budget per device and epochs. Prints and writes
``results/ddp_scaling/summary.{json,md}``: wall time, each rank's measured peak against the
budget, the final (best-exit) validation accuracy, and the samples DistributedSampler padded.

    NF_DATA_DIR=../shared/datasets python experiments/ddp_scaling.py    # about 5 minutes on 2 cores
    python experiments/ddp_scaling.py --estimate    # scaling on paper: VGG-16, all-reduce against compute
    NF_DATA_DIR=../shared/datasets python experiments/ddp_scaling.py --same-global-batch
        # 1 process at batch 128 against 2 at 64 each (same global batch and schedule): accuracy only

On a machine with 2 cores the two processes share the cores the single process has to
itself, so the wall time shows the cost of the collectives and of sharing, not a speed-up;
the accuracy and memory columns are what this machine can check.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "ddp_scaling"
WORK = Path(__file__).resolve().parent / "out" / "ddp_scaling"
COMMON = ["method=neuroflux", "model=vgg11", "model.width_mult=0.25", "data=cifar10_folder", "data.train_subset=2000",
          "data.val_subset=500", "epochs=3", "seed=0", "trainer.accelerator=cpu",
          "trainer.enable_progress_bar=false"]  # fmt: skip
SETUPS = {  # the same budget per device: 2 processes train on twice the global batch
    "1 process": ["distributed=single", "budget=10MB", "batch_limit=256"],
    "2 processes": ["distributed=ddp", "trainer.devices=2", "budget=10MB", "batch_limit=256"],
}
SAME_GLOBAL_BATCH = {  # --same-global-batch: a budget no block reaches, blocks at 128 in all or 64 per process
    "1 process, batch 128": ["distributed=single", "budget=1GB", "batch_limit=128", "optim.reference_batch=128"],
    "2 processes, batch 64 each": ["distributed=ddp", "trainer.devices=2", "budget=1GB", "batch_limit=64",
                                   "optim.reference_batch=64"],
}  # fmt: skip


def run(name: str, extra: list[str]) -> dict:
    directory = WORK / "".join(c if c.isalnum() else "_" for c in name)
    command = [str(Path(sys.executable).parent / "nf-train"), *COMMON, *extra, f"hydra.run.dir={directory}"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    results = json.loads((directory / "results.json").read_text())
    ranks = 2 if "distributed=ddp" in extra else 1
    train = results["data"]["train_subset"]
    return {
        "setup": name, "processes": ranks, "wall_seconds": wall, "train_seconds": results["train_seconds"],
        "final_accuracy": results["final_accuracy"], "budget_bytes": results["budget_bytes"],
        "peaks": results.get("measured_peak_bytes_per_rank") or [results["measured_peak_bytes"]],
        "batch_sizes": results["batch_sizes"], "padded_samples": ranks * math.ceil(train / ranks) - train,
        "exit_unit": (results.get("exit") or {}).get("unit"),
    }  # fmt: skip


def main(same_global_batch: bool = False) -> None:
    setups = SAME_GLOBAL_BATCH if same_global_batch else SETUPS
    rows = [run(name, extra) for name, extra in setups.items()]
    name = "same_global_batch" if same_global_batch else "summary"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps({"settings": COMMON, "setups": setups, "rows": rows}, indent=2))
    lines = [
        "# NeuroFlux on 1 and 2 processes (same data, budget per device, one torch thread per process)", "",
        f"Settings: `{' '.join(COMMON)}`, then per setup: "
        + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in setups.items()) + ".", "",
        "| setup | wall s | train s | per-rank peak MB (budget) | block batch sizes per rank | padded samples | "
        "best-exit val acc % |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        peaks = ", ".join(f"{p / 1e6:.2f}" for p in r["peaks"])
        lines.append(
            f"| {r['setup']} | {r['wall_seconds']:.0f} | {r['train_seconds']:.0f} | {peaks} ({r['budget_bytes'] / 1e6:.1f}) "
            f"| {r['batch_sizes']} | {r['padded_samples']} | {100 * r['final_accuracy']:.1f} |"
        )
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))



def estimate(budget: str = "300MB", flops_per_second: float = 20e12) -> str:
    """Scaling on paper for VGG-16 at full width on 32x32 inputs under ``budget`` per device.

    Per block of NeuroFlux's plan: the bytes each step all-reduces (the active block's units and
    exits, fp32 gradients; a ring all-reduce moves 2 (N-1)/N times that per rank) against the
    step's compute (forward and backward of the block at its batch, counted by torch's FLOP
    counter, at ``flops_per_second``), on a 10 GbE link (1.25 GB/s) and an NVLink (300 GB/s).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nf_lightning.core.memory.budget import MemoryBudget
    from nf_lightning.core.network.decompose import decompose
    from nf_lightning.core.options import NeuroFluxOptions
    from nf_lightning.core.train.run import BlockwiseRun
    from nf_lightning.models import create

    net = create("vgg16", num_classes=10, width_mult=1.0)
    recipe = lambda: (torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), [])  # noqa: E731
    run = BlockwiseRun.create(decompose(net), recipe, (3, 32, 32), MemoryBudget.parse(budget),
                              NeuroFluxOptions(epochs_per_block=1, cache=False))
    links = {"10 GbE": 1.25e9, "NVLink": 300e9}
    lines = [
        f"VGG-16 (width 1.0, 32x32) under {budget} per device, 2 ranks; compute at {flops_per_second / 1e12:.0f} "
        "TFLOP/s; ring all-reduce moves 2(N-1)/N x the gradient bytes per rank.", "",
        "| block | units | batch | gradient MB per step | GFLOP per step | compute ms | all-reduce ms 10 GbE | "
        "all-reduce ms NVLink | comm/compute 10 GbE | comm/compute NVLink |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    h = torch.randn(1, 3, 32, 32)
    for index, block in enumerate(run.plan.blocks):
        batch = run.plan.batch_size(index)
        params = sum(p.numel() for u in block.units for m in (run.units[u], run.exits[u]) for p in m.parameters())
        x = h.expand(batch, *h.shape[1:]).clone().requires_grad_(False)
        flops = 0
        for u in block.units:
            with FlopCounterMode(display=False) as counter:
                out = run.units[u](x)
                run.exits[u](out).sum().backward()
            flops += counter.get_total_flops()
            x = out.detach()
        h = x[:1]
        grad_bytes = 4 * params
        compute = flops / flops_per_second
        comm = {k: 2 * (2 - 1) / 2 * grad_bytes / bw for k, bw in links.items()}
        lines.append(
            f"| {index} | {block.units[0]}-{block.units[-1]} | {batch} | {grad_bytes / 1e6:.1f} | {flops / 1e9:.0f} | "
            f"{1e3 * compute:.1f} | {1e3 * comm['10 GbE']:.1f} | {1e3 * comm['NVLink']:.2f} | "
            f"{comm['10 GbE'] / compute:.2f} | {comm['NVLink'] / compute:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if "--estimate" in sys.argv:
        print(estimate())
    else:
        main(same_global_batch="--same-global-batch" in sys.argv)
