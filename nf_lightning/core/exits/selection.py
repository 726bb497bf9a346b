"""Early exits (§5.4 of the paper): pick the smallest exit that keeps the best accuracy.

Every unit with its exit head (an auxiliary head, or the model's own head for the
last unit) is a complete classifier. Accuracies are fractions in ``[0, 1]``
throughout, and so is the ``tolerance`` of :func:`select_exit`: ``0.01`` is one
percentage point.

Example:
    >>> records = [ExitRecord(0, 0.61, 1_000), ExitRecord(1, 0.70, 5_000), ExitRecord(2, 0.705, 20_000)]
    >>> select_exit(records).unit, select_exit(records, tolerance=0.01).unit
    (2, 1)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nf_lightning.core.train.batches import split_batch

# Accuracies arrive as float32 means of per-batch accuracies, so two exits with the
# same number of correct predictions can differ in the last bits. Differences below
# this (one sample in a million) are rounding and count as ties.
ACCURACY_EPSILON = 1e-6


@dataclass(frozen=True)
class ExitRecord:
    """One exit: the network up to ``unit`` followed by that unit's exit head.

    Args:
        unit: index of the last unit the exit runs.
        accuracy: validation accuracy as a fraction in ``[0, 1]``.
        parameters: parameters of the units up to ``unit`` plus the exit head.
    """

    unit: int
    accuracy: float
    parameters: int

    def __post_init__(self) -> None:
        if self.unit < 0 or self.parameters < 0:
            raise ValueError(f"unit and parameters must be >= 0, got {self.unit} and {self.parameters}")
        if not 0.0 <= self.accuracy <= 1.0:
            raise ValueError(f"accuracy is a fraction in [0, 1], got {self.accuracy} for unit {self.unit}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExitRecord:
        return cls(unit=int(data["unit"]), accuracy=float(data["accuracy"]), parameters=int(data["parameters"]))


def select_exit(
    records: Iterable[ExitRecord], tolerance: float = 0.0, reference: float | None = None
) -> ExitRecord:
    """The exit with the fewest parameters among those good enough.

    Good enough means within ``tolerance`` of the best accuracy or, when
    ``reference`` (an absolute accuracy) is given, reaching ``reference``; if no
    exit reaches it, the best exit. Ties in parameters go to the shallower exit.
    Both are accuracy fractions (``0.01`` = one percentage point); tolerance ``0``
    keeps only the best accuracy, ``1`` admits every exit.

    >>> select_exit([ExitRecord(0, 0.5, 10), ExitRecord(1, 0.5, 10), ExitRecord(2, 0.4, 5)]).unit
    0
    >>> select_exit([ExitRecord(0, 0.5, 10), ExitRecord(1, 0.7, 20), ExitRecord(2, 0.8, 40)], reference=0.65).unit
    1
    """
    records = list(records)
    if not records:
        raise ValueError("no exits to select from: record at least one exit first")
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(
            f"tolerance is a fraction of accuracy in [0, 1] (0.01 = one percentage point), got {tolerance}"
        )
    if reference is not None and not 0.0 <= reference <= 1.0:
        raise ValueError(f"reference is an accuracy fraction in [0, 1], got {reference}")
    best = max(record.accuracy for record in records)
    floor = best - tolerance if reference is None or reference > best else reference
    candidates = [record for record in records if record.accuracy >= floor - ACCURACY_EPSILON]
    return min(candidates, key=lambda record: (record.parameters, record.unit))


def exit_parameters(units: Sequence[nn.Module], exits: Sequence[nn.Module], unit: int) -> int:
    """Parameters of ``units[0..unit]`` plus ``exits[unit]`` (each shared tensor counted once).

    >>> units = [nn.Linear(4, 4), nn.Linear(4, 4)]
    >>> exit_parameters(units, [nn.Linear(4, 2), nn.Linear(4, 2)], 1)
    50
    """
    _check_unit(units, exits, unit)
    modules = [*units[: unit + 1], exits[unit]]
    unique = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in unique.values())


class ExitModel(nn.Module):
    """A standalone classifier: copies of ``units[0..unit]`` followed by a copy of ``exits[unit]``.

    The copies are in eval mode and independent of the originals, so training
    can go on (or the originals be freed) without changing the exit model.

    Example:
        >>> import torch
        >>> units = [nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Conv2d(8, 8, 3)]
        >>> exits = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)) for _ in units]
        >>> model = ExitModel(units, exits, unit=0)
        >>> model(torch.randn(2, 3, 6, 6)).shape
        torch.Size([2, 10])
    """

    def __init__(self, units: Sequence[nn.Module], exits: Sequence[nn.Module], unit: int) -> None:
        super().__init__()
        _check_unit(units, exits, unit)
        self.unit = unit
        self.units = nn.Sequential(*(copy.deepcopy(u) for u in units[: unit + 1]))
        self.head = copy.deepcopy(exits[unit])
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.units(x))


def export_program(model: nn.Module, input_shape: Sequence[int], path: str | Path) -> torch.export.ExportedProgram:
    """Save ``model`` with ``torch.export`` (batch dimension dynamic) to ``path`` and return the program.

    The file loads with ``torch.export.load(path).module()`` in any process that
    has PyTorch, without this package or the model's source code.

    >>> import tempfile
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval()
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     program = export_program(model, (3, 5, 5), f"{tmp}/model.pt2")
    ...     torch.export.load(f"{tmp}/model.pt2").module()(torch.zeros(7, 3, 5, 5)).shape
    torch.Size([7, 36])
    """
    example = torch.zeros(2, *input_shape, device=next(model.parameters()).device)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return program


def loader_accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    """Fraction of the ``(inputs, labels)`` batches (or dicts, as :func:`split_batch` reads them) of ``loader``
    that ``model`` classifies right, without grad (the model's train/eval mode is the caller's). An empty loader
    raises ``ValueError``.

    >>> model = nn.Linear(2, 2).eval()
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(2)), model.bias.zero_()
    >>> loader_accuracy(model, [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))])
    0.5
    >>> loader_accuracy(model, [{"image": torch.tensor([[1.0, 0.0]]), "label": torch.tensor([0])}])
    1.0
    """
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(batch)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    if total == 0:
        raise ValueError("the loader is empty: there is no accuracy to measure")
    return correct / total


def save_exit(model: nn.Module, input_shape: Sequence[int], directory: str | Path, stem: str) -> dict[str, str | None]:
    """``model``'s state dict as ``<stem>.pt`` and its :func:`export_program` as ``<stem>.pt2`` in ``directory``.

    A model ``torch.export`` cannot capture gets a warning and no ``.pt2`` (never a
    partial one); the state dict is always written. Returns the file names written,
    ``{"state_dict": ..., "program": ... or None}``.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     save_exit(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval(), (3, 5, 5), tmp, "exit")
    {'state_dict': 'exit.pt', 'program': 'exit.pt2'}
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str | None] = {"state_dict": f"{stem}.pt", "program": f"{stem}.pt2"}
    torch.save(model.state_dict(), directory / f"{stem}.pt")
    try:
        export_program(model, input_shape, directory / f"{stem}.pt2")
    except Exception as error:  # torch.export raises many kinds; the caller's results must still be saved
        (directory / f"{stem}.pt2").unlink(missing_ok=True)
        warnings.warn(f"torch.export could not capture {stem}, so no {stem}.pt2 is written: {error}", stacklevel=2)
        files["program"] = None
    return files


def _check_unit(units: Sequence[nn.Module], exits: Sequence[nn.Module], unit: int) -> None:
    if len(units) != len(exits):
        raise ValueError(f"need one exit per unit, got {len(units)} units and {len(exits)} exits")
    if not 0 <= unit < len(units):
        raise IndexError(f"unit {unit} is out of range for {len(units)} units")
