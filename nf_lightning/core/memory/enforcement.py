"""Holding every unit step to the memory budget, as a transaction.

A unit step has two phases. Forward and backward run under the meter with
the budget as a hard limit: going over raises there, before anything is
updated, and the caller retries on smaller pieces. Before the update, the
bytes live at that moment plus what ``optimizer.step()`` will allocate
(state it creates on its first step, temporaries of its foreach kernels;
measured once per optimizer on host copies, see :func:`update_overhead`)
must fit the budget, or the update is refused, again before anything
changed. Then the update runs, measured: so no update is ever applied twice,
and an update that went over anyway (a wrong prediction) is recorded as a
violation rather than retried.

Everything alive counts: the unit and its exit, their gradients and
optimizer state, the block's input batch (alive for the whole block step),
the unit's own input and the labels.

Metering has a cost (a dispatch hook on every op on CPU), so :class:`BudgetGuard`
meters every step while a block's batch size is new (its first ``full_steps``
batches, and again after any shrink) and then one batch in ``sample_every``.
Steps in between are not measured: they are guaranteed only in the sense that
a step of the same shapes was measured and fit. Pass ``sample_every=1`` to
meter everything.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(100, 10)
    >>> sgd = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    >>> update_overhead(sgd)   # the first step creates a momentum buffer per parameter: (1000 + 10) * 4 bytes
    4040
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from nf_lightning.core.memory.meter import MemoryLimitExceeded, TrackedMemoryMeter, Trackable, meter_for

FULL_STEPS = 5  # batches metered in full while a batch size is new
SAMPLE_EVERY = 20  # then one batch in this many


@dataclass
class Attempt:
    """A unit step that did not fit, or an update that went over after it was applied."""

    block: int
    unit: int
    batch: int
    bytes: int
    phase: str  # "forward/backward", "update refused" or "update over budget (applied once)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BudgetGuard:
    """Meters unit steps against ``budget`` bytes on ``device`` and keeps the record.

    Args:
        device: the training device.
        budget: bytes a step may use.
        full_steps: batches metered in full after a block starts or shrinks.
        sample_every: after that, meter one batch in this many.
    """

    device: torch.device
    budget: int
    full_steps: int = FULL_STEPS
    sample_every: int = SAMPLE_EVERY
    failed: list[Attempt] = field(default_factory=list)
    violations: list[Attempt] = field(default_factory=list)
    metered_steps: int = 0
    unmetered_steps: int = 0
    peak: int = 0
    last_peak: int = 0
    _since_change: int = 0
    _overheads: dict[tuple[int, bool], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.full_steps < 0 or self.sample_every < 1:
            raise ValueError(f"need full_steps >= 0 and sample_every >= 1, got {self.full_steps}, {self.sample_every}")
        self.device = torch.device(self.device)

    def restart(self) -> None:
        """The batch size is new (a new block, or a shrink): meter in full again."""
        self._since_change = 0

    def next_batch(self) -> bool:
        """Whether the coming batch is metered."""
        index = self._since_change
        self._since_change += 1
        metered = index < self.full_steps or (index - self.full_steps) % self.sample_every == 0
        return metered

    @contextlib.contextmanager
    def unit_step(
        self,
        block: int,
        unit: int,
        batch: int,
        tracked: Sequence[Trackable],
        optimizer: Optimizer,
        metered: bool = True,
    ) -> Iterator[Callable[[Optimizer], None]]:
        """A window around one unit step; yields ``before_update(optimizer)`` to call right before its update.

        ``optimizer`` is the unit's; what its update will allocate is measured
        before the window opens (the measurement's own copies must not count).

        Raises :class:`~nf_lightning.core.memory.meter.MemoryLimitExceeded` (an
        ``OutOfMemoryError``) when the forward/backward or the coming update
        does not fit; nothing has been updated then.
        """
        if not metered:
            self.unmetered_steps += 1
            yield lambda optimizer: None
            return
        overhead = self.overhead(optimizer)
        meter = meter_for(self.device, limit=self.budget)
        meter.track(*tracked)
        phase = "forward/backward"

        def before_update(_: Optimizer) -> None:
            nonlocal phase
            needed = meter.current_bytes() + overhead
            if needed > self.budget:
                phase = "update refused"
                raise MemoryLimitExceeded(
                    f"the update of unit {unit} needs {needed} bytes on {self.device}, over the budget of {self.budget}"
                )
            meter.limit = None  # the update runs to its end and is measured, never undone or repeated
            phase = "update"

        try:
            with meter:
                yield before_update
        except torch.OutOfMemoryError:
            self.failed.append(Attempt(block, unit, batch, max(meter.peak_bytes, meter.current_bytes()), phase))
            raise
        self.metered_steps += 1
        self.last_peak = meter.peak_bytes
        self.peak = max(self.peak, meter.peak_bytes)
        if meter.peak_bytes > self.budget:
            self.violations.append(Attempt(block, unit, batch, meter.peak_bytes, "update over budget (applied once)"))

    def overhead(self, optimizer: Optimizer) -> int:
        """:func:`update_overhead` of ``optimizer``, measured once per optimizer and state (first step or later)."""
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
        key = (id(inner), bool(inner.state))
        if key not in self._overheads:
            self._overheads[key] = update_overhead(inner)
        return self._overheads[key]

    def summary(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "metered_steps": self.metered_steps,
            "unmetered_steps": self.unmetered_steps,
            "peak_bytes": self.peak,
            "failed_attempts": len(self.failed),
            "violations": len(self.violations),
            "full_steps": self.full_steps,
            "sample_every": self.sample_every,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "since_change": self._since_change,
            "failed": [a.to_dict() for a in self.failed],
            "violation_list": [a.to_dict() for a in self.violations],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.metered_steps = int(state["metered_steps"])
        self.unmetered_steps = int(state["unmetered_steps"])
        self.peak = int(state["peak_bytes"])
        self._since_change = int(state["since_change"])
        self.failed = [Attempt(**a) for a in state["failed"]]
        self.violations = [Attempt(**a) for a in state["violation_list"]]


def update_overhead(optimizer: Optimizer) -> int:
    """Bytes ``optimizer.step()`` allocates beyond what is live before it: state it creates, temporaries.

    Measured by stepping a twin optimizer over host copies of the parameters,
    gradients for every trainable one and the current state (so the first
    step's state creation is included until that state exists), with the
    tracked meter; the real parameters are not touched. Bytes do not depend on
    where they would live, so the host measures them for any device.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params:
        return 0
    copies = {id(p): _host_copy(p) for p in params}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [copies[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    twin = type(optimizer)(groups)
    for p in params:
        if p in optimizer.state:
            twin.state[copies[id(p)]] = {
                k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else copy.deepcopy(v)
                for k, v in optimizer.state[p].items()
            }
    meter = TrackedMemoryMeter("cpu")
    meter.track(twin, *copies.values())
    before = meter.current_bytes()
    with meter:
        twin.step()
    return max(meter.peak_bytes - before, 0)


def _host_copy(p: Tensor) -> nn.Parameter:
    twin = nn.Parameter(p.detach().to("cpu", copy=True), p.requires_grad)
    if p.requires_grad:  # measured before the backward pass: every trainable parameter will have one
        twin.grad = torch.zeros_like(twin)
    return twin
