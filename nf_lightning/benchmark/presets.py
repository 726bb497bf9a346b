"""The compared methods, the benchmark's presets and the constants of its rules.

Example:
    >>> sorted(PRESETS)
    ['default', 'large', 'quick', 'tiny_imagenet']
    >>> [m for m in METHODS if m in SCRATCH_LIKE]
    ['scratch_exit', 'depth_search']
"""

from __future__ import annotations

from typing import Any

METHODS = ("bp", "bp_ckpt", "neuroflux", "scratch_exit", "depth_search")
"""The compared methods; ``--classic-ll`` adds ``classic_ll``."""
LABELS = {
    "bp": "BP", "bp_ckpt": "BP + checkpointing", "neuroflux": "NeuroFlux", "classic_ll": "classic LL",
    "scratch_exit": "scratch exit", "depth_search": "depth search",
}  # fmt: skip
COLOURS = {
    "bp": "tab:blue", "bp_ckpt": "tab:purple", "neuroflux": "tab:green", "classic_ll": "tab:orange",
    "scratch_exit": "tab:red", "depth_search": "tab:brown",
}  # fmt: skip
BP_LIKE = ("bp", "bp_ckpt", "scratch_exit", "depth_search")
"""Methods trained by ordinary Lightning training (cosine over ``bp_epochs``); the others are local learning."""
SCRATCH_LIKE = ("scratch_exit", "depth_search")
"""BP from a fresh initialisation on an exit's architecture (units ``0..k`` and unit ``k``'s head)."""
LOCAL = ("neuroflux", "classic_ll")

BUDGET_BATCH = 8
"""The default budget is the smallest at which plain BP trains at this batch size."""
TARGET_MARGIN = 0.01
"""The target is BP's best validation accuracy (mean over seeds) minus this (one point)."""
CONVERGENCE_FRACTION = 0.2
CONVERGENCE_GAIN = 0.005
"""A run converged when it gained at most this much validation accuracy over its last fifth."""
ACCURACY_EPSILON = 1e-6

RECORD_FILE = "record.json"
PROBE_FILE = "probe.json"
SPEC_FILE = "spec.json"
LOG_FILE = "log.txt"
SNAPSHOT_DIR = "snapshots"

TEST_SPLITS = {"tiny_imagenet": "its official validation images, scored as the test split"}
"""What each data set's test split is, where it is not the data set's own test split."""

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {  # a smoke run of the whole machinery: a few minutes on 2 cores
        "data": "cifar10_folder", "train_subset": 1000, "val_subset": 500, "test_subset": 0, "seeds": 1,
        "lrs": [0.05], "bp_epochs": 4, "nf_epochs": 2, "polish_epochs": 2,
    },
    "default": {  # CIFAR-10: 2 learning rates, BP 30 epochs (cosine) at its tightest budget
        "data": "cifar10_folder", "train_subset": 5000, "val_subset": 1000, "test_subset": 0, "seeds": 3,
        "lrs": [0.05, 0.1], "bp_epochs": 30, "nf_epochs": 10, "polish_epochs": 20,
    },
    "tiny_imagenet": {  # the shared Tiny ImageNet-100 copy: 9,000 / 1,000 images, its 5,000 validation images as test
        "data": "tiny_imagenet", "train_subset": 0, "val_subset": 0, "test_subset": 0, "seeds": 3,
        "lrs": [0.05, 0.1], "bp_epochs": 30, "nf_epochs": 10, "polish_epochs": 20,
    },
    "large": {  # all 45,000 CIFAR-10 training images, 5,000 for validation, longer schedules: for longer machines
        "data": "cifar10_folder", "train_subset": 0, "val_subset": 0, "test_subset": 0, "seeds": 3,
        "lrs": [0.025, 0.05, 0.1], "bp_epochs": 60, "nf_epochs": 20, "polish_epochs": 40,
    },
}  # fmt: skip
