"""The SLURM launcher preset (Hydra's submitit plugin) composes with the training config.

No cluster here: the preset is checked for what submitit would be asked for, and the
same job function runs under Hydra's basic launcher in ``tests/test_cli.py``'s multirun test.
"""

from __future__ import annotations

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from nf_lightning.cli.common import CONFIG_MODULE


def test_slurm_preset_asks_for_one_task_per_training_process() -> None:
    overrides = ["hydra/launcher=slurm", "distributed=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                 "hydra.launcher.partition=gpu", "+slurm_gpus_per_node=4", "method=neuroflux"]  # fmt: skip
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] == 240
    assert cfg.trainer.strategy._target_.endswith("NeuroFluxDDPStrategy")


def test_without_gpus_the_preset_requests_none() -> None:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["gpus_per_node"] is None and launcher["tasks_per_node"] == 1 and launcher["nodes"] == 1
