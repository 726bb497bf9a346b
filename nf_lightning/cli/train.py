"""``nf-train``: train a model under a memory budget with BP, classic LL or NeuroFlux.

Examples:
    nf-train experiment=quickstart
    nf-train model=vgg16 data=cifar10_folder budget=300MB method=neuroflux
    nf-train -m method=bp,classic_ll,neuroflux budget=100MB,300MB,500MB

Every run writes ``results.json`` into its output directory (see the README).
"""

from __future__ import annotations

import json
import sys
import math
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
import torch
import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from nf_lightning import data, models
from nf_lightning.cli.common import CONF_DIR, output_dir
from nf_lightning.core.budget import parse_bytes
from nf_lightning.core.cache import cache_size_report
from nf_lightning.core.partitioner import BudgetTooSmall
from nf_lightning.core.profiler import profile_backprop
from nf_lightning.lightning.classifier import ClassifierModule
from nf_lightning.lightning.early_exit import EarlyExitSelector
from nf_lightning.lightning.history import ValidationHistory
from nf_lightning.lightning.memory_profiler import MemoryProfiler
from nf_lightning.lightning.peak_memory import PeakMemoryMonitor
from nf_lightning.lightning.strategy import NeuroFluxStrategy

METHODS = ("bp", "classic_ll", "neuroflux")


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The data module named by ``cfg.data.name`` with the group's other keys as arguments."""
    options = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(options, dict)
    return data.create(options.pop("name"), **options)


def build_module(cfg: DictConfig, num_classes: int) -> ClassifierModule:
    """A plain classifier around the configured model (knows nothing of NeuroFlux)."""
    net = models.create(cfg.model.name, num_classes=num_classes, width_mult=cfg.model.width_mult)
    return ClassifierModule(
        net, num_classes, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )


def bp_batch_size(module: ClassifierModule, input_shape: tuple[int, ...], budget: int, batch_limit: int) -> int:
    """Largest batch for backpropagation under ``budget``; raises :class:`BudgetTooSmall` if none fits."""
    hp = module.hparams
    model = profile_backprop(
        module.net,
        input_shape,
        optimizer_factory=lambda params: torch.optim.SGD(
            params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        ),
    )
    batch = min(model.max_batch(budget), batch_limit)
    if batch < 1:
        needed = math.ceil(model.predict(1))
        raise BudgetTooSmall(budget, needed, -1, needed_by="backpropagation through the whole model (batch 1)")
    return batch


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Train once as ``cfg`` says; write and return the results."""
    method = cfg.method.name
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    pl.seed_everything(cfg.seed, workers=True)
    out.mkdir(parents=True, exist_ok=True)
    budget = parse_bytes(cfg.budget)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.num_classes)
    results: dict[str, Any] = {
        "method": method,
        "model": OmegaConf.to_container(cfg.model),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "budget": cfg.budget,
        "budget_bytes": budget,
        "epochs": cfg.epochs,
        "could_run": True,
    }
    history = ValidationHistory()
    trainer_kwargs: dict[str, Any] = dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    trainer_kwargs.update(default_root_dir=str(out), logger=CSVLogger(str(out), name="logs"), callbacks=[history])
    start = time.perf_counter()
    try:
        if method == "bp":
            batch = bp_batch_size(module, datamodule.input_shape, budget, cfg.batch_limit)
            datamodule.batch_size = batch
            module.hparams.lr = cfg.optim.lr * batch / cfg.optim.reference_batch
            results["batch_sizes"] = [batch]
            trainer_kwargs["callbacks"].append(PeakMemoryMonitor())
            trainer = pl.Trainer(max_epochs=cfg.epochs, **trainer_kwargs)
        else:
            strategy = NeuroFluxStrategy(
                memory_budget=budget,
                epochs_per_block=cfg.epochs,
                batch_limit=cfg.batch_limit,
                rho=cfg.method.rho,
                aux=cfg.method.aux,
                cache=cfg.method.cache,
                cache_dir=out / "cache",
                cache_dtype=cfg.method.cache_dtype,
                lr_reference_batch=cfg.optim.reference_batch,
                single_block=cfg.method.single_block,
            )
            selector = EarlyExitSelector(
                tolerance=cfg.exit.tolerance, depth_patience=cfg.exit.depth_patience, export=cfg.export
            )
            trainer_kwargs["callbacks"].append(selector)
            trainer = pl.Trainer(strategy=strategy, **trainer_kwargs)
        trainer.fit(module, datamodule=datamodule)
    except BudgetTooSmall as error:
        results.update(could_run=False, reason=str(error))
        print(f"[nf-train] {method} cannot run: {error}")
        _write(out, results)
        return results
    results["train_seconds"] = time.perf_counter() - start
    results["history"] = history.records
    results["final_accuracy"] = history.final_accuracy()
    if method != "bp":
        plan = trainer.strategy.plan
        results["plan"] = plan.to_dict()
        results["batch_sizes"] = [plan.batch_size(i) for i in range(len(plan.blocks))]
        results["exit_accuracies"] = history.final_exit_accuracies()
        results["exit"] = selector.summary
        cache = cache_size_report(out / "cache") if (out / "cache").is_dir() else {}
        results["cache_bytes"] = sum(cache.values())
        samples = len(datamodule.train_dataset(augment=False)) + len(datamodule.val_dataset())
        results["dataset_bytes"] = samples * math.prod(datamodule.input_shape)  # as uint8 images
    results["measured_peak_bytes"] = _measured_peak(trainer)
    _write(out, results)
    print(
        f"[nf-train] {method} {cfg.model.name} @ {cfg.budget}: validation accuracy "
        f"{results['final_accuracy']:.4f} in {results['train_seconds']:.1f} s -> {out / 'results.json'}"
    )
    return results


def _measured_peak(trainer: pl.Trainer) -> int | None:
    for callback in trainer.callbacks:
        if isinstance(callback, PeakMemoryMonitor):
            return callback.peak_bytes
        if isinstance(callback, MemoryProfiler) and callback.peaks:
            return max(callback.peaks.values())
    return None


def _write(out: Path, results: dict[str, Any]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(out / "results.json")


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    results = run(cfg, output_dir())
    if not results["could_run"] and HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(2)  # a sweep records the infeasible run and goes on; a single run fails


if __name__ == "__main__":
    main()
