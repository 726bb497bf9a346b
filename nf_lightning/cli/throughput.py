"""``nf-throughput``: inference throughput of a run's early exit against its full model (Table 3).

Examples:
    nf-throughput outputs/2024-05-01/12-00-00_neuroflux_vgg16_300MB
    nf-throughput RUN_DIR --batch-sizes 1 64 256 --device cuda

``RUN_DIR`` is an ``nf-train`` run of NeuroFlux or classic local learning. The
exit is its exported ``export/exit_model.pt2``, run as exported. The full model
is the run's architecture (model and width from ``results.json``, classes and
input shape from ``export/exit.json``) with the weights of the run's newest
checkpoint. Without a checkpoint the freshly built architecture is measured:
throughput does not depend on the weights' values, only on the operations.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nf_lightning import models
from nf_lightning.core.exits.throughput import compare_throughput
from nf_lightning.lightning.early_exit import PROGRAM_FILE, SUMMARY_FILE

EXPORT_DIR = "export"
NET_PREFIX = "net."  # nf-train's ClassifierModule holds the network as `self.net`


def build_full_model(run_dir: Path, results: dict[str, Any], summary: dict[str, Any]) -> tuple[nn.Module, Path | None]:
    """The run's full model, with its newest checkpoint's weights when there is one (else None)."""
    model = models.create(
        results["model"]["name"], num_classes=summary["num_classes"], width_mult=results["model"]["width_mult"]
    )
    checkpoint = newest_checkpoint(run_dir)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix(NET_PREFIX): v for k, v in state.items() if k.startswith(NET_PREFIX)})
    return model, checkpoint


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written ``*.ckpt`` anywhere under ``run_dir``."""
    checkpoints = sorted(run_dir.rglob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    return checkpoints[-1] if checkpoints else None


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of :func:`~nf_lightning.core.exits.throughput.compare_throughput` as aligned text.

    >>> print(format_table([{"batch_size": 1, "exit_images_per_s": 300.0, "full_images_per_s": 100.0, "speedup": 3.0}]))
    batch  exit img/s  full img/s  speedup
        1       300.0       100.0    3.00x
    """
    lines = [f"{'batch':>5}  {'exit img/s':>10}  {'full img/s':>10}  {'speedup':>7}"]
    for row in rows:
        lines.append(
            f"{row['batch_size']:>5}  {row['exit_images_per_s']:>10.1f}  {row['full_images_per_s']:>10.1f}"
            f"  {row['speedup']:>6.2f}x"
        )
    return "\n".join(lines)


def measure_run(
    run_dir: Path,
    batch_sizes: Sequence[int] = (1, 64),
    device: str | torch.device = "cpu",
    warmup: int = 10,
    repeats: int = 50,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Throughput of ``run_dir``'s exported exit against its full model: the rows and what was compared."""
    results = json.loads((run_dir / "results.json").read_text())
    export = run_dir / EXPORT_DIR
    if not (export / PROGRAM_FILE).is_file():
        raise FileNotFoundError(f"no exported exit model in {export} (the run's method is {results.get('method')!r})")
    summary = json.loads((export / SUMMARY_FILE).read_text())
    program = torch.export.load(str(export / PROGRAM_FILE))
    full, checkpoint = build_full_model(run_dir, results, summary)
    return {
        "model": results["model"]["name"],
        "width_mult": results["model"]["width_mult"],
        "device": str(device),
        "exit_unit": summary["unit"],
        "num_units": summary["num_units"],
        "exit_parameters": summary["parameters"],
        "full_parameters": summary["full_parameters"],
        "checkpoint": str(checkpoint) if checkpoint else None,
        "num_threads": num_threads,
        "rows": compare_throughput(
            program, full, summary["input_shape"], batch_sizes, device, warmup, repeats, num_threads
        ),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nf-throughput", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="an nf-train output directory")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    args = parser.parse_args(argv)
    try:
        report = measure_run(args.run_dir, args.batch_sizes, args.device, args.warmup, args.repeats, args.threads)
    except FileNotFoundError as error:
        parser.exit(1, f"nf-throughput: {error}\n")
    checkpoint = report["checkpoint"]
    weights = f"weights of {Path(checkpoint).name}" if checkpoint else "fresh weights (no checkpoint)"
    print(
        f"{report['model']} (width {report['width_mult']}) on {report['device']}: exit after unit "
        f"{report['exit_unit']} of {report['num_units']} ({report['exit_parameters'] / 1e6:.2f}M parameters) "
        f"vs the full model ({report['full_parameters'] / 1e6:.2f}M, {weights})"
    )
    print(format_table(report["rows"]))


if __name__ == "__main__":
    main()
