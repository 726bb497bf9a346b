"""experiments/compare.py: the summary logic on hand-made runs, the README section, and one tiny real benchmark."""

from __future__ import annotations

import doctest
import json
import math
import sys
import time
from pathlib import Path

import pytest

from nf_lightning.cli.common import compose_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # experiments/ is scripts, not a package

import compare
import figures


def history(points: list[tuple[float, float]], block: int | None = None) -> list[dict]:
    return [{"epoch": i, "seconds": s, "block": block, "val/loss": 1.0, "val/acc": a} for i, (s, a) in enumerate(points)]


def nf_history() -> list[dict]:
    """Two blocks: exit 0 in block 0, then exits 1-2 in block 1 (exit 0's last value carried on)."""
    return [
        {"epoch": 0, "seconds": 10.0, "block": 0, "neuroflux/acc_exit_0": 0.30, "val/acc": 0.30},
        {"epoch": 1, "seconds": 20.0, "block": 0, "neuroflux/acc_exit_0": 0.45, "val/acc": 0.45},
        {"epoch": 2, "seconds": 26.0, "block": 1, "neuroflux/acc_exit_0": 0.45, "neuroflux/acc_exit_1": 0.40,
         "neuroflux/acc_exit_2": 0.38, "val/acc": 0.45},
        {"epoch": 3, "seconds": 31.0, "block": 1, "neuroflux/acc_exit_0": 0.45, "neuroflux/acc_exit_1": 0.62,
         "neuroflux/acc_exit_2": 0.50, "val/acc": 0.45},
    ]  # fmt: skip


def record(
    method: str, lr: float, seed: int, hist: list[dict], *, test: float = 0.5, batch: list[int] | None = None,
    exits: list[dict] | None = None, train_seconds: float | None = None, before_fit: float | None = None,
) -> dict:
    """A run's record.json as the worker writes it."""
    results = {
        "method": method, "could_run": True, "budget_bytes": 10_000_000, "history": hist,
        "batch_sizes": batch or [8], "final_accuracy": compare.record_accuracy(hist[-1]),
        "train_seconds": train_seconds or hist[-1]["seconds"] + 5.0, "validation_seconds": 2.0,
        "measured_peak_bytes": 9_900_000,
    }  # fmt: skip
    if before_fit is not None:
        results["before_fit_seconds"] = before_fit
    probe = {"train_loop_seconds": 40.0, "steps": [100] * len(results["batch_sizes"]), "accuracy": test,
             "test_seconds": 5.0}  # fmt: skip
    if exits is not None:
        results["exit"] = {"exits": exits, "full_parameters": 1_000}
        results["plan"] = {"blocks": [{"units": [0]}, {"units": [1, 2]}], "seconds": 1.0}
        probe["exit_accuracies"] = {str(e["unit"]): e["accuracy"] - 0.02 for e in exits}
    spec = {"key": f"{method}_lr{lr:g}_seed{seed}", "method": method, "lr": lr, "seed": seed, "overrides": []}
    return {"spec": spec, "status": "ok", "results": results, "probe": probe}


EXITS = [
    {"unit": 0, "accuracy": 0.45, "parameters": 100},
    {"unit": 1, "accuracy": 0.62, "parameters": 400},
    {"unit": 2, "accuracy": 0.50, "parameters": 1_000},
]


def test_docstring_examples() -> None:
    assert doctest.testmod(compare).failed == 0


# --------------------------------------------------------------------------- curves
def test_accuracy_curve_time_to_target_and_accuracy_at() -> None:
    nf = nf_history()
    assert compare.accuracy_curve(nf) == [(10.0, 0.30), (20.0, 0.45), (26.0, 0.45), (31.0, 0.62)]
    assert compare.time_to_target(nf, 0.45) == 20.0  # exit 0 in block 0, before any deeper exit exists
    assert compare.time_to_target(nf, 0.61) == 31.0  # exit 1, the module's val/acc is lower
    assert compare.time_to_target(nf, 0.63) is None and compare.time_to_target([], 0.1) is None
    bp = history([(40.0, 0.35), (80.0, 0.33)])
    assert compare.accuracy_curve(list(reversed(bp))) == [(40.0, 0.35), (80.0, 0.35)]  # time order, best so far
    assert compare.accuracy_at(bp, 39.0) is None and compare.accuracy_at(bp, 100.0) == 0.35
    assert compare.accuracy_at(nf, 30.0) == 0.45


def test_convergence_rule_is_half_a_point_over_the_last_fifth() -> None:
    rising = history([(float(i), 0.30 + 0.01 * i) for i in range(10)])  # +1 point per validation
    flat_end = history([(float(i), min(0.30 + 0.05 * i, 0.60)) for i in range(10)])
    assert compare.convergence(rising) == {"converged": False, "gain": pytest.approx(0.02), "window": 2}
    assert compare.convergence(flat_end)["converged"] is True
    just = history([(0.0, 0.5), (1.0, 0.6), (2.0, 0.6), (3.0, 0.6), (4.0, 0.605)])  # window 1: +0.5 point
    assert compare.convergence(just)["converged"] is True
    assert compare.convergence(history([(0.0, 0.5), (1.0, 0.6), (2.0, 0.606)]))["converged"] is False
    assert compare.convergence(history([(0.0, 0.5)]))["converged"] is None
    # a run that peaked earlier and fell back did not gain: converged
    assert compare.convergence(history([(0.0, 0.3), (1.0, 0.6), (2.0, 0.6), (3.0, 0.6), (4.0, 0.55)]))["converged"]
    blocks = compare.block_convergence(nf_history(), [{"units": [0]}, {"units": [1, 2]}])
    assert [b["converged"] for b in blocks] == [False, False] and blocks[1]["gain"] == pytest.approx(0.22)


def test_seed_aggregation_and_speedup_bounds() -> None:
    assert compare.mean_std([0.5, 0.6, 0.7]) == {"mean": pytest.approx(0.6), "std": 0.1, "n": 3}
    assert compare.mean_std([None]) == {"mean": None, "std": None, "n": 0}
    assert compare.mean_std([0.4]) == {"mean": 0.4, "std": 0.0, "n": 1}
    reached = [{"time_to_target": 10.0, "last_seconds": 30.0}, {"time_to_target": 20.0, "last_seconds": 30.0}]
    missed = [{"time_to_target": 60.0, "last_seconds": 90.0}, {"time_to_target": None, "last_seconds": 120.0}]
    nf, bp = compare.mean_time_to_target(reached), compare.mean_time_to_target(missed)
    assert nf == {"mean": 15.0, "lower_bound": False, "reached": 2, "n": 2}
    assert bp == {"mean": 90.0, "lower_bound": True, "reached": 1, "n": 2}
    assert compare.speedup(bp, nf) == {"value": 6.0, "bound": ">"}
    assert compare.speedup(nf, nf) == {"value": 1.0, "bound": "="}
    assert compare.speedup(nf, bp) == {"value": pytest.approx(1 / 6), "bound": "<"}
    assert compare.speedup(bp, bp) is None and compare.speedup({}, nf) is None
    assert [compare.format_speedup(v) for v in ({"value": 6.0, "bound": ">"}, None)] == [">6.00x", "-"]


def test_grid_then_seeds_at_each_methods_best_rate() -> None:
    rows = [
        {"method": "bp", "seed": 0, "lr": 0.1, "status": "ok", "final_val": 0.60},
        {"method": "bp", "seed": 0, "lr": 0.05, "status": "ok", "final_val": 0.60},  # a tie: the smaller rate
        {"method": "neuroflux", "seed": 0, "lr": 0.1, "status": "failed"},
        {"method": "bp", "seed": 1, "lr": 0.1, "status": "ok", "final_val": 0.99},  # not seed 0: not the grid
    ]
    assert compare.choose_lrs(rows, ["bp", "neuroflux"]) == {"bp": 0.05, "neuroflux": None}
    keys = [s.key for s in compare.planned_runs(["bp", "neuroflux"], [0.05, 0.1], 3, {"bp": 0.05, "neuroflux": None})]
    assert keys == [
        "bp_lr0.05_seed0", "neuroflux_lr0.05_seed0", "bp_lr0.1_seed0", "neuroflux_lr0.1_seed0",
        "bp_lr0.05_seed1", "bp_lr0.05_seed2",
    ]  # fmt: skip


def test_run_rows_failed_infeasible_and_bp_profiling_on_the_clock(tmp_path: Path) -> None:
    ok = compare.run_row(record("bp", 0.05, 0, history([(10.0, 0.5), (20.0, 0.6)]), before_fit=3.0), target=0.55)
    assert ok["status"] == "ok" and ok["curve"] == [(13.0, 0.5), (23.0, 0.6)] and ok["time_to_target"] == 23.0
    assert ok["total_seconds"] == 23.0 and ok["wall_seconds"] == pytest.approx(20.0)  # train 25 s, test pass 5 s
    assert ok["harness_step_seconds"] == pytest.approx(0.4)
    cannot = record("neuroflux", 0.05, 0, history([(1.0, 0.1)]))
    cannot["results"].update(could_run=False, reason="budget too small")
    assert compare.run_row(cannot) == {"key": "neuroflux_lr0.05_seed0", "method": "neuroflux", "lr": 0.05,
                                       "seed": 0, "status": "cannot_run", "reason": "budget too small"}  # fmt: skip
    (tmp_path / compare.LOG_FILE).write_text("Traceback ...\nRuntimeError: boom")
    settings = {"model": "vgg11", "width": 0.25, "data": "cifar10_folder", "train_subset": 10, "val_subset": 10,
                "data_seed": 0, "batch_limit": 8, "bp_epochs": 1, "nf_epochs": 1, "test_subset": 0, "set": []}  # fmt: skip
    failed = compare._finished(compare.RunSpec("bp", 0.05, 1), 1, tmp_path, settings, "1MB")
    assert failed["status"] == "failed" and "boom" in failed["error"]
    assert compare.run_row(failed)["status"] == "failed"


def test_every_method_is_metered_by_its_strategy_on_neurofluxs_schedule() -> None:
    from nf_lightning.lightning.strategy import NeuroFluxStrategy

    defaults = NeuroFluxStrategy()
    assert compare.neuroflux_metering() == {"full_steps": defaults.options.meter_full_steps,
                                            "sample_every": defaults.options.meter_sample_every}  # fmt: skip
    settings = {"model": "vgg11", "width": 0.25, "data": "cifar10_folder", "train_subset": 10, "val_subset": 10,
                "data_seed": 0, "batch_limit": 8, "bp_epochs": 1, "nf_epochs": 1, "test_subset": 0, "set": [],
                "meter": {"full_steps": 20, "sample_every": 10}}  # fmt: skip
    for method in ("bp", "bp_ckpt", "neuroflux"):
        overrides = compare.run_overrides(compare.RunSpec(method, 0.05, 0), settings, "1MB")
        assert "+trainer.strategy.meter_full_steps=20" in overrides
        assert "+trainer.strategy.meter_sample_every=10" in overrides
        every = compare.run_overrides(compare.RunSpec(method, 0.05, 0), {**settings, "meter_every_step": True}, "1MB")
        assert "+trainer.strategy.meter_sample_every=1" in every
        cfg = compose_config("train", overrides)
        assert cfg.trainer.strategy.meter_sample_every == 10 and cfg.trainer.strategy.memory_budget == "1MB"


def hand_made_records() -> list[dict]:
    bp = {0.05: [(40.0, 0.50), (80.0, 0.60), (120.0, 0.62)], 0.1: [(40.0, 0.40), (80.0, 0.55), (120.0, 0.58)]}
    records = [record("bp", lr, 0, history(points), test=0.60) for lr, points in bp.items()]
    records.append(record("bp", 0.05, 1, history([(40.0, 0.52), (80.0, 0.64), (120.0, 0.64)]), test=0.62))
    records.append(record("bp_ckpt", 0.05, 0, history([(60.0, 0.45), (160.0, 0.60)]), batch=[11], test=0.58))
    records.append(record("bp_ckpt", 0.05, 1, history([(60.0, 0.44), (170.0, 0.58)]), batch=[11], test=0.57))
    for seed, shift in ((0, 0.0), (1, 3.0)):
        records.append(record("neuroflux", 0.05, seed, [{**r, "seconds": r["seconds"] + shift} for r in nf_history()],
                              batch=[64, 128], exits=EXITS, test=0.61))  # fmt: skip
    return records


def test_summary_of_hand_made_runs() -> None:
    summary = compare.summarize(hand_made_records(), ["bp", "bp_ckpt", "neuroflux"], seeds=2)
    assert summary["lrs"] == {"bp": 0.05, "bp_ckpt": 0.05, "neuroflux": 0.05}
    assert summary["bp_best_val"]["mean"] == pytest.approx(0.63)  # best validation of each BP seed, averaged
    assert summary["target"] == pytest.approx(0.62)
    bp, ckpt, nf = (summary["methods"][m] for m in ("bp", "bp_ckpt", "neuroflux"))
    assert bp["test_acc"] == {"mean": pytest.approx(0.61), "std": pytest.approx(0.0141, abs=1e-4), "n": 2}
    assert bp["time_to_target"] == {"mean": 100.0, "lower_bound": False, "reached": 2, "n": 2}
    assert ckpt["time_to_target"]["lower_bound"] and ckpt["time_to_target"]["reached"] == 0
    assert nf["time_to_target"] == {"mean": 32.5, "lower_bound": False, "reached": 2, "n": 2}
    assert summary["speedups"]["bp"] == {"value": pytest.approx(100 / 32.5), "bound": "="}
    assert summary["speedups"]["bp_ckpt"]["bound"] == ">"
    assert summary["equal_time_seconds"] == pytest.approx(32.5)  # NeuroFlux's last validations, 31 and 34 s
    assert nf["accuracy_at_equal_time"]["mean"] == pytest.approx((0.62 + 0.45) / 2)
    assert bp["accuracy_at_equal_time"]["n"] == 0  # no validation yet at 32.5 s
    assert bp["converged"] == 1 and nf["converged"] == 0 and nf["blocks_converged"] == [0, 0]
    exit_ = summary["exits"]
    assert (exit_["unit"], exit_["parameters"], exit_["compression"], exit_["reached"]) == (1, 400, 2.5, 2)
    assert exit_["test_acc"]["mean"] == pytest.approx(0.60)
    assert {(r["method"], r["lr"]) for r in summary["grid"]} >= {("bp", 0.05), ("bp", 0.1)}


def benchmark_summary() -> dict:
    settings = {"preset": "test", "model": "vgg11", "width": 0.25, "data": "cifar10_folder", "train_subset": 5000,
                "val_subset": 1000, "test_subset": 0, "seeds": 2, "lrs": [0.05, 0.1], "bp_epochs": 3, "nf_epochs": 2,
                "jobs": 2}  # fmt: skip
    return {
        "preset": "test", "settings": settings, "machine": {"cpus": 2},
        "budget": {"bytes": 10_000_000, "text": "10.0 MB", "rule": "given"},
        "results": compare.summarize(hand_made_records(), ["bp", "bp_ckpt", "neuroflux"], seeds=2),
        "overhead": {"bp": {"bare_step_seconds": 0.01}}, "throughput": {"rows": [
            {"batch_size": 1, "speedup": 4.0}, {"batch_size": 64, "speedup": 2.5}]},
    }  # fmt: skip


def test_table_and_readme_regeneration(tmp_path: Path) -> None:
    summary = benchmark_summary()
    table = compare.markdown_table(summary)
    assert "| BP | 8 | 0.05 | 1/2 | 61.0 ± 1.4 |" in table
    assert ">" in table and "3.08x vs BP" in table and "unit 1" in table and "4.00x at batch 1" in table
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\nintro\n\n{compare.README_BEGIN}\nold table\n{compare.README_END}\n\n## Next\n")
    compare.update_readme(path, readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Project\n\nintro\n\n") and text.endswith("\n## Next\n")
    assert table in text and text.count(compare.README_BEGIN) == 1
    compare.update_readme(path, readme)
    assert readme.read_text() == text  # regenerating is idempotent
    readme.write_text("# Project without markers\n")
    with pytest.raises(SystemExit, match="compare:begin"):
        compare.update_readme(path, readme)
    with pytest.raises(SystemExit, match="run the benchmark first"):
        compare.update_readme(tmp_path / "missing.json", readme)


def test_a_neuroflux_that_never_reached_the_target_gets_no_speed_up() -> None:
    summary = benchmark_summary()
    never = {"mean": 90.0, "lower_bound": True, "reached": 0, "n": 2}
    summary["results"]["methods"]["neuroflux"]["time_to_target"] = never
    table = compare.markdown_table(summary)
    assert "reached the target in none of its seeds" in table and "vs BP (ratio" not in table


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


def test_tiny_benchmark_end_to_end_and_resumed(tmp_path: Path, cifar: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "--preset", "quick", "--width", "0.125", "--train-subset", "200", "--val-subset", "100",
        "--test-subset", "200", "--bp-epochs", "2", "--nf-epochs", "1", "--batch-limit", "64",
        "--bare-steps", "2", "--throughput-repeats", "2", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
    ]  # fmt: skip
    summary = compare.main(argv)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["results"]["lrs"] == {"bp": 0.05, "bp_ckpt": 0.05, "neuroflux": 0.05}
    budget = written["budget"]
    assert budget["rule"].startswith("the smallest at which BP trains at batch 8")
    runs = {r["method"]: r for r in written["results"]["runs"]}
    assert set(runs) == {"bp", "bp_ckpt", "neuroflux"} and all(r["status"] == "ok" for r in runs.values())
    assert runs["bp"]["batch_sizes"] == [8] and runs["bp_ckpt"]["batch_sizes"][0] > 8  # checkpointing fits more
    for run in runs.values():
        assert run["measured_peak_bytes"] <= budget["bytes"]  # every method held to the budget by its meter
        assert 0.0 <= run["test_acc"] <= 1.0 and run["curve"] and run["converged"] is not None
        assert sum(run["steps"]) > 0 and run["harness_step_seconds"] > 0
    assert runs["bp"]["steps"] == [2 * 25]  # 2 epochs of 200 images at batch 8
    meter = written["settings"]["meter"]
    assert runs["bp"]["metered_steps"] == meter["full_steps"] + math.ceil((50 - meter["full_steps"]) / meter["sample_every"])
    assert set(runs["neuroflux"]["exit_test_accuracies"]) == {str(u) for u in range(8)}
    for method in ("bp", "bp_ckpt", "neuroflux"):
        assert written["overhead"][method]["bare_step_seconds"] > 0
    assert [r["batch_size"] for r in written["throughput"]["rows"]] == [1, 64]
    assert (tmp_path / "out" / "figure12.png").stat().st_size > 0
    table = (tmp_path / "out" / "summary.md").read_text()
    assert table.count("| NeuroFlux + polish |") == 1 and "Polish (2 epochs of end-to-end BP" in table
    polish = runs["neuroflux"]["polish"]  # the quick preset polishes the deployed exit for 2 epochs
    assert polish["epochs"] == 2 and polish["measured_peak_bytes"] <= budget["bytes"]
    assert runs["neuroflux"]["measured_peak_bytes"] >= polish["measured_peak_bytes"]
    if not polish["kept"]:
        assert runs["neuroflux"]["test_acc"] == runs["neuroflux"]["blockwise_test_acc"]
    assert "| method |" in capsys.readouterr().out
    assert summary["results"]["target"] == written["results"]["target"]
    # resumed: every run is reused, nothing trains again
    records = sorted((tmp_path / "w" / "runs").glob(f"*/{compare.RECORD_FILE}"))
    stamps = [p.stat().st_mtime for p in records]
    again = compare.main(argv)
    assert "reusing" in capsys.readouterr().out
    assert [p.stat().st_mtime for p in records] == stamps
    assert json.loads(json.dumps(again["results"]["runs"])) == json.loads(json.dumps(summary["results"]["runs"]))


def test_methods_can_be_chosen_but_bp_sets_the_target() -> None:
    args = compare.parse_args(["--preset", "quick", "--methods", "bp", "neuroflux", "--bp-epochs", "30"])
    settings = compare.settings_of(args)
    assert settings["methods"] == ["bp", "neuroflux"] and settings["bp_epochs"] == 30
    assert compare.settings_of(compare.parse_args(["--classic-ll"]))["methods"] == [*compare.METHODS, "classic_ll"]
    with pytest.raises(SystemExit, match="must include bp"):
        compare.settings_of(compare.parse_args(["--methods", "neuroflux"]))
