"""Memory budgets as byte counts: ``"300MB"`` in, ``300000000`` out, and back.

SI prefixes are decimal and IEC prefixes are binary, as their standards say:
``MB`` is 10**6 bytes (the paper's "300MB" budgets), ``MiB`` is 2**20 bytes.
Units are case-insensitive; a fractional byte count is rounded down, so a
parsed budget never exceeds what was asked for.

Example:
    >>> parse_bytes("300MB"), parse_bytes("0.5GiB"), parse_bytes("1.5 gb"), parse_bytes(2048)
    (300000000, 536870912, 1500000000, 2048)
    >>> format_bytes(300_000_000), format_bytes(512)
    ('300.0 MB', '512 B')
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

__all__ = ["format_bytes", "parse_bytes", "tensor_budget"]

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


def tensor_budget(budget: str | int | float, memory_overhead: float = 1.0) -> int:
    """Bytes of live tensors allowed under ``budget`` when the device holds ``memory_overhead`` bytes per tensor byte.

    The meters count tensor bytes (on CUDA the allocator's ``memory_allocated``; on CPU
    live tensor storage). A CPU process's resident memory for a training step is
    higher, by 1.1-2.2x in ``experiments/results/meter_crosscheck`` (kernel scratch
    space, allocator slack); a ``memory_overhead`` of that size makes the plan and the
    guard hold resident memory, not only tensor bytes, to the budget.

    >>> tensor_budget("300MB"), tensor_budget("300MB", 1.5)
    (300000000, 200000000)
    """
    if not isinstance(memory_overhead, (int, float)) or isinstance(memory_overhead, bool) or memory_overhead < 1.0:
        raise ValueError(f"memory_overhead is bytes held per tensor byte, at least 1.0; got {memory_overhead!r}")
    return int(parse_bytes(budget) / memory_overhead)
