"""Why the polish's first epoch loses validation accuracy (issue 21), on the benchmark's default CIFAR-10 setting.

One block-wise run (VGG-11 x0.25, 5,000 / 1,000 CIFAR-10 images, 9.76 MB, 10 epochs per block, the
rate 0.05 at batch 128), then polishes of its deployed exit with different rates and BatchNorm
treatments, the validation accuracy after every polish epoch, both as trained and after the exit's
BatchNorm statistics are re-estimated on 1,000 un-augmented training images (on a copy). Last, the
exit's statistics alone re-estimated on augmented and on un-augmented training images, weights
untouched.

    OMP_NUM_THREADS=1 NF_DATA_DIR=../shared/datasets python experiments/polish_drop.py [--seed 0]

Writes ``experiments/results/polish_drop/rows.jsonl`` and ``summary.md``; the block-wise exit is kept
in ``experiments/out/polish_drop/`` and reused. Accuracies only: timings here are not benchmark timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from nf_lightning import EarlyExitSelector, NeuroFluxStrategy
from nf_lightning.core.exits.selection import loader_accuracy
from nf_lightning.data.cifar_folder import CIFAR10FolderDataModule
from nf_lightning.lightning.classifier import ClassifierModule
from nf_lightning.lightning.polish import polish_exit
from nf_lightning.models import create

REPO = Path(__file__).resolve().parents[1]
BUDGET = "9.76MB"
VARIANTS = [  # (name, polish_exit settings, epochs)
    ("rate 1e-6, statistics follow the batches", {"lr": 1e-6}, 1),
    ("rate 1e-6, frozen statistics", {"lr": 1e-6, "batchnorm": "frozen"}, 1),
    ("rate 0.05", {"lr": 0.05}, 3),
    ("rate 0.05, frozen statistics", {"lr": 0.05, "batchnorm": "frozen"}, 3),
    ("rate 0.01", {"lr": 0.01}, 3),
    ("rate 0.01, frozen statistics", {"lr": 0.01, "batchnorm": "frozen"}, 3),
    ("rate 0.05, warm-up 0.3", {"lr": 0.05, "warmup": 0.3}, 3),
]


def recalibrated(model: nn.Module, loader: DataLoader) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are the plain averages over ``loader``."""
    model = copy.deepcopy(model)
    for norm in model.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.reset_running_stats()
            norm.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    return model.eval()


class Validations(pl.Callback):
    """Validation accuracy after every epoch, as trained and with statistics from ``clean`` (on a copy)."""

    def __init__(self, clean: DataLoader, val: DataLoader) -> None:
        self.clean, self.val, self.as_trained, self.recalibrated = clean, val, [], []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.as_trained.append(round(float(trainer.callback_metrics["val/acc"]), 4))
        net = pl_module.net
        self.recalibrated.append(round(loader_accuracy(recalibrated(net, self.clean), self.val), 4))
        net.train()


def blockwise_exit(dm: CIFAR10FolderDataModule, work: Path, seed: int) -> tuple[nn.Module, dict]:
    saved = work / f"exit_seed{seed}.pt"
    if saved.exists():
        return torch.load(saved, weights_only=False), json.loads(saved.with_suffix(".json").read_text())
    pl.seed_everything(seed)
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=10, lr_reference_batch=128,
                                 cache_dir=work / "cache")  # fmt: skip
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[EarlyExitSelector(export=False)], default_root_dir=work)  # fmt: skip
    trainer.fit(ClassifierModule(create("vgg11", num_classes=10, width_mult=0.25), 10), datamodule=dm)
    info = {"exits": {u: r.accuracy for u, r in strategy.run.records.items()}, "deployed": strategy.run.deploy_unit}
    torch.save(strategy.run.exit_model(), saved)
    saved.with_suffix(".json").write_text(json.dumps(info))
    return strategy.run.exit_model(), info


def _percents(values: list[float]) -> str:
    return ", ".join(f"{100 * v:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out, work = REPO / "experiments/results/polish_drop", REPO / "experiments/out/polish_drop"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    dm = CIFAR10FolderDataModule(os.environ["NF_DATA_DIR"], batch_size=128, train_subset=5000, val_subset=1000, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    exit_model, info = blockwise_exit(dm, work, args.seed)
    val = dm.val_dataloader()
    clean_set = dm.train_dataset(augment=False)
    clean = DataLoader(Subset(clean_set, range(0, len(clean_set), 5)), batch_size=100)  # 1,000 images
    rows = [{"variant": "block-wise exit", "unit": info["deployed"], "val": round(loader_accuracy(exit_model, val), 4)}]
    for name, loader in (("augmented", dm.train_dataloader()), ("un-augmented", DataLoader(clean_set, batch_size=23))):
        rows.append({"variant": f"statistics re-estimated on {name} training images, weights untouched",
                     "val": round(loader_accuracy(recalibrated(exit_model, loader), val), 4)})  # fmt: skip
    for name, settings, epochs in VARIANTS:
        pl.seed_everything(args.seed)
        seen = Validations(clean, val)
        _, report = polish_exit(exit_model, dm, BUDGET, epochs=epochs, callbacks=[seen],
                                trainer_options={"accelerator": "cpu", "enable_progress_bar": False}, **settings)  # fmt: skip
        rows.append({"variant": f"polish: {name}", "batch": report.batch_size, "per_epoch": seen.as_trained,
                     "per_epoch_recalibrated": seen.recalibrated})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    with open(out / "rows.jsonl", "a") as file:
        file.writelines(json.dumps({"seed": args.seed, **row}) + "\n" for row in rows)
    lines = [f"# The polish's first epoch (seed {args.seed})", "",
             f"Block-wise exits (validation): {json.dumps(info['exits'])}; deployed unit {info['deployed']}.", "",
             "| variant | validation % | after each polish epoch % | same, statistics re-estimated on 1,000 clean images % |",
             "| --- | ---: | --- | --- |"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['variant']} | {100 * row['val']:.1f} | - | - |" if "val" in row else
                     f"| {row['variant']} | - | {_percents(row['per_epoch'])} | {_percents(row['per_epoch_recalibrated'])} |")
    (out / f"summary_seed{args.seed}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
