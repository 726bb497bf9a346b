"""experiments/memory_figures.py end to end on a small VGG-11: files written, numbers consistent.

The script runs as a user runs it, in a process of its own (tests import nothing from ``experiments/``).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "memory_figures.py"
BATCH_LIMIT = 8
BATCHES = (2, 4, 8)  # the planner profiles at powers of two from 2 to the batch limit
BUDGET_MB = 1.0  # between the small width's most and least demanding units at the limit


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of the script at width 0.125, shared by the tests below."""
    out = tmp_path_factory.mktemp("memory_figures")
    argv = ["--model", "vgg11", "--width", "0.125", "--budget", f"{BUDGET_MB}MB", "--batch-limit", str(BATCH_LIMIT)]
    done = subprocess.run([sys.executable, str(SCRIPT), *argv, "--out", str(out)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    paths = sorted(out.iterdir())
    assert sorted(p.name for p in paths) == sorted(
        f"{stem}.{ext}"
        for stem in ("fig4_memory_vs_batch", "fig6_max_batch_per_unit", "fig8_unit_linear_fits")
        for ext in ("csv", "png")
    )
    for path in paths:
        assert path.parent == out and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return out


def _rows(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


def _non_decreasing(values: list[float]) -> bool:
    return all(a <= b for a, b in zip(values, values[1:]))


def test_figure4_orders_the_four_curves(out_dir: Path) -> None:
    rows = _rows(out_dir / "fig4_memory_vs_batch.csv")
    assert [row["batch"] for row in rows] == list(BATCHES)
    for column in ("inference_mb", "bp_mb", "classic_ll_mb", "aan_ll_mb"):
        assert rows[0][column] > 0 and _non_decreasing([row[column] for row in rows]), column
    for row in rows:
        assert row["classic_ll_mb"] >= row["aan_ll_mb"]  # wider heads, and all units resident
        assert row["bp_mb"] > row["inference_mb"]
    assert rows[-1]["classic_ll_mb"] > rows[-1]["bp_mb"]  # the paper's observation on classic LL


def test_figure6_batches_and_blocks_respect_budget_and_limit(out_dir: Path) -> None:
    rows = _rows(out_dir / "fig6_max_batch_per_unit.csv")
    assert [row["unit"] for row in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        assert row["max_batch_capped"] == min(row["max_batch"], BATCH_LIMIT)
        assert 1 <= row["block_batch"] <= row["max_batch_capped"]
        assert row["block_peak_mb"] <= BUDGET_MB
    blocks = [row["block"] for row in rows]
    assert blocks[0] == 1 and all(b - a in (0, 1) for a, b in zip(blocks, blocks[1:]))
    assert min(row["max_batch"] for row in rows) < BATCH_LIMIT < max(row["max_batch"] for row in rows)


def test_figure8_models_follow_the_measured_peaks(out_dir: Path) -> None:
    rows = _rows(out_dir / "fig8_unit_linear_fits.csv")
    units = sorted({row["unit"] for row in rows})
    assert units == [float(u) for u in range(1, len(units) + 1)]
    for unit in units:
        own = [row for row in rows if row["unit"] == unit]
        assert [row["batch"] for row in own] == list(BATCHES)
        assert _non_decreasing([row["measured_mb"] for row in own])
        assert own[0]["floor_mb"] == own[0]["measured_mb"]  # floored at the smallest batch's peak
        for row in own:
            line = row["slope_mb_per_sample"] * row["batch"] + row["intercept_mb"]
            assert row["predicted_mb"] == pytest.approx(max(line, row["floor_mb"]), abs=1e-5)
            assert row["predicted_mb"] == pytest.approx(row["measured_mb"], rel=0.1)
