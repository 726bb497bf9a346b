"""Class-balanced, seeded selection of sample indices.

>>> import numpy as np
>>> labels = np.array([0, 0, 0, 1, 1, 1])
>>> chosen = balanced_choice(labels, 4, num_classes=2, rng=np.random.default_rng(0))
>>> np.bincount(labels[chosen]).tolist()
[2, 2]
"""

from __future__ import annotations

import numpy as np


def _balanced_counts(size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class counts summing to ``size``, differing by at most one; ``rng`` picks who gets the extra."""
    counts = np.full(num_classes, size // num_classes, dtype=np.int64)
    counts[rng.choice(num_classes, size % num_classes, replace=False)] += 1
    return counts


def balanced_choice(
    labels: np.ndarray,
    size: int,
    num_classes: int,
    rng: np.random.Generator,
    what: str = "subset",
) -> np.ndarray:
    """Sorted positions of ``size`` items of ``labels``, drawn without replacement, class-balanced.

    ``what`` names the request in error messages (e.g. ``"val_size"``).
    """
    if not 0 <= size <= len(labels):
        raise ValueError(f"{what}={size} is out of range: choose between 0 and {len(labels)}")
    counts = _balanced_counts(size, num_classes, rng)
    chosen = []
    for label, count in enumerate(counts):
        members = np.flatnonzero(labels == label)
        if count > len(members):
            most = num_classes * int(np.bincount(labels, minlength=num_classes).min())
            raise ValueError(
                f"{what}={size} needs {count} items of class {label} but only {len(members)} "
                f"are available; choose at most {most}"
            )
        chosen.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(chosen))
