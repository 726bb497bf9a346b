"""Check the profiler's predictions against real training steps on CPU.

For each model, every unit (with its adaptive aux head; the last with the model's head)
and the whole model under backprop are profiled on fake tensors at the fit batch sizes;
real CPU steps at other batch sizes are then measured with the tracked meter and compared
with the fits' predictions.

    python experiments/validate_profiler.py                      # width 1.0, all three models
    python experiments/validate_profiler.py --width 0.25 --models vgg16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from nf_lightning import models
from nf_lightning.core.exits.aux_heads import build_aux_heads
from nf_lightning.core.network.decompose import decompose
from nf_lightning.core.memory.profiler import LinearMemoryModel, profile_backprop, profile_units

MB = 1e6
INPUT_SHAPE = (3, 32, 32)


def validate(name: str, width: float, fit_batches: Sequence[int], check_batches: Sequence[int]) -> float:
    """Print one table for ``name``; return its worst relative error."""
    model = models.create(name, num_classes=10, width_mult=width)
    parts = decompose(model)
    aux_heads = build_aux_heads(parts.units, 10, INPUT_SHAPE, policy="adaptive")
    start = time.perf_counter()
    fits = profile_units(parts.units, aux_heads, parts.head, INPUT_SHAPE, fit_batches)
    fits.append(profile_backprop(model, INPUT_SHAPE, fit_batches))
    profiling = time.perf_counter() - start
    real = profile_units(parts.units, aux_heads, parts.head, INPUT_SHAPE, check_batches, fake=False)
    real.append(profile_backprop(model, INPUT_SHAPE, check_batches, fake=False))
    labels = [f"unit {i}" for i in range(len(parts.units))] + ["BP"]

    print(f"\n{name} width {width}: {len(parts.units)} units, fake profiling {profiling:.1f} s")
    columns = "".join(f"  {f'pred@{b}':>8} {f'meas@{b}':>8} {'err':>6}" for b in check_batches)
    print(f"{'':8}{'static MB':>10}{'MB/sample':>10}{'fit err':>8}{columns}")
    worst = 0.0
    for label, fit, measured in zip(labels, fits, real):
        cells, errors = _compare(fit, measured)
        worst = max(worst, *errors)
        print(f"{label:8}{fit.static_bytes / MB:10.2f}{fit.slope / MB:10.3f}{fit.rel_error:8.2%}{cells}")
    print(f"worst error {worst:.2%}")
    return worst


def _compare(fit: LinearMemoryModel, measured: LinearMemoryModel) -> tuple[str, list[float]]:
    cells, errors = "", []
    for batch, peak in measured.samples:
        predicted = fit.predict(batch)
        errors.append(abs(predicted - peak) / peak)
        cells += f"  {predicted / MB:8.2f} {peak / MB:8.2f} {errors[-1]:6.1%}"
    return cells, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18", "mobilenetv2"])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--fit-batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--check-batches", type=int, nargs="+", default=[6, 12])
    args = parser.parse_args()
    torch.manual_seed(0)
    worst = max(validate(name, args.width, args.fit_batches, args.check_batches) for name in args.models)
    print(f"\nworst error over all models: {worst:.2%}")


if __name__ == "__main__":
    main()
