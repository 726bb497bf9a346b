"""NeuroFlux against plain backpropagation on torchvision's own networks, in a LightningModule users would write.

For each torchvision model (``mobilenet_v2(width_mult=0.5)``, ``resnet18()``)
and data set (the CIFAR-10 JPEG folder copy and the 100-class Tiny ImageNet
copy in ``../shared/datasets``, images at 32x32) it trains, from the same
initial weights (seed 0) on the same fixed, class-balanced subsets:

- **BP**: plain Lightning training of :class:`TorchvisionClassifier`, batch 128,
  a fixed number of epochs, cosine decay over them (the module's own
  ``configure_optimizers``, because it is given ``max_epochs``);
- **NeuroFlux**: the same module (given no ``max_epochs``, so its recipe has no
  scheduler and NeuroFlux's per-block cosine applies) under
  ``NeuroFluxStrategy(memory_budget=..., epochs_per_block=..., block_patience=2)``,
  every other option at its default.

The module below imports nothing from nf_lightning. Each row runs in its own
process with one torch thread, two at a time; a row with a saved result for
the same settings is skipped, so a killed run continues where it stopped.

It records every exit's validation accuracy, the selected exit's test accuracy
(the test split: CIFAR-10's 10,000 test images; Tiny ImageNet's official
validation images), BP's final validation and test accuracy, wall times,
chance (1/C), and the two acceptance checks of issue 10: no exit below twice
chance, and the best exit within 3 points of BP (on the test split; the
validation gap is reported too, but exits are selected on validation, so it
flatters NeuroFlux).

Usage::

    python experiments/torchvision_check.py                 # the default check
    python experiments/torchvision_check.py --preset quick  # a smoke run (a few minutes)

The default check took 69 min of row time (BP 30 epochs: 6-20 min a row; NeuroFlux 3-6 min
a row), about 35 min on two cores shared with other work. To measure a fixed commit while
others edit the checkout, run it against an exported copy:
``git archive <commit> | tar -x -C /tmp/snap`` then ``PYTHONPATH=/tmp/snap NF_CODE_COMMIT=<commit>``
(the summary records which nf_lightning the rows imported and its commit).

Writes ``experiments/results/torchvision_check/<preset>/summary.json`` and ``summary.md``
(the default preset straight into ``experiments/results/torchvision_check/``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
import torchvision
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "torchvision_check"

ACCEPT_GAP_POINTS = 3.0
"""The best exit must be within this many accuracy points of BP (issue 10)."""
CHANCE_FACTOR = 2.0
"""No exit may be below this multiple of chance (issue 10)."""


# --------------------------------------------------------------------------- the user's module
class TorchvisionClassifier(pl.LightningModule):
    """A torchvision classifier as people write one for Lightning (no nf_lightning import).

    SGD with Nesterov momentum 0.9, weight decay 5e-4, ``lr`` tuned for batch 128;
    cosine decay over ``max_epochs`` when it is given, a constant rate otherwise.
    """

    def __init__(self, arch: str, num_classes: int, width_mult: float = 1.0, lr: float = 0.05,
                 max_epochs: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        if arch == "mobilenet_v2":
            self.net = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult)
        elif arch == "resnet18":
            if width_mult != 1.0:
                raise ValueError("torchvision's resnet18 has no width_mult")
            self.net = torchvision.models.resnet18(num_classes=num_classes)
        else:
            raise ValueError(f"unknown arch {arch!r}")
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True,
                                    weight_decay=5e-4)
        if self.hparams.max_epochs is None:
            return optimizer
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}


# --------------------------------------------------------------------------- the rows
MODELS = {
    "resnet18": {"arch": "resnet18", "width_mult": 1.0, "budget": "100MB"},
    "mobilenet_v2": {"arch": "mobilenet_v2", "width_mult": 0.5, "budget": "30MB"},
}
"""torchvision's networks at full width for resnet18, 0.5 for mobilenet_v2, and NeuroFlux budgets that
give each four blocks on these data (``nf-plan`` shows them)."""
DATASETS = {
    "tiny_imagenet100": {"dataset": "tiny_imagenet", "train": 6000, "val": 1000},
    "cifar10": {"dataset": "cifar10_folder", "train": 4000, "val": 1000},
}
"""Class-balanced, seeded subsets of each data set's training and validation splits (the
validation split is held out of the official training set; Tiny ImageNet's copy has
9,000 + 1,000 such images in all). Rows run longest first, to share two cores evenly."""
PRESETS: dict[str, dict[str, Any]] = {
    # BP's epochs, NeuroFlux's horizon per block (block_patience=2 may end a block sooner)
    "default": {"bp_epochs": 30, "epochs_per_block": 6, "block_patience": 2, "polish_epochs": 12, "subset_scale": 1.0},
    "quick": {"bp_epochs": 2, "epochs_per_block": 2, "block_patience": 2, "polish_epochs": 1, "subset_scale": 0.1},
}


def make_rows(preset: dict[str, Any]) -> list[dict[str, Any]]:
    """BP and NeuroFlux for every model x data set, with the preset's epochs and subsets."""
    rows = []
    for data_key, data in DATASETS.items():
        for model_key, model in MODELS.items():
            base = {
                "model": model_key, "data": data_key, **model, **data,
                "train": max(1, round(data["train"] * preset["subset_scale"])),
                "val": max(1, round(data["val"] * preset["subset_scale"])),
            }
            rows.append({**base, "method": "bp", "name": f"{model_key} / {data_key} / BP",
                         "epochs": preset["bp_epochs"]})
            rows.append({**base, "method": "neuroflux", "name": f"{model_key} / {data_key} / NeuroFlux",
                         "options": {"epochs_per_block": preset["epochs_per_block"],
                                     "block_patience": preset["block_patience"]},
                         "polish_epochs": preset.get("polish_epochs", 0)})
    return rows


def row_key(row: dict[str, Any]) -> str:
    return re.sub(r"[^a-z0-9]+", "_", row["name"].lower()).strip("_")


# --------------------------------------------------------------------------- one row, in its own process
def worker(row: dict[str, Any], out: Path, data_dir: str, seed: int) -> dict[str, Any]:
    """Train and score one row (runs inside the row's own process)."""
    import warnings

    from nf_lightning import NeuroFluxStrategy, data
    from nf_lightning.core.exits.selection import loader_accuracy

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dm = data.create(row["dataset"], data_dir=data_dir, train_subset=row["train"], val_subset=row["val"],
                     batch_size=128, seed=seed)
    dm.prepare_data()
    dm.setup("fit")
    num_classes = dm.num_classes
    pl.seed_everything(seed)
    bp = row["method"] == "bp"
    module = TorchvisionClassifier(row["arch"], num_classes, width_mult=row["width_mult"],
                                   max_epochs=row["epochs"] if bp else None)
    curve: list[float] = []

    class ValCurve(pl.Callback):
        def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
                curve.append(round(float(trainer.callback_metrics["val_acc"]), 4))

    common = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
              "enable_model_summary": False, "num_sanity_val_steps": 0, "default_root_dir": str(out),
              "callbacks": [ValCurve()]}
    strategy = None
    if bp:
        trainer = pl.Trainer(max_epochs=row["epochs"], **common)
    else:
        strategy = NeuroFluxStrategy(memory_budget=row["budget"], cache_dir=out / "cache", **row["options"])
        trainer = pl.Trainer(strategy=strategy, **common)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    dm.setup("test")
    test_set = dm.test_dataset()
    if row.get("test_subset"):  # every k-th test image (for fast tests of this script only)
        step = max(1, len(test_set) // row["test_subset"])
        test_set = torch.utils.data.Subset(test_set, range(0, len(test_set), step)[: row["test_subset"]])
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=256, shuffle=False,
                                              collate_fn=dm.test_dataloader().collate_fn)
    start = time.perf_counter()
    tested = trainer.test(module, dataloaders=test_loader, verbose=False)
    test_seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "name": row["name"], "row": row, "seed": seed, "seconds": round(seconds, 1),
        "test_seconds": round(test_seconds, 1), "num_classes": num_classes, "chance": 1 / num_classes,
        "sizes": {"train": len(dm.train_dataset(augment=False)), "val": len(dm.val_dataset()),
                  "test": len(test_set)},
        "test": float(tested[0]["test_acc"]), "val_curve": curve,
        "parameters": sum(p.numel() for p in module.net.parameters()),
    }
    if bp:
        result["final_val"] = curve[-1]
        result["epochs"] = trainer.current_epoch
        return result
    assert strategy is not None and strategy.run is not None
    run = strategy.run
    exit_model = run.exit_model().eval()
    result.update({
        "exit_val": {str(unit): record.accuracy for unit, record in sorted(run.records.items())},
        "exit_parameters": {str(unit): record.parameters for unit, record in sorted(run.records.items())},
        "selected_unit": run.deploy_unit, "num_units": len(run.units),
        "test_exit_model": loader_accuracy(exit_model, test_loader),  # outside Lightning: agrees with test
        "blocks": [{"units": list(run.units_of(b)), "batch_size": run.batch_size_of(b), **ended}
                   for b, ended in zip(range(run.num_blocks), run.progress.ended_blocks)],
        "epochs": trainer.current_epoch,
    })
    result["best_val"] = max(result["exit_val"].values())
    if row.get("polish_epochs"):  # end-to-end BP on the deployed exit, under the same budget
        from nf_lightning.core.memory.budget import MemoryBudget
        from nf_lightning.lightning.polish import polish_exit

        polished, report = polish_exit(
            exit_model, dm, MemoryBudget.parse(row["budget"]), epochs=row["polish_epochs"], lr=module.hparams.lr,
            reference_batch=128, momentum=0.9, weight_decay=5e-4,  # the polish's recipe (nf-train's optim)
            trainer_options={"accelerator": "cpu", "enable_progress_bar": False, "default_root_dir": str(out)},
        )
        result.update(polish=report.to_dict(), test_blockwise=result["test"], seconds_blockwise=result["seconds"],
                      seconds=round(seconds + report.seconds, 1))
        if report.kept:
            result.update(test=loader_accuracy(polished, test_loader),
                          best_val=max(result["best_val"], report.val_after))
    return result


def run_row(row: dict[str, Any], out: Path, data_dir: str, seed: int) -> dict[str, Any]:
    """Train one row in a fresh process with one torch thread; its JSON result (or the error) comes back."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(row), "--out", str(out),
               "--data-dir", data_dir, "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    (out / "log.txt").write_text(done.stdout[-20000:] + "\n--- stderr ---\n" + done.stderr[-20000:])
    if done.returncode != 0:
        error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        return {"name": row["name"], "row": row, "error": error}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _brief(result: dict[str, Any]) -> str:
    return f"test {result['test']:.3f} in {result['seconds']:.0f} s"


def run_rows(rows: list[dict[str, Any]], root: Path, work: Path, data_dir: str, seed: int,
             parallel: int = 2) -> list[dict[str, Any]]:
    """Every row's result, from ``root/rows/<key>.json`` when saved with the same settings, else trained."""

    def one(row: dict[str, Any]) -> dict[str, Any]:
        saved = root / "rows" / f"{row_key(row)}.json"
        if saved.is_file():
            result = json.loads(saved.read_text())
            if result.get("row") == row and result.get("seed") == seed:
                return result
        result = run_row(row, work / row_key(row), data_dir, seed)
        if "error" not in result:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(result, indent=2))
        print(f"[torchvision_check] {row['name']}: "
              f"{result.get('error') or _brief(result)}", flush=True)
        return result

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, rows))


def exit_throughput(result: dict[str, Any], repeats: int = 30) -> dict[str, Any]:
    """Inference speed of a NeuroFlux row's deployed exit against its full network, batch 1 and 64, one thread.

    Speed depends on the operations, not on the weights' values, so the architecture
    is built afresh from the row (as ``compare.py`` and ``nf-throughput`` do).
    """
    from nf_lightning.core.network.decompose import decompose
    from nf_lightning.core.exits.selection import ExitModel
    from nf_lightning.core.exits.aux_heads import build_exits
    from nf_lightning.core.exits.throughput import compare_throughput
    from nf_lightning.data import KNOWN_DATASETS

    row = result["row"]
    net = TorchvisionClassifier(row["arch"], result["num_classes"], width_mult=row["width_mult"]).net.eval()
    input_shape = KNOWN_DATASETS[row["dataset"]].input_shape
    parts = decompose(net)
    exit_model = ExitModel(parts.units, build_exits(parts, input_shape, "adaptive"), result["selected_unit"])
    rows = compare_throughput(exit_model, net, input_shape, batch_sizes=(1, 64), warmup=5, repeats=repeats,
                              num_threads=1)  # fmt: skip
    return {"unit": result["selected_unit"], "rows": rows}


# --------------------------------------------------------------------------- the checks and the summary
def checks(bp: dict[str, Any], nf: dict[str, Any]) -> dict[str, Any]:
    """Issue 10's acceptance for one model x data set, from a BP and a NeuroFlux result.

    Gaps are in accuracy points, positive when NeuroFlux is below BP. The test gap
    (BP's test accuracy minus the selected exit's) decides; the validation gap (BP's
    final validation accuracy minus the best exit's) is reported alongside.
    """
    chance = nf["chance"]
    worst_unit, worst = min(nf["exit_val"].items(), key=lambda item: item[1])
    gap_test = 100 * (bp["test"] - nf["test"])
    gap_val = 100 * (bp["final_val"] - nf["best_val"])
    return {
        "chance": chance,
        "twice_chance": CHANCE_FACTOR * chance,
        "worst_exit_unit": int(worst_unit),
        "worst_exit_val": worst,
        "exits_below_twice_chance": sorted(int(u) for u, a in nf["exit_val"].items() if a < CHANCE_FACTOR * chance),
        "every_exit_above_twice_chance": worst >= CHANCE_FACTOR * chance,
        "gap_test_points": round(gap_test, 2),
        "gap_val_points": round(gap_val, 2),
        "best_exit_within_3_points": gap_test <= ACCEPT_GAP_POINTS,
    }


def summarize(results: list[dict[str, Any]], preset_name: str, preset: dict[str, Any], seed: int) -> dict[str, Any]:
    """Pair each model x data set's BP and NeuroFlux results and run the checks on each pair."""
    by_pair: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in results:
        by_pair.setdefault((r["row"]["model"], r["row"]["data"]), {})[r["row"]["method"]] = r
    pairs = []
    for (model, data), methods in by_pair.items():
        pair: dict[str, Any] = {"model": model, "data": data, "bp": methods.get("bp"),
                                "neuroflux": methods.get("neuroflux")}
        ok = all(m is not None and "error" not in m for m in (pair["bp"], pair["neuroflux"]))
        pair["checks"] = checks(pair["bp"], pair["neuroflux"]) if ok else None
        pairs.append(pair)
    complete = [p["checks"] for p in pairs if p["checks"] is not None]
    return {
        "preset": preset_name, "settings": preset, "seed": seed,
        "models": MODELS, "datasets": DATASETS,
        "total_row_seconds": round(sum(r.get("seconds", 0.0) + r.get("test_seconds", 0.0) for r in results), 1),
        "acceptance": {
            "pairs_complete": len(complete), "pairs": len(pairs),
            "every_exit_above_twice_chance": bool(complete)
            and all(c["every_exit_above_twice_chance"] for c in complete),
            "best_exit_within_3_points": bool(complete) and all(c["best_exit_within_3_points"] for c in complete),
        },
        "pairs": pairs,
    }


def _speed(throughput: dict[str, Any] | None) -> str:
    if not throughput:
        return ""
    rows = ", ".join(f"{r['speedup']:.1f}x at batch {r['batch_size']}" for r in throughput["rows"])
    return f"; inference against the full model: {rows}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    lines = [
        f"# torchvision check ({summary['preset']} preset, seed {summary['seed']})",
        "",
        f"BP: {s['bp_epochs']} epochs, batch 128, SGD nesterov lr 0.05, cosine over the epochs. "
        f"NeuroFlux: `NeuroFluxStrategy(memory_budget=<budget>, epochs_per_block={s['epochs_per_block']}, "
        f"block_patience={s['block_patience']})`, other options at defaults, the same module without a scheduler. "
        "One torch thread per run, two runs at a time on a shared 2-core machine (times include that contention). "
        "Accuracies in %; gaps in points (BP minus NeuroFlux). Exits are selected on validation; "
        "the test gap decides the check.",
        "",
        "Subsets (class-balanced, seed " + str(summary["seed"]) + "): "
        + "; ".join(f"{k}: {d['train']} train / {d['val']} val images (scaled by {s['subset_scale']}), full test split"
                    for k, d in summary["datasets"].items())
        + ". Budgets: " + ", ".join(f"{k} {m['budget']}" for k, m in summary["models"].items())
        + ". Code: " + str((summary.get("code") or {}).get("commit")) + ".",
        "",
        "| model | data (train/val/test, classes) | BP val | BP test | BP s | NeuroFlux exits val (unit: %) | "
        "worst exit | best exit val (unit) | its test | NF s | >= 2x chance | gap test | gap val | within 3 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in summary["pairs"]:
        bp, nf, c = p["bp"], p["neuroflux"], p["checks"]
        if c is None:
            errors = "; ".join(f"{m['name']}: {m.get('error', 'missing')}" for m in (bp, nf) if m and "error" in m)
            lines.append(f"| {p['model']} | {p['data']} | failed: {errors or 'missing row'} |" + " |" * 12)
            continue
        sizes = nf["sizes"]
        exits = ", ".join(f"{u}: {_pct(a)}" for u, a in nf["exit_val"].items())
        lines.append(
            f"| {p['model']} | {p['data']} ({sizes['train']}/{sizes['val']}/{sizes['test']}, {nf['num_classes']}) | "
            f"{_pct(bp['final_val'])} | {_pct(bp['test'])} | {bp['seconds']:.0f} | {exits} | "
            f"{_pct(c['worst_exit_val'])} (unit {c['worst_exit_unit']}; 2x chance {_pct(c['twice_chance'])}) | "
            f"{_pct(nf['best_val'])} ({nf['selected_unit']} of {nf['num_units'] - 1}) | {_pct(nf['test'])} | "
            f"{nf['seconds']:.0f} | {'yes' if c['every_exit_above_twice_chance'] else 'NO'} | "
            f"{c['gap_test_points']:+.1f} | {c['gap_val_points']:+.1f} | "
            f"{'yes' if c['best_exit_within_3_points'] else 'NO'} |"
        )
    lines += ["", "NeuroFlux blocks (units, batch, epochs run / horizon, why it ended):", ""]
    for p in summary["pairs"]:
        nf = p["neuroflux"]
        if nf and "blocks" in nf:
            blocks = "; ".join(
                f"{b['units'][0]}-{b['units'][-1]} @ {b['batch_size']}, {b['epochs']}/{b['horizon']} ({b['reason']})"
                for b in nf["blocks"]
            )
            lines.append(f"- {p['model']} / {p['data']} (budget {nf['row']['budget']}): {blocks}")
    polished = [p for p in summary["pairs"] if p["neuroflux"] and p["neuroflux"].get("polish")]
    if polished:
        lines += ["", f"Polish of the deployed exit ({s.get('polish_epochs')} epochs of end-to-end BP under the same "
                  "budget, `polish_exit`; its time is in NF s, its result is the NeuroFlux test when kept):", ""]
    for p in polished:
        nf, report = p["neuroflux"], p["neuroflux"]["polish"]
        lines.append(
            f"- {p['model']} / {p['data']}: unit {nf['selected_unit']} "
            f"({nf['exit_parameters'][str(nf['selected_unit'])]:,} of {nf['parameters']:,} parameters) at batch "
            f"{report['batch_size']}: validation {_pct(report['val_before'])} -> {_pct(report['val_after'])}, test "
            f"{_pct(nf['test_blockwise'])} -> {_pct(nf['test']) if report['kept'] else 'not kept'}, "
            f"{report['seconds']:.0f} s{_speed(nf.get('throughput'))}"
        )
    a = summary["acceptance"]
    lines += [
        "",
        f"Acceptance ({a['pairs_complete']} of {a['pairs']} pairs complete): every exit >= 2x chance: "
        f"{'yes' if a['every_exit_above_twice_chance'] else 'NO'}; best exit within 3 points of BP (test): "
        f"{'yes' if a['best_exit_within_3_points'] else 'NO'}. "
        f"Total training + test time over all rows: {summary['total_row_seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def code_version() -> dict[str, Any]:
    """Which nf_lightning the rows import (a snapshot on ``PYTHONPATH`` or the checkout), and its commit."""
    import nf_lightning

    root = Path(nf_lightning.__file__).resolve().parent.parent
    version: dict[str, Any] = {"nf_lightning": str(root), "commit": os.environ.get("NF_CODE_COMMIT")}
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                         capture_output=True, text=True)
    if git.returncode == 0 and Path(git.stdout.split()[0]).resolve() == root:
        version["commit"] = git.stdout.split()[1]
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "nf_lightning"],
                               capture_output=True, text=True).stdout.strip()
        version["uncommitted_changes_in_nf_lightning"] = bool(dirty)
    return version


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("NF_DATA_DIR", "../shared/datasets"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), Path(args.out), args.data_dir, args.seed)))
        return
    preset = PRESETS[args.preset]
    root = RESULTS if args.preset == "default" else RESULTS / args.preset
    work = Path(os.environ.get("NF_WORK_DIR", "/tmp/nf_torchvision_check")) / args.preset
    start = time.perf_counter()
    results = run_rows(make_rows(preset), root, work, args.data_dir, args.seed, args.parallel)
    torch.set_num_threads(1)
    for result in results:  # timed alone, after the rows, in this process
        if result["row"]["method"] == "neuroflux" and "error" not in result:
            result["throughput"] = exit_throughput(result)
    summary = summarize(results, args.preset, preset, args.seed)
    summary["wall_seconds_this_invocation"] = round(time.perf_counter() - start, 1)
    summary["code"] = code_version()
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    table = markdown(summary)
    (root / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
