"""Starting a fine-tuning run from pretrained weights.

Example (``nf-train ... pretrained=path/to/last.ckpt``)::

    report = load_pretrained(module, "outputs/.../checkpoints/last.ckpt")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def load_pretrained(module: nn.Module, path: str | Path) -> dict[str, Any]:
    """Start ``module`` from the weights in ``path`` (a Lightning checkpoint or a state dict).

    Keys are matched as they are, else with the module's ``net.`` prefix added
    (a state dict of the bare network). Tensors whose shape differs (a head for
    another number of classes) are skipped and listed. Load checkpoints you
    trust: they are unpickled. Returns what was loaded, for ``results.json``.
    """
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds neither a Lightning checkpoint nor a state dict of tensors")
    own = module.state_dict()
    if not set(state) & set(own) and {f"net.{k}" for k in state} & set(own):
        state = {f"net.{k}": v for k, v in state.items()}
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(k for k in own if k not in loadable)
    if not loadable:
        raise ValueError(f"no tensor of {path} matches the model (its keys start {sorted(state)[:3]})")
    module.load_state_dict(loadable, strict=False)
    return {"path": str(path), "loaded": len(loadable), "skipped": skipped, "missing": missing}
