"""Every default is written once, in the code: the app's configs override only what differs.

Checked for every method: each literal value given to one of nf_lightning's own objects
(strategies, callbacks, ``before_fit`` hooks, the module) and each top-level app key that
feeds a code parameter must differ from that parameter's default; a key whose value is
the default reads it with ``${code_default:...}``. (The data, model and ``update`` groups
list their objects' settings as a catalogue of what can be overridden; they are not checked.)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from nf_lightning.cli.common import code_default, compose_config
from nf_lightning.data.registry import KNOWN_DATASETS
from nf_lightning.core.options import NeuroFluxOptions

METHODS = ("neuroflux", "classic_ll", "bp", "bp_ckpt")
CONF = Path(__file__).resolve().parents[1] / "conf"
NODES = ("trainer.strategy", "method.before_fit", "module")  # plus every callback
APP_KEYS = {  # a top-level key -> the code parameter it feeds
    "budget": "nf_lightning.lightning.strategy.NeuroFluxStrategy.memory_budget",
    "memory_overhead": "nf_lightning.core.memory.budget.MemoryBudget.overhead",
    "batch_limit": "nf_lightning.core.options.NeuroFluxOptions.batch_limit",
    "epochs": "nf_lightning.core.options.NeuroFluxOptions.epochs_per_block",
    "optim.lr": "nf_lightning.lightning.classifier.ClassifierModule.lr",
    "optim.momentum": "nf_lightning.lightning.classifier.ClassifierModule.momentum",
    "optim.weight_decay": "nf_lightning.lightning.classifier.ClassifierModule.weight_decay",
    "exit.tolerance": "nf_lightning.core.options.NeuroFluxOptions.exit_tolerance",
    "exit.depth_patience": "nf_lightning.lightning.early_exit.EarlyExitSelector.depth_patience",
    "export": "nf_lightning.lightning.early_exit.EarlyExitSelector.export",
}


GROUPS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml")) for group in ("data", "model", "update")}


def defaults_of(target: str, name: str | None = None) -> dict[str, Any]:
    """The parameter defaults of the callable at ``target`` (a NeuroFlux strategy's options included; for
    ``nf_lightning.data.create``, those of the data module registered as ``name``)."""
    module, _, attribute = target.rpartition(".")
    owner = getattr(importlib.import_module(module), attribute)
    owners = [owner]
    if target == "nf_lightning.data.create":  # a data module passes **kwargs up its classes' constructors
        owners = [k.__init__ for k in reversed(KNOWN_DATASETS[name].__mro__) if "__init__" in vars(k)]
    found = {p.name: p.default for o in owners for p in inspect.signature(o).parameters.values() if p.default is not p.empty}
    if "option_overrides" in inspect.signature(owner).parameters or attribute == "NeuroFluxDDPStrategy":
        found |= {f.name: f.default for f in dataclasses.fields(NeuroFluxOptions)}
    return found


def is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("${")


def restated_defaults(cfg: DictConfig) -> list[str]:
    """Where ``cfg`` writes a literal equal to the code's default for the parameter it feeds."""
    found = []
    callbacks = [f"callbacks.{name}" for name, entry in (cfg.get("callbacks") or {}).items() if entry is not None]
    for path in (*NODES, *GROUPS, *callbacks):
        node = OmegaConf.select(cfg, path)
        if node is None or "_target_" not in node:
            continue
        defaults = defaults_of(str(node._target_), node.get("name"))
        raw = OmegaConf.to_container(node, resolve=False)
        for key, value in raw.items():
            if key in defaults and not is_interpolation(value) and value == defaults[key]:
                found.append(f"{path}.{key}: {value!r}")
    raw_app = OmegaConf.to_container(cfg, resolve=False)
    for key, parameter in APP_KEYS.items():
        value = raw_app
        for part in key.split("."):
            value = value[part]
        if not is_interpolation(value) and value == code_default(parameter):
            found.append(f"{key}: {value!r}")
    return found


@pytest.mark.parametrize("method", METHODS)
def test_no_config_restates_a_code_default(method: str) -> None:
    cfg = compose_config("train", [f"method={method}", "paths.output_dir=out"])
    assert restated_defaults(cfg) == []


@pytest.mark.parametrize("choice", [f"{g}={o}" for g, options in GROUPS.items() for o in options if o != "none"])
def test_no_data_model_or_update_config_restates_a_code_default(choice: str) -> None:
    cfg = compose_config("train", [choice, "paths.output_dir=out"])
    assert restated_defaults(cfg) == []


def test_a_restated_default_of_a_group_is_found() -> None:
    cfg = compose_config("train", ["paths.output_dir=out", "data.num_workers=0", "model.width_mult=1.0",
                                   "update=velocity", "update.mu=0.5"])  # fmt: skip
    assert sorted(restated_defaults(cfg)) == [
        "callbacks.neuron_budget.mu: 0.5", "data.num_workers: 0", "model.width_mult: 1.0", "update.mu: 0.5"]


def test_a_restated_default_is_found() -> None:
    cfg = compose_config("train", ["method=neuroflux", "paths.output_dir=out", "batch_limit=256",
                                   "+trainer.strategy.rho=0.4", "callbacks.early_exit.export=true"])  # fmt: skip
    assert sorted(restated_defaults(cfg)) == [
        "batch_limit: 256", "callbacks.early_exit.export: True", "trainer.strategy.rho: 0.4"
    ]


def test_the_apps_defaults_are_the_codes() -> None:
    cfg = compose_config("train", ["paths.output_dir=out"])
    options = NeuroFluxOptions()
    assert (cfg.budget, cfg.batch_limit, cfg.exit.tolerance) == ("300MB", options.batch_limit, options.exit_tolerance)
    assert cfg.epochs != options.epochs_per_block  # deliberate, and train.yaml says why
