"""Peak device memory of a measuring window, with one interface for two backends.

``CudaMemoryMeter`` reads the CUDA caching allocator's counters. ``TrackedMemoryMeter``
counts the bytes of live tensor *storages* on a device (views share their base's
storage and are counted once), so it also works on CPU and on fake or meta tensors,
where there is no allocator to ask.

Example:
    >>> import torch
    >>> w = torch.zeros(256)                    # exists before the window: 1 KiB
    >>> meter = meter_for("cpu")
    >>> meter.track(w)
    >>> with meter:
    ...     y = w * 2                           # +1 KiB while alive
    ...     del y
    >>> meter.peak_bytes, meter.current_bytes()
    (2048, 1024)
"""

from __future__ import annotations

import os

import weakref
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["CudaMemoryMeter", "MemoryLimitExceeded", "MemoryMeter", "TrackedMemoryMeter", "meter_for"]

Trackable = nn.Module | Optimizer | Tensor


class MemoryLimitExceeded(torch.OutOfMemoryError):
    """More bytes were live than a meter's ``limit``: a device of that size would have run out.

    A ``torch.OutOfMemoryError`` (alias ``torch.cuda.OutOfMemoryError``), so code that
    handles a real out-of-memory error handles a budget overrun the same way.
    """


class MemoryMeter(Protocol):
    """Peak bytes live on one device during a ``with`` window, pre-existing tensors included.

    With a ``limit``, a window whose peak goes over it raises :class:`MemoryLimitExceeded`.
    """

    @property
    def peak_bytes(self) -> int: ...

    def __enter__(self) -> MemoryMeter: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def reset_peak(self) -> None:
        """Restart the peak from the bytes live now."""

    def current_bytes(self) -> int:
        """Bytes live on the device now."""

    def track(self, *objects: Trackable) -> None:
        """Count tensors that already exist: module parameters, buffers and gradients,
        optimizer state, plain tensors (no-op where the backend sees every allocation)."""


class CudaMemoryMeter:
    """Memory of one CUDA device as the caching allocator reports it.

    Counts every tensor on the device, whoever allocated it, so ``track`` has nothing to do.
    No synchronization is needed: the allocator updates its counters on the host, as
    kernels are queued.
    The ``limit`` is checked when the window closes (the allocator itself raises when the
    device fills up).

    Example:
        >>> with CudaMemoryMeter("cuda:0") as meter:  # doctest: +SKIP
        ...     model(x).sum().backward()
        >>> meter.peak_bytes  # doctest: +SKIP
    """

    def __init__(self, device: str | torch.device = "cuda", limit: int | None = None) -> None:
        self.device = torch.device(device)
        self.limit = limit
        self._peak: int | None = None

    @property
    def peak_bytes(self) -> int:
        """Peak of the window, read live inside it and frozen when it closes."""
        if self._peak is None:
            return torch.cuda.max_memory_allocated(self.device)
        return self._peak

    def __enter__(self) -> CudaMemoryMeter:
        self._peak = None
        self.reset_peak()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._peak = torch.cuda.max_memory_allocated(self.device)
        if exc_info[0] is None:
            _check_limit(self._peak, self.limit, self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def current_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def track(self, *objects: Trackable) -> None:
        """Nothing to do: the allocator already counts every tensor on the device."""


class TrackedMemoryMeter:
    """Live tensor storage on ``device``, followed op by op.

    Inside the window a dispatch mode sees the outputs of every aten op, backward ops
    included, and registers their storages; a finalizer on each storage takes its bytes
    off the live total when it is freed. Each storage counts once, however many views
    share it; in-place ops allocate nothing; a storage resized in place is re-measured.

    Tensors that existed before the window count from its start: register them with
    :meth:`track`, or they are found when an op first reads them, and since they were
    live all along their bytes are added to the peak as well. Scratch memory a kernel
    allocates and frees inside one op is invisible at this level. With a ``limit``, the op
    that takes the peak over it raises :class:`MemoryLimitExceeded`, as an allocator would.

    Works unchanged under ``FakeTensorMode`` (enter the fake mode first): fake tensors
    report their fake device and a storage of the real size.

    Example:
        >>> meter = TrackedMemoryMeter("cpu")
        >>> with meter:
        ...     a = torch.empty(1000)               # 4000 bytes
        ...     b = a.view(10, 100)                 # a view: no new storage
        ...     del a, b
        ...     c = torch.empty(10)                 # 40 bytes
        >>> meter.peak_bytes, meter.current_bytes()
        (4000, 40)
    """

    def __init__(self, device: str | torch.device = "cpu", limit: int | None = None) -> None:
        self.device = torch.device(device)
        self.limit = limit
        self._live: dict[int, int] = {}  # id(storage) -> bytes; the finalizer removes it
        self._current = 0
        self._peak = 0
        self._mode: _OpWatcher | None = None

    @property
    def peak_bytes(self) -> int:
        return self._peak

    def __enter__(self) -> TrackedMemoryMeter:
        self.reset_peak()
        self._mode = _OpWatcher(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._mode is not None, "window closed without being opened"
        self._mode.__exit__(*exc_info)
        self._mode = None

    def reset_peak(self) -> None:
        self._peak = self._current

    def current_bytes(self) -> int:
        return self._current

    def track(self, *objects: Trackable) -> None:
        for tensor in _tensors_of(objects):
            self.add_existing(tensor)

    def add_existing(self, tensor: Tensor) -> None:
        """A tensor live since the window opened: it raises every earlier total, so the peak too."""
        added = self._register(tensor)
        self._peak += added

    def add_new(self, tensors: list[Tensor]) -> None:
        """Tensors an op just returned, all live together."""
        for tensor in tensors:
            self._register(tensor)
        self._peak = max(self._peak, self._current)

    def _register(self, tensor: Tensor) -> int:
        """Start following the tensor's storage; return the bytes this added to the live total."""
        if tensor.layout != torch.strided or not _same_device(tensor.device, self.device):
            return 0
        storage = tensor.untyped_storage()
        key, nbytes = id(storage), storage.nbytes()
        known = self._live.get(key)
        if known is None:
            if nbytes == 0:
                return 0
            # torch keeps one Python object per storage for the storage's whole life (as it
            # does for tensors), so this fires when the storage itself is freed
            finalizer = weakref.finalize(storage, self._release, key)
            finalizer.atexit = False
            known = 0
        self._live[key] = nbytes
        self._current += nbytes - known
        return nbytes - known

    def _release(self, key: int) -> None:
        self._current -= self._live.pop(key)


class _OpWatcher(TorchDispatchMode):
    """Reports each op's inputs (possibly pre-existing) and outputs (new) to a meter."""

    _FRESH_INPUT_OPS = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}

    def __init__(self, meter: TrackedMemoryMeter) -> None:
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = list(_flat_tensors((args, tuple(kwargs.values()))))
        if func in self._FRESH_INPUT_OPS:  # torch.tensor(...): built outside the dispatcher just now
            self.meter.add_new(inputs)
        else:
            for tensor in inputs:
                self.meter.add_existing(tensor)
        out = func(*args, **kwargs)
        self.meter.add_new(list(_flat_tensors(out)))
        _check_limit(self.meter.peak_bytes, self.meter.limit, self.meter.device)
        return out


def _flat_tensors(value: object) -> Iterator[Tensor]:
    """The tensors in an aten op's arguments or results: tensors, nested in lists and tuples."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _flat_tensors(item)


def _tensors_of(objects: tuple[Trackable, ...]) -> Iterator[Tensor]:
    """Every tensor an object holds on to, with the gradients of those that have one."""
    for obj in objects:
        if isinstance(obj, nn.Module):
            held = [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, Optimizer):
            held = tree_leaves((obj.param_groups, list(obj.state.values())))
        elif isinstance(obj, Tensor):
            held = [obj]
        else:
            raise TypeError(f"cannot track {type(obj).__name__}: expected a module, optimizer or tensor")
        for tensor in held:
            if isinstance(tensor, Tensor):
                yield tensor
                if tensor.is_leaf and tensor.grad is not None:
                    yield tensor.grad


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    return actual.type == wanted.type and (wanted.index is None or actual.index in (None, wanted.index))


def _check_limit(peak: int, limit: int | None, device: torch.device) -> None:
    if limit is not None and peak > limit:
        raise MemoryLimitExceeded(f"{peak} bytes live on {device}, over the limit of {limit} bytes")


def meter_for(device: str | torch.device, limit: int | None = None) -> MemoryMeter:
    """``CudaMemoryMeter`` for a CUDA device, ``TrackedMemoryMeter`` for any other.

    Example:
        >>> type(meter_for("cpu")).__name__
        'TrackedMemoryMeter'
    """
    device = torch.device(device)
    return CudaMemoryMeter(device, limit) if device.type == "cuda" else TrackedMemoryMeter(device, limit)


def device_memory_bytes(device: str | torch.device) -> int | None:
    """Total memory of ``device``: the GPU's, or the host's physical memory for the CPU; None if unknown.

    >>> device_memory_bytes("cpu") > 0
    True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def cap_cuda_allocator(device: torch.device, budget: int) -> float | None:
    """On CUDA, make the caching allocator itself refuse to hold more than ``budget`` bytes for this process.

    The budget counts bytes of tensors the allocator hands out (``memory_allocated``); the CUDA
    context and the allocator's cache above the cap are not in it. Returns the fraction set, or
    None on other devices. (Unverified on a GPU in this project's CI: see the README.)
    """
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
