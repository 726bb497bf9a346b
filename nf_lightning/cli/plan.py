"""``nf-plan``: show what NeuroFlux would do under a budget, without training.

Examples:
    nf-plan model=vgg16 data=cifar10_folder budget=300MB
    nf-plan model=resnet18 budget=100MB output=json
    nf-plan model=torchvision model.name=efficientnet_b0 budget=100MB

Prints the units with their fitted memory models, the blocks with batch sizes
and predicted peaks, and the largest batch backpropagation and classic local
learning could use under the same budget (or that they cannot run).
"""

from __future__ import annotations

import json
import time
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from nf_lightning.cli.common import CONFIG_PATH
from nf_lightning.core.exits.aux_heads import build_aux_heads
from nf_lightning.core.memory.budget import MemoryBudget, format_bytes
from nf_lightning.core.network.decompose import decompose
from nf_lightning.core.options import NeuroFluxOptions
from nf_lightning.core.plan.partitioner import BudgetTooSmall
from nf_lightning.core.plan.training_plan import TrainingPlan, make_plan
from nf_lightning.data import KNOWN_DATASETS
from nf_lightning.lightning.backprop_batch import backprop_need, largest_backprop_batch


def plan_report(cfg: DictConfig) -> dict[str, Any]:
    """Everything ``nf-plan`` prints, as plain data."""
    start = time.perf_counter()
    if cfg.data.name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {cfg.data.name!r}; known: {', '.join(KNOWN_DATASETS)}")
    info = KNOWN_DATASETS[cfg.data.name]  # the class knows classes and input shape; no data is loaded
    net = instantiate(cfg.model, num_classes=info.num_classes)
    input_shape = tuple(info.input_shape)
    budget = MemoryBudget.parse(cfg.budget, cfg.memory_overhead).tensor_bytes  # tensor bytes, as nf-train holds them
    decomposition = decompose(net)

    def optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)

    report: dict[str, Any] = {
        "model": cfg.model.name,
        "width_mult": cfg.model.get("width_mult"),  # the zoo's; torchvision's networks have none
        "data": cfg.data.name,
        "budget": cfg.budget,
        "budget_bytes": budget,
        "memory_overhead": cfg.memory_overhead,
        "batch_limit": cfg.batch_limit,
        "rho": cfg.trainer.strategy.get("rho", NeuroFluxOptions.rho),  # the method's, else NeuroFlux's default
    }
    widest = cfg.trainer.strategy.get("aux_max_filters", NeuroFluxOptions.aux_max_filters)
    for name, policy, single in (("neuroflux", "adaptive", False), ("classic_ll", "classic", True)):
        aux = build_aux_heads(decomposition.units, info.num_classes, input_shape, policy=policy, max_filters=widest)
        try:
            plan = make_plan(
                decomposition.units,
                [*aux, decomposition.head],
                input_shape,
                budget,
                epochs_per_block=cfg.epochs,
                batch_limit=cfg.batch_limit,
                rho=report["rho"],
                aux_policy=policy,
                aux_max_filters=widest,
                optimizer_factory=optimizer,
                single_block=single,
            )
            report[name] = {"could_run": True, **_plan_summary(plan)}
        except BudgetTooSmall as error:
            report[name] = {"could_run": False, "reason": str(error), "minimum_budget_bytes": error.minimum_bytes}
    # the same sizing nf-train's BP uses: the profiler's line, then a measured step at that batch
    bp_batch, bp, peak = largest_backprop_batch(net, input_shape, budget, cfg.batch_limit, optimizer)
    report["bp"] = {"could_run": bp_batch >= 1, "batch_size": bp_batch, "memory_model": bp.to_dict()}
    if bp_batch < 1:
        smallest, needed = backprop_need(net, bp, peak)
        report["bp"]["reason"] = f"needs {format_bytes(needed)} at batch {smallest}"
    report["seconds"] = time.perf_counter() - start
    return report


def _plan_summary(plan: TrainingPlan) -> dict[str, Any]:
    return {
        "units": [
            {"unit": i, "slope_bytes_per_sample": m.slope, "intercept_bytes": m.intercept, "fit_rel_error": m.rel_error,
             "max_batch": min(m.max_batch(plan.budget), plan.batch_limit)}
            for i, m in enumerate(plan.unit_models)
        ],
        "blocks": [b.to_dict() for b in plan.blocks],
        "seconds": plan.seconds,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a person reads it."""
    budget = report["budget_bytes"]
    lines = [f"{report['model']} (width {report['width_mult']}) on {report['data']}, budget {format_bytes(budget)}"]
    nf = report["neuroflux"]
    if nf["could_run"]:
        lines.append("units (adaptive aux heads): peak = slope * batch + intercept")
        for u in nf["units"]:
            lines.append(
                f"  unit {u['unit']:>2}: {format_bytes(u['slope_bytes_per_sample']):>10}/sample "
                f"+ {format_bytes(u['intercept_bytes']):>10}  fit error {100 * u['fit_rel_error']:.2f}%  "
                f"max batch {u['max_batch']}"
            )
        lines.append(f"NeuroFlux blocks (rho {report['rho']}, batch limit {report['batch_limit']}):")
        for i, b in enumerate(nf["blocks"]):
            units = b["units"]
            lines.append(
                f"  block {i}: units {units[0]}-{units[-1]:<3} batch {b['batch_size']:>4}  "
                f"predicted peak {format_bytes(b['predicted_peak'])} of {format_bytes(budget)}"
            )
    else:
        lines.append(f"NeuroFlux cannot run: {nf['reason']}")
    cl = report["classic_ll"]
    lines.append(
        f"classic LL: batch {cl['blocks'][0]['batch_size']}" if cl["could_run"] else f"classic LL cannot run: {cl['reason']}"
    )
    bp = report["bp"]
    lines.append(f"BP: batch {bp['batch_size']}" if bp["could_run"] else f"BP cannot run: {bp['reason']}")
    lines.append(f"planned in {report['seconds']:.2f} s")
    return "\n".join(lines)


@hydra.main(config_path=CONFIG_PATH, config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report = plan_report(cfg)
    print(json.dumps(report, indent=2) if cfg.output == "json" else format_report(report))


if __name__ == "__main__":
    main()
