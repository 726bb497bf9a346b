"""experiments/compare.py and figures.py: the pure pieces, and one tiny real comparison on CIFAR-10."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # experiments/ is scripts, not a package

import compare
import figures


def nf_history() -> list[dict]:
    """Two blocks: exit 0 is validated twice, then exits 1-2 (exit 0's last value is carried on).

    ``val/acc`` is the module's own metric on the exit NeuroFlux would deploy at that time.
    """
    return [
        {"epoch": 0, "seconds": 10.0, "block": 0, "neuroflux/acc_exit_0": 0.30, "val/acc": 0.30},
        {"epoch": 1, "seconds": 20.0, "block": 0, "neuroflux/acc_exit_0": 0.45, "val/acc": 0.45},
        {"epoch": 2, "seconds": 26.0, "block": 1, "neuroflux/acc_exit_0": 0.45, "neuroflux/acc_exit_1": 0.40,
         "neuroflux/acc_exit_2": 0.38, "val/acc": 0.45},
        {"epoch": 3, "seconds": 31.0, "block": 1, "neuroflux/acc_exit_0": 0.45, "neuroflux/acc_exit_1": 0.52,
         "neuroflux/acc_exit_2": 0.50, "val/acc": 0.52},
    ]


def bp_history() -> list[dict]:
    return [
        {"epoch": 0, "seconds": 40.0, "block": None, "val/loss": 1.9, "val/acc": 0.35},
        {"epoch": 1, "seconds": 80.0, "block": None, "val/loss": 1.7, "val/acc": 0.33},
    ]


def row(method: str, budget: str, budget_bytes: int, **values: object) -> dict:
    return {"method": method, "budget": budget, "budget_bytes": budget_bytes, "could_run": True, **values}


# --------------------------------------------------------------------------- time to target
def test_accuracy_curve_is_the_best_exit_so_far() -> None:
    assert compare.accuracy_curve(nf_history()) == [(10.0, 0.30), (20.0, 0.45), (26.0, 0.45), (31.0, 0.52)]
    assert compare.accuracy_curve(bp_history()) == [(40.0, 0.35), (80.0, 0.35)]  # a later drop is not "unreached"


def test_time_to_target_uses_any_exit_evaluated_so_far() -> None:
    history = nf_history()
    assert compare.time_to_target(history, 0.30) == 10.0
    assert compare.time_to_target(history, 0.45) == 20.0  # exit 0 in block 0, before any deeper exit exists
    assert compare.time_to_target(history, 0.51) == 31.0  # exit 1 of the second block
    assert compare.time_to_target(history, 0.53) is None
    assert compare.time_to_target(bp_history(), 0.34) == 40.0
    assert compare.time_to_target([], 0.1) is None


def test_time_to_target_ignores_losses_and_order() -> None:
    shuffled = list(reversed(bp_history()))
    assert compare.time_to_target(shuffled, 0.34) == 40.0
    assert compare.record_accuracy({"seconds": 1.0, "val/loss": 3.0}) is None


# --------------------------------------------------------------------------- target and ratios
def test_default_target_is_bp_at_the_most_generous_budget_minus_a_point() -> None:
    runs = [
        row("bp", "10MB", 10_000_000, final_accuracy=0.30),
        row("bp", "40MB", 40_000_000, final_accuracy=0.42),
        row("neuroflux", "80MB", 80_000_000, final_accuracy=0.60),
        {"method": "bp", "budget": "80MB", "budget_bytes": 80_000_000, "could_run": False},
        row("bp", "20MB", 20_000_000, final_accuracy=0.50),
    ]
    assert compare.default_target(runs) == pytest.approx(0.41)
    with pytest.raises(ValueError, match="--target"):
        compare.default_target([r for r in runs if r["method"] != "bp"])


def test_speedup_and_its_lower_bound() -> None:
    nf = row("neuroflux", "20MB", 1, time_to_target_seconds=20.0, train_seconds=60.0)
    bp = row("bp", "20MB", 1, time_to_target_seconds=50.0, train_seconds=90.0)
    assert compare.speedup(bp, nf) == compare.Speedup(2.5, lower_bound=False)
    slow = row("classic_ll", "20MB", 1, time_to_target_seconds=None, curve=[(50.0, 0.3), (100.0, 0.4)])
    assert compare.speedup(slow, nf) == compare.Speedup(5.0, lower_bound=True)
    assert str(compare.speedup(slow, nf)) == ">5.00x"
    assert compare.speedup({"method": "bp", "could_run": False}, nf) is None
    assert compare.speedup(bp, {**nf, "time_to_target_seconds": None}) is None


def test_add_speedups_pairs_runs_of_the_same_budget() -> None:
    rows = [
        row("bp", "10MB", 1, time_to_target_seconds=30.0, train_seconds=40.0),
        {"method": "classic_ll", "budget": "10MB", "budget_bytes": 1, "could_run": False},
        row("neuroflux", "10MB", 1, time_to_target_seconds=10.0, train_seconds=20.0),
        row("bp", "20MB", 2, time_to_target_seconds=15.0, train_seconds=40.0),
        row("neuroflux", "20MB", 2, time_to_target_seconds=5.0, train_seconds=20.0),
    ]
    compare.add_speedups(rows)
    assert rows[2]["speedup_vs_bp"] == {"value": 3.0, "lower_bound": False}
    assert rows[2]["speedup_vs_classic_ll"] is None
    assert rows[4]["speedup_vs_bp"]["value"] == 3.0 and "speedup_vs_bp" not in rows[3]


def test_summarize_run_prefers_the_exported_exit() -> None:
    exits = [{"unit": 0, "accuracy": 0.45, "parameters": 300}, {"unit": 1, "accuracy": 0.52, "parameters": 1_000}]
    results = {**row("neuroflux", "20MB", 1), "batch_sizes": [64, 128], "train_seconds": 35.0,
               "history": nf_history(), "final_accuracy": 0.52, "measured_peak_bytes": 900,
               "exit": {"parameters": 1_000, "accuracy": 0.52, "exits": exits}}
    summary = compare.summarize_run(results, target=0.5, full_parameters=20_000)
    assert summary["time_to_target_seconds"] == 31.0 and summary["best_accuracy"] == 0.52
    assert (summary["exported_parameters"], summary["exported_from"]) == (1_000, "exit")
    assert summary["target_exit_parameters"] == 1_000
    assert compare.summarize_run(results, target=0.45, full_parameters=20_000)["target_exit_parameters"] == 300
    del results["exit"]
    without_exits = compare.summarize_run(results, 0.5, 20_000)
    assert without_exits["exported_parameters"] == without_exits["target_exit_parameters"] == 20_000
    assert compare.summarize_run(results, 0.6, 20_000)["target_exit_parameters"] is None
    failed = compare.summarize_run({**row("bp", "1MB", 1), "could_run": False, "reason": "too small"}, 0.5, 20_000)
    assert failed == {"method": "bp", "budget": "1MB", "budget_bytes": 1, "could_run": False, "reason": "too small"}


def test_curve_budget_is_the_tightest_with_most_methods() -> None:
    rows = [
        row("neuroflux", "5MB", 5), {**row("bp", "5MB", 5), "could_run": False},
        row("neuroflux", "10MB", 10), row("bp", "10MB", 10),
        row("neuroflux", "40MB", 40), row("bp", "40MB", 40),
    ]
    assert figures.curve_budget_of(rows) == "10MB"


def test_aux_head_flops_are_counted_not_guessed() -> None:
    profile = {e["unit"]: e for e in figures.unit_profile("vgg11", width_mult=0.25)}
    first = profile[0]  # VGG-11's first unit: 16 channels, pooled to 16x16; adaptive head 8 filters, classic 256
    c, h, w = first["channels"], first["height"], first["width"]
    assert (c, h, w) == (16, 16, 16) and first["activation_elements"] == c * h * w

    def conv_and_linear(filters: int) -> int:  # 3x3 conv at the unit's resolution, 2x2 pool, Linear to 10 classes
        return 2 * (9 * c * filters * h * w + filters * 4 * 10)

    assert first["aux_flops_adaptive"] == conv_and_linear(8)
    assert first["aux_flops_classic"] == conv_and_linear(256)
    assert profile[max(profile)]["aux_flops_adaptive"] is None  # the last unit's exit is the model's head


# --------------------------------------------------------------------------- end to end
@pytest.fixture
def cifar(shared_datasets_dir: Path, data_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NF_DATA_DIR", str(shared_datasets_dir))
    monkeypatch.setenv("NF_CACHE_DIR", str(data_cache_dir))
    return shared_datasets_dir


def test_tiny_comparison_writes_summary_figures_and_infeasible_runs(tmp_path: Path, cifar: Path) -> None:
    summary = compare.main([
        "--model", "vgg11", "--width", "0.125", "--budgets", "4MB", "2MB", "--epochs", "1",
        "--train-subset", "500", "--val-subset", "200", "--batch-limit", "64", "--out", str(tmp_path),
    ])
    rows = {(r["budget"], r["method"]): r for r in summary["rows"]}
    assert [r["budget"] for r in summary["rows"]] == ["2MB"] * 3 + ["4MB"] * 3  # tightest first
    assert rows["2MB", "bp"]["could_run"] is False and "batch 1" in rows["2MB", "bp"]["reason"]
    assert rows["2MB", "neuroflux"]["could_run"] and rows["4MB", "bp"]["could_run"]
    assert summary["target_accuracy"] == pytest.approx(rows["4MB", "bp"]["final_accuracy"] - compare.TARGET_MARGIN)
    for budget, method in rows:
        assert (tmp_path / "runs" / f"{budget}_{method}" / "results.json").is_file()
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["rows"] == json.loads(json.dumps(summary["rows"]))
    with (tmp_path / "summary.csv").open() as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == 6 and {line["could_run"] for line in lines} == {"True", "False"}
    for stem in ("fig11_training_time", "fig12_accuracy_vs_time", "fig13_activations_aux_flops"):
        assert (tmp_path / f"{stem}.png").stat().st_size > 0 and (tmp_path / f"{stem}.csv").is_file()
