"""What the Hydra apps share: where the configs live, composing them, and where a run writes.

The configs ship inside the package as ``nf_lightning.conf`` (the project's
top-level ``conf/``), so the apps find them from any install and any directory.
They restate no default of the code: a key the command line may set but whose
value is the code's default reads it through the ``code_default`` resolver
(``batch_limit: ${code_default:nf_lightning.core.options.NeuroFluxOptions.batch_limit}``),
so every default is written once, in the code.

Example:
    >>> cfg = compose_config("train", ["experiment=quickstart", "method=bp"])
    >>> cfg.method.name, cfg.model.name, cfg.batch_limit
    ('bp', 'vgg11', 256)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

CONFIG_MODULE = "nf_lightning.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
"""``config_path`` of the apps' ``hydra.main``."""


def _value_or(value: object, default: object) -> object:
    """``value`` unless it is null, then ``default``: ``${nf.value_or:${resume},outputs/...}``.

    (``oc.select`` falls back only when a key is missing, not when it is null.)
    """
    return default if value is None else value


if not OmegaConf.has_resolver("nf.value_or"):
    OmegaConf.register_new_resolver("nf.value_or", _value_or)


def code_default(path: str) -> Any:
    """The default of parameter ``name`` of the callable at ``module.Callable`` (``path`` = ``module.Callable.name``).

    >>> code_default("nf_lightning.core.options.NeuroFluxOptions.rho")
    0.4
    """
    owner_path, _, name = path.rpartition(".")
    module_name, _, owner_name = owner_path.rpartition(".")
    owner = getattr(importlib.import_module(module_name), owner_name)
    default = inspect.signature(owner).parameters[name].default
    if default is inspect.Parameter.empty:
        raise KeyError(f"{path}: {owner_name} has no default for {name!r}")
    return default


if not OmegaConf.has_resolver("code_default"):
    OmegaConf.register_new_resolver("code_default", code_default)


def compose_config(name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """The app config ``name`` (``"train"`` or ``"plan"``) with command-line style ``overrides``, outside an app."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def output_dir() -> Path:
    """The current Hydra run's output directory."""
    return Path(HydraConfig.get().runtime.output_dir)
