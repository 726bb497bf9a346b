"""Budgeted neuron updates (arXiv 2312.05282) at our scale: velocity, random, Sparse Update and full fine-tuning.

A zoo model (ResNet-18 and MobileNetV2 at narrow widths) is pretrained on
CIFAR-10 classes 0-4 (airplane ... deer), then fine-tuned on classes 5-9
(dog ... truck) with a new head, updating about 10 %, 20 % and 30 % of its conv
parameters with :class:`nf_lightning.neuron_budget.callback.NeuronUpdateBudget`
(velocity, random, Sparse Update) or everything (full), several seeds each,
with every ``norm`` setting of the preset and, at ``norm="frozen"``, the memory
runs' byte budgets. Every run is a real Lightning ``Trainer.fit`` on the CPU with one torch thread.

It writes, under ``experiments/results/neuron_budget/<preset>/``:

- ``rows/acc_*.json``: one file per fine-tuning run (test accuracy on the
  held-out CIFAR-10 test images of classes 5-9, validation accuracy per epoch,
  the selection per epoch, seconds per step);
- ``memory/*.json``: one file per memory run (``neuron_budget_memory.py``: the
  measured peak of one training step at batch 1, 8 and 64 against its computed
  floor, the probe's bytes, and at batch 64 resident memory in a fresh process);
- ``summary.json`` and ``summary.md`` (mean and spread over seeds, the memory
  table), and ``accuracy_vs_budget.png`` when matplotlib is installed.

Rows that exist are skipped, so a killed run continues where it stopped. The
pretrained weights are kept in ``outputs/neuron_budget/<preset>/`` (not committed).

Usage::

    NF_DATA_DIR=../shared/datasets python experiments/neuron_budget.py --preset quick     # about 2 minutes
    NF_DATA_DIR=../shared/datasets python experiments/neuron_budget.py --jobs 2           # the full grid
    NF_DATA_DIR=../shared/datasets python experiments/neuron_budget.py --part memory      # the memory table only
    python experiments/neuron_budget.py --readme    # README's paragraph and NEURON_BUDGET.md's tables from summary.json

From a pinned snapshot (``nf_lightning.benchmark.snapshot``), ``--results`` and
``--work`` point back at the checkout's rows and pretrained weights.

See ``experiments/NEURON_BUDGET.md`` for the setup and what compares with the paper.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from nf_lightning.benchmark.provenance import code_identity  # noqa: E402
from nf_lightning.core.exits.selection import loader_accuracy  # noqa: E402
from nf_lightning.neuron_budget.budget import parse_bytes  # noqa: E402

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
    first_epoch: str = "sparse_update"
    accuracy_norms: tuple[str, ...] = ("always",)
    accuracy_byte_budgets: bool = False  # also the memory runs' byte budgets (norm frozen), at `batch`


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
        accuracy_norms=("always", "frozen"),
        accuracy_byte_budgets=True,
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
        accuracy_norms=("always", "range", "frozen"),
        accuracy_byte_budgets=True,
    ),
}

# nearer the paper's setting, where pretrained features transfer and the gap to full fine-tuning is small:
# four times the images per pretraining class and about twice the epochs; the full preset's fine-tuning at 10
# and 30 % with every BatchNorm training
PRESETS["more_pretraining"] = replace(PRESETS["full"], budgets=(0.1, 0.3), pretrain_per_class=4000,
                                      pretrain_epochs=15, accuracy_norms=("always",), accuracy_byte_budgets=False)


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
    """One fine-tuning run on classes 5-9 (``task["kind"] == "accuracy"``) or one memory run (``"memory"``)."""
    _threads()
    import lightning.pytorch as pl

    from nf_lightning.models import create
    from nf_lightning.neuron_budget.callback import NeuronUpdateBudget

    preset = PRESETS[task["preset"]]
    out = Path(task["out"])
    if out.exists():
        return json.loads(out.read_text())
    if task["kind"] == "memory":
        return _memory_row(task, preset, out)
    pl.seed_everything(task["seed"], workers=True)
    data = datasets(preset, task["data_dir"], "finetune")
    net = create(task["model"], num_classes=len(FINETUNE_CLASSES), width_mult=task["width"])
    net.load_state_dict(torch.load(task["pretrained"], map_location="cpu", weights_only=True))
    new_head(net, task["seed"])
    budget = None
    callbacks: list[Any] = []
    if task["policy"] != "full":
        budget = NeuronUpdateBudget(
            task["policy"], task["budget"], first_epoch=preset.first_epoch, probe_size=preset.probe_size,
            norm=task["norm"], seed=task["seed"], log_layers=False,
        )
        callbacks.append(budget)
    val_accs: list[float] = []
    steps = StepTime()
    fit = trainer(preset.finetune_epochs, callbacks + [steps, ValAcc(val_accs)])
    start = time.perf_counter()
    fit.fit(make_module(net, preset.finetune_lr, preset.finetune_epochs), loader(data["train"], preset.batch, True),
            loader(data["val"], preset.batch, False))
    seconds = time.perf_counter() - start
    history = budget.history if budget is not None else []
    epochs = preset.finetune_epochs
    row = {
        **{k: task[k] for k in ("kind", "model", "width", "policy", "budget", "seed", "norm")},
        "step_seconds": statistics.mean(steps.seconds) if steps.seconds else None,
        "steps_timed": len(steps.seconds),
        "train_seconds": seconds,
        "updated_fraction": [h["updated_fraction"] for h in history] or [1.0] * epochs,
        "selected_by": [h["policy"] for h in history] or ["full"] * epochs,
        "frozen_layers": [h["frozen_layers"] for h in history] or [0] * epochs,
        "probe_bytes": max((h["probe_bytes"] for h in history), default=0),
        "val_acc": val_accs,
        "test_acc": accuracy(net, data["test"]),
        "code": code_identity(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    return row


def _memory_row(task: dict[str, Any], preset: Preset, out: Path) -> dict[str, Any]:
    """A memory row, and at batch 64 its resident-memory cross-check in a fresh process."""
    import neuron_budget_memory as memory

    row = {**memory.measure(task, preset, sys.modules[__name__]), "code": code_identity()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    if task["batch"] == 64:
        row["resident"] = memory.resident(out, task["pretrained"])
        out.write_text(json.dumps(row, indent=2))
    return row


class StepTime:
    """Seconds per training step (forward, backward, update)."""

    def __new__(cls) -> Any:
        import lightning.pytorch as pl

        class _StepTime(pl.Callback):
            def __init__(self) -> None:
                self.seconds: list[float] = []
                self._start = 0.0

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                self._start = time.perf_counter()

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                self.seconds.append(time.perf_counter() - self._start)

        return _StepTime()


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
def tasks(preset_name: str, data_dir: str | None, part: str = "all", results: Path = RESULTS,
          work: Path = WORK) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pretraining tasks (weights under ``work``), then the accuracy runs and/or the memory runs (``part``;
    rows under ``results``)."""
    import neuron_budget_memory as memory

    preset = PRESETS[preset_name]
    rows = results / preset_name / "rows"
    pre, fine, bases = [], [], []
    for model, width in preset.models:
        weights = work / preset_name / f"{model}_w{width}.pt"
        pre.append({"preset": preset_name, "model": model, "width": width, "path": str(weights), "data_dir": data_dir})
        base = {"preset": preset_name, "model": model, "width": width, "pretrained": str(weights), "data_dir": data_dir}
        bases.append(base)
        policies = [p for p in preset.policies if p != "full"]
        grid = [("full", 1.0, "always")] + [(p, b, n) for p in policies for b in preset.budgets
                                            for n in preset.accuracy_norms]
        if preset.accuracy_byte_budgets:
            grid += [(p, b, "frozen") for p in policies for b in memory.BYTE_BUDGETS[model]]
        for seed in preset.seeds:
            for policy, budget, norm in grid:
                suffix = "" if norm == "always" else f"_{norm}"
                name = f"acc_{model}_w{width}_{policy}_{budget}_s{seed}{suffix}.json"
                fine.append({**base, "kind": "accuracy", "policy": policy, "budget": budget, "seed": seed,
                             "norm": norm, "out": str(rows / name)})
    if part == "memory":
        fine = []
    if part in ("memory", "all"):
        fine += memory.memory_tasks(preset, preset_name, bases, results / preset_name / "memory")
    return pre, fine


def run_all(preset_name: str, data_dir: str | None, jobs: int, part: str, results: Path = RESULTS,
            work: Path = WORK) -> None:
    pre, fine = tasks(preset_name, data_dir, part, results, work)
    start = time.perf_counter()
    if jobs <= 1:
        for task in pre:
            print("pretrain", task["model"], pretrain(task), flush=True)
        for i, task in enumerate(fine):
            row = finetune(task)
            print(f"[{i + 1}/{len(fine)}] {_label(task)}: {_brief(row)}", flush=True)
    else:
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that `kill` reaches the workers too
        try:
            with get_context("spawn").Pool(jobs) as pool:  # leaving the block, however, terminates the workers
                for task, result in zip(pre, pool.imap(pretrain, pre)):
                    print("pretrain", task["model"], result, flush=True)
                for i, (task, row) in enumerate(zip(fine, pool.imap(finetune, fine))):
                    print(f"[{i + 1}/{len(fine)}] {_label(task)}: {_brief(row)}", flush=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
    summarize(preset_name, {part: time.perf_counter() - start}, results, work)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _label(task: dict[str, Any]) -> str:
    batch = f" b{task['batch']}" if task["kind"] == "memory" else ""
    return f"{task['kind']} {task['model']}{batch} {task['policy']} {task['budget']} s{task['seed']} {task['norm']}"


def _brief(row: dict[str, Any]) -> str:
    if "peak_bytes" in row:
        return f"peak {row['peak_bytes'] / 1e6:.2f} MB, floor {row['floor_bytes'] / 1e6:.2f} MB"
    return f"test {row['test_acc']:.3f}, {row['train_seconds']:.0f} s"


# ---------------------------------------------------------------- summary
def summarize(preset_name: str, wall_seconds: dict[str, float] | None = None, results: Path = RESULTS,
              work: Path = WORK) -> dict[str, Any]:
    """``summary.json`` and ``summary.md`` from the rows (wall times of earlier invocations are kept)."""
    import neuron_budget_memory as memory

    folder = results / preset_name
    acc = [json.loads(p.read_text()) for p in sorted((folder / "rows").glob("acc_*.json"))]
    mem = [json.loads(p.read_text()) for p in sorted((folder / "memory").glob("*.json"))]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in acc:
        groups.setdefault((r["model"], r["width"], r["policy"], r["budget"], r.get("norm", "always")), []).append(r)
    table = []
    for (model, width, policy, budget, norm), runs in sorted(groups.items(), key=lambda item: _order(*item[0])):
        tests = [r["test_acc"] for r in runs]
        table.append({
            "model": model, "width": width, "policy": policy, "budget": budget, "norm": norm, "seeds": len(runs),
            "test_acc_mean": statistics.mean(tests), "test_acc_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "test_acc_min": min(tests), "test_acc_max": max(tests),
            "updated_fraction_mean": statistics.mean(f for r in runs for f in r["updated_fraction"]),
            "step_seconds_mean": statistics.mean(r["step_seconds"] for r in runs),
            "train_seconds_mean": statistics.mean(r["train_seconds"] for r in runs),
        })
    old = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    walls = {**old.get("wall_seconds_by_part", {}), **(wall_seconds or {})}
    if old.get("wall_seconds"):  # a summary from before the parts: its one invocation ran everything
        walls.setdefault("all", old["wall_seconds"])
    pretrained = [json.loads(p.read_text()) for p in sorted((work / preset_name).glob("*.json"))] or old.get(
        "pretrained", [])
    commits = collections.Counter((r.get("code") or {}).get("commit") or "unrecorded" for r in acc + mem)
    summary = {"preset": preset_name, "config": asdict(PRESETS[preset_name]), "accuracy": table,
               "rows_by_commit": dict(commits.most_common()),
               "memory": memory.summarize_memory(mem), "pretrained": pretrained, "wall_seconds_by_part": walls,
               "torch_threads": 1}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (folder / "summary.md").write_text(markdown(summary))
    plot(summary, folder / "accuracy_vs_budget.png")
    return summary


def _order(model: str, width: float, policy: str, budget: float | str, norm: str) -> tuple:
    """Model, policy, then fractions of the parameters before byte budgets (by bytes), then norm."""
    import neuron_budget_memory as memory

    in_bytes = isinstance(budget, str)
    return model, width, policy, in_bytes, parse_bytes(budget) if in_bytes else budget, memory.NORMS.index(norm)


def markdown(summary: dict[str, Any]) -> str:
    import neuron_budget_memory as memory

    lines = [f"# Budgeted neuron updates: preset `{summary['preset']}`", ""]
    for part, seconds in summary["wall_seconds_by_part"].items():
        lines.append(f"- wall time of the `--part {part}` invocation: {seconds:.0f} s")
    commits = summary.get("rows_by_commit", {})
    if commits:
        lines.append("- rows by code commit: " + ", ".join(f"`{commit[:10]}` {n}" for commit, n in commits.items()))
    for p in summary["pretrained"]:
        lines.append(f"- pretrained {p['model']} w{p['width']} on classes 0-4: test accuracy {p['test_acc_classes_0_4']:.3f}")
    lines += ["", "## Test accuracy on classes 5-9 (mean ± std over seeds, [min, max])", "",
              "| model | policy | budget | norm | seeds | test accuracy | updated fraction | ms / step |",
              "| --- | --- | ---: | --- | ---: | --- | ---: | ---: |"]
    for r in summary["accuracy"]:
        budget = memory.budget_label(r["policy"], r["budget"])
        lines.append(
            f"| {r['model']} w{r['width']} | {r['policy']} | {budget} | {r['norm']} | {r['seeds']} | "
            f"{r['test_acc_mean']:.3f} ± {r['test_acc_std']:.3f} [{r['test_acc_min']:.3f}, {r['test_acc_max']:.3f}] | "
            f"{r['updated_fraction_mean']:.3f} | {r['step_seconds_mean'] * 1e3:.0f} |"
        )
    lines += ["", "## Peak memory of one training step against its floor (tracked meter, CPU)", "",
              memory.memory_markdown(summary["memory"])]
    return "\n".join(lines) + "\n"


def write_docs(summary: dict[str, Any]) -> None:
    """README's "Budgeted neuron updates" numbers and NEURON_BUDGET.md's tables, between their markers."""
    source = f"experiments/results/neuron_budget/{summary['preset']}/summary.json"
    note = f"<!-- generated by `python experiments/neuron_budget.py --readme` from {source}; do not edit -->"
    _between(PROJECT / "README.md", "neuron_budget", f"{note}\n{readme_paragraph(summary)}\n")
    text = markdown(summary).split("\n", 2)[2]  # without the title
    _between(HERE / "NEURON_BUDGET.md", "neuron_budget_tables", f"{note}\n{text}")


def readme_paragraph(summary: dict[str, Any]) -> str:
    """README's generated paragraph: memory against the floors, accuracy by fraction, then by bytes."""
    import neuron_budget_memory as memory

    return " ".join(filter(None, [memory.readme_paragraph(summary), accuracy_sentence(summary),
                                  byte_budget_sentence(summary)]))


def accuracy_sentence(summary: dict[str, Any]) -> str:
    """Velocity against random, and the budgeted policies against full fine-tuning (``norm="always"`` rows)."""
    rows = [r for r in summary["accuracy"] if r["norm"] == "always"]
    mean = {(r["model"], r["policy"], r["budget"]): r["test_acc_mean"] for r in rows}
    cells = sorted({(m, b) for m, p, b in mean if p == "velocity"})
    if not cells:
        return ""
    margins = [mean[(m, "velocity", b)] - mean[(m, "random", b)] for m, b in cells if (m, "random", b) in mean]
    best = sum(1 for m, b in cells if mean[(m, "velocity", b)] == max(
        v for (mm, p, bb), v in mean.items() if mm == m and bb == b and p != "full"))
    gaps = [mean[(m, "full", 1.0)] - max(v for (mm, p, bb), v in mean.items() if mm == m and bb == max(
        b2 for m2, b2 in cells if m2 == m) and p != "full") for m in {m for m, _ in cells} if (m, "full", 1.0) in mean]
    seeds = max(r["seeds"] for r in rows)
    return (f"Accuracy ({seeds} seeds, `norm=\"always\"`): velocity has the best mean of the three policies in "
            f"{best} of {len(cells)} model x budget cells, {100 * min(margins):.1f}-{100 * max(margins):.1f} points "
            f"over random, and at the largest budget the best policy stays {100 * min(gaps):.1f}-{100 * max(gaps):.1f} "
            "points under full fine-tuning.")


def byte_budget_sentence(summary: dict[str, Any]) -> str:
    """Per model, the best policy under its largest byte budget against full fine-tuning, with both peaks."""
    batch = summary["config"]["batch"]
    peaks = {(r["model"], r["policy"], r["budget"]): r["peak_vs_full"] for r in summary["memory"]
             if r["batch"] == batch and isinstance(r["budget"], str)}
    full = {r["model"]: r for r in summary["accuracy"] if r["policy"] == "full"}
    parts = []
    for model in sorted({r["model"] for r in summary["accuracy"] if isinstance(r["budget"], str)}):
        rows = [r for r in summary["accuracy"] if r["model"] == model and isinstance(r["budget"], str)]
        budget = max((r["budget"] for r in rows), key=parse_bytes)
        best = max((r for r in rows if r["budget"] == budget), key=lambda r: r["test_acc_mean"])
        peak = peaks.get((model, best["policy"], budget))
        if model not in full or peak is None:
            continue
        parts.append(f"{model} at {budget}: {best['policy']} {100 * best['test_acc_mean']:.1f} % against full "
                     f"fine-tuning's {100 * full[model]['test_acc_mean']:.1f} %, at {peak:.2f}x its peak")
    if not parts:
        return ""
    return (f"Byte budgets (`norm=\"frozen\"`, the best policy at the larger budget, batch {batch}): "
            + "; ".join(parts) + ".")


def _between(path: Path, marker: str, body: str) -> None:
    text = path.read_text()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    path.write_text(f"{head}{begin}\n{body}{end}{rest.split(end, 1)[1]}")


COLORS = {"velocity": "tab:blue", "random": "tab:orange", "sparse_update": "tab:green"}  # a policy, one colour
LINES = {"always": "-", "range": "--", "frozen": ":"}  # a norm setting, one line style


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
        fractions = [r for r in rows if not isinstance(r["budget"], str)]  # byte budgets have no x here
        for policy, norm in sorted({(r["policy"], r["norm"]) for r in fractions if r["policy"] != "full"}):
            points = sorted((r["budget"], r["test_acc_mean"], r["test_acc_std"]) for r in fractions
                            if (r["policy"], r["norm"]) == (policy, norm))
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=COLORS.get(policy), linestyle=LINES.get(norm),
                        label=policy if norm == "always" else f"{policy}, {norm}")
        for r in rows:
            if r["policy"] == "full":
                ax.axhline(r["test_acc_mean"], color="black", linestyle="--", label="full")
        ax.set_title(f"{model} w{width}")
        ax.set_xlabel("budget (fraction of conv parameters)")
        ax.set_ylabel("test accuracy, classes 5-9")
    handles, labels = axes[0][0].get_legend_handles_labels()  # the same lines on every panel: one legend below
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize="small")
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 5), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (1 torch thread each); "
                        "default: 1 for quick, 2 for full")
    parser.add_argument("--data-dir", default=os.environ.get("NF_DATA_DIR"))
    parser.add_argument("--part", choices=("all", "accuracy", "memory"), default="all",
                        help="the accuracy runs, the memory runs (batch 1/8/64, floors, resident check) or both")
    parser.add_argument("--summary-only", action="store_true", help="rebuild the summary from the rows")
    parser.add_argument("--refloor", action="store_true", help="recompute the memory rows' floors, then summarize")
    parser.add_argument("--readme", action="store_true",
                        help="write README's paragraph and NEURON_BUDGET.md's tables from the committed summary.json")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="rows and summaries go to RESULTS/<preset>/ (default: experiments/results/neuron_budget)")
    parser.add_argument("--work", type=Path, default=WORK,
                        help="pretrained weights, reused when present (default: outputs/neuron_budget)")
    args = parser.parse_args(argv)
    results, work = args.results.resolve(), args.work.resolve()
    if args.readme:
        write_docs(json.loads((RESULTS / args.preset / "summary.json").read_text()))
        return
    if args.refloor:
        import neuron_budget_memory

        neuron_budget_memory.refloor(results / args.preset / "memory")
    if args.summary_only or args.refloor:
        summarize(args.preset, results=results, work=work)
        return
    jobs = args.jobs if args.jobs is not None else (1 if args.preset == "quick" else 2)
    run_all(args.preset, args.data_dir, jobs, args.part, results, work)


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT))
    main()
