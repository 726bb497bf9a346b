"""Budgeted neuron updates (arXiv 2312.05282) at our scale: velocity, random, Sparse Update and full fine-tuning.

A zoo model (ResNet-18 and MobileNetV2 at narrow widths) is pretrained on
CIFAR-10 classes 0-4 (airplane ... deer), then fine-tuned on classes 5-9
(dog ... truck) with a new head, updating about 10 %, 20 % and 30 % of its conv
parameters with :class:`nf_lightning.neuron_budget.callback.NeuronUpdateBudget`
(velocity, random, Sparse Update) or everything (full), several seeds each.
Every run is a real Lightning ``Trainer.fit`` on the CPU with one torch thread.

It writes, under ``experiments/results/neuron_budget/<preset>/``:

- ``rows/*.json``: one file per fine-tuning run (test accuracy on the held-out
  CIFAR-10 test images of classes 5-9, validation accuracy per epoch, the
  selection per epoch, seconds per step) and per cost run (peak memory of one
  training step measured by the project's tracked meter, and seconds per step,
  for both ``norm="always"`` and ``norm="range"``);
- ``summary.json`` and ``summary.md`` (mean and spread over seeds, the memory
  and time table), and ``accuracy_vs_budget.png`` when matplotlib is installed.

Rows that exist are skipped, so a killed run continues where it stopped. The
pretrained weights are kept in ``outputs/neuron_budget/<preset>/`` (not committed).

Usage::

    NF_DATA_DIR=../shared/datasets python experiments/neuron_budget.py --preset quick     # about 2 minutes
    NF_DATA_DIR=../shared/datasets python experiments/neuron_budget.py --jobs 2           # the full grid

See ``experiments/NEURON_BUDGET.md`` for the setup and what compares with the paper.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from nf_lightning.core.exits import loader_accuracy  # noqa: E402

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
RESULTS = HERE / "results" / "neuron_budget"
WORK = PROJECT / "outputs" / "neuron_budget"
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)


@dataclass(frozen=True)
class Preset:
    models: tuple[tuple[str, float], ...]
    policies: tuple[str, ...]
    budgets: tuple[float, ...]
    seeds: tuple[int, ...]
    pretrain_per_class: int
    pretrain_epochs: int
    finetune_per_class: int
    finetune_epochs: int
    val_per_class: int
    test_per_class: int
    probe_size: int
    batch: int = 64
    pretrain_lr: float = 0.05
    finetune_lr: float = 0.01
    cost_batches: int = 4
    first_epoch: str = "sparse_update"
    norms: tuple[str, ...] = ("always", "range")
    cost_budgets: tuple[float, ...] | None = None  # budgets of the cost runs (all of ``budgets`` if None)
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    # about 2 minutes on one core: the whole pipeline, tiny data, one seed, two budgets
    "quick": Preset(
        models=(("resnet18", 0.125), ("mobilenetv2", 0.25)),
        policies=("velocity", "random", "sparse_update", "full"),
        budgets=(0.1, 0.3),
        seeds=(0,),
        pretrain_per_class=100,
        pretrain_epochs=2,
        finetune_per_class=40,
        finetune_epochs=3,
        val_per_class=20,
        test_per_class=40,
        probe_size=32,
        cost_batches=2,
        cost_budgets=(0.1,),
    ),
    # about an hour with --jobs 2 on two cores (see NEURON_BUDGET.md for the estimate)
    "full": Preset(
        models=(("resnet18", 0.125), ("mobilenetv2", 0.25)),
        policies=("velocity", "random", "sparse_update", "full"),
        budgets=(0.1, 0.2, 0.3),
        seeds=(0, 1, 2),
        pretrain_per_class=1000,
        pretrain_epochs=8,
        finetune_per_class=200,
        finetune_epochs=8,
        val_per_class=100,
        test_per_class=200,
        probe_size=250,  # 1 % of the 25,000 training images of classes 5-9, from the validation split
    ),
}


# ---------------------------------------------------------------- data
class ClassSubset(torch.utils.data.Dataset):
    """Rows of an ``ImageTensorDataset`` of some classes, labels shifted to start at 0."""

    def __init__(self, base: Any, positions: torch.Tensor, offset: int) -> None:
        self.base, self.positions, self.offset = base, positions, offset

    def __len__(self) -> int:
        return len(self.positions)

    def __getitems__(self, indices: Any) -> Any:
        from nf_lightning.data.tensor_dataset import ImageBatch

        batch = self.base.__getitems__(self.positions[torch.as_tensor(indices, dtype=torch.int64)])
        return ImageBatch(batch.images, batch.labels - self.offset)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]


def class_subset(base: Any, classes: tuple[int, ...], per_class: int, seed: int = 0) -> ClassSubset:
    """``per_class`` seeded rows of each class of ``classes`` (the same rows for every run)."""
    labels = base.labels
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:
        rows = (labels == c).nonzero().flatten()
        if len(rows) < per_class:
            raise ValueError(f"class {c} has {len(rows)} images, fewer than {per_class}")
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    return ClassSubset(base, torch.cat(chosen).sort().values, offset=min(classes))


def datasets(preset: Preset, data_dir: str | None, phase: str) -> dict[str, ClassSubset]:
    from nf_lightning.data import CIFAR10FolderDataModule

    dm = CIFAR10FolderDataModule(data_dir)
    dm.setup()
    classes = PRETRAIN_CLASSES if phase == "pretrain" else FINETUNE_CLASSES
    per_class = preset.pretrain_per_class if phase == "pretrain" else preset.finetune_per_class
    return {
        "train": class_subset(dm.train_dataset(augment=True), classes, per_class),
        "val": class_subset(dm.val_dataset(), classes, preset.val_per_class),
        "test": class_subset(dm.test_dataset(), classes, preset.test_per_class),
    }


def loader(dataset: ClassSubset, batch: int, shuffle: bool) -> torch.utils.data.DataLoader:
    from nf_lightning.data.tensor_dataset import collate_batch

    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=shuffle, collate_fn=collate_batch)


# ---------------------------------------------------------------- training
def make_module(net: torch.nn.Module, lr: float, epochs: int) -> Any:
    import lightning.pytorch as pl
    import torch.nn.functional as F

    class Classifier(pl.LightningModule):
        """SGD (momentum 0.9, weight decay 5e-4) with a cosine schedule over the run."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val/acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
            steps = max(1, int(self.trainer.estimated_stepping_batches))
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return Classifier()


def trainer(epochs: int, callbacks: list, **kwargs: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def accuracy(net: torch.nn.Module, dataset: ClassSubset) -> float:
    return loader_accuracy(net.eval(), loader(dataset, 256, shuffle=False))


def new_head(net: torch.nn.Module, seed: int) -> None:
    """A fresh classifier for the new classes (the last Linear), drawn from ``seed``."""
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head.reset_parameters()


class StepCost:
    """Seconds per training step (forward, backward, update) and the measured peak of metered steps."""

    def __new__(cls, meter_epoch: int | None = None, meter_batches: int = 1) -> Any:
        import lightning.pytorch as pl

        from nf_lightning.core.memory import meter_for

        class _StepCost(pl.Callback):
            def __init__(self) -> None:
                self.seconds: list[float] = []
                self.peak_bytes = 0
                self._meter: Any = None
                self._start = 0.0

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if trainer.current_epoch == meter_epoch and batch_idx < meter_batches:
                    self._meter = meter_for(trainer.strategy.root_device)
                    self._meter.track(pl_module, *trainer.optimizers)
                    self._meter.__enter__()
                self._start = time.perf_counter()

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                elapsed = time.perf_counter() - self._start
                if self._meter is not None:
                    self._meter.__exit__(None, None, None)
                    self.peak_bytes = max(self.peak_bytes, self._meter.peak_bytes)
                    self._meter = None
                elif meter_epoch is None or trainer.current_epoch == meter_epoch:
                    self.seconds.append(elapsed)

        return _StepCost()


def pretrain(task: dict[str, Any]) -> dict[str, Any]:
    """Train the model on classes 0-4 from scratch; save its weights."""
    _threads()
    import lightning.pytorch as pl

    from nf_lightning.models import create

    preset, path = PRESETS[task["preset"]], Path(task["path"])
    if path.exists():
        return {"path": str(path), "skipped": True}
    pl.seed_everything(0, workers=True)
    data = datasets(preset, task["data_dir"], "pretrain")
    net = create(task["model"], num_classes=len(PRETRAIN_CLASSES), width_mult=task["width"])
    start = time.perf_counter()
    fit = trainer(preset.pretrain_epochs, [], limit_val_batches=0)
    fit.fit(make_module(net, preset.pretrain_lr, preset.pretrain_epochs), loader(data["train"], preset.batch, True))
    result = {"model": task["model"], "width": task["width"], "test_acc_classes_0_4": accuracy(net, data["test"]),
              "seconds": time.perf_counter() - start}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return result


def finetune(task: dict[str, Any]) -> dict[str, Any]:
    """One fine-tuning run on classes 5-9 (``task["kind"] == "accuracy"``) or one cost run (``"cost"``)."""
    _threads()
    import lightning.pytorch as pl

    from nf_lightning.neuron_budget.callback import NeuronUpdateBudget
    from nf_lightning.models import create

    preset = PRESETS[task["preset"]]
    out = Path(task["out"])
    if out.exists():
        return json.loads(out.read_text())
    pl.seed_everything(task["seed"], workers=True)
    data = datasets(preset, task["data_dir"], "finetune")
    net = create(task["model"], num_classes=len(FINETUNE_CLASSES), width_mult=task["width"])
    net.load_state_dict(torch.load(task["pretrained"], map_location="cpu", weights_only=True))
    new_head(net, task["seed"])
    cost = task["kind"] == "cost"
    budget = None
    callbacks: list[Any] = []
    if task["policy"] != "full":
        budget = NeuronUpdateBudget(
            task["policy"], task["budget"], first_epoch=preset.first_epoch, probe_size=preset.probe_size,
            norm=task["norm"], seed=task["seed"], log_layers=False,
        )
        callbacks.append(budget)
    # cost runs: epoch 0 with the first selection, epoch 1 with the policy's own; meter its first step
    steps = StepCost(meter_epoch=1 if cost else None)
    val_accs: list[float] = []
    callbacks += [steps, ValAcc(val_accs)]
    epochs = 2 if cost else preset.finetune_epochs
    extra = {"limit_train_batches": preset.cost_batches + 1, "limit_val_batches": 1} if cost else {}
    fit = trainer(epochs, callbacks, **extra)
    module = make_module(net, preset.finetune_lr, epochs)
    start = time.perf_counter()
    fit.fit(module, loader(data["train"], preset.batch, True), loader(data["val"], preset.batch, False))
    seconds = time.perf_counter() - start
    history = budget.history if budget is not None else []
    total = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    row = {
        **{k: task[k] for k in ("kind", "model", "width", "policy", "budget", "seed", "norm")},
        "step_seconds": statistics.mean(steps.seconds) if steps.seconds else None,
        "steps_timed": len(steps.seconds),
        "train_seconds": seconds,
        "conv_params": total,
        "updated_fraction": [h["updated_fraction"] for h in history] or [1.0] * epochs,
        "selected_by": [h["policy"] for h in history] or ["full"] * epochs,
        "frozen_layers": [h["frozen_layers"] for h in history] or [0] * epochs,
        "velocity_bytes": max((h["velocity_bytes"] for h in history), default=0),
    }
    if cost:
        row["peak_bytes"] = steps.peak_bytes
    else:
        row["val_acc"] = val_accs
        row["test_acc"] = accuracy(net, data["test"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    return row


class ValAcc:
    def __new__(cls, sink: list[float]) -> Any:
        import lightning.pytorch as pl

        class _ValAcc(pl.Callback):
            def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                if "val/acc" in trainer.callback_metrics:
                    sink.append(float(trainer.callback_metrics["val/acc"]))

        return _ValAcc()


def _threads() -> None:
    torch.set_num_threads(1)
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


# ---------------------------------------------------------------- the grid
def tasks(preset_name: str, data_dir: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    preset = PRESETS[preset_name]
    rows = RESULTS / preset_name / "rows"
    pre, fine = [], []
    for model, width in preset.models:
        weights = WORK / preset_name / f"{model}_w{width}.pt"
        pre.append({"preset": preset_name, "model": model, "width": width, "path": str(weights), "data_dir": data_dir})
        base = {"preset": preset_name, "model": model, "width": width, "pretrained": str(weights), "data_dir": data_dir}
        grid = [("full", 1.0)] + [(p, b) for p in preset.policies if p != "full" for b in preset.budgets]
        for seed in preset.seeds:
            for policy, budget in grid:
                name = f"acc_{model}_w{width}_{policy}_{budget}_s{seed}.json"
                fine.append({**base, "kind": "accuracy", "policy": policy, "budget": budget, "seed": seed,
                             "norm": "always", "out": str(rows / name)})
        cost_grid = [("full", 1.0)] + [
            (p, b) for p in preset.policies if p != "full" for b in (preset.cost_budgets or preset.budgets)
        ]
        for norm in preset.norms:
            for policy, budget in cost_grid:
                if policy == "full" and norm != preset.norms[0]:
                    continue
                name = f"cost_{model}_w{width}_{policy}_{budget}_{norm}.json"
                fine.append({**base, "kind": "cost", "policy": policy, "budget": budget, "seed": 0, "norm": norm,
                             "out": str(rows / name)})
    return pre, fine


def run_all(preset_name: str, data_dir: str | None, jobs: int) -> None:
    pre, fine = tasks(preset_name, data_dir)
    start = time.perf_counter()
    if jobs <= 1:
        for task in pre:
            print("pretrain", task["model"], pretrain(task), flush=True)
        for i, task in enumerate(fine):
            row = finetune(task)
            print(f"[{i + 1}/{len(fine)}] {_label(task)}: {_brief(row)}", flush=True)
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            for task, result in zip(pre, pool.map(pretrain, pre)):
                print("pretrain", task["model"], result, flush=True)
            for i, (task, row) in enumerate(zip(fine, pool.map(finetune, fine))):
                print(f"[{i + 1}/{len(fine)}] {_label(task)}: {_brief(row)}", flush=True)
    summarize(preset_name, time.perf_counter() - start)


def _label(task: dict[str, Any]) -> str:
    return f"{task['kind']} {task['model']} {task['policy']} {task['budget']} s{task['seed']} {task['norm']}"


def _brief(row: dict[str, Any]) -> str:
    if row["kind"] == "cost":
        return f"peak {row['peak_bytes'] / 1e6:.2f} MB, {row['step_seconds'] * 1e3:.0f} ms/step"
    return f"test {row['test_acc']:.3f}, {row['train_seconds']:.0f} s"


# ---------------------------------------------------------------- summary
def summarize(preset_name: str, wall_seconds: float | None = None) -> dict[str, Any]:
    folder = RESULTS / preset_name
    rows = [json.loads(p.read_text()) for p in sorted((folder / "rows").glob("*.json"))]
    acc = [r for r in rows if r["kind"] == "accuracy"]
    cost = [r for r in rows if r["kind"] == "cost"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in acc:
        groups.setdefault((r["model"], r["width"], r["policy"], r["budget"]), []).append(r)
    table = []
    for (model, width, policy, budget), runs in sorted(groups.items()):
        tests = [r["test_acc"] for r in runs]
        table.append({
            "model": model, "width": width, "policy": policy, "budget": budget, "seeds": len(runs),
            "test_acc_mean": statistics.mean(tests), "test_acc_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "test_acc_min": min(tests), "test_acc_max": max(tests),
            "updated_fraction_mean": statistics.mean(f for r in runs for f in r["updated_fraction"]),
            "step_seconds_mean": statistics.mean(r["step_seconds"] for r in runs),
            "train_seconds_mean": statistics.mean(r["train_seconds"] for r in runs),
        })
    costs = [{k: r[k] for k in ("model", "width", "policy", "budget", "norm", "peak_bytes", "step_seconds")}
             | {"frozen_layers": r["frozen_layers"][-1], "updated_fraction": r["updated_fraction"][-1],
                "velocity_bytes": r["velocity_bytes"]} for r in cost]
    for c in costs:
        full = next((f for f in costs if f["model"] == c["model"] and f["policy"] == "full"), None)
        c["peak_vs_full"] = c["peak_bytes"] / full["peak_bytes"] if full else None
        c["time_vs_full"] = c["step_seconds"] / full["step_seconds"] if full and full["step_seconds"] else None
    pretrained = [json.loads(p.read_text()) for p in sorted((WORK / preset_name).glob("*.json"))]
    summary = {"preset": preset_name, "config": asdict(PRESETS[preset_name]), "accuracy": table, "cost": costs,
               "pretrained": pretrained, "wall_seconds": wall_seconds, "torch_threads": 1}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (folder / "summary.md").write_text(markdown(summary))
    plot(summary, folder / "accuracy_vs_budget.png")
    print(markdown(summary))
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Budgeted neuron updates: preset `{summary['preset']}`", ""]
    if summary.get("wall_seconds"):
        lines += [f"Wall time of this invocation: {summary['wall_seconds']:.0f} s.", ""]
    for p in summary["pretrained"]:
        lines.append(f"- pretrained {p['model']} w{p['width']} on classes 0-4: test accuracy {p['test_acc_classes_0_4']:.3f}")
    lines += ["", "## Test accuracy on classes 5-9 (mean ± std over seeds, [min, max])", "",
              "| model | policy | budget | seeds | test accuracy | updated fraction | ms / step |",
              "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in summary["accuracy"]:
        budget = "all" if r["policy"] == "full" else f"{r['budget']:.0%}"
        lines.append(
            f"| {r['model']} w{r['width']} | {r['policy']} | {budget} | {r['seeds']} | {r['test_acc_mean']:.3f} ± "
            f"{r['test_acc_std']:.3f} [{r['test_acc_min']:.3f}, {r['test_acc_max']:.3f}] | "
            f"{r['updated_fraction_mean']:.3f} | {r['step_seconds_mean'] * 1e3:.0f} |"
        )
    lines += ["", "## Peak memory and time of one training step (tracked meter, CPU, batch "
              f"{summary['config']['batch']})", "",
              "| model | policy | budget | norm | frozen convs | peak MB | vs full | ms / step | vs full | velocity MB (host) |",
              "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in sorted(summary["cost"], key=lambda c: (c["model"], c["policy"] != "full", c["policy"], c["budget"], c["norm"])):
        budget = "all" if c["policy"] == "full" else f"{c['budget']:.0%}"
        norm = "-" if c["policy"] == "full" else c["norm"]
        lines.append(
            f"| {c['model']} w{c['width']} | {c['policy']} | {budget} | {norm} | {c['frozen_layers']} | "
            f"{c['peak_bytes'] / 1e6:.2f} | {_ratio(c['peak_vs_full'])} | {c['step_seconds'] * 1e3:.0f} | "
            f"{_ratio(c['time_vs_full'])} | {c['velocity_bytes'] / 1e6:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    models = sorted({(r["model"], r["width"]) for r in summary["accuracy"]})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (model, width) in zip(axes[0], models):
        rows = [r for r in summary["accuracy"] if (r["model"], r["width"]) == (model, width)]
        for policy in sorted({r["policy"] for r in rows} - {"full"}):
            points = sorted((r["budget"], r["test_acc_mean"], r["test_acc_std"]) for r in rows if r["policy"] == policy)
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=policy)
        for r in rows:
            if r["policy"] == "full":
                ax.axhline(r["test_acc_mean"], color="black", linestyle="--", label="full")
        ax.set_title(f"{model} w{width}")
        ax.set_xlabel("budget (fraction of conv parameters)")
        ax.set_ylabel("test accuracy, classes 5-9")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (1 torch thread each); "
                        "default: 1 for quick, 2 for full")
    parser.add_argument("--data-dir", default=os.environ.get("NF_DATA_DIR"))
    parser.add_argument("--summary-only", action="store_true", help="rebuild the summary from the rows")
    args = parser.parse_args(argv)
    if args.summary_only:
        summarize(args.preset)
        return
    jobs = args.jobs if args.jobs is not None else (1 if args.preset == "quick" else 2)
    run_all(args.preset, args.data_dir, jobs)


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT))
    main()
