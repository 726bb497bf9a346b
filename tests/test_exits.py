"""Exit selection, exit models, their export and their throughput (no Lightning)."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch
from torch import nn

from nf_lightning import models
from nf_lightning.core.exits import selection as exits, throughput
from nf_lightning.core.exits.aux_heads import build_aux_heads
from nf_lightning.core.network.decompose import decompose
from nf_lightning.core.exits.selection import (
    ExitModel,
    ExitRecord,
    exit_parameters,
    export_program,
    loader_accuracy,
    save_exit,
    select_exit,
)
from nf_lightning.core.exits.throughput import compare_throughput

SHAPE = (3, 32, 32)


def table(*rows: tuple[float, int]) -> list[ExitRecord]:
    """Exit records for units 0, 1, ... from (accuracy, parameters) pairs."""
    return [ExitRecord(unit, accuracy, parameters) for unit, (accuracy, parameters) in enumerate(rows)]


def test_best_accuracy_wins_without_tolerance() -> None:
    records = table((0.60, 100), (0.72, 300), (0.71, 200), (0.72001, 900))
    assert select_exit(records).unit == 3


def test_equal_accuracy_goes_to_fewest_parameters_then_shallowest() -> None:
    assert select_exit(table((0.5, 300), (0.7, 400), (0.7, 350), (0.7, 350))).unit == 2
    # float32 rounding of a logged mean is a tie, not an improvement
    assert select_exit(table((0.1, 10), (0.7, 100), (0.7 + 1e-8, 500))).unit == 1


def test_tolerance_admits_smaller_exits_within_it() -> None:
    records = table((0.60, 100), (0.70, 300), (0.705, 900), (0.72, 2000))
    assert select_exit(records, tolerance=0.0).unit == 3
    assert select_exit(records, tolerance=0.015).unit == 2
    assert select_exit(records, tolerance=0.02).unit == 1
    assert select_exit(records, tolerance=1.0).unit == 0


def test_reference_accuracy_picks_the_smallest_exit_reaching_it() -> None:
    records = table((0.60, 100), (0.70, 300), (0.705, 900), (0.72, 2000))
    assert select_exit(records, reference=0.70).unit == 1
    assert select_exit(records, reference=0.701).unit == 2
    assert select_exit(records, reference=0.5).unit == 0
    assert select_exit(records, reference=0.9).unit == 3  # nothing reaches it: the best
    with pytest.raises(ValueError, match="reference"):
        select_exit(records, reference=1.5)


def test_fewest_parameters_need_not_be_shallowest() -> None:
    records = [ExitRecord(4, 0.8, 500), ExitRecord(2, 0.8, 400), ExitRecord(3, 0.79, 300)]
    assert select_exit(records, tolerance=0.01).unit == 3


@pytest.mark.parametrize(
    ("records", "tolerance", "error"),
    [
        ([], 0.0, "no exits"),
        (table((0.5, 10)), -0.01, "fraction of accuracy"),
        (table((0.5, 10)), 2.0, "0.01 = one percentage point"),
    ],
)
def test_selection_errors(records: list[ExitRecord], tolerance: float, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        select_exit(records, tolerance)


def test_record_rejects_percentages_and_round_trips() -> None:
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
        ExitRecord(0, 71.5, 10)
    record = ExitRecord(2, 0.25, 1234)
    assert ExitRecord.from_dict(record.to_dict()) == record


@pytest.fixture(scope="module")
def vgg11() -> tuple[nn.Module, list[nn.Module], nn.ModuleList]:
    torch.manual_seed(0)
    model = models.create("vgg11", num_classes=10, width_mult=0.25).eval()
    parts = decompose(model)
    heads = nn.ModuleList([*build_aux_heads(parts.units, 10, SHAPE), parts.head]).eval()
    return model, parts.units, heads


def test_exit_model_is_units_then_head_and_independent(vgg11) -> None:
    _, units, heads = vgg11
    x = torch.randn(4, *SHAPE)
    for unit in (0, 3, len(units) - 1):
        model = ExitModel(units, heads, unit)
        expected = x
        for module in units[: unit + 1]:
            expected = module(expected)
        assert torch.equal(model(x), heads[unit](expected))
        assert not model.training
        assert sum(p.numel() for p in model.parameters()) == exit_parameters(units, heads, unit)
    model = ExitModel(units, heads, 1)
    before = model(x)
    with torch.no_grad():
        next(units[0].parameters()).add_(1.0)
    try:
        assert torch.equal(model(x), before)  # copies, not views of the training model
    finally:
        with torch.no_grad():
            next(units[0].parameters()).sub_(1.0)


def test_last_exit_counts_the_whole_model(vgg11) -> None:
    model, units, heads = vgg11
    assert exit_parameters(units, heads, len(units) - 1) == sum(p.numel() for p in model.parameters())
    assert exit_parameters(units, heads, 0) < exit_parameters(units, heads, 1)


def test_full_vgg16_has_the_papers_parameter_count() -> None:
    parts = decompose(models.create("vgg16", num_classes=10))
    heads = [*build_aux_heads(parts.units, 10, SHAPE), parts.head]
    assert round(exit_parameters(parts.units, heads, len(parts.units) - 1) / 1e6, 1) == 14.7


@pytest.mark.parametrize("unit", [-1, 8])
def test_unit_out_of_range(vgg11, unit: int) -> None:
    _, units, heads = vgg11
    with pytest.raises(IndexError, match="out of range for 8 units"):
        ExitModel(units, heads, unit)


def test_exported_program_has_a_dynamic_batch(vgg11, tmp_path: Path) -> None:
    _, units, heads = vgg11
    model = ExitModel(units, heads, 2)
    export_program(model, SHAPE, tmp_path / "exit.pt2")
    loaded = torch.export.load(str(tmp_path / "exit.pt2")).module()
    for batch in (1, 5):
        x = torch.randn(batch, *SHAPE)
        torch.testing.assert_close(loaded(x), model(x))


def test_early_exit_of_a_deep_model_is_faster(vgg11) -> None:
    model, units, heads = vgg11
    threads = torch.get_num_threads()
    rows = compare_throughput(
        ExitModel(units, heads, 1), model, SHAPE, batch_sizes=(1, 64), warmup=3, repeats=15, num_threads=1
    )
    assert [row["batch_size"] for row in rows] == [1, 64]
    for row in rows:
        assert row["speedup"] == pytest.approx(row["exit_images_per_s"] / row["full_images_per_s"])
        assert row["speedup"] > 1.0, rows
    assert torch.get_num_threads() == threads


def test_throughput_accepts_an_exported_program(vgg11, tmp_path: Path) -> None:
    _, units, heads = vgg11
    program = export_program(ExitModel(units, heads, 0), SHAPE, tmp_path / "exit.pt2")
    row = throughput.measure_throughput(program, SHAPE, batch_size=3, warmup=1, repeats=2, num_threads=1)
    assert row["batch_size"] == 3 and row["images_per_s"] > 0


def test_docstring_examples() -> None:
    assert doctest.testmod(exits).failed == 0
    assert doctest.testmod(throughput).failed == 0


class DataDependent(nn.Module):
    """A branch on a tensor's value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)


def test_save_exit_keeps_the_state_dict_and_writes_no_partial_program(tmp_path: Path) -> None:
    files = save_exit(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()).eval(), (3, 5, 5), tmp_path, "ok")
    assert files == {"state_dict": "ok.pt", "program": "ok.pt2"}
    assert torch.export.load(str(tmp_path / "ok.pt2")).module()(torch.ones(4, 3, 5, 5)).shape == (4, 18)
    with pytest.warns(UserWarning, match="torch.export could not capture bad"):
        files = save_exit(DataDependent(), (3, 5, 5), tmp_path, "bad")
    assert files == {"state_dict": "bad.pt", "program": None}
    assert (tmp_path / "bad.pt").is_file() and not (tmp_path / "bad.pt2").exists()


def test_loader_accuracy_counts_every_batch_and_refuses_an_empty_loader() -> None:
    model = nn.Identity()
    batches = [(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1])),
               (torch.tensor([[2.0, 0.0]]), torch.tensor([0]))]
    assert loader_accuracy(model, batches) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="empty"):
        loader_accuracy(model, [])
