"""NEq's velocity from the previous epoch's weights, in a bounded number of bytes.

Velocity compares every conv's output on a fixed probe set with the output one
epoch earlier. Instead of recording those outputs (hundreds of megabytes at a
few hundred images), :class:`VelocityProbe` keeps a copy of what the epoch's
training can change (:meth:`~VelocityProbe.keep`: the selected rows of each
partly trained conv, the parameters that require a gradient, the buffers) and
later runs the old and the new model on the same probe inputs
(:meth:`~VelocityProbe.compare`): the old model's outputs are exactly the ones a
recording would have held.

``compare(..., max_bytes=...)`` bounds what it holds: the copy, the rows it
swaps in, and the old model's outputs awaiting the new ones. The outputs are
taken a group of layers at a time, in micro-batches, so that they fit what is
left of ``max_bytes``; a layer whose output on one sample does not fit is taken
a group of its channels at a time. Each pass stops after its group's last layer.
Fewer bytes cost more, shorter, passes; the result is the same (sums of
per-sample, per-channel cosines).

A channel that did not train over the epoch and whose output on the probe set
is bit for bit what it was (its filter, its inputs and its BatchNorm all stayed
frozen) gives no evidence: its ``phi``, ``delta`` and velocity stay as they were
instead of decaying to zero, and a channel that never trained nor moved is not
measured yet (:attr:`~VelocityProbe.measured`; NaN in
:meth:`~VelocityProbe.flat_velocity`, which the velocity policy tries first).
Without this, a selection that freezes everything else would see only its own
neurons move and choose them again in every epoch. A channel that trained is
measured even if its output did not move (a dead input, say): its velocity is
then about zero, and it is not tried again first.

``keep(..., off_device=True)`` puts the copied rows of partly trained convs, the
bulk of the copy, off the training device: in host memory when that is an
accelerator, else in an unlinked temporary file, memory-mapped (the kernel may
page it out); they are exchanged a run of rows at a time all the same.

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
    >>> probe.measure([net], net, [x], max_bytes=probe.kept_bytes + 2 * 9 * 4)  # one sample's outputs at a time
    >>> bool(probe.velocity["0"].abs().max() < 1e-6), probe.batch_bytes  # velocity 0, up to rounding
    (True, 72)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nf_lightning.neuron_budget.kept_state import Kept, changeable, nbytes, swapped_state
from nf_lightning.neuron_budget.selection import RECURSIONS, channel_cosine, velocity_step


class _GroupDone(Exception):
    """Raised by a hook after a pass's last needed layer: the rest of the forward pass is not run."""


class VelocityProbe:
    """Per neuron ``phi``, ``delta`` and velocity of the convs in ``layers`` (name -> module).

    :meth:`keep` copies, from the modules whose weights and buffers define the
    outputs (the model, or NeuroFlux's active units), what training can change;
    :meth:`compare` runs the forward function on each probe batch with the kept
    state and with the current one, and updates the velocity; :meth:`measure`
    does both. :attr:`kept_bytes` is the copy (on the device between probes);
    :attr:`peak_bytes` is the most it held on the device: in the last comparison
    the copy then, a row set aside and the outputs, or the copy kept since if that
    is more; :attr:`off_device_bytes` is the part of the copy kept off the device.
    :attr:`measured` says, per channel, whether it has trained or moved since the probe began.
    """

    def __init__(self, layers: Mapping[str, nn.Module], mu: float = 0.5, recursion: str = "paper") -> None:
        if recursion not in RECURSIONS:
            raise ValueError(f"recursion must be one of {RECURSIONS}, got {recursion!r}")
        self.layers = dict(layers)
        self.mu, self.recursion = float(mu), recursion
        self.passes = 0
        self.forwards = 0
        self.phi: dict[str, Tensor] = {}
        self.delta: dict[str, Tensor] = {}
        self.velocity: dict[str, Tensor] = {}
        self.measured: dict[str, Tensor] = {}
        self.snapshot: list[Kept] = []
        self.batch_bytes = 0
        self.compared_bytes = 0
        self._aside = 0

    @property
    def kept_bytes(self) -> int:
        """The copy on the training device (row indices included)."""
        return sum((0 if k.off_device else nbytes(k.tensor)) + (nbytes(k.rows) if k.rows is not None else 0)
                   for k in self.snapshot)

    @property
    def off_device_bytes(self) -> int:
        return sum(nbytes(k.tensor) for k in self.snapshot if k.off_device)

    @property
    def swap_bytes(self) -> int:
        """What exchanging kept and current rows in place sets aside: in the last comparison, a sixteenth of
        what its bound left after the copy (without a bound, all of a layer's rows and their copy); one row at
        the least, which is also the figure before any comparison."""
        row = max((nbytes(k.tensor[0]) for k in self.snapshot if k.rows is not None and len(k.rows)), default=0)
        return max(row, self._aside)

    def _set_aside(self, max_bytes: int | None) -> int:
        """The bytes the next comparison exchanges rows within (see :attr:`swap_bytes`)."""
        rows = [nbytes(k.tensor) for k in self.snapshot if k.rows is not None and len(k.rows)]
        free = max_bytes - self.kept_bytes if max_bytes is not None else None
        self._aside = 0 if not rows else 2 * max(rows) if free is None else max(0, free) // 16
        return self.swap_bytes

    @property
    def peak_bytes(self) -> int:
        return max(self.compared_bytes, self.kept_bytes)

    def tensors(self) -> list[Tensor]:
        """The kept copy on the training device, for a memory meter to count."""
        return [t for k in self.snapshot for t in (None if k.off_device else k.tensor, k.rows) if t is not None]

    def keep(self, modules: Sequence[nn.Module], off_device: bool = False) -> None:
        """Copy what training can change from now on (the comparison's old state); ``off_device`` copies the
        selected rows straight off the device, one row at a time."""
        self.snapshot = []  # the old copy goes before the new one is made: never both at once
        self.snapshot = changeable(modules, off_device)

    def compare(self, modules: Sequence[nn.Module], forward: Callable[[Tensor], Any], inputs: Iterable[Tensor],
                max_bytes: int | None = None) -> None:
        """Update the velocity from the kept state's and the current state's outputs on ``inputs``.

        ``max_bytes`` bounds :attr:`peak_bytes`; None holds each input batch's
        outputs of every layer at once. One channel of one sample's output is
        the least it can hold, and one layer's output on one sample once the
        copy alone exceeds ``max_bytes``: :attr:`peak_bytes` reports it if that
        is more.
        """
        if not self.snapshot:
            raise RuntimeError("VelocityProbe.compare needs a kept state: call keep() first")
        sums: dict[str, Tensor] = {}
        moved: dict[str, Tensor] = {}
        counts = dict.fromkeys(self.layers, 0)
        self.batch_bytes = 0
        aside = self._set_aside(max_bytes)
        limit = None if max_bytes is None else max_bytes - self.kept_bytes - aside
        calls: list[_Call] | None = None
        read: dict[int, list[Kept]] = {}
        with _eval_no_grad(modules):
            for x in inputs:
                calls = calls if calls is not None else self._calls(forward, x[:1])  # the same for every batch
                micro, groups = _plan(calls, len(x), limit)
                for chunk in x.split(micro):
                    for group, last in groups:
                        kept = read.setdefault(last, self._read_by(calls, last))
                        self._compare_group(forward, chunk, group, last, kept, aside, sums, moved, counts)
        self._update(sums, moved, counts)
        self.compared_bytes = self.kept_bytes + self.swap_bytes + self.batch_bytes
        self.passes += 1

    def measure(self, modules: Sequence[nn.Module], forward: Callable[[Tensor], Any], inputs: Iterable[Tensor],
                max_bytes: int | None = None) -> None:
        """:meth:`compare` (once a state is kept), then :meth:`keep` the current one."""
        if self.snapshot:
            self.compare(modules, forward, inputs, max_bytes)
        else:
            self.passes += 1
        self.keep(modules)

    def flat_velocity(self, names: Sequence[str]) -> Tensor:
        """The velocity of the layers ``names``, one after another, NaN where it is not measured yet."""
        return torch.cat([self.velocity[name].masked_fill(~self.measured[name], float("nan")) for name in names])

    def state_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "phi": dict(self.phi), "delta": dict(self.delta),
                "velocity": dict(self.velocity), "measured": dict(self.measured),
                "snapshot": [(k.rows.cpu() if k.rows is not None else None, k.tensor.cpu()) for k in self.snapshot],
                "batch_bytes": self.batch_bytes, "compared_bytes": self.compared_bytes}

    def load_state_dict(self, state: Mapping[str, Any], modules: Sequence[nn.Module], off_device: bool = False) -> None:
        """Restore a probe saved with the same modules in scope, selected as they were when it was saved
        (``off_device`` as in :meth:`keep`)."""
        self.passes, self.batch_bytes = int(state["passes"]), int(state["batch_bytes"])
        self.compared_bytes = int(state.get("compared_bytes", 0))
        self.phi, self.delta, self.velocity = dict(state["phi"]), dict(state["delta"]), dict(state["velocity"])
        self.measured = dict(state["measured"])
        slots = changeable(modules, off_device)
        saved = state["snapshot"]
        if len(slots) != len(saved) or any((k.rows is None) != (rows is None) or k.tensor.shape != t.shape
                                           for k, (rows, t) in zip(slots, saved)):
            raise ValueError("the velocity probe was saved for other modules or another selection")
        for k, (rows, t) in zip(slots, saved):
            k.tensor.copy_(t)
            if rows is not None:
                k.rows.copy_(rows)
        self.snapshot = slots

    def _calls(self, forward: Callable[[Tensor], Any], sample: Tensor) -> list[_Call]:
        """The layers in scope in the order the forward pass calls them, with their output bytes per sample."""
        calls: list[_Call] = []
        handles = [m.register_forward_hook(
            lambda _m, _i, out, n=name: calls.append(_Call(n, nbytes(out) // len(out), out.shape[1])))
            for name, m in self.layers.items()]
        try:
            forward(sample)
        finally:
            for handle in handles:
                handle.remove()
        return calls

    def _read_by(self, calls: Sequence[_Call], last: int) -> list[Kept]:
        """The kept tensors a pass that stops after call ``last`` reads: every whole one (put in place by
        reference), and the rows of the convs called by then; the others' rows are not read, not exchanged."""
        called = {id(self.layers[call.name]) for call in calls[: last + 1]}
        return [k for k in self.snapshot if k.rows is None or id(k.module) in called]

    def _compare_group(self, forward: Callable[[Tensor], Any], x: Tensor, group: dict[str, slice], last: int,
                       kept: Sequence[Kept], aside: int, sums: dict[str, Tensor], moved: dict[str, Tensor],
                       counts: dict[str, int]) -> None:
        """The old (``kept`` in place, its rows exchanged within ``aside`` bytes) and the new pass over ``x`` up to
        call ``last``, comparing the layers (and their channels) in ``group``."""
        recorded: dict[str, list[Tensor]] = {}
        state = {"old": True, "call": -1}

        def hook(name: str, output: Tensor) -> None:
            state["call"] += 1
            if name in group:
                channels = group[name]
                whole = channels == slice(None)
                out = output.detach()[:, channels].flatten(2)
                if state["old"]:
                    recorded.setdefault(name, []).append(out if whole else out.clone())  # not a view of it all
                else:
                    old = recorded[name].pop(0)
                    total = sums.setdefault(name, output.new_zeros(output.shape[1], dtype=torch.float64))
                    total[channels] += channel_cosine(old, out).double().sum(0)
                    changed = moved.setdefault(name, output.new_zeros(output.shape[1], dtype=torch.bool))
                    changed[channels] |= (old != out).any(2).any(0)
                    counts[name] += len(out) if whole or channels.start == 0 else 0
            if state["call"] == last:
                raise _GroupDone

        handles = [m.register_forward_hook(lambda _m, _i, out, n=name: hook(n, out)) for name, m in self.layers.items()]
        try:
            with swapped_state(kept, aside), contextlib.suppress(_GroupDone):
                forward(x)
            self.batch_bytes = max(self.batch_bytes, sum(nbytes(t) for ts in recorded.values() for t in ts))
            state.update(old=False, call=-1)
            with contextlib.suppress(_GroupDone):
                forward(x)
            self.forwards += 2
        finally:
            for handle in handles:
                handle.remove()

    def _update(self, sums: dict[str, Tensor], moved: dict[str, Tensor], counts: dict[str, int]) -> None:
        """One step of the recursion for the channels that trained or whose output moved; the others keep
        what they had."""
        trained = {k.module: k.rows for k in self.snapshot if k.name == "weight"}  # kept rows: those that trained
        for name in self.layers:
            if not counts[name]:
                raise ValueError(f"layer {name} gave no output in the probe pass")
            phi = (sums[name] / counts[name]).float()
            ones, zeros = torch.ones_like(phi), torch.zeros_like(phi)
            delta, velocity = velocity_step(
                phi, self.phi.get(name, ones), self.velocity.get(name, zeros), self.delta.get(name, zeros),
                self.mu, self.recursion)
            changed = moved[name].to(phi.device)
            if self.layers[name] in trained:  # a frozen conv's weight is not kept
                rows = trained[self.layers[name]]
                changed[rows.to(phi.device) if rows is not None else slice(None)] = True
            self.phi[name] = torch.where(changed, phi, self.phi.get(name, ones))
            self.delta[name] = torch.where(changed, delta, self.delta.get(name, zeros))
            self.velocity[name] = torch.where(changed, velocity, self.velocity.get(name, zeros))
            self.measured[name] = changed | self.measured.get(name, torch.zeros_like(changed))


@dataclass(frozen=True)
class _Call:
    """One call of a layer in scope during a forward pass: its output's bytes and channels per sample."""

    name: str
    nbytes: int
    channels: int


def _plan(calls: Sequence[_Call], batch: int, limit: int | None) -> tuple[int, list[tuple[dict[str, slice], int]]]:
    """The micro-batch and the groups of layers (name -> channels compared, index of the group's last call)
    whose outputs fit ``limit``: whole layers where one sample's output fits, else channels of one layer.
    With no bytes left (``limit <= 0``) it takes one sample's output of one layer at a time."""
    whole = slice(None)
    if limit is None or not calls:
        return batch, [(dict.fromkeys((c.name for c in calls), whole), len(calls) - 1)]
    per_sample: dict[str, int] = {}
    channels: dict[str, int] = {}
    last_call: dict[str, int] = {}
    for index, call in enumerate(calls):
        per_sample[call.name] = per_sample.get(call.name, 0) + call.nbytes
        channels[call.name], last_call[call.name] = call.channels, index
    micro = max(1, min(batch, limit // max(per_sample.values())))
    groups: list[tuple[dict[str, slice], int]] = []
    group: dict[str, slice] = {}
    size = 0
    for name, size_of_one in per_sample.items():  # in the order of their first calls
        if group and size + size_of_one * micro > limit:
            groups.append((group, max(last_call[n] for n in group)))
            group, size = {}, 0
        if size_of_one * micro <= limit or limit <= 0:  # no bytes left after the copy: a layer at a time, whole
            group[name] = whole
            size += size_of_one * micro
            continue
        step = max(1, limit // -(-size_of_one // channels[name]))  # channels of one sample that fit
        groups.extend(({name: slice(start, start + step)}, last_call[name])
                      for start in range(0, channels[name], step))
    if group:
        groups.append((group, max(last_call[n] for n in group)))
    return micro, groups


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
