"""What the Hydra apps share: where the configs live and where a run writes."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def output_dir() -> Path:
    """The current Hydra run's output directory."""
    return Path(HydraConfig.get().runtime.output_dir)
