"""NeuroFlux on 1 and 2 processes over the same total data (issue 13).

Runs ``nf-train`` twice, side by side in one invocation: one process (``distributed=single``)
and two (``distributed=ddp trainer.devices=2``, Lightning's launcher starting the second), one
torch thread per process, the same data, budget per device and epochs. Prints and writes
``results/ddp_scaling/summary.{json,md}``: wall time, each rank's measured peak against the
budget, the final (best-exit) validation accuracy, and the samples DistributedSampler padded.

    NF_DATA_DIR=../shared/datasets python experiments/ddp_scaling.py    # about 5 minutes on 2 cores

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
          "data.val_subset=500", "budget=10MB", "epochs=3", "batch_limit=256", "seed=0",
          "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]  # fmt: skip
SETUPS = {"1 process": ["distributed=single"], "2 processes": ["distributed=ddp", "trainer.devices=2"]}


def run(name: str, extra: list[str]) -> dict:
    directory = WORK / name.replace(" ", "_")
    command = [str(Path(sys.executable).parent / "nf-train"), *COMMON, *extra, f"hydra.run.dir={directory}"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    results = json.loads((directory / "results.json").read_text())
    ranks = 2 if "ddp" in " ".join(extra) else 1
    train = results["data"]["train_subset"]
    return {
        "setup": name, "processes": ranks, "wall_seconds": wall, "train_seconds": results["train_seconds"],
        "final_accuracy": results["final_accuracy"], "budget_bytes": results["budget_bytes"],
        "peaks": results.get("measured_peak_bytes_per_rank") or [results["measured_peak_bytes"]],
        "batch_sizes": results["batch_sizes"], "padded_samples": ranks * math.ceil(train / ranks) - train,
        "exit_unit": (results.get("exit") or {}).get("unit"),
    }  # fmt: skip


def main() -> None:
    rows = [run(name, extra) for name, extra in SETUPS.items()]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps({"settings": COMMON, "rows": rows}, indent=2))
    lines = [
        "# NeuroFlux on 1 and 2 processes (same data, budget per device, one torch thread per process)", "",
        f"Settings: `{' '.join(COMMON)}`.", "",
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
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
