"""NeuroFlux against BP and a scratch-trained exit on torchvision's own networks, in a LightningModule users write.

For ``resnet18()`` and ``mobilenet_v2(width_mult=0.5)``, each with the stem
users give them on 32 px images (3x3 stride-1 first convolution, no max-pool),
on the CIFAR-10 JPEG folder copy and the 100-class Tiny ImageNet copy: BP,
NeuroFlux (with a polish of its exit) and ``scratch_exit`` (the exit NeuroFlux
deployed, BP-trained from a fresh initialisation), over the same learning-rate
grid on seed 0, then 3 seeds at each method's best rate. The machinery is
:mod:`nf_lightning.benchmark.tv_rows` (runs), ``tv_worker`` (one row),
``tv_models`` (the module and stems) and ``tv_report`` (checks, summary, table).

    NF_DATA_DIR=../shared/datasets python experiments/torchvision_check.py --preset quick   # smoke run
    NF_DATA_DIR=../shared/datasets python experiments/torchvision_check.py                  # the check (long)

A row saved by the same code with the same settings is reused, so a killed
check continues where it stopped. Writes ``experiments/results/torchvision_check/<preset>/summary.json``
and ``summary.md``. For timings from one commit, run it from a pinned snapshot
(``experiments/README.md``, "Running from a pinned snapshot").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from nf_lightning.benchmark.provenance import code_identity
from nf_lightning.benchmark.tv_report import markdown, summarize
from nf_lightning.benchmark.tv_rows import PRESETS, run_check

RESULTS = Path(__file__).resolve().parent / "results" / "torchvision_check"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--data-dir", default=os.environ.get("NF_DATA_DIR", "../shared/datasets"))
    parser.add_argument("--parallel", type=int, default=2, help="rows at once (one torch thread each)")
    parser.add_argument("--models", nargs="+", help="a subset of the preset's models")
    parser.add_argument("--datasets", nargs="+", help="a subset of the preset's data sets")
    parser.add_argument("--test-subset", type=int, help="score every k-th test image only (smoke runs)")
    parser.add_argument("--out", type=Path, help="results directory (default experiments/results/torchvision_check/<preset>)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("NF_WORK_DIR", "/tmp/nf_torchvision_check")))
    args = parser.parse_args(argv)
    preset = {**PRESETS[args.preset], **{k: v for k, v in (("models", args.models), ("datasets", args.datasets)) if v}}
    root = args.out or RESULTS / args.preset
    start = time.perf_counter()
    results, reused = run_check(preset, root, args.work / args.preset, args.data_dir, args.parallel, args.test_subset)
    summary = summarize(results, args.preset, preset)
    summary.update(reused=reused, code=code_identity(), wall_seconds_this_invocation=round(time.perf_counter() - start, 1))
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    (root / "summary.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
