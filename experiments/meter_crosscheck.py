"""How the tracked CPU meter compares with the kernel's count of resident memory (issue 11).

For zoo models at a few widths and batch sizes, one SGD step is measured in a
fresh subprocess by the tracked meter and by ``VmHWM`` (see
``nf_lightning.cli.meter_check``). Writes ``results/meter_crosscheck/summary.{json,md}``.

    python experiments/meter_crosscheck.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from nf_lightning.cli.meter_check import cross_check

OUT = Path(__file__).resolve().parent / "results" / "meter_crosscheck"
GRID = [("vgg11", 0.25), ("resnet18", 0.25), ("mobilenetv2", 0.5)]
BATCHES = (8, 32, 128)


def main() -> None:
    rows = []
    for model, width in GRID:
        for batch in BATCHES:
            row = cross_check(model, width, batch)
            rows.append(row)
            print(f"{model} x{width} batch {batch}: tracked {row['tracked_step_bytes'] / 1e6:.1f} MB, "
                  f"resident {row['resident_step_bytes'] / 1e6:.1f} MB, ratio {row['step_ratio']:.2f}", flush=True)
    ratios = [r["step_ratio"] for r in rows]
    summary = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
        "step_ratio": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
        "runtime_bytes_median": statistics.median(r["runtime_bytes"] for r in rows),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        "# Tracked CPU meter against resident memory (one SGD step, fresh process, one thread)", "",
        "| model | batch | tracked step MB | resident step MB | ratio | tracked total MB | resident total MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} x{r['width']} | {r['batch']} | {r['tracked_step_bytes'] / 1e6:.1f} | "
            f"{r['resident_step_bytes'] / 1e6:.1f} | {r['step_ratio']:.2f} | {r['tracked_total_bytes'] / 1e6:.1f} | "
            f"{r['resident_total_bytes'] / 1e6:.1f} |"
        )
    s = summary["step_ratio"]
    lines += ["", f"Step ratio resident/tracked: min {s['min']:.2f}, median {s['median']:.2f}, max {s['max']:.2f}. "
              f"Resident before the step beyond live tensors (torch's code pages, kernel JIT, heap): median "
              f"{summary['runtime_bytes_median'] / 1e6:.0f} MB, a fixed cost of the process, not of the budget."]
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
