"""How many bytes the velocity probe may hold, and where its copy of the selected rows goes.

``memory`` is bytes (``"256KB"``) or a fraction of the least a training step can peak at: the
smaller of the last measured step (:attr:`ProbeMemory.step_peak`) and inference's peak at the
training batch (:attr:`ProbeMemory.inference_peak`). No step holds less than inference, so the
probe stays within that fraction of the next step too, whichever selection it makes. (Under
NeuroFlux a block's step runs on cached inputs, so the measured step alone counts there.)

``copy`` is ``"device"``, ``"off_device"`` or ``"auto"``: off the device on an accelerator; on
the CPU, off it while no step has been measured, or when the selected rows would take more than
half of the limit, decided once per scope (:meth:`ProbeMemory.new_scope`).

Example:
    >>> import torch
    >>> memory = ProbeMemory(0.1)
    >>> memory.limit() is None                     # no step measured yet
    True
    >>> memory.step_peak = 1000
    >>> memory.limit(), memory.off_device(torch.device("cpu"), row_bytes=40)
    (100, False)
    >>> memory.inference_peak = 600                # the next selection's step may be as small as this
    >>> memory.limit()
    60
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nf_lightning.core.memory.meter import meter_for
from nf_lightning.neuron_budget.budget import parse_bytes

PROBE_COPIES = ("auto", "device", "off_device")


class ProbeMemory:
    """The probe's limit in bytes and the placement of its copy (see the module's docstring)."""

    def __init__(self, memory: float | str = 0.1, copy: str = "auto") -> None:
        if copy not in PROBE_COPIES:
            raise ValueError(f"probe_copy must be one of {PROBE_COPIES}, got {copy!r}")
        self.bytes = parse_bytes(memory) if isinstance(memory, str) else None
        if self.bytes is None and (isinstance(memory, bool) or not 0.0 < float(memory) <= 1.0):
            raise ValueError(f"probe_memory is a fraction of the step's peak in (0, 1] or bytes ('256KB'), "
                             f"got {memory!r}")
        self.memory, self.copy = memory, copy
        self.step_peak: int | None = None
        self.inference_peak: int | None = None
        self._off_device: bool | None = None

    def limit(self) -> int | None:
        """The limit in bytes (None while a fraction has neither a measured step nor inference)."""
        if self.bytes is not None:
            return self.bytes
        least = min((peak for peak in (self.step_peak, self.inference_peak) if peak), default=None)
        return int(self.memory * least) if least else None

    def new_scope(self) -> None:
        """Decide ``"auto"``'s placement anew and measure inference anew (a new set of layers)."""
        self._off_device, self.inference_peak = None, None

    def off_device(self, device: torch.device, row_bytes: int) -> bool:
        """Whether the next copy of the selected rows (``row_bytes``) goes off ``device``; ``auto`` on the CPU
        decides on the first measured step (until then off the device), so the copy does not move back and forth."""
        if self.copy != "auto":
            return self.copy == "off_device"
        if device.type != "cpu":
            return True
        if self._off_device is None:
            limit = self.limit()
            if limit is None:
                return True
            self._off_device = 2 * row_bytes > limit
        return self._off_device


def inference_peak(module: nn.Module, x: Tensor) -> int:
    """The metered peak of ``module(x)`` in eval mode without gradients, weights and ``x`` counted: less than
    any training step on ``x`` holds. Nothing changes: no running statistics, each submodule's mode restored.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    >>> peak = inference_peak(net, torch.zeros(2, 3, 8, 8))
    >>> peak > 2 * 8 * 6 * 6 * 4, int(net[1].num_batches_tracked), net[1].training
    (True, 0, True)
    """
    modes = [(m, m.training) for m in module.modules()]
    meter = meter_for(x.device)
    meter.track(module, x)
    module.eval()
    try:
        with meter, torch.no_grad():
            module(x)
    finally:
        for m, training in modes:
            m.training = training
    return meter.peak_bytes
