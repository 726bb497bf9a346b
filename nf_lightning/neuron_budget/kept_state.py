"""The velocity probe's copy of what an epoch's training can change, and its exchange with the model.

:func:`changeable` copies, from the modules in scope, a partly trained conv's
selected rows, the parameters that require a gradient and the buffers (on the
device, or the rows off it); :func:`swapped_state` puts that copy in place of
the current state for a forward pass, exchanging rows in place a few at a time.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> kept = changeable([net])                            # weight and bias require a gradient
    >>> [k.name for k in kept], nbytes(kept[0].tensor)
    (['weight', 'bias'], 16)
    >>> with torch.no_grad():
    ...     _ = net.weight.add_(1)
    >>> with swapped_state(kept):
    ...     bool(torch.equal(net.weight, kept[0].tensor))
    True
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nf_lightning.neuron_budget.partial import AffineBatchNorm2d, PartialConv2d


@dataclass
class Kept:
    """One kept tensor: ``module``'s parameter or buffer ``name``, whole (``rows`` None) or those rows of it;
    ``off_device``: the copy lives off the training device."""

    module: nn.Module
    name: str
    rows: Tensor | None
    tensor: Tensor
    off_device: bool = False


def selected_row_bytes(modules: Sequence[nn.Module]) -> int:
    """Bytes of the selected rows of every partly trained conv: the part of the copy ``off_device`` moves."""
    return sum(len(m.selected_rows) * nbytes(t[0]) for m in _unique_modules(modules) if isinstance(m, PartialConv2d)
               for t in (m.weight, m.bias) if t is not None)


def fixed_copy_bytes(modules: Sequence[nn.Module]) -> int:
    """An upper bound of the kept copy outside the convs' and Linear layers' weights, whatever the selection:
    every buffer, every other parameter and every conv row's index (a byte budget reserves it; the rows
    themselves it prices per neuron)."""
    total = 0
    for module in _unique_modules(modules):
        weights = isinstance(module, (nn.Conv2d, nn.Linear))
        if isinstance(module, nn.Conv2d):
            total += module.out_channels * 8 * (1 + int(module.bias is not None))  # int64 row indices
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and not (weights and name in ("weight", "bias")) and name != "selected_rows" \
                    and not name.endswith("_selected"):
                total += nbytes(tensor)
    return total


def changeable(modules: Sequence[nn.Module], off_device: bool = False) -> list[Kept]:
    """Copies of what an epoch's training can change: a partial conv's selected rows (off the device if
    ``off_device``), the parameters that require a gradient, and the buffers (a fully frozen conv's weight
    is neither, and a frozen BatchNorm's statistics do not change)."""
    kept = []
    for module in _unique_modules(modules):
        if isinstance(module, PartialConv2d):
            rows = module.selected_rows
            if len(rows):
                for name in ("weight", "bias"):
                    source = getattr(module, name)
                    if source is None:
                        continue
                    if off_device:
                        copy = _off_device_empty((len(rows), *source.shape[1:]), source.dtype, source.device)
                        with torch.no_grad():
                            for i, row in enumerate(rows.tolist()):
                                copy[i].copy_(source[row])
                    else:
                        copy = source.index_select(0, rows)
                    kept.append(Kept(module, name, rows.clone(), copy, off_device))
            params = {}
        else:
            params = {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}
        buffers = {} if isinstance(module, AffineBatchNorm2d) else {  # a frozen BatchNorm's statistics stay
            n: b for n, b in module._buffers.items() if b is not None and not (
                isinstance(module, PartialConv2d) and n in ("weight", "bias", "selected_rows"))}
        kept.extend(Kept(module, name, None, t.detach().clone()) for name, t in {**params, **buffers}.items())
    return kept


def _off_device_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialized tensor off ``device``: host memory for an accelerator; for the CPU, an unlinked,
    memory-mapped temporary file (its pages the kernel may write out and drop)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device="cpu")
    numel = math.prod(shape)
    handle, path = tempfile.mkstemp(prefix="nf_velocity_probe_")
    try:
        os.ftruncate(handle, numel * torch.empty((), dtype=dtype).element_size())
        mapped = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(handle)
        os.unlink(path)  # the mapping lives on; the file goes when it does, also after a crash
    return mapped.view(shape)


def _unique_modules(roots: Sequence[nn.Module]) -> Iterator[nn.Module]:
    seen: set[int] = set()
    for root in roots:
        for module in root.modules():
            if id(module) not in seen:
                seen.add(id(module))
                yield module


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@contextlib.contextmanager
def swapped_state(snapshot: Sequence[Kept], aside: int = 0) -> Iterator[None]:
    """The kept tensors in place of the current ones for the block: whole tensors by reference, rows by
    exchanging their contents in place, as many rows at a time as ``aside`` bytes hold (the rows set aside and
    their kept copies brought onto the device; one row at the least), so no second copy of all rows exists."""
    whole = []
    for k in snapshot:
        store = k.module._parameters if k.name in k.module._parameters else k.module._buffers
        if k.rows is None:
            whole.append((store, k.name, store[k.name]))
            store[k.name] = k.tensor
        else:
            _exchange_rows(store[k.name], k.rows, k.tensor, aside)
    try:
        yield
    finally:
        for store, name, tensor in whole:
            store[name] = tensor
        for k in snapshot:
            if k.rows is not None:
                store = k.module._parameters if k.name in k.module._parameters else k.module._buffers
                _exchange_rows(store[k.name], k.rows, k.tensor, aside)


def _exchange_rows(target: Tensor, rows: Tensor, kept: Tensor, aside: int) -> None:
    """Swap ``target[rows[i]]`` and ``kept[i]`` for every ``i``, in place, a run of rows within ``aside`` bytes
    at a time."""
    if not len(rows):
        return
    run = max(1, aside // (2 * nbytes(kept[0])))
    index = rows.to(target.device)
    with torch.no_grad():
        for start in range(0, len(index), run):
            part = index[start:start + run]
            current = target.index_select(0, part)
            target.index_copy_(0, part, kept[start:start + run].to(target.device))
            kept[start:start + run].copy_(current)
