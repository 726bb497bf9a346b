"""Memory budgets: ``"300MB"`` in, ``300000000`` out, and back; :class:`MemoryBudget`, the one value passed down.

SI prefixes are decimal and IEC prefixes are binary, as their standards say:
``MB`` is 10**6 bytes (the paper's "300MB" budgets), ``MiB`` is 2**20 bytes.
Units are case-insensitive; a fractional byte count is rounded down, so a
parsed budget never exceeds what was asked for.

Example:
    >>> parse_bytes("300MB"), parse_bytes("0.5GiB"), parse_bytes("1.5 gb"), parse_bytes(2048)
    (300000000, 536870912, 1500000000, 2048)
    >>> format_bytes(300_000_000), format_bytes(512)
    ('300.0 MB', '512 B')
    >>> MemoryBudget.parse("300MB", overhead=1.5).tensor_bytes
    200000000
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

__all__ = ["DEFAULT_BUDGET", "MemoryBudget", "format_bytes", "parse_bytes"]

DEFAULT_BUDGET = "300MB"  # the paper's budget; what a bare NeuroFluxStrategy() or BudgetedBackpropStrategy() gets

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)\s*", re.IGNORECASE)
_ACCEPTED = (
    'a positive byte count: an int, or a number with an optional unit, e.g. "300MB", "1.5 GB", '
    '"512MiB", "0.5GiB", "100kB", "2048"; units B, kB, MB, GB, TB (powers of 1000) and '
    "KiB, MiB, GiB, TiB (powers of 1024), case-insensitive"
)


def parse_bytes(value: str | int | float) -> int:
    """Number of bytes in ``value``, a byte count or a string such as ``"300MB"``.

    Raises ``ValueError`` (naming the accepted forms) for anything that is not
    a positive amount of at least one byte.

    >>> parse_bytes("512MiB"), parse_bytes("100kB"), parse_bytes("2048")
    (536870912, 100000, 2048)
    """
    amount = _amount(value)
    if amount is None or amount < 1:
        raise ValueError(f"memory budget {value!r} is not {_ACCEPTED}")
    return int(amount)


def _amount(value: object) -> Decimal | None:
    """The exact number of bytes ``value`` denotes, or None if it has no accepted form."""
    if isinstance(value, str):
        match = _PATTERN.fullmatch(value)
        unit = match["unit"].lower() if match else ""
        return Decimal(match["number"]) * _UNITS[unit] if match and unit in _UNITS else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return Decimal(str(value)) if math.isfinite(value) else None


def format_bytes(n: int | float) -> str:
    """``n`` bytes in the largest decimal unit that keeps the number below 1000.

    One decimal for kB and above, so the output parses back with
    :func:`parse_bytes` to within 0.05 of its unit.

    >>> format_bytes(999), format_bytes(23_400_000), format_bytes(999_960), format_bytes(2**30)
    ('999 B', '23.4 MB', '1.0 MB', '1.1 GB')
    """
    if round(abs(n)) < 1000:
        return f"{round(n)} B"
    value = n / 1000
    for unit in ("kB", "MB", "GB"):
        if round(abs(value), 1) < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


@dataclass(frozen=True)
class MemoryBudget:
    """A device memory budget, parsed once where it enters (a strategy, the app, the polish) and passed down.

    Args:
        bytes: device memory for training.
        overhead: device bytes held per tensor byte the meters count; the plan and the
            guard hold tensor bytes to :attr:`tensor_bytes` = ``bytes / overhead``. 1.0 makes
            the budget one of tensor bytes (CUDA's ``memory_allocated``); a CPU process's
            resident memory for a step measured 1.1-2.2x its tensor bytes
            (``experiments/results/meter_crosscheck``: kernel scratch space, allocator slack).

    >>> budget = MemoryBudget.parse("300MB")
    >>> budget.bytes, budget.tensor_bytes, str(budget)
    (300000000, 300000000, '300.0 MB')
    >>> MemoryBudget.parse(budget, overhead=2.0) == MemoryBudget(300_000_000, 2.0)
    True
    """

    bytes: int
    overhead: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes < 1:
            raise ValueError(f"memory budget {self.bytes!r} is not {_ACCEPTED}")
        overhead = self.overhead
        if not isinstance(overhead, (int, float)) or isinstance(overhead, bool) or not overhead >= 1.0:
            raise ValueError(f"memory_overhead is bytes held per tensor byte, at least 1.0; got {overhead!r}")

    @classmethod
    def parse(cls, value: str | int | float | MemoryBudget, overhead: float | None = None) -> MemoryBudget:
        """The budget ``value`` denotes (``"300MB"``, a byte count, or a budget) at ``overhead`` (its own if None)."""
        if isinstance(value, MemoryBudget):
            return value if overhead is None else cls(value.bytes, overhead)
        return cls(parse_bytes(value)) if overhead is None else cls(parse_bytes(value), overhead)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of live tensors allowed: what the plan and the step guard hold training to."""
        return int(self.bytes / self.overhead)

    def __str__(self) -> str:
        return format_bytes(self.bytes)
