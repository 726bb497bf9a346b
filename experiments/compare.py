"""NeuroFlux against BP, BP with checkpointing, a scratch-trained exit and a depth search, under one memory budget.

A thin command line over :mod:`nf_lightning.benchmark` (the rules, presets and
outputs are described in ``experiments/README.md``):

    NF_DATA_DIR=../shared/datasets python experiments/compare.py --preset quick          # smoke run
    NF_DATA_DIR=../shared/datasets python experiments/compare.py                         # CIFAR-10, 3 seeds
    NF_DATA_DIR=../shared/datasets python experiments/compare.py --preset tiny_imagenet  # Tiny ImageNet-100
    python experiments/compare.py --readme       # README section from the committed summaries
"""

from __future__ import annotations

import sys
from pathlib import Path

from nf_lightning.benchmark.cli import main

if __name__ == "__main__":
    main(sys.argv[1:], repo=Path(__file__).resolve().parents[1])
