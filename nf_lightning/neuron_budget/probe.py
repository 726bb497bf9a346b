"""NEq's velocity from the previous epoch's weights, not from recorded outputs.

Velocity compares every conv's output on a fixed probe set with the output one
epoch earlier. Instead of recording those outputs (hundreds of megabytes at a
few hundred images), :class:`VelocityProbe` keeps a copy of the weights and
buffers of the modules in scope as they were at the previous probe (about the
model's size, on the training device) and runs the old and the new model on
each probe batch: the old model's outputs are exactly the ones a recording
would have held. Only one probe batch's conv outputs live at a time.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU())
    >>> probe = VelocityProbe({"0": net[0]}, mu=0.5)
    >>> x = torch.randn(4, 1, 3, 3)
    >>> probe.measure([net], net, [x])                      # the first call only keeps the weights
    >>> with torch.no_grad():
    ...     _ = net[0].weight.mul_(2)                       # the same direction: phi stays 1
    >>> probe.measure([net], net, [x])
    >>> bool(probe.velocity["0"].abs().max() < 1e-6)       # velocity 0, up to rounding
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nf_lightning.neuron_budget.selection import RECURSIONS, channel_cosine, velocity_step


class VelocityProbe:
    """Per neuron ``phi``, ``delta`` and velocity of the convs in ``layers`` (name -> module).

    :meth:`measure` takes the modules whose weights and buffers define the
    outputs (the model, or NeuroFlux's active units), the forward function that
    runs a probe batch through them, and the probe batches. The first call keeps a copy of their
    state; each later one compares old and new outputs, updates the velocity and
    keeps the new state. :attr:`kept_bytes` is the copy (it lives on the device
    between probes); :attr:`peak_bytes` adds one batch's recorded outputs.
    """

    def __init__(self, layers: Mapping[str, nn.Module], mu: float = 0.5, recursion: str = "paper") -> None:
        if recursion not in RECURSIONS:
            raise ValueError(f"recursion must be one of {RECURSIONS}, got {recursion!r}")
        self.layers = dict(layers)
        self.mu, self.recursion = float(mu), recursion
        self.passes = 0
        self.phi: dict[str, Tensor] = {}
        self.delta: dict[str, Tensor] = {}
        self.velocity: dict[str, Tensor] = {}
        self.snapshot: list[tuple[nn.Module, str, Tensor]] = []
        self.batch_bytes = 0

    @property
    def kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, _, t in self.snapshot)

    @property
    def peak_bytes(self) -> int:
        return self.kept_bytes + self.batch_bytes

    def tensors(self) -> list[Tensor]:
        """The kept copy, for a memory meter to count."""
        return [t for _, _, t in self.snapshot]

    def measure(self, modules: Sequence[nn.Module], forward: Callable[[Tensor], Any], inputs: Iterable[Tensor]) -> None:
        """One probe: compare the outputs of the kept state and the current one; keep the current one."""
        with _eval_no_grad(modules):
            if self.snapshot:
                self._compare(forward, inputs)
            self.snapshot = _copy_state(modules)
        self.passes += 1

    def flat_velocity(self, names: Sequence[str]) -> Tensor:
        return torch.cat([self.velocity[name] for name in names])

    def state_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "phi": dict(self.phi), "delta": dict(self.delta), "velocity": dict(self.velocity),
                "snapshot": [t.cpu() for _, _, t in self.snapshot], "batch_bytes": self.batch_bytes}

    def load_state_dict(self, state: Mapping[str, Any], modules: Sequence[nn.Module]) -> None:
        """Restore a probe saved with the same modules in scope."""
        self.passes, self.batch_bytes = int(state["passes"]), int(state["batch_bytes"])
        self.phi, self.delta, self.velocity = dict(state["phi"]), dict(state["delta"]), dict(state["velocity"])
        slots = _copy_state(modules)
        if len(slots) != len(state["snapshot"]):
            raise ValueError("the velocity probe was saved for other modules")
        self.snapshot = [(m, n, saved.to(t.device)) for (m, n, t), saved in zip(slots, state["snapshot"])]

    def _compare(self, forward: Callable[[Tensor], Any], inputs: Iterable[Tensor]) -> None:
        recorded: dict[str, list[Tensor]] = {}
        sums: dict[str, Tensor] = {}
        counts = dict.fromkeys(self.layers, 0)
        old = True

        def hook(name: str, output: Tensor) -> None:
            out = output.detach().flatten(2)
            if old:
                recorded.setdefault(name, []).append(out)
                return
            previous = recorded[name].pop(0)
            cosine = channel_cosine(previous, out).double().sum(0)
            sums[name] = sums[name] + cosine if name in sums else cosine
            counts[name] += len(out)

        handles = [m.register_forward_hook(lambda _m, _i, out, n=name: hook(n, out)) for name, m in self.layers.items()]
        try:
            for x in inputs:
                old = True
                with _swapped_state(self.snapshot):
                    forward(x)
                self.batch_bytes = max(self.batch_bytes, sum(t.numel() * t.element_size()
                                                             for ts in recorded.values() for t in ts))
                old = False
                forward(x)
        finally:
            for handle in handles:
                handle.remove()
        self._update(sums, counts)

    def _update(self, sums: dict[str, Tensor], counts: dict[str, int]) -> None:
        for name in self.layers:
            if not counts[name]:
                raise ValueError(f"layer {name} gave no output in the probe pass")
            phi = (sums[name] / counts[name]).float()
            ones, zeros = torch.ones_like(phi), torch.zeros_like(phi)
            self.delta[name], self.velocity[name] = velocity_step(
                phi, self.phi.get(name, ones), self.velocity.get(name, zeros), self.delta.get(name, zeros),
                self.mu, self.recursion)
            self.phi[name] = phi


def _copy_state(modules: Sequence[nn.Module]) -> list[tuple[nn.Module, str, Tensor]]:
    """Every parameter and buffer the forward pass reads (not the selected-row copies), copied."""
    copies = []
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is not None and not name.endswith("_selected") and name != "selected_rows":
                        copies.append((module, name, tensor.detach().clone()))
    return copies


@contextlib.contextmanager
def _swapped_state(snapshot: Sequence[tuple[nn.Module, str, Tensor]]) -> Iterator[None]:
    """The kept tensors in place of the current ones, for the length of the block."""
    current = []
    for module, name, tensor in snapshot:
        store = module._parameters if name in module._parameters else module._buffers
        current.append((store, name, store[name]))
        store[name] = tensor
    try:
        yield
    finally:
        for store, name, tensor in current:
            store[name] = tensor


@contextlib.contextmanager
def _eval_no_grad(modules: Sequence[nn.Module]) -> Iterator[None]:
    flags = [(m, m.training) for root in modules for m in root.modules()]
    for root in modules:
        root.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training
