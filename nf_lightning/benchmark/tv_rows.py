"""``torchvision_check``'s runs: which rows, one row trained in its own process, and the phases that order them.

Per model x data set, under the same protocol as ``compare.py``: BP and
NeuroFlux over the learning-rate grid on seed 0, each method's best rate (final
validation accuracy) for the other seeds; ``scratch_exit`` (the exit NeuroFlux
deployed in that seed, BP-trained from a fresh initialisation like BP) over
the grid once NeuroFlux's seed 0 is done, then its other seeds. A saved row is
reused only with the same settings from the same code.

Example:
    >>> rows = grid_rows({"bp_epochs": 2, "epochs_per_block": 2, "block_patience": 2, "polish_epochs": 1,
    ...                   "subset_scale": 0.1, "lrs": [0.05], "seeds": 1, "models": ["mobilenet_v2"],
    ...                   "datasets": ["cifar10"]})
    >>> [r["name"] for r in rows]
    ['mobilenet_v2 / cifar10 / bp / lr0.05 / seed0', 'mobilenet_v2 / cifar10 / neuroflux / lr0.05 / seed0']
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MODELS = {
    "resnet18": {"arch": "resnet18", "width_mult": 1.0, "budget": "100MB"},
    "mobilenet_v2": {"arch": "mobilenet_v2", "width_mult": 0.5, "budget": "30MB"},
}
"""torchvision's networks (full width for resnet18, 0.5 for mobilenet_v2) and NeuroFlux's budget for each."""
DATASETS = {
    "tiny_imagenet100": {"dataset": "tiny_imagenet", "train": 6000, "val": 1000},
    "cifar10": {"dataset": "cifar10_folder", "train": 4000, "val": 1000},
}
"""Class-balanced, seeded subsets of each data set's training split (validation held out of it)."""


def row_key(row: Mapping[str, Any]) -> str:
    """A file name for a row.

    >>> row_key({"name": "resnet18 / cifar10 / bp / lr0.05 / seed0"})
    'resnet18_cifar10_bp_lr0_05_seed0'
    """
    return re.sub(r"[^a-z0-9]+", "_", row["name"].lower()).strip("_")


def make_row(preset: Mapping[str, Any], model: str, data: str, method: str, lr: float, seed: int,
             unit: int | None = None) -> dict[str, Any]:  # fmt: skip
    """One row: a method on a model x data set at a rate and seed (``unit``: the scratch exit's depth)."""
    spec = DATASETS[data]
    row = {"model": model, "data": data, **MODELS[model], **spec, "method": method, "lr": lr, "seed": seed,
           "train": max(1, round(spec["train"] * preset["subset_scale"])),
           "val": max(1, round(spec["val"] * preset["subset_scale"])), "cifar_stem": True}  # fmt: skip
    depth = "" if unit is None else f" / unit{unit}"
    row["name"] = f"{model} / {data} / {method}{depth} / lr{lr:g} / seed{seed}"
    if method == "neuroflux":
        row.update(options={"epochs_per_block": preset["epochs_per_block"], "block_patience": preset["block_patience"]},
                   polish_epochs=preset.get("polish_epochs", 0))  # fmt: skip
    else:
        row.update(epochs=preset["bp_epochs"], unit=unit)
    return row


def grid_rows(preset: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Seed 0 of BP and NeuroFlux at every rate, for every model x data set."""
    return [make_row(preset, model, data, method, lr, 0) for data in preset["datasets"] for model in preset["models"]
            for lr in preset["lrs"] for method in ("bp", "neuroflux")]  # fmt: skip


def best_rate(results: Sequence[Mapping[str, Any]], model: str, data: str, method: str) -> float | None:
    """The rate whose seed-0 row ended with the highest final validation accuracy (the smaller on ties)."""
    grid = [r for r in results if "error" not in r and r["row"]["model"] == model and r["row"]["data"] == data
            and r["row"]["method"] == method and r["row"]["seed"] == 0]  # fmt: skip
    return max(grid, key=lambda r: (r["final_val"], -r["row"]["lr"]))["row"]["lr"] if grid else None


def later_rows(preset: Mapping[str, Any], results: Sequence[Mapping[str, Any]], phase: int) -> list[dict[str, Any]]:
    """Phase 1: the other seeds of BP and NeuroFlux, and scratch exits over the grid on NeuroFlux's seed-0 exit.
    Phase 2: the other seeds of the scratch exits, each on the exit NeuroFlux deployed in that seed."""
    rows = []
    for data in preset["datasets"]:
        for model in preset["models"]:
            nf_lr = best_rate(results, model, data, "neuroflux")
            deployed = {r["row"]["seed"]: r["selected_unit"] for r in results if "error" not in r
                        and r["row"]["method"] == "neuroflux" and r["row"]["lr"] == nf_lr
                        and (r["row"]["model"], r["row"]["data"]) == (model, data)}  # fmt: skip
            if phase == 1:
                for seed in range(1, preset["seeds"]):
                    rows += [make_row(preset, model, data, m, lr, seed) for m in ("bp", "neuroflux")
                             if (lr := best_rate(results, model, data, m)) is not None]  # fmt: skip
                if 0 in deployed:
                    rows += [make_row(preset, model, data, "scratch_exit", lr, 0, deployed[0]) for lr in preset["lrs"]]
            elif (lr := best_rate(results, model, data, "scratch_exit")) is not None:
                rows += [make_row(preset, model, data, "scratch_exit", lr, s, deployed[s])
                         for s in range(1, preset["seeds"]) if s in deployed]  # fmt: skip
    return rows


PRESETS: dict[str, dict[str, Any]] = {
    "default": {"bp_epochs": 30, "epochs_per_block": 6, "block_patience": 2, "polish_epochs": 12, "subset_scale": 1.0,
                "lrs": [0.05, 0.1], "seeds": 3, "models": list(MODELS), "datasets": list(DATASETS)},
    "quick": {"bp_epochs": 2, "epochs_per_block": 2, "block_patience": 2, "polish_epochs": 1, "subset_scale": 0.1,
              "lrs": [0.05], "seeds": 1, "models": list(MODELS), "datasets": list(DATASETS)},
}  # fmt: skip
"""BP's epochs, NeuroFlux's horizon per block (block patience may end a block sooner), the polish, the grid."""


def run_row(row: Mapping[str, Any], out: Path, data_dir: str) -> dict[str, Any]:
    """Train one row in a fresh process with one torch thread; its JSON result (or the error) comes back."""
    from nf_lightning.benchmark.provenance import code_root

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nf_lightning.benchmark.tv_worker", json.dumps(row), str(out), data_dir]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=code_root())
    (out / "log.txt").write_text(done.stdout[-20000:] + "\n--- stderr ---\n" + done.stderr[-20000:])
    if done.returncode != 0:
        error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        return {"name": row["name"], "row": dict(row), "error": error}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rows(rows: Sequence[Mapping[str, Any]], root: Path, work: Path, data_dir: str, parallel: int = 2,
             reused: list[str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Every row's result: from ``root/rows/<key>.json`` when saved with the same settings by the same code, else
    trained (``parallel`` at a time); the names of the rows reused are appended to ``reused``."""
    from nf_lightning.benchmark.provenance import code_identity, same_code

    code = code_identity()

    def one(row: Mapping[str, Any]) -> dict[str, Any]:
        saved = root / "rows" / f"{row_key(row)}.json"
        if saved.is_file():
            result = json.loads(saved.read_text())
            if result.get("row") == row and same_code((result.get("provenance") or {}).get("code"), code):
                if reused is not None:
                    reused.append(row["name"])
                return result
        result = run_row(row, work / row_key(row), data_dir)
        if "error" not in result:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(result, indent=2))
        brief = result.get("error") or f"test {result['test']:.3f} in {result['seconds']:.0f} s"
        print(f"[torchvision_check] {row['name']}: {brief}", flush=True)
        return result

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, rows))


def run_check(preset: Mapping[str, Any], root: Path, work: Path, data_dir: str, parallel: int = 2,
              test_subset: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """The grid, then the other seeds and the scratch exits' grid, then the scratch exits' other seeds.

    Returns every result and the names of the rows reused. ``test_subset`` scores every k-th test image only.
    """
    reused: list[str] = []

    def scored(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**r, "test_subset": test_subset} if test_subset else r for r in rows]

    results = run_rows(scored(grid_rows(preset)), root, work, data_dir, parallel, reused)
    for phase in (1, 2):
        results += run_rows(scored(later_rows(preset, results, phase)), root, work, data_dir, parallel, reused)
    return results, reused
