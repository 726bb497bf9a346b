"""Cross-checking the tracked CPU meter against the operating system's count of resident memory.

The tracked meter (:class:`~nf_lightning.core.memory.meter.TrackedMemoryMeter`) counts
live tensor storage. What a CPU process really holds also has kernel scratch
space, allocator slack and torch's own bookkeeping. :func:`measure_step` runs one
training step under the meter and, for the same step, reads the kernel's
high-water mark of resident memory (``VmHWM``, reset through
``/proc/self/clear_refs`` right before the step): the growth over the resident
memory just before it is an independent measurement of what the step took.
Each measurement runs in a fresh subprocess (:func:`cross_check`), so nothing
another test allocated is in the numbers. Linux only.

Example (``experiments/meter_crosscheck.py`` runs a grid of these)::

    >>> row = cross_check("vgg11", width=0.25, batch=32)     # doctest: +SKIP
    >>> row["total_ratio"] > 1                               # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nf_lightning.core.memory.meter import TrackedMemoryMeter


def measure_step(
    build: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    batch: int,
    num_classes: int = 10,
    setup: Callable[[nn.Module, torch.optim.Optimizer], None] | None = None,
) -> dict[str, Any]:
    """Bytes of one SGD step (forward, backward, update) of ``build()`` at ``batch``, by the meter and by the kernel.

    Resident memory is read before the model is built (the baseline). A first
    step at the same batch warms up kernels and creates the optimizer's state;
    freed heap memory is handed back to the system (``malloc_trim``); then the
    second step is measured both ways. ``step``: what the step adds (the tracked
    meter's peak over the bytes live before it; ``VmHWM`` over ``VmRSS`` before
    it). ``total``: everything training holds at the step's peak (the meter's
    peak with parameters, gradients, optimizer state and batch; ``VmHWM`` over
    the baseline). ``setup(model, optimizer)``, if given, runs before the first
    step (to install a selection of what trains, say).
    """
    torch.manual_seed(0)
    gc.collect()
    _malloc_trim()
    baseline = _status_bytes("VmRSS")
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if setup is not None:
        setup(model, optimizer)
    x = torch.randn(batch, *input_shape)
    y = torch.randint(0, num_classes, (batch,))

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    gc.collect()
    _malloc_trim()
    meter = TrackedMemoryMeter("cpu")
    meter.track(model, optimizer, x, y)
    before_tracked = meter.current_bytes()
    before_rss = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    with meter:
        step()
    hwm = _status_bytes("VmHWM")
    tracked, resident = meter.peak_bytes - before_tracked, hwm - before_rss
    return {
        "batch": batch,
        "tracked_step_bytes": tracked,
        "resident_step_bytes": resident,
        "step_ratio": resident / tracked,
        "tracked_total_bytes": meter.peak_bytes,
        "resident_total_bytes": hwm - baseline,
        "total_ratio": (hwm - baseline) / meter.peak_bytes,
        "runtime_bytes": before_rss - baseline - before_tracked,  # resident before the step, beyond live tensors
    }


def cross_check(model: str, width: float, batch: int, input_shape: tuple[int, ...] = (3, 32, 32)) -> dict[str, Any]:
    """:func:`measure_step` of zoo model ``model`` at ``width`` in a fresh subprocess (one torch thread)."""
    command = [sys.executable, "-m", "nf_lightning.cli.meter_check", model, str(width), str(batch)]
    command += [str(s) for s in input_shape]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"meter cross-check of {model} x{width} at batch {batch} failed:\n{done.stderr[-2000:]}")
    return {"model": model, "width": width, **json.loads(done.stdout.strip().splitlines()[-1])}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: the resident-memory cross-check needs Linux")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed heap memory stays resident, the check is then looser
        pass


def _main() -> None:
    parser = argparse.ArgumentParser(description="one meter cross-check; run by cross_check() in a fresh process")
    parser.add_argument("model")
    parser.add_argument("width", type=float)
    parser.add_argument("batch", type=int)
    parser.add_argument("shape", type=int, nargs="+")
    args = parser.parse_args()
    from nf_lightning.models import create

    torch.set_num_threads(1)
    result = measure_step(lambda: create(args.model, width_mult=args.width), tuple(args.shape), args.batch)
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
