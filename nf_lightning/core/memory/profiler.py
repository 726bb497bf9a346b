"""Profiler (NeuroFlux §5.2): peak training memory of each unit as a linear function of batch size.

Each unit, with its auxiliary head, is trained for a step at a few batch sizes on copies of
its modules; the measured peaks are fitted by least squares, ``peak ~= slope*batch + intercept``.
By default (any device but CUDA) the copies hold *fake* tensors (``FakeTensorMode``): shapes
and storage sizes without data, so profiling costs almost nothing and is exact for the
ops it sees. On CUDA, real steps on device copies are measured by the allocator.
The user's modules are never touched: not their values, buffers, modes nor ``requires_grad``.

Example:
    >>> from torch import nn
    >>> unit = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    >>> aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    >>> model = profile_unit(unit, aux, (3, 32, 32), batch_sizes=(2, 4, 8))
    >>> model.rel_error < 0.01, model.max_batch(10 * 2**20) > 8
    (True, True)
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.optim import Optimizer

from nf_lightning.core.memory.meter import MemoryMeter, TrackedMemoryMeter, meter_for

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "LinearMemoryModel",
    "default_optimizer",
    "profile_backprop",
    "profile_inference",
    "profile_unit",
    "profile_units",
]

DEFAULT_BATCH_SIZES: tuple[int, ...] = (2, 4, 8, 16, 32)  # fake steps cost the same at any batch
OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
Shape = Sequence[int]


def default_optimizer(params: Iterable[nn.Parameter]) -> Optimizer:
    """SGD with momentum 0.9: one state tensor (the momentum buffer) per parameter."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


@dataclass
class LinearMemoryModel:
    """Peak memory of a training step as a linear function of the batch size, with a floor.

    Large batches are linear (activations dominate); at small batches the peak
    settles on a floor set by batch-independent work such as the optimizer
    step. So the line is fitted to the larger half of the profiled batch sizes
    and the prediction never drops below the peak measured at the smallest one.

    Example:
        >>> m = LinearMemoryModel.fit([(2, 300), (4, 500), (8, 900)], static_bytes=80,
        ...                           input_bytes_per_sample=12)
        >>> m.slope, round(m.intercept), m.max_batch(1000), m.max_batch(50)
        (100.0, 100, 9, 0)
        >>> LinearMemoryModel.fit([(2, 900), (4, 910), (8, 1000), (16, 1800)], 0, 0).predict(1)
        900.0
    """

    slope: float
    intercept: float
    rel_error: float  # max relative error of the fit on its samples
    samples: list[tuple[int, int]]  # (batch, measured peak bytes)
    static_bytes: int  # params, buffers, grads and optimizer state: independent of the batch
    input_bytes_per_sample: int  # one sample of the input batch
    floor: float = 0.0  # peak at the smallest profiled batch: no batch needs less

    @classmethod
    def fit(
        cls, samples: Sequence[tuple[int, int]], static_bytes: int, input_bytes_per_sample: int
    ) -> LinearMemoryModel:
        """Least-squares line through the larger half of ``(batch, peak)`` samples, floored at the smallest."""
        ordered = sorted((int(b), int(p)) for b, p in samples)
        if len({b for b, _ in ordered}) < 2:
            raise ValueError(f"need samples at two or more batch sizes, got {list(samples)}")
        upper = ordered[(len(ordered) - 1) // 2 :]
        batches = [float(b) for b, _ in upper]
        peaks = [float(p) for _, p in upper]
        mean_b, mean_p = sum(batches) / len(upper), sum(peaks) / len(upper)
        spread = sum((b - mean_b) ** 2 for b in batches)
        slope = sum((b - mean_b) * (p - mean_p) for b, p in zip(batches, peaks)) / spread
        intercept = mean_p - slope * mean_b
        model = cls(slope, intercept, 0.0, ordered, static_bytes, input_bytes_per_sample, float(ordered[0][1]))
        model.rel_error = max(abs(model.predict(b) - p) / p for b, p in ordered)
        return model

    def predict(self, batch: int) -> float:
        """Predicted peak bytes of a step at this batch size."""
        return max(self.slope * batch + self.intercept, self.floor)

    def max_batch(self, budget_bytes: int) -> int:
        """Largest batch whose predicted peak fits the budget (0 if none does).

        A fit that does not grow with the batch fits any batch, reported as ``sys.maxsize``.
        """
        if self.predict(1) > budget_bytes:
            return 0
        if self.slope <= 0:
            return sys.maxsize
        batch = math.floor((budget_bytes - self.intercept) / self.slope)
        while self.predict(batch) > budget_bytes:  # guard float rounding at the boundary
            batch -= 1
        return batch

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly form."""
        return {**asdict(self), "samples": [list(s) for s in self.samples]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearMemoryModel:
        return cls(**{**data, "samples": [tuple(s) for s in data["samples"]]})


def profile_unit(
    unit: nn.Module,
    aux: nn.Module | None,
    input_shape: Shape,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    optimizer_factory: OptimizerFactory | None = None,
    device: str | torch.device = "cpu",
    num_classes: int = 10,
    fake: bool | None = None,
) -> LinearMemoryModel:
    """Fit the peak memory of one local-learning step of ``unit`` with its head ``aux``.

    The step: input batch and labels resident, ``out = unit(x)``, cross-entropy of
    ``aux(out)``, backward, optimizer step, ``zero_grad(set_to_none=True)``; ``out`` stays
    live to the end, as it is the next unit's input. A first, unmeasured step creates the
    optimizer's state, so it counts (on a real CUDA device, one per batch size, to settle
    per-shape kernels and workspaces too). ``aux=None`` means ``unit`` returns the logits
    itself; for the last unit pass the model's classifier as ``aux``.
    ``optimizer_factory(params)`` builds the optimizer (``default_optimizer`` if None);
    ``fake=None`` profiles on fake tensors everywhere but on CUDA.

    Example:
        >>> from torch import nn
        >>> fc = profile_unit(nn.Linear(100, 10), None, (100,), batch_sizes=(1, 2))
        >>> fc.static_bytes, fc.input_bytes_per_sample    # (1000 + 10) * 4 bytes * 3
        (12120, 400)
    """
    device, fake = _target(device, fake)
    baseline = _new_meter(device, fake).current_bytes()  # what the device held before the copies
    samples = []
    with _copies([unit, aux], device, fake, train=True) as (unit_copy, aux_copy):
        assert unit_copy is not None
        modules = [m for m in (unit_copy, aux_copy) if m is not None]
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        optimizer = (optimizer_factory or default_optimizer)(params)
        for index, batch in enumerate(batch_sizes):
            try:
                x = _random_input(unit, input_shape, batch, device)
                y = torch.randint(num_classes, (batch,), device=device)
                if index == 0 or _warm_up_each_shape(device, fake):
                    _local_step(unit_copy, aux_copy, optimizer, x, y)  # creates the optimizer's state
                meter = _new_meter(device, fake)
                meter.track(*modules, optimizer, x, y)
                with meter:
                    out = _local_step(unit_copy, aux_copy, optimizer, x, y)
            except torch.OutOfMemoryError:  # a real device too small for this batch: fit what was measured
                if len(samples) < 2:
                    raise
                break
            del out
            samples.append((batch, meter.peak_bytes - baseline))
        static = _held_bytes(*modules, optimizer, device=device) + sum(_nbytes(p) for p in params)
    return LinearMemoryModel.fit(samples, static, _sample_bytes(unit, input_shape))


def profile_units(
    units: Sequence[nn.Module],
    aux_heads: Sequence[nn.Module],
    head: nn.Module,
    input_shape: Shape,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    optimizer_factory: OptimizerFactory | None = None,
    device: str | torch.device = "cpu",
    num_classes: int = 10,
    fake: bool | None = None,
) -> list[LinearMemoryModel]:
    """``profile_unit`` for every unit with its aux head, the last one with the model's ``head``.

    Each unit is profiled on the output shape of the one before it.

    Example:
        >>> from torch import nn
        >>> units = [nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 3)]
        >>> aux_heads = [nn.Sequential(nn.Flatten(), nn.Linear(8 * 15 * 15, 10))]
        >>> head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 13 * 13, 10))
        >>> fits = profile_units(units, aux_heads, head, (3, 32, 32), batch_sizes=(1, 2))
        >>> [f.input_bytes_per_sample for f in fits]       # 3*32*32 and 8*15*15 floats
        [12288, 7200]
    """
    if len(aux_heads) != len(units) - 1:
        raise ValueError(f"{len(units)} units need {len(units) - 1} aux heads, got {len(aux_heads)}")
    fits, shape = [], tuple(input_shape)
    for unit, exit_head in zip(units, [*aux_heads, head]):
        fits.append(profile_unit(unit, exit_head, shape, batch_sizes, optimizer_factory, device, num_classes, fake))
        shape = _output_shape(unit, shape)
    return fits


def profile_backprop(
    model: nn.Module,
    input_shape: Shape,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    optimizer_factory: OptimizerFactory | None = None,
    device: str | torch.device = "cpu",
    num_classes: int = 10,
    fake: bool | None = None,
) -> LinearMemoryModel:
    """Fit the peak memory of an ordinary backprop step of the whole ``model`` (the BP baseline).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
        >>> profile_backprop(net, (3, 32, 32), batch_sizes=(2, 4)).slope > 0
        True
    """
    return profile_unit(model, None, input_shape, batch_sizes, optimizer_factory, device, num_classes, fake)


def profile_inference(
    model: nn.Module,
    input_shape: Shape,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    device: str | torch.device = "cpu",
    fake: bool | None = None,
) -> LinearMemoryModel:
    """Fit the peak memory of a forward pass of ``model`` in eval mode under ``no_grad``.

    Example:
        >>> from torch import nn
        >>> fit = profile_inference(nn.Linear(100, 10), (100,), batch_sizes=(1, 2))
        >>> fit.static_bytes, fit.slope                    # weights; input + output per sample
        (4040, 440.0)
    """
    device, fake = _target(device, fake)
    baseline = _new_meter(device, fake).current_bytes()
    samples = []
    with _copies([model], device, fake, train=False) as (model_copy,), torch.no_grad():
        assert model_copy is not None
        for batch in batch_sizes:
            x = _random_input(model, input_shape, batch, device)
            if _warm_up_each_shape(device, fake):
                model_copy(x)
            meter = _new_meter(device, fake)
            meter.track(model_copy, x)
            with meter:
                out = model_copy(x)
            del out
            samples.append((batch, meter.peak_bytes - baseline))
        static = _held_bytes(model_copy, device=device)
    return LinearMemoryModel.fit(samples, static, _sample_bytes(model, input_shape))


def _target(device: str | torch.device, fake: bool | None) -> tuple[torch.device, bool]:
    """The device to profile for, and whether on fake tensors (by default: unless CUDA)."""
    device = torch.device(device)
    return device, device.type != "cuda" if fake is None else fake


def _warm_up_each_shape(device: torch.device, fake: bool) -> bool:
    """Whether a step must run once per input shape before measuring: on a real CUDA device,
    where cuDNN and cuBLAS choose kernels and allocate workspaces for each new shape."""
    return device.type == "cuda" and not fake


def _new_meter(device: torch.device, fake: bool) -> MemoryMeter:
    return TrackedMemoryMeter(device) if fake else meter_for(device)


def _local_step(unit: nn.Module, aux: nn.Module | None, optimizer: Optimizer, x: Tensor, y: Tensor) -> Tensor:
    """One local-learning update; returns the unit's output (kept for the next unit)."""
    out = unit(x)
    F.cross_entropy(out if aux is None else aux(out), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


@contextmanager
def _copies(
    modules: list[nn.Module | None], device: torch.device, fake: bool, train: bool
) -> Iterator[list[nn.Module | None]]:
    """Copies of ``modules`` on ``device``; fake ones live in a ``FakeTensorMode`` kept active."""
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None

    def clone(tensor: Tensor) -> Tensor:
        if mode is None:
            new = tensor.detach().to(device, copy=True)
        else:
            with mode:
                new = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=device)
        return nn.Parameter(new, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new

    present = [m for m in modules if m is not None]
    tensors = chain.from_iterable(chain(m.parameters(), m.buffers()) for m in present)
    memo: dict[int, Any] = {id(t): clone(t) for t in tensors}  # deepcopy takes these instead of copying
    copies = [None if m is None else copy.deepcopy(m, memo).train(train) for m in modules]
    with mode if mode is not None else nullcontext():
        yield copies


def _output_shape(unit: nn.Module, input_shape: Shape) -> tuple[int, ...]:
    """Shape of one sample of ``unit``'s output, from a fake forward pass."""
    with _copies([unit], torch.device("cpu"), fake=True, train=False) as (unit_copy,), torch.no_grad():
        assert unit_copy is not None
        return tuple(unit_copy(torch.empty(1, *input_shape, dtype=_float_dtype(unit))).shape[1:])


def _random_input(module: nn.Module, input_shape: Shape, batch: int, device: torch.device) -> Tensor:
    return torch.randn(batch, *input_shape, dtype=_float_dtype(module), device=device)


def _float_dtype(module: nn.Module) -> torch.dtype:
    """Dtype of the module's floating-point parameters (the input batch gets the same)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())


def _sample_bytes(module: nn.Module, input_shape: Shape) -> int:
    return math.prod(input_shape) * _float_dtype(module).itemsize


def _held_bytes(*objects: nn.Module | Optimizer, device: torch.device) -> int:
    """Bytes of the distinct storages that modules and optimizers hold on ``device``."""
    meter = TrackedMemoryMeter(device)
    meter.track(*objects)
    return meter.current_bytes()


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
