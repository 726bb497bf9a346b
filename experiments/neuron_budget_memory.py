"""The memory of budgeted neuron updates: measured peak of one training step against its computed floor.

For each model, batch size (1, 8, 64), policy (velocity, random, Sparse Update at
10/20/30 % of the conv parameters, and byte budgets at batch 64), ``norm``
(always, range, frozen) and full fine-tuning, a real ``Trainer.fit`` runs two
short epochs with :class:`~nf_lightning.neuron_budget.callback.NeuronUpdateBudget`
(so the policy's own selection is in effect in the second) and the project's
tracked meter measures the first step of the second epoch, the probe's copy of
the weights included. Beside it:

- **floor**: ``max(inference's peak, weights + buffers + batch + the probe's copy
  + NeuronBytes.peak_bytes)``: the selected parameters' copies, gradients and
  momentum, and the activations the selection must keep (computed from the
  shapes), added layer by layer to inference's working set at that layer (the
  tracked meter's profile of an inference pass, which also says which tensors
  inference still holds there: a kept one of those is counted once); for full fine-tuning, stock
  PyTorch's layers (``NeuronBytes(stock=True)``: a ReLU6 keeps a float copy of its
  output where ours keep bits);
- **resident** (batch 64): the same selection's step in a fresh process, the
  tracked meter against the kernel's high-water mark of resident memory
  (:func:`nf_lightning.cli.meter_check.measure_step`).

Rows go to ``results/neuron_budget/<preset>/memory/*.json``; ``summarize`` writes
``memory.json`` and ``memory.md`` next to them. Run through
``experiments/neuron_budget.py --part memory``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
BATCHES = (1, 8, 64)
NORMS = ("always", "range", "frozen")
BYTE_BUDGETS = {"resnet18": ("4MB", "8MB"), "mobilenetv2": ("24MB", "48MB")}  # at batch 64, with norm frozen


def memory_tasks(preset: Any, preset_name: str, base_tasks: list[dict[str, Any]], rows: Path) -> list[dict[str, Any]]:
    """One task per (model, batch, policy, budget, norm), full fine-tuning once per model and batch."""
    tasks = []
    for base in base_tasks:
        model = base["model"]
        grid = [(p, b, n) for p in preset.policies if p != "full" for b in preset.budgets for n in NORMS]
        for batch in BATCHES:
            extra = [(p, b, "frozen") for p in preset.policies if p != "full" for b in BYTE_BUDGETS[model]]
            for policy, budget, norm in [("full", 1.0, "always"), *grid, *(extra if batch == 64 else [])]:
                name = f"mem_{model}_w{base['width']}_b{batch}_{policy}_{budget}_{norm}.json"
                tasks.append({**base, "kind": "memory", "policy": policy, "budget": budget, "norm": norm,
                              "batch": batch, "seed": 0, "out": str(rows / name)})
    return tasks


def measure(task: dict[str, Any], preset: Any, helpers: Any) -> dict[str, Any]:
    """One memory run: two short epochs, the second epoch's first step metered; floor and probe beside it."""
    import lightning.pytorch as pl

    from nf_lightning.models import create
    from nf_lightning.neuron_budget.callback import NeuronUpdateBudget
    from nf_lightning.neuron_budget.probe_memory import inference_peak

    pl.seed_everything(task["seed"], workers=True)
    data = helpers.datasets(preset, task["data_dir"], "finetune")
    net = create(task["model"], num_classes=5, width_mult=task["width"])
    net.load_state_dict(torch.load(task["pretrained"], map_location="cpu", weights_only=True))
    helpers.new_head(net, task["seed"])
    train = helpers.loader(data["train"], task["batch"], True)
    x, y = next(iter(train))
    inference = inference_peak(net, x)  # eval mode, no gradients, tracked meter
    update = None
    if task["policy"] != "full":
        update = NeuronUpdateBudget(task["policy"], task["budget"], first_epoch=preset.first_epoch,
                                    probe_size=preset.probe_size, norm=task["norm"], seed=task["seed"], log_layers=False)
    meter = MeterStep(update)
    fit = helpers.trainer(2, [meter] + ([update] if update else []), limit_train_batches=3, limit_val_batches=1)
    fit.fit(helpers.make_module(net, preset.finetune_lr, 2), train, helpers.loader(data["val"], 64, False))
    masks = meter.masks if update else {n: torch.ones(m.out_channels, dtype=torch.bool)
                                        for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    probe_kept = update._probe.kept_bytes if update and update._probe else 0
    floor = floor_bytes(net, x, y, masks, task["norm"] if update else "always", probe_kept, inference)
    record = update.history[-1] if update else {}
    return {
        **{k: task[k] for k in ("model", "width", "policy", "budget", "norm", "batch")},
        "peak_bytes": meter.peak_bytes, "floor_bytes": floor, "inference_bytes": inference,
        "probe_kept_bytes": probe_kept, "probe_bytes": update.probe_bytes if update else 0,
        "selection_bytes": record.get("selection_bytes"), "updated_fraction": record.get("updated_fraction", 1.0),
        "frozen_layers": record.get("frozen_layers", 0), "selected_by": record.get("policy", "full"),
        "guard": update.guard.summary() if update and update.guard else None,
        "masks": {name: mask.nonzero().flatten().tolist() for name, mask in masks.items()},
    }


class MeterStep:
    """The tracked meter around the first training step of epoch 1, counting the probe's copy of the weights;
    keeps the selection of that step (the callback chooses the next one when the epoch ends)."""

    def __new__(cls, update: Any) -> Any:
        import lightning.pytorch as pl

        from nf_lightning.core.memory.meter import meter_for

        class _MeterStep(pl.Callback):
            def __init__(self) -> None:
                self.peak_bytes, self._meter, self.masks = 0, None, {}

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if trainer.current_epoch == 1 and batch_idx == 0:
                    self.masks = update.masks if update is not None else {}
                    self._meter = meter_for(trainer.strategy.root_device)
                    probe = update._probe.tensors() if update is not None and update._probe else []
                    self._meter.track(pl_module, *trainer.optimizers, *probe)
                    self._meter.__enter__()

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                if self._meter is not None:
                    self._meter.__exit__(None, None, None)
                    self.peak_bytes, self._meter = self._meter.peak_bytes, None

        return _MeterStep()


def floor_bytes(net: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: dict[str, torch.Tensor], norm: str,
                probe_kept: int, inference: int) -> int:
    from nf_lightning.neuron_budget.budget import NeuronBytes, inference_profile, trace_layers

    named = dict(net.named_modules())
    convs = [named[name.removeprefix("net.")] for name in masks]
    trace = trace_layers(net, x[:1])
    full = all(bool(m.all()) for m in masks.values()) and norm == "always"
    costs = NeuronBytes(trace, convs, len(x), norm, state_tensors=1, working=inference_profile(net, x, trace),
                        stock=full)
    weights = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    batch = x.numel() * x.element_size() + y.numel() * y.element_size()
    counts = [int(m.sum()) for m in masks.values()]
    update = step_temporaries(net, x, y, None if full else dict(zip(convs, masks.values())), norm)
    return max(inference, weights + batch + probe_kept + costs.peak_bytes(counts, update))


def step_temporaries(net: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: dict[nn.Module, torch.Tensor] | None,
                     norm: str) -> int:
    """What the experiment's optimizer step allocates for temporaries, its state existing (a copy of ``net``
    with the selection ``masks`` installed; None: full fine-tuning)."""
    import copy

    from nf_lightning.core.memory.enforcement import update_overhead
    from nf_lightning.neuron_budget.trainable import SelectiveTraining, activations_of, norms_to_freeze

    twin = copy.deepcopy(net)
    twin_of = dict(zip(net.modules(), twin.modules()))
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    if masks is not None:
        twin_masks = {twin_of[conv]: mask for conv, mask in masks.items()}
        modules = list(twin.modules())
        SelectiveTraining().apply(twin_masks, [optimizer], norms_to_freeze(modules, twin_masks, norm),
                                  activations_of(modules))
    nn.functional.cross_entropy(twin(x[:2]), y[:2]).backward()
    optimizer.step()  # the momentum exists from here on
    return update_overhead(optimizer)


def refloor(folder: Path) -> None:
    """Recompute every row's floor from its selection (the floor is a computation from shapes: no training)."""
    from nf_lightning.models import create

    for path in sorted(folder.glob("*.json")):
        row = json.loads(path.read_text())
        net = create(row["model"], num_classes=5, width_mult=row["width"])
        named = dict(net.named_modules())
        masks = {}
        for name, rows in row["masks"].items():
            masks[name] = torch.zeros(named[name.removeprefix("net.")].out_channels, dtype=torch.bool)
            masks[name][rows] = True
        x, y = torch.randn(row["batch"], 3, 32, 32), torch.zeros(row["batch"], dtype=torch.int64)
        norm = row["norm"] if row["policy"] != "full" else "always"
        row["floor_bytes"] = floor_bytes(net, x, y, masks, norm, row["probe_kept_bytes"], row["inference_bytes"])
        path.write_text(json.dumps(row, indent=2))


# ---------------------------------------------------------------- resident memory
def resident(row_path: Path, pretrained: str) -> dict[str, Any]:
    """The row's selection stepped in a fresh process: tracked meter and resident memory."""
    command = [sys.executable, str(HERE / "neuron_budget_memory.py"), str(row_path), pretrained]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"resident check of {row_path.name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _resident_main(row_path: str, pretrained: str) -> None:
    from nf_lightning.cli.meter_check import measure_step
    from nf_lightning.models import create
    from nf_lightning.neuron_budget.trainable import SelectiveTraining, activations_of, norms_to_freeze

    torch.set_num_threads(1)
    row = json.loads(Path(row_path).read_text())

    def build() -> nn.Module:
        net = create(row["model"], num_classes=5, width_mult=row["width"])
        net.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True), strict=False)
        return net

    def setup(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        named = dict(net.named_modules())
        masks = {}
        for name, rows in row["masks"].items():
            conv = named[name.removeprefix("net.")]
            masks[conv] = torch.zeros(conv.out_channels, dtype=torch.bool)
            masks[conv][rows] = True
        modules = list(net.modules())
        SelectiveTraining().apply(masks, [optimizer], norms_to_freeze(modules, masks, row["norm"]),
                                  activations_of(modules))

    result = measure_step(build, (3, 32, 32), row["batch"], 5, None if row["policy"] == "full" else setup)
    print(json.dumps(result))


# ---------------------------------------------------------------- summary
def summarize_memory(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ratios: peak over floor, over full fine-tuning's peak at the same batch, probe over peak."""
    table = []
    for r in rows:
        full = next((f for f in rows if f["model"] == r["model"] and f["batch"] == r["batch"] and f["policy"] == "full"),
                    None)
        entry = {k: v for k, v in r.items() if k != "masks"}
        entry["peak_vs_floor"] = r["peak_bytes"] / r["floor_bytes"]
        entry["peak_vs_full"] = r["peak_bytes"] / full["peak_bytes"] if full else None
        entry["floor_vs_full"] = r["floor_bytes"] / full["peak_bytes"] if full else None
        entry["probe_vs_peak"] = r["probe_bytes"] / r["peak_bytes"] if r["probe_bytes"] else None
        entry["probe_kept_vs_peak"] = r["probe_kept_bytes"] / r["peak_bytes"] if r["probe_kept_bytes"] else None
        table.append(entry)
    return sorted(table, key=lambda e: (e["model"], e["batch"], e["policy"] != "full", e["norm"], e["policy"],
                                        str(e["budget"])))


def budget_label(policy: str, budget: float | str) -> str:
    """How a table prints a budget: ``all`` for full fine-tuning, a byte budget as given, a fraction in %."""
    return "all" if policy == "full" else budget if isinstance(budget, str) else f"{budget:.0%}"


def memory_markdown(table: list[dict[str, Any]]) -> str:
    lines = ["Probe: its copy of the weights, on the device during every step (counted in the peak), and its peak "
             "between epochs (the copy and one probe batch's conv outputs), each against the step's peak. "
             "Resident: the same selection's step in a fresh process, growth of the resident high-water mark over "
             "the tracked meter's growth (batch 64).", "",
             "| model | batch | policy | budget | norm | frozen convs | updated | peak MB | floor MB | peak / floor "
             "| peak / full | floor / full | probe copy MB (of peak) | probe peak MB (of peak) | resident / tracked |",
             "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in table:
        budget = budget_label(e["policy"], e["budget"])
        probe = f"{e['probe_bytes'] / 1e6:.2f} ({e['probe_vs_peak']:.0%})" if e["probe_bytes"] else "-"
        copy = f"{e['probe_kept_bytes'] / 1e6:.2f} ({e['probe_kept_vs_peak']:.0%})" if e["probe_kept_bytes"] else "-"
        res = e.get("resident")
        lines.append(
            f"| {e['model']} w{e['width']} | {e['batch']} | {e['policy']} | {budget} | "
            f"{'-' if e['policy'] == 'full' else e['norm']} | {e['frozen_layers']} | {e['updated_fraction']:.1%} | "
            f"{e['peak_bytes'] / 1e6:.2f} | {e['floor_bytes'] / 1e6:.2f} | {e['peak_vs_floor']:.2f} | "
            f"{_fmt(e['peak_vs_full'])} | {_fmt(e['floor_vs_full'])} | {copy} | {probe} | "
            f"{_fmt(res['step_ratio']) if res else '-'} |")
    return "\n".join(lines) + "\n"


def readme_paragraph(summary: dict[str, Any]) -> str:
    """The README's memory sentences, every number from ``summary.json``."""
    table = summary["memory"]
    ratios = [e["peak_vs_floor"] for e in table]
    outside = [e for e in table if not 0.9 <= e["peak_vs_floor"] <= 1.1]
    parts = [f"The {len(table)} memory configurations (4 policies, 10/20/30 % and byte budgets, 3 `norm` "
             f"settings, batch 1, 8 and 64) peak at {min(ratios):.2f}-{max(ratios):.2f}x their computed floors"
             + (f", {len(table) - len(outside)} of them within 0.9-1.1x" if outside else "") + "."]
    for model in sorted({e["model"] for e in table}):
        rows = [e for e in table if e["model"] == model and e["batch"] == 64 and e["policy"] != "full"]
        full = next((e for e in table if e["model"] == model and e["batch"] == 64 and e["policy"] == "full"), None)
        if not rows or full is None:
            continue
        frozen = [e for e in rows if e["norm"] == "frozen" and not isinstance(e["budget"], str)]
        always = [e for e in rows if e["norm"] == "always"]
        probe = [e["probe_vs_peak"] for e in rows if e["probe_vs_peak"]]
        copy = [e["probe_kept_vs_peak"] for e in rows if e["probe_kept_vs_peak"]]
        parts.append(
            f"{model} w{rows[0]['width']} at batch 64 (full fine-tuning {full['peak_bytes'] / 1e6:.1f} MB): "
            f"with `norm=\"frozen\"` the 10-30 % budgets peak at {_span(frozen, 'peak_vs_full')} of full fine-tuning "
            f"(floors {_span(frozen, 'floor_vs_full')}), with `norm=\"always\"` at {_span(always, 'peak_vs_full')} "
            f"(every BatchNorm trains and keeps its input)"
            + (f"; velocity's probe keeps a copy of the weights, {min(copy):.0%}-{max(copy):.0%} of the step's peak, "
               f"and peaks between epochs at {min(probe):.0%}-{max(probe):.0%} of it" if probe else "") + ".")
    return " ".join(parts)


def _span(rows: list[dict[str, Any]], key: str) -> str:
    values = [e[key] for e in rows if e[key] is not None]
    return f"{min(values):.2f}-{max(values):.2f}x" if values else "-"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    _resident_main(sys.argv[1], sys.argv[2])
