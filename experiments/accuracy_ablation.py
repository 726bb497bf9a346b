"""What each change to NeuroFlux's recipe does to accuracy: one row per change, same data and seed.

Every row trains NeuroFlux (through ``NeuroFluxStrategy`` on the plain
``ClassifierModule``) with one set of strategy options, in its own process
with one torch thread, two rows at a time. It records the best exit's
validation accuracy (exits are chosen on validation), that exit's accuracy on
the data set's test split, every exit's accuracy, how each block ended, and
the wall time. Rows that already have a result are skipped, so a killed run
continues where it stopped.

Usage::

    NF_DATA_DIR=../shared/datasets python experiments/accuracy_ablation.py            # the VGG-11 rows
    NF_DATA_DIR=../shared/datasets python experiments/accuracy_ablation.py --suite mobilenet

Writes ``experiments/results/accuracy_ablation/<suite>/summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "accuracy_ablation"

VGG = {"model": "vgg11", "width": 0.25, "budget": "20MB", "train": 5000, "val": 1000}
MOBILENET = {"model": "tv_mobilenet_v2", "width": 0.5, "budget": "30MB", "train": 5000, "val": 1000}

SUITES: dict[str, list[dict[str, Any]]] = {
    "vgg11": [
        {"name": "constant lr, 5 epochs/block", **VGG, "options": {"epochs_per_block": 5, "lr_decay": "none"}},
        {"name": "cosine per block, 5 epochs/block", **VGG, "options": {"epochs_per_block": 5}},
        {"name": "+ feature flips and crops", **VGG, "options": {"epochs_per_block": 5, "feature_augment": "flip_crop"}},
        {"name": "+ image augmentation through frozen blocks (no cache)", **VGG,
         "options": {"epochs_per_block": 5, "cache": False}},
        {"name": "cosine per block, 10 epochs/block", **VGG, "options": {"epochs_per_block": 10}},
        {"name": "+ feature flips", **VGG, "options": {"epochs_per_block": 10, "feature_augment": "flip"}},
        {"name": "horizon 20, block patience 2", **VGG, "options": {"epochs_per_block": 20, "block_patience": 2}},
    ],
    "memorization": [  # each exit's accuracy on the training images too: do cached blocks memorize their cache?
        {"name": "cosine per block, 10 epochs/block", **VGG, "options": {"epochs_per_block": 10}},
        {"name": "+ image augmentation through frozen blocks (no cache)", **VGG,
         "options": {"epochs_per_block": 10, "cache": False}},
    ],
    "mobilenet": [
        {"name": "constant lr, 2 epochs/block (the reported collapse)", **MOBILENET,
         "options": {"epochs_per_block": 2, "lr_decay": "none"}},
        {"name": "cosine per block, 5 epochs/block", **MOBILENET, "options": {"epochs_per_block": 5}},
        {"name": "+ at least 200 steps per block", **MOBILENET,
         "options": {"epochs_per_block": 5, "min_steps_per_block": 200}},
        {"name": "horizon 20, block patience 2", **MOBILENET, "options": {"epochs_per_block": 20, "block_patience": 2}},
    ],
}


def run_row(row: dict[str, Any], out: Path, data_dir: str, seed: int) -> dict[str, Any]:
    """Train one row in a fresh process; its JSON result (or the error) comes back."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(Path(__file__)), "--worker", json.dumps(row), "--out", str(out),
               "--data-dir", data_dir, "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    (out / "log.txt").write_text(done.stdout[-20000:] + "\n--- stderr ---\n" + done.stderr[-20000:])
    if done.returncode != 0:
        return {"name": row["name"], "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(row: dict[str, Any], out: Path, data_dir: str, seed: int) -> dict[str, Any]:
    """The training itself (runs inside the row's own process)."""
    import warnings

    import lightning.pytorch as pl
    import torch
    import torchvision

    from nf_lightning import NeuroFluxStrategy, data, models
    from nf_lightning.core.exits.selection import loader_accuracy
    from nf_lightning.lightning.classifier import ClassifierModule

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(seed)
    dm = data.create("cifar10_folder", data_dir=data_dir, train_subset=row["train"], val_subset=row["val"],
                     batch_size=128, seed=seed)
    dm.prepare_data()
    dm.setup("fit")
    if row["model"].startswith("tv_"):
        net = getattr(torchvision.models, row["model"][3:])(num_classes=dm.num_classes, width_mult=row["width"])
    else:
        net = models.create(row["model"], num_classes=dm.num_classes, width_mult=row["width"])
    strategy = NeuroFluxStrategy(memory_budget=row["budget"], cache_dir=out / "cache", **row["options"])
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=out)
    start = time.perf_counter()
    trainer.fit(ClassifierModule(net, dm.num_classes), datamodule=dm)
    seconds = time.perf_counter() - start
    run = strategy.run
    model = run.exit_model().eval()
    dm.setup("test")
    test = loader_accuracy(model, dm.test_dataloader())
    accuracies = {unit: record.accuracy for unit, record in sorted(run.records.items())}
    plain = torch.utils.data.DataLoader(dm.train_dataset(augment=False), batch_size=256)
    train_accuracies = {unit: loader_accuracy(run.exit_model(unit).eval(), plain) for unit in sorted(run.records)}
    return {
        "name": row["name"], "row": row, "seed": seed, "seconds": round(seconds, 1),
        "best_val": max(accuracies.values()), "selected_unit": run.deploy_unit, "test": test,
        "exit_val": accuracies, "exit_train": train_accuracies, "blocks": run.progress.ended_blocks,
        "batch_sizes": [run.batch_size_of(b) for b in range(run.num_blocks)],
        "block_units": [list(run.units_of(b)) for b in range(run.num_blocks)],
        "chance": 1 / dm.num_classes,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| row | best exit val | its test acc | worst exit val | epochs per block | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | |")
            continue
        epochs = ", ".join(str(b["epochs"]) for b in r["blocks"])
        lines.append(
            f"| {r['name']} | {r['best_val']:.1%} (unit {r['selected_unit']}) | {r['test']:.1%} | "
            f"{min(r['exit_val'].values()):.1%} | {epochs} | {r['seconds']:.0f} |"
        )
    fits = [r for r in results if r.get("exit_train")]
    if fits:
        lines += ["", "Each exit's accuracy, validation / un-augmented training images (%), and its block:", ""]
    for r in fits:
        block_of = {u: b for b, units in enumerate(r.get("block_units", [])) for u in units}
        exits = ", ".join(
            f"{u}: {100 * r['exit_val'][u]:.0f}/{100 * r['exit_train'][u]:.0f}"
            + (f" (block {block_of[int(u)]})" if int(u) in block_of else "")
            for u in r["exit_val"]
        )
        lines.append(f"- {r['name']}: {exits}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="vgg11")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("NF_DATA_DIR", "../shared/datasets"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), Path(args.out), args.data_dir, args.seed)))
        return
    root = RESULTS / args.suite
    rows = SUITES[args.suite]
    work = Path(os.environ.get("NF_WORK_DIR", "/tmp/nf_accuracy_ablation")) / args.suite

    def one(index: int) -> dict[str, Any]:
        saved = root / "rows" / f"{index}.json"
        if saved.is_file():
            return json.loads(saved.read_text())
        result = run_row(rows[index], work / str(index), args.data_dir, args.seed)
        if "error" not in result:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(result, indent=2))
        print(f"[ablation] {rows[index]['name']}: {result.get('best_val', result.get('error'))}", flush=True)
        return result

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(one, range(len(rows))))
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps({"suite": args.suite, "seed": args.seed, "rows": results}, indent=2))
    table = markdown(results)
    (root / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
