"""``nf-train``: train a model under a memory budget with BP, BP with checkpointing, classic LL or NeuroFlux.

Examples:
    nf-train experiment=quickstart
    nf-train model=vgg16 data=cifar10_folder budget=300MB method=neuroflux
    nf-train -m method=bp,bp_ckpt,classic_ll,neuroflux budget=100MB,300MB,500MB

The app is thin: every object comes from the config's ``_target_`` entries
(see ``conf/train.yaml``), so a method or a callback is a config file, not
code here. A method whose config has ``method.before_fit`` gets that hook
called before the Trainer is built, with the module, the data module and the
run's :class:`~nf_lightning.core.memory.budget.MemoryBudget` (BP sizes its batch
to the budget there). The budget is parsed once, here.
Every run writes ``results.json`` into its output directory (see the README).
A killed run continues with ``nf-train resume=<its output directory>``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nf_lightning.cli.common import CONFIG_PATH, output_dir
from nf_lightning.core.cache import cache_size_report
from nf_lightning.core.exits.selection import save_exit
from nf_lightning.core.memory.budget import MemoryBudget
from nf_lightning.core.memory.enforcement import BudgetGuard
from nf_lightning.core.plan.partitioner import BudgetTooSmall
from nf_lightning.lightning.early_exit import EarlyExitSelector
from nf_lightning.lightning.history import ValidationHistory
from nf_lightning.lightning.peak_memory import PeakMemoryMonitor
from nf_lightning.lightning.polish import check_settings, polish_exit
from nf_lightning.lightning.run_access import neuroflux_run
from nf_lightning.neuron_budget.pretrained import load_pretrained

CONFIG_FILE = "config.yaml"  # the run's own config, what resume() reads
POLISHED_STEM = "polished_exit"  # export/polished_exit.pt (state dict) and .pt2 (program)
POLISHED_STATE_FILE, POLISHED_PROGRAM_FILE = f"{POLISHED_STEM}.pt", f"{POLISHED_STEM}.pt2"


def run(cfg: DictConfig, out: Path, ckpt_path: Path | None = None) -> dict[str, Any]:
    """Train once as ``cfg`` says, into ``out``; write and return the results.

    The config is saved as ``out/config.yaml`` first; with ``ckpt_path`` the
    run continues from that checkpoint (see :func:`resume`).

    Example:
        >>> from nf_lightning.cli.common import compose_config
        >>> results = run(compose_config("train", ["experiment=quickstart"]), Path("out"))  # doctest: +SKIP
        >>> results["could_run"], results["final_accuracy"]  # doctest: +SKIP
        (True, 0.43)
    """
    cfg = OmegaConf.merge(cfg, {"paths": {"output_dir": str(out)}, "resume": None})
    _check_polish(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, num_classes=datamodule.num_classes)
    module = instantiate(cfg.module, net=net, num_classes=datamodule.num_classes)
    pretrained = load_pretrained(module, cfg.pretrained) if cfg.get("pretrained") else None
    budget = MemoryBudget.parse(cfg.budget, cfg.memory_overhead)  # the one place the app parses it
    results = _header(cfg, budget, pretrained, ckpt_path)
    history = ValidationHistory()
    start = time.perf_counter()
    try:
        if cfg.method.get("before_fit") is not None:
            results.update(instantiate(cfg.method.before_fit)(module=module, datamodule=datamodule, budget=budget))
            results["before_fit_seconds"] = time.perf_counter() - start  # not on the history's clock
        trainer = instantiate(
            cfg.trainer, callbacks=[history, *_instantiate_all(cfg.callbacks)], logger=_instantiate_all(cfg.logger)
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except BudgetTooSmall as error:
        results.update(could_run=False, reason=str(error))
        print(f"[nf-train] {cfg.method.name} cannot run: {error}")
        _write(out, results)
        return results
    results.update(_outcome(trainer, datamodule, history))
    if cfg.method.get("polish_epochs"):
        results["polish"] = _polish(cfg, budget, trainer, datamodule, history, out)
        if results["polish"]["kept"]:
            results["final_accuracy"] = results["polish"]["val_after"]
    # one clock for every run: the history's (restored on resume, paused for a benchmark's test pass), after the
    # profiling before fit; the records' times are on the same clock once offset by it
    results["train_seconds"] = results.get("before_fit_seconds", 0.0) + history.elapsed
    if not trainer.is_global_zero:  # under DDP every rank runs this; rank 0 writes the run's results
        return results
    _write(out, results)
    print(
        f"[nf-train] {cfg.method.name} {cfg.model.name} @ {cfg.budget}: validation accuracy "
        f"{results['final_accuracy']:.4f} in {results['train_seconds']:.1f} s -> {out / 'results.json'}"
    )
    return results


def _check_polish(cfg: DictConfig) -> None:
    if not cfg.method.get("polish_epochs"):
        return
    if cfg.distributed != "single":
        raise ValueError("polish_epochs needs distributed=single: the exit is polished on one device")
    if not (cfg.get("callbacks") or {}).get("early_exit"):
        raise ValueError("polish_epochs needs the early_exit callback: it polishes the exit that callback selects")
    settings = _polish_settings(cfg)
    check_settings(int(cfg.method.polish_epochs), settings.pop("lr"), **settings)


def _polish_settings(cfg: DictConfig) -> dict[str, Any]:
    """The ``polish`` group's settings (``lr``, ``warmup``, ``batchnorm``); a run configured before that
    group existed has only the recipe's rate."""
    return {"lr": cfg.optim.lr, **(cfg.get("polish") or {})}


def _header(cfg: DictConfig, budget: MemoryBudget, pretrained: Any, ckpt_path: Path | None) -> dict[str, Any]:
    """What ``results.json`` says of the run before it trains."""
    results: dict[str, Any] = {
        "method": cfg.method.name,
        "model": OmegaConf.to_container(cfg.model),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "budget": cfg.budget,
        "budget_bytes": budget.bytes,
        "epochs": cfg.epochs,
        "could_run": True,
    }
    if pretrained is not None:
        results["pretrained"] = pretrained
    if ckpt_path is not None:
        results["resumed_from"] = str(ckpt_path)
    return results


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """One object per entry of a ``{name: {_target_: ...}}`` group; entries set to null are left out."""
    return [instantiate(entry) for entry in (group or {}).values() if entry is not None]


def _outcome(trainer: pl.Trainer, datamodule: pl.LightningDataModule, history: ValidationHistory) -> dict[str, Any]:
    """What a finished run measured: from the history, the block-wise run (if any) and the meters."""
    outcome: dict[str, Any] = {
        "validation_seconds": history.validation_seconds,
        "history": history.records,
        "final_accuracy": history.final_accuracy(),
        "measured_peak_bytes": None,
    }
    run = neuroflux_run(trainer)
    if run is not None:
        plan = run.plan
        directory = run.caches.directory if run.caches is not None else None
        cache = cache_size_report(directory) if directory is not None and directory.is_dir() else {}
        samples = len(datamodule.train_dataset(augment=False)) + len(datamodule.val_dataset())
        outcome.update(
            plan=plan.to_dict(),
            batch_sizes=[run.batch_size_of(i) for i in range(len(plan.blocks))],
            exit_accuracies=history.final_exit_accuracies(),
            measured_peak_bytes=max(run.step.peaks.values(), default=None),
            cache_bytes=sum(cache.values()),
            dataset_bytes=samples * math.prod(datamodule.input_shape),  # as uint8 images
            enforcement=run.step.guard.summary(),
        )
    elif isinstance(getattr(trainer.strategy, "guard", None), BudgetGuard):  # BP's, on one device or several
        outcome.update(measured_peak_bytes=trainer.strategy.guard.peak, enforcement=trainer.strategy.summary())
    if trainer.world_size > 1:  # every rank's own peak against the per-device budget
        peak = torch.tensor([outcome["measured_peak_bytes"] or 0])
        outcome["measured_peak_bytes_per_rank"] = [int(p) for p in trainer.strategy.all_gather(peak).flatten()]
    for callback in trainer.callbacks:
        if isinstance(callback, PeakMemoryMonitor):
            outcome["measured_peak_bytes"] = callback.peak_bytes
        elif isinstance(callback, EarlyExitSelector):
            outcome["exit"] = callback.summary
    return outcome


def _polish(
    cfg: DictConfig, budget: MemoryBudget, trainer: pl.Trainer, datamodule: pl.LightningDataModule,
    history: ValidationHistory, out: Path,
) -> dict[str, Any]:
    """Polish the exit the run deployed (:func:`~nf_lightning.lightning.polish.polish_exit`), with the
    ``polish_callbacks`` group's callbacks if the config has one, and export it
    beside the block-wise one as ``export/polished_exit.pt`` (state dict) and ``polished_exit.pt2``
    (:func:`~nf_lightning.core.exits.selection.save_exit`)."""
    selector = next((c for c in trainer.callbacks if isinstance(c, EarlyExitSelector)), None)
    if selector is None or selector.exit_model is None:
        raise ValueError(f"polish_epochs needs a deployed exit: method {cfg.method.name} selected none")
    settings = _polish_settings(cfg)
    model, report = polish_exit(
        selector.exit_model, datamodule, budget, epochs=int(cfg.method.polish_epochs), lr=settings.pop("lr"),
        reference_batch=cfg.optim.reference_batch, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
        batch_limit=cfg.batch_limit, callbacks=[history, *_instantiate_all(cfg.get("polish_callbacks"))],
        trainer_options={"accelerator": cfg.trainer.accelerator, "devices": 1,
                         "enable_progress_bar": cfg.trainer.enable_progress_bar},
        **settings,
    )  # fmt: skip
    save_exit(model, tuple(datamodule.input_shape), out / "export", POLISHED_STEM)
    print(
        f"[nf-train] polish: exit of unit {selector.selected.unit} from {report.val_before:.4f} to "
        f"{report.val_after:.4f} validation accuracy at batch {report.batch_size} "
        f"({'kept' if report.kept else 'not kept: the block-wise exit stays'})"
    )
    return {"unit": selector.selected.unit, **report.to_dict()}


def _write(out: Path, results: dict[str, Any]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(out / "results.json")


def resume(run_dir: Path) -> dict[str, Any]:
    """Continue the run in ``run_dir`` (killed, or stopped) from its last checkpoint, with its own config.

    It writes the same ``results.json``; its history and times span both parts
    (the time the run was down is not counted).
    """
    run_dir = Path(run_dir)
    config, checkpoint = run_dir / CONFIG_FILE, run_dir / "checkpoints" / "last.ckpt"
    for needed in (config, checkpoint):
        if not needed.is_file():
            raise FileNotFoundError(f"cannot resume {run_dir}: {needed.name} is missing ({needed})")
    return run(OmegaConf.load(config), run_dir, ckpt_path=checkpoint)


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    results = resume(Path(cfg.resume)) if cfg.get("resume") else run(cfg, output_dir())
    if not results["could_run"] and HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(2)  # a sweep records the infeasible run and goes on; a single run fails


if __name__ == "__main__":
    main()
