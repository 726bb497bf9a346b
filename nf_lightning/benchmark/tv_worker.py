"""One ``torchvision_check`` row in its own process: ``python -m nf_lightning.benchmark.tv_worker <row json> <out>
<data dir>``; prints the row's result as JSON on its last line.

Example:
    >>> main([json.dumps(row), "/tmp/row", "../shared/datasets"])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from nf_lightning.benchmark.provenance import LoadSampler, run_provenance, utc_now
from nf_lightning.benchmark.tv_models import TorchvisionClassifier, torchvision_network


class ValCurve(pl.Callback):
    """Validation accuracy after every validation of ``fit``."""

    def __init__(self) -> None:
        self.curve: list[float] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self.curve.append(round(float(trainer.callback_metrics["val_acc"]), 4))


def _network(row: Mapping[str, Any], num_classes: int, input_shape: tuple[int, ...]) -> torch.nn.Module:
    net = torchvision_network(row["arch"], num_classes, row["width_mult"], row["cifar_stem"])
    if row.get("unit") is None:
        return net
    from nf_lightning.core.network.decompose import decompose
    from nf_lightning.core.exits.selection import ExitModel
    from nf_lightning.core.exits.aux_heads import build_exits

    parts = decompose(net)  # the exit NeuroFlux deploys at that unit, from a fresh initialisation
    return ExitModel(parts.units, build_exits(parts, input_shape, "adaptive"), row["unit"]).train()


def _test_loader(dm: Any, row: Mapping[str, Any]) -> Any:
    dm.setup("test")
    test_set = dm.test_dataset()
    if row.get("test_subset"):  # every k-th test image (for fast tests of this script only)
        step = max(1, len(test_set) // row["test_subset"])
        test_set = torch.utils.data.Subset(test_set, range(0, len(test_set), step)[: row["test_subset"]])
    return torch.utils.data.DataLoader(test_set, batch_size=256, shuffle=False,
                                       collate_fn=dm.test_dataloader().collate_fn)  # fmt: skip


def train_row(row: Mapping[str, Any], out: Path, data_dir: str) -> dict[str, Any]:
    """Train and score one row; BP and scratch exits at batch 128, NeuroFlux under the row's budget."""
    from nf_lightning import NeuroFluxStrategy, data

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dm = data.create(row["dataset"], data_dir=data_dir, train_subset=row["train"], val_subset=row["val"],
                     batch_size=128, seed=row["seed"])  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    pl.seed_everything(row["seed"])
    local = row["method"] == "neuroflux"
    net = _network(row, dm.num_classes, tuple(dm.input_shape))
    module = TorchvisionClassifier(net, dm.num_classes, lr=row["lr"], max_epochs=None if local else row["epochs"])
    curve = ValCurve()
    common = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
              "enable_model_summary": False, "num_sanity_val_steps": 0, "default_root_dir": str(out),
              "callbacks": [curve]}  # fmt: skip
    strategy = NeuroFluxStrategy(memory_budget=row["budget"], cache_dir=out / "cache", **row["options"]) if local else None
    trainer = pl.Trainer(strategy=strategy, **common) if local else pl.Trainer(max_epochs=row["epochs"], **common)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    test_loader = _test_loader(dm, row)
    tested = trainer.test(module, dataloaders=test_loader, verbose=False)
    result: dict[str, Any] = {
        "name": row["name"], "row": dict(row), "seconds": round(seconds, 1), "num_classes": dm.num_classes,
        "chance": 1 / dm.num_classes, "test": float(tested[0]["test_acc"]), "val_curve": curve.curve,
        "sizes": {"train": len(dm.train_dataset(augment=False)), "val": len(dm.val_dataset()),
                  "test": len(test_loader.dataset)},
        "parameters": sum(p.numel() for p in net.parameters()),
    }  # fmt: skip
    if not local:
        return {**result, "final_val": curve.curve[-1], "best_val": max(curve.curve), "epochs": trainer.current_epoch}
    return _neuroflux_result(result, row, strategy, dm, test_loader, out)


def _neuroflux_result(result: dict[str, Any], row: Mapping[str, Any], strategy: Any, dm: Any, test_loader: Any,
                      out: Path) -> dict[str, Any]:  # fmt: skip
    """Exits, blocks and the polish of the deployed exit (kept when validation does not drop)."""
    from nf_lightning.core.exits.selection import loader_accuracy
    from nf_lightning.core.memory.budget import MemoryBudget
    from nf_lightning.lightning.polish import polish_exit

    run = strategy.run
    exit_model = run.exit_model().eval()
    result.update(
        exit_val={str(u): r.accuracy for u, r in sorted(run.records.items())},
        exit_parameters={str(u): r.parameters for u, r in sorted(run.records.items())},
        selected_unit=run.deploy_unit, num_units=len(run.units), test_blockwise=result["test"],
        test_exit_model=loader_accuracy(exit_model, test_loader), seconds_blockwise=result["seconds"],
        blocks=[{"units": list(run.units_of(b)), "batch_size": run.batch_size_of(b), **ended}
                for b, ended in zip(range(run.num_blocks), run.progress.ended_blocks)],
    )  # fmt: skip
    result["best_val"] = result["final_val"] = max(result["exit_val"].values())
    if row.get("polish_epochs"):
        polished, report = polish_exit(
            exit_model, dm, MemoryBudget.parse(row["budget"]), epochs=row["polish_epochs"], lr=row["lr"],
            reference_batch=128, momentum=0.9, weight_decay=5e-4,  # the row's recipe (tv_models.TorchvisionClassifier)
            trainer_options={"accelerator": "cpu", "enable_progress_bar": False, "default_root_dir": str(out)},
        )  # fmt: skip
        result.update(polish=report.to_dict(), seconds=round(result["seconds"] + report.seconds, 1))
        if report.kept:
            result.update(test=loader_accuracy(polished, test_loader), best_val=max(result["best_val"], report.val_after),
                          final_val=report.val_after)  # fmt: skip
    return result


def main(argv: list[str]) -> None:
    """Train the row ``argv[0]`` (JSON) into ``argv[1]`` with data from ``argv[2]``; print its result."""
    row, out, data_dir = json.loads(argv[0]), Path(argv[1]), argv[2]
    started_at, start = utc_now(), time.perf_counter()
    with LoadSampler() as sampler:
        result = train_row(row, out, data_dir)
    result["provenance"] = run_provenance(sampler, started_at, time.perf_counter() - start)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
