"""What holding NeuroFlux's steps to the budget costs: metering every step, sampling, and (almost) none.

The same NeuroFlux run under each setting (VGG-11 x0.25, CIFAR-10 subset, 20 MB,
one torch thread, one run at a time, the settings interleaved and repeated),
differing only in how often a step is metered (``meter_full_steps``,
``meter_sample_every``). It reports the median time spent inside the training
steps (``run.seconds["train"]``) and the overhead of each setting against the one
that meters only the first batch of each block. Run-to-run noise on a shared
machine is several percent: read the repeats in the JSON too.

Usage::

    NF_DATA_DIR=../shared/datasets python experiments/enforcement_overhead.py

Writes ``experiments/results/enforcement_overhead/summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "enforcement_overhead"
SETTINGS = {
    "every step": {"meter_full_steps": 10**9, "meter_sample_every": 1},
    "first 20, then 1 in 10": {"meter_full_steps": 20, "meter_sample_every": 10},
    "default (first 5, then 1 in 20)": {"meter_full_steps": 5, "meter_sample_every": 20},
    "first batch of each block only": {"meter_full_steps": 1, "meter_sample_every": 10**9},
}


def worker(options: dict[str, Any], data_dir: str, train: int, out: Path) -> dict[str, Any]:
    import warnings

    import lightning.pytorch as pl
    import torch

    from nf_lightning import NeuroFluxStrategy, data, models
    from nf_lightning.lightning.classifier import ClassifierModule

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0)
    dm = data.create("cifar10_folder", data_dir=data_dir, train_subset=train, val_subset=500, batch_size=128)
    strategy = NeuroFluxStrategy(memory_budget="20MB", epochs_per_block=2, block_patience=None,
                                 cache_dir=out / "cache", **options)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=out)
    trainer.fit(ClassifierModule(models.create("vgg11", width_mult=0.25), 10), datamodule=dm)
    run = strategy.run
    return {"train_seconds": run.seconds["train"], "steps": sum(b["steps"] for b in run.progress.ended_blocks),
            **run.step.guard.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("NF_DATA_DIR", "../shared/datasets"))
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args.data_dir, args.train, Path(args.out))))
        return
    rows: dict[str, dict[str, Any]] = {name: {**options, "repeats": []} for name, options in SETTINGS.items()}
    for repeat in range(args.repeats):
        for index, (name, options) in enumerate(SETTINGS.items()):
            out = Path(os.environ.get("NF_WORK_DIR", "/tmp/nf_enforcement")) / f"{index}-{repeat}"
            command = [sys.executable, __file__, "--worker", json.dumps(options), "--out", str(out),
                       "--data-dir", args.data_dir, "--train", str(args.train)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            rows[name]["repeats"].append(measured["train_seconds"])
            rows[name].update({k: v for k, v in measured.items() if k != "train_seconds"})
            print(f"[overhead] {name} #{repeat}: {measured['train_seconds']:.1f} s in training steps", flush=True)
    for row in rows.values():
        row["train_seconds"] = statistics.median(row["repeats"])
    base = rows["first batch of each block only"]["train_seconds"]
    lines = ["| metering | metered / unmetered steps | median seconds in training steps (repeats) | overhead |",
             "| --- | --- | --- | --- |"]
    for name, row in rows.items():
        row["overhead"] = row["train_seconds"] / base - 1
        repeats = ", ".join(f"{t:.1f}" for t in row["repeats"])
        lines.append(f"| {name} | {row['metered_steps']} / {row['unmetered_steps']} | {row['train_seconds']:.1f} "
                     f"({repeats}) | {row['overhead']:+.1%} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps({"train_images": args.train, "rows": rows}, indent=2))
    table = "\n".join(lines) + "\n"
    (RESULTS / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
