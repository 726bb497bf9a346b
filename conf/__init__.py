"""nf-train's and nf-plan's Hydra configs, installed as the package ``nf_lightning.conf``.

The YAML files live in the project's top-level ``conf/``; ``pyproject.toml`` maps
this directory to ``nf_lightning.conf`` so the apps find them with
``config_path="pkg://nf_lightning.conf"`` from an editable or a regular install.
"""
