"""Inference throughput (images per second), the measure of the paper's Table 3.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    >>> row = measure_throughput(model, (3, 8, 8), batch_size=4, warmup=1, repeats=3)
    >>> row["batch_size"], row["images_per_s"] > 0
    (4, True)
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

Model = nn.Module | ExportedProgram


def measure_throughput(
    model: Model,
    input_shape: Sequence[int],
    batch_size: int,
    device: str | torch.device = "cpu",
    warmup: int = 10,
    repeats: int = 50,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Median images per second of ``model`` on random batches of ``batch_size``.

    An ``nn.Module`` is put in eval mode and moved to ``device`` (in place); an
    ``ExportedProgram`` runs as exported (its batch norm already frozen in eval
    mode). Every forward pass runs under ``torch.inference_mode``; ``warmup``
    untimed passes come first (allocator, oneDNN/cuDNN algorithm choice), then
    ``repeats`` timed ones. On CUDA the device is synchronised before the clock
    starts and before it stops, so a time covers the kernels, not their launch.
    ``num_threads`` sets PyTorch's CPU threads for the measurement (``None``
    keeps the current setting). On a CPU shared with other work, 1 avoids
    threads waiting on each other for a busy core, which can slow small
    models by two orders of magnitude.

    Returns ``batch_size``, ``images_per_s`` (the median over repeats),
    ``seconds_per_batch`` (median), ``repeats`` and ``device``.
    """
    (row,) = _measure([model], input_shape, batch_size, device, warmup, repeats, num_threads)
    return row


def compare_throughput(
    exit_model: Model,
    full_model: Model,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    device: str | torch.device = "cpu",
    warmup: int = 10,
    repeats: int = 50,
    num_threads: int | None = None,
) -> list[dict[str, Any]]:
    """Throughput of an exit model against the full model, one row per batch size.

    Measured as :func:`measure_throughput` does, with the two models timed in
    turns (one pass of each per repeat), so that a change in the machine's load
    hits both alike. Each row has ``batch_size``, ``exit_images_per_s``,
    ``full_images_per_s`` and ``speedup`` (exit over full, Table 3's ratio).

    >>> from torch import nn
    >>> small, large = nn.Linear(8, 2), nn.Sequential(nn.Linear(8, 512), nn.Linear(512, 2))
    >>> [sorted(row) for row in compare_throughput(small, large, (8,), (2,), warmup=1, repeats=2)]
    [['batch_size', 'exit_images_per_s', 'full_images_per_s', 'speedup']]
    """
    rows = []
    for batch in batch_sizes:
        models = [exit_model, full_model]
        exit_row, full_row = _measure(models, input_shape, batch, device, warmup, repeats, num_threads)
        rows.append(
            {
                "batch_size": batch,
                "exit_images_per_s": exit_row["images_per_s"],
                "full_images_per_s": full_row["images_per_s"],
                "speedup": exit_row["images_per_s"] / full_row["images_per_s"],
            }
        )
    return rows


def _measure(
    models: Sequence[Model],
    input_shape: Sequence[int],
    batch_size: int,
    device: str | torch.device,
    warmup: int,
    repeats: int,
    num_threads: int | None,
) -> list[dict[str, Any]]:
    """One :func:`measure_throughput` row per model, the models timed in turns."""
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, repeats >= 1 and warmup >= 0, got {batch_size}, {repeats}, {warmup}")
    device = torch.device(device)
    forwards = [_runnable(model, device) for model in models]
    x = torch.randn(batch_size, *input_shape, device=device)
    sync = _synchronizer(device)
    seconds: list[list[float]] = [[] for _ in forwards]
    with _cpu_threads(num_threads), torch.inference_mode():
        for forward in forwards:
            for _ in range(warmup):
                forward(x)
        for _ in range(repeats):
            for forward, times in zip(forwards, seconds):
                sync()
                start = time.perf_counter()
                forward(x)
                sync()
                times.append(time.perf_counter() - start)
    medians = [statistics.median(times) for times in seconds]
    return [
        {
            "batch_size": batch_size,
            "images_per_s": batch_size / median,
            "seconds_per_batch": median,
            "repeats": repeats,
            "device": str(device),
        }
        for median in medians
    ]


def _runnable(model: Model, device: torch.device) -> Callable[[Tensor], Tensor]:
    if isinstance(model, ExportedProgram):
        # The exported module refuses .eval(); its graph already has the eval-mode ops.
        return model.module().to(device)
    return model.eval().to(device)


@contextlib.contextmanager
def _cpu_threads(count: int | None) -> Iterator[None]:
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None
