"""How many bytes the velocity probe may hold, and where its copy of the selected rows goes.

``memory`` is a fraction of the training step's measured peak (:attr:`ProbeMemory.step_peak`)
or bytes (``"256KB"``). ``copy`` is ``"device"``, ``"off_device"`` or ``"auto"``: off the
device on an accelerator; on the CPU, off it while no step has been measured, or when the
selected rows would take more than half of the limit, decided once per scope (:meth:`ProbeMemory.new_scope`).

Example:
    >>> import torch
    >>> memory = ProbeMemory(0.1)
    >>> memory.limit() is None                     # no step measured yet
    True
    >>> memory.step_peak = 1000
    >>> memory.limit(), memory.off_device(torch.device("cpu"), row_bytes=40)
    (100, False)
"""

from __future__ import annotations

import torch

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
        self._off_device: bool | None = None

    def limit(self) -> int | None:
        """The limit in bytes (None while a fraction has no measured step yet)."""
        if self.bytes is not None:
            return self.bytes
        return int(self.memory * self.step_peak) if self.step_peak else None

    def new_scope(self) -> None:
        """Decide ``"auto"``'s placement anew (a new set of layers)."""
        self._off_device = None

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
