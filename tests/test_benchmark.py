"""nf_lightning.benchmark on hand-made runs: curves and the deployable crossing, planning, reuse, provenance,
summaries, tables and the README section (the real runs are in ``test_compare_cli.py``)."""

from __future__ import annotations

import doctest
import importlib
import json
import subprocess
from pathlib import Path

import pytest

from nf_lightning.benchmark import curves, plan, provenance, readme, report, scheduler, stats, summary
from nf_lightning.benchmark.baselines import depth_search_seed, exit_network
from nf_lightning.benchmark.cli import neuroflux_metering, parse_args, settings_of
from nf_lightning.benchmark.presets import METHODS, RECORD_FILE
from nf_lightning.benchmark.unit_profile import unit_profile
from nf_lightning.cli.common import compose_config

REPO = Path(__file__).resolve().parents[1]
MODULES = ("baselines", "cli", "curves", "figure", "measure", "plan", "presets", "probe", "provenance", "readme",
           "report", "scheduler", "stats", "summary", "unit_profile", "worker")  # fmt: skip
CODE = {"commit": "c0ffee", "dirty": False, "diff_sha": None, "source": "git"}


def history(points: list[tuple[float, float]], block: int | None = None) -> list[dict]:
    return [{"epoch": i, "seconds": s, "block": block, "val/acc": a} for i, (s, a) in enumerate(points)]


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


EXITS = [
    {"unit": 0, "accuracy": 0.45, "parameters": 100},
    {"unit": 1, "accuracy": 0.62, "parameters": 400},
    {"unit": 2, "accuracy": 0.50, "parameters": 1_000},
]


def record(
    method: str, lr: float, seed: int, hist: list[dict], *, test: float = 0.5, batch: list[int] | None = None,
    exits: list[dict] | None = None, before_fit: float | None = None, unit: int | None = None,
    code: dict | None = None, tolerance: float = 0.0,
) -> dict:
    """A run's record.json as the worker writes it."""
    results = {
        "method": method, "could_run": True, "budget_bytes": 10_000_000, "history": hist,
        "batch_sizes": batch or [8], "final_accuracy": hist[-1].get("val/acc"),
        "train_seconds": hist[-1]["seconds"] + 5.0, "validation_seconds": 2.0, "measured_peak_bytes": 9_900_000,
    }  # fmt: skip
    if before_fit is not None:
        results["before_fit_seconds"] = before_fit
    probe = {"train_loop_seconds": 40.0, "steps": [100] * len(results["batch_sizes"]), "accuracy": test,
             "test_seconds": 5.0, "test_images": 10_000, "parameters": 1_000}  # fmt: skip
    if exits is not None:
        results["exit"] = {"exits": exits, "full_parameters": 1_000, "unit": 1, "tolerance": tolerance}
        results["plan"] = {"blocks": [{"units": [0]}, {"units": [1, 2]}], "seconds": 1.0}
        probe["exit_accuracies"] = {str(e["unit"]): e["accuracy"] - 0.02 for e in exits}
    key = plan.RunSpec(method, lr, seed, unit).key
    spec = {"key": key, "method": method, "lr": lr, "seed": seed, "unit": unit, "overrides": []}
    provenance_ = {"code": code or CODE, "started_at": "2026-01-01T00:00:00Z", "load": {"mean": 1.0}}
    return {"spec": spec, "status": "ok", "results": results, "probe": probe, "provenance": provenance_}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    assert doctest.testmod(importlib.import_module(f"nf_lightning.benchmark.{name}")).failed == 0


# --------------------------------------------------------------------------- curves and the deployable crossing
def test_curves_time_to_target_and_accuracy_at() -> None:
    nf = curves.raw_curve(nf_history())
    assert nf == [(10.0, 0.30), (20.0, 0.45), (26.0, 0.45), (31.0, 0.62)]
    assert curves.time_to_target(nf, 0.45) == 20.0  # exit 0 in block 0, before any deeper exit exists
    assert curves.time_to_target(nf, 0.61) == 31.0 and curves.time_to_target(nf, 0.63) is None
    bp = curves.raw_curve(list(reversed(history([(40.0, 0.35), (80.0, 0.33)]))))
    assert curves.accuracy_curve(bp) == [(40.0, 0.35), (80.0, 0.35)]  # time order, best so far
    assert curves.accuracy_at(bp, 39.0) is None and curves.accuracy_at(bp, 100.0) == 0.35


def test_the_crossing_is_the_deployable_exits_not_the_best_of_all_exits() -> None:
    parameters = {0: 100, 1: 400, 2: 1_000}
    hist = [
        {"seconds": 10.0, "neuroflux/acc_exit_0": 0.50, "neuroflux/acc_exit_1": 0.60, "val/acc": 0.90},
        {"seconds": 20.0, "neuroflux/acc_exit_0": 0.50, "neuroflux/acc_exit_1": 0.61, "neuroflux/acc_exit_2": 0.58},
        {"seconds": 30.0, "neuroflux/acc_exit_0": 0.60, "neuroflux/acc_exit_1": 0.61, "neuroflux/acc_exit_2": 0.62},
        {"seconds": 40.0, "val/acc": 0.66},  # the polish: the polished exit
    ]  # fmt: skip
    # the module's val/acc is not an exit: at 10 s the deployable exit is unit 1 at 60 %, not 90 %
    assert curves.raw_curve(hist, parameters) == [(10.0, 0.60), (20.0, 0.61), (30.0, 0.62), (40.0, 0.66)]
    assert curves.time_to_target(curves.raw_curve(hist, parameters), 0.62) == 30.0
    # with a 2-point tolerance the rule deploys the smallest exit within 2 points of the best
    loose = curves.raw_curve(hist, parameters, tolerance=0.02)
    assert loose == [(10.0, 0.60), (20.0, 0.61), (30.0, 0.60), (40.0, 0.66)]
    assert curves.time_to_target(loose, 0.61) == 20.0 and curves.time_to_target(loose, 0.62) == 40.0
    assert curves.deployable_point(hist[2], parameters, 0.02) == (0, 0.60)
    assert curves.deployable_point({"seconds": 1.0}) is None
    nf = record("neuroflux", 0.05, 0, hist, exits=EXITS, tolerance=0.02)
    row = summary.run_row(nf, target=0.62)
    assert row["time_to_target"] == 40.0 and row["crossing_validation"] == 3 and row["best_val"] == 0.66


def test_a_run_row_carries_the_head_policy_its_run_trained_with() -> None:
    """The bare-loop and throughput measurements rebuild the heads a run had: its plan's, or its exit's model's."""
    nf = record("neuroflux", 0.05, 0, nf_history(), exits=EXITS)
    assert summary.run_row(nf)["aux_policy"] is None  # a record from before the plan said (the default heads)
    nf["results"]["plan"]["aux_policy"] = "pooled"
    scratch = record("scratch_exit", 0.05, 0, history([(10.0, 0.5)]), unit=2)
    scratch["results"]["model"] = {"name": "vgg11", "unit": 2, "aux": "pooled"}
    assert summary.run_row(nf)["aux_policy"] == summary.run_row(scratch)["aux_policy"] == "pooled"


def test_run_rows_failed_infeasible_and_bp_profiling_on_the_clock(tmp_path: Path) -> None:
    ok = summary.run_row(record("bp", 0.05, 0, history([(10.0, 0.5), (20.0, 0.6)]), before_fit=3.0), target=0.55)
    assert ok["status"] == "ok" and ok["curve"] == [(13.0, 0.5), (23.0, 0.6)] and ok["time_to_target"] == 23.0
    assert ok["total_seconds"] == 23.0 and ok["wall_seconds"] == 25.0  # train_seconds: its clock has no test pass
    assert ok["harness_step_seconds"] == pytest.approx(0.4) and ok["provenance"]["code"] == CODE
    silent = record("bp", 0.05, 0, history([(10.0, 0.5)]))
    silent["results"]["history"] = []  # no validation at all: its whole time counts
    assert summary.run_row(silent, target=0.5)["last_seconds"] == 15.0
    cannot = record("neuroflux", 0.05, 0, history([(1.0, 0.1)]))
    cannot["results"].update(could_run=False, reason="budget too small")
    assert summary.run_row(cannot) == {"key": "neuroflux_lr0.05_seed0", "method": "neuroflux", "lr": 0.05,
                                       "seed": 0, "unit": None, "status": "cannot_run", "reason": "budget too small"}
    (tmp_path / "log.txt").write_text("Traceback ...\nRuntimeError: boom")
    (tmp_path / "spec.json").write_text(json.dumps({"key": "bp_lr0.05_seed1", "method": "bp", "lr": 0.05, "seed": 1}))
    failed = scheduler._finished(1, tmp_path)
    assert failed["status"] == "failed" and "boom" in failed["error"]
    assert summary.run_row(failed)["status"] == "failed"
    assert scheduler.reusable(tmp_path, [], CODE) is None  # a failed run is retried


def test_convergence_rule_is_half_a_point_over_the_last_fifth() -> None:
    def curve(values: list[float]) -> list[tuple[float, float]]:
        return [(float(i), a) for i, a in enumerate(values)]

    assert curves.convergence(curve([0.30 + 0.01 * i for i in range(10)])) == {
        "converged": False, "gain": pytest.approx(0.02), "window": 2}  # fmt: skip
    assert curves.convergence(curve([min(0.30 + 0.05 * i, 0.60) for i in range(10)]))["converged"] is True
    assert curves.convergence(curve([0.5, 0.6, 0.6, 0.6, 0.605]))["converged"] is True  # +0.5 point
    assert curves.convergence(curve([0.5, 0.6, 0.606]))["converged"] is False
    assert curves.convergence(curve([0.5]))["converged"] is None
    blocks = curves.block_convergence(nf_history(), [{"units": [0]}, {"units": [1, 2]}])
    assert [b["converged"] for b in blocks] == [False, False] and blocks[1]["gain"] == pytest.approx(0.22)


def test_seed_aggregation_and_speedups_per_seed_and_of_means() -> None:
    assert stats.mean_std([0.5, 0.6, 0.7]) == {"mean": pytest.approx(0.6), "std": 0.1, "n": 3}
    reached = [{"time_to_target": 10.0, "last_seconds": 30.0}, {"time_to_target": 20.0, "last_seconds": 30.0}]
    missed = [{"time_to_target": 60.0, "last_seconds": 90.0}, {"time_to_target": None, "last_seconds": 120.0}]
    nf, bp = stats.mean_time_to_target(reached), stats.mean_time_to_target(missed)
    assert bp == {"mean": 90.0, "lower_bound": True, "reached": 1, "n": 2}
    assert stats.speedup(bp, nf) == {"value": 6.0, "bound": ">"}
    assert stats.speedup(nf, bp) == {"value": pytest.approx(1 / 6), "bound": "<"}
    assert stats.speedup(bp, bp) is None
    per_seed = stats.per_seed_speedups(dict(enumerate(missed)), dict(enumerate(reached)))
    assert per_seed == [{"seed": 0, "value": 6.0, "bound": "="}, {"seed": 1, "value": 6.0, "bound": ">"}]


# --------------------------------------------------------------------------- planning and reuse
def test_plan_interleaves_seeds_and_schedules_scratch_exits_after_neuroflux() -> None:
    methods = ["bp", "neuroflux", "scratch_exit", "depth_search"]
    nothing = plan.planned_runs(methods, [0.05, 0.1], 3, plan.Known(), units=8)
    assert [s.key for s in nothing] == ["bp_lr0.05_seed0", "neuroflux_lr0.05_seed0", "bp_lr0.1_seed0",
                                        "neuroflux_lr0.1_seed0"]  # fmt: skip
    known = plan.Known(best={"bp": 0.05, "neuroflux": 0.1}, deployed={(0.1, 0): 3, (0.1, 1): 5, (0.05, 0): 7})
    keys = [s.key for s in plan.planned_runs(methods, [0.05, 0.1], 3, known, units=8)][4:]
    assert keys == ["scratch_exit_u3_lr0.05_seed0", "scratch_exit_u3_lr0.1_seed0",  # NeuroFlux's exit at its rate
                    "bp_lr0.05_seed1", "neuroflux_lr0.1_seed1", "bp_lr0.05_seed2", "neuroflux_lr0.1_seed2"]
    known.best = {**known.best, "scratch_exit": 0.1}
    known.target = 0.6
    known.crossed = {(0, 0): False, (0, 1): True, (1, 0): False}
    keys = [s.key for s in plan.planned_runs(methods, [0.05, 0.1], 2, known, units=8)]
    assert "scratch_exit_u5_lr0.1_seed1" in keys  # the exit NeuroFlux deployed in seed 1
    assert [k for k in keys if k.startswith("depth")] == [
        "depth_search_u0_lr0.1_seed0", "depth_search_u1_lr0.1_seed0",  # seed 0 stops at the depth that crossed
        "depth_search_u0_lr0.1_seed1", "depth_search_u1_lr0.1_seed1"]  # fmt: skip


def test_a_pinned_method_trains_at_its_one_rate() -> None:
    keys = [s.key for s in plan.planned_runs(["bp", "neuroflux"], [0.05, 0.1], 1, plan.Known(), 8, {"bp": 0.1})]
    assert keys == ["neuroflux_lr0.05_seed0", "bp_lr0.1_seed0", "neuroflux_lr0.1_seed0"]
    settings = settings_of(parse_args(["--preset", "large", "--rate", "bp=0.1", "neuroflux=0.05"], REPO))
    assert settings["pinned"] == {"bp": 0.1, "neuroflux": 0.05}
    records = [record("bp", 0.1, 0, history([(1.0, 0.5)]))]
    assert summary.known_from(records, {**settings, "methods": ["bp"], "seeds": 1}).target == pytest.approx(0.49)
    with pytest.raises(SystemExit, match="methods not run"):
        settings_of(parse_args(["--methods", "bp", "--rate", "neuroflux=0.1"], REPO))


def test_scratch_runs_are_bp_on_the_exit_and_depth_search_stops_at_the_target() -> None:
    settings = {"model": "vgg11", "width": 0.25, "data": "cifar10_folder", "train_subset": 10, "val_subset": 10,
                "data_seed": 0, "batch_limit": 8, "bp_epochs": 3, "nf_epochs": 1, "test_subset": 0, "set": [],
                "meter": {"full_steps": 20, "sample_every": 10}}  # fmt: skip
    overrides = plan.run_overrides(plan.RunSpec("depth_search", 0.05, 0, 2), settings, "1MB", target=0.6)
    cfg = compose_config("train", overrides)
    assert cfg.method.name == "bp" and cfg.epochs == 3 and cfg.module.lr_schedule == "cosine"
    assert cfg.model.unit == 2 and cfg.callbacks.stop.target == 0.6
    assert cfg.trainer.strategy.meter_sample_every == 10  # the same guard schedule as every method
    with pytest.raises(ValueError, match="needs the target"):
        plan.run_overrides(plan.RunSpec("depth_search", 0.05, 0, 2), settings, "1MB")
    net = exit_network("vgg11", num_classes=10, unit=2, width_mult=0.25)
    full = exit_network("vgg11", num_classes=10, unit=7, width_mult=0.25)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in full.parameters())
    pooled = exit_network("vgg11", num_classes=10, unit=2, width_mult=0.25, aux="pooled")  # as NeuroFlux's aux
    assert type(pooled.head[0]).__name__ == "AdaptiveAvgPool2d" != type(net.head[0]).__name__
    nf = compose_config("train", plan.run_overrides(plan.RunSpec("neuroflux", 0.05, 0), settings, "1MB"))
    assert "snapshots" in nf.callbacks and "snapshots" in nf.polish_callbacks


def test_local_overrides_reach_neuroflux_alone_and_tag_its_runs_only() -> None:
    settings = settings_of(parse_args(["--preset", "quick", "--local-set", "polish.warmup=0.1", "exit.depth_patience=1"],
                                      REPO))  # fmt: skip
    assert settings["local_set"] == ["polish.warmup=0.1", "exit.depth_patience=1"]
    tag = plan.local_tag(settings["local_set"])
    assert tag and tag != plan.local_tag(["polish.warmup=0.2", "exit.depth_patience=1"])  # another lever, other runs
    methods = ["bp", "neuroflux", "scratch_exit"]
    known = plan.Known(best={"bp": 0.05, "neuroflux": 0.05}, deployed={(0.05, 0): 3})
    keys = [s.key for s in plan.planned_runs(methods, [0.05], 2, known, units=8, tag=tag)]
    assert keys == ["bp_lr0.05_seed0", f"neuroflux_lr0.05_seed0_{tag}", "scratch_exit_u3_lr0.05_seed0",
                    "bp_lr0.05_seed1", f"neuroflux_lr0.05_seed1_{tag}"]  # BP's keys as without the lever: reusable
    settings = {**settings, "width": 0.25}
    nf = compose_config("train", plan.run_overrides(plan.RunSpec("neuroflux", 0.05, 0, tag=tag), settings, "1MB"))
    assert nf.polish.warmup == 0.1 and nf.exit.depth_patience == 1
    bp = plan.run_overrides(plan.RunSpec("bp", 0.05, 0), settings, "1MB")
    assert bp == plan.run_overrides(plan.RunSpec("bp", 0.05, 0), {**settings, "local_set": []}, "1MB")
    line = report.settings_line({"settings": settings, "budget": {"text": "1 MB", "rule": "given"},
                                 "results": {}, "machine": {"cpus": 2}})  # fmt: skip
    assert "NeuroFlux only `polish.warmup=0.1 exit.depth_patience=1`" in line


def test_scratch_overrides_reach_the_scratch_trained_exits_alone_and_tag_their_runs_only() -> None:
    settings = {**settings_of(parse_args(["--preset", "quick", "--scratch-set", "epochs=40"], REPO)), "width": 0.25}
    tag = plan.local_tag(settings["scratch_set"])
    known = plan.Known(best={"bp": 0.05, "neuroflux": 0.05, "scratch_exit": 0.05},
                       deployed={(0.05, 0): 3, (0.05, 1): 2}, target=0.5, crossed={(0, 0): False})  # fmt: skip
    keys = [s.key for s in plan.planned_runs(["bp", "neuroflux", "scratch_exit", "depth_search"], [0.05], 2, known,
                                             units=8, scratch_tag=tag)]  # fmt: skip
    assert keys == ["bp_lr0.05_seed0", "neuroflux_lr0.05_seed0", f"scratch_exit_u3_lr0.05_seed0_{tag}",
                    "bp_lr0.05_seed1", "neuroflux_lr0.05_seed1", f"scratch_exit_u2_lr0.05_seed1_{tag}",
                    f"depth_search_u0_lr0.05_seed0_{tag}", f"depth_search_u1_lr0.05_seed0_{tag}",
                    f"depth_search_u0_lr0.05_seed1_{tag}"]  # fmt: skip
    for method, unit in (("scratch_exit", 3), ("depth_search", 1)):  # exits trained by one recipe
        spec = plan.RunSpec(method, 0.05, 0, unit, tag)
        cfg = compose_config("train", plan.run_overrides(spec, settings, "1MB", 0.5))
        assert cfg.epochs == 40 and cfg.model.unit == unit
    for method in ("bp", "neuroflux"):
        cfg = compose_config("train", plan.run_overrides(plan.RunSpec(method, 0.05, 0), settings, "1MB"))
        assert cfg.epochs == (2 if method == "neuroflux" else 4)  # the quick preset's, not the exits' 40
    line = report.settings_line({"settings": settings, "budget": {"text": "1 MB", "rule": "given"},
                                 "results": {}, "machine": {"cpus": 2}})  # fmt: skip
    assert "scratch-trained exits only `epochs=40`" in line


def test_depth_search_sums_each_depths_time_until_one_crosses() -> None:
    rows = [{"unit": 0, "status": "ok", "time_to_target": None, "last_seconds": 50.0},
            {"unit": 1, "status": "ok", "time_to_target": None, "last_seconds": 70.0},
            {"unit": 2, "status": "ok", "time_to_target": 30.0, "last_seconds": 30.0}]  # fmt: skip
    assert depth_search_seed(rows)["seconds"] == 150.0 and depth_search_seed(rows)["crossed_unit"] == 2
    never = depth_search_seed(rows[:2])
    assert never["seconds"] == 120.0 and never["crossed_unit"] is None


def test_a_run_is_reused_only_from_the_same_code(tmp_path: Path) -> None:
    saved = record("bp", 0.05, 0, history([(1.0, 0.5)]))
    saved["spec"]["overrides"] = ["method=bp"]
    (tmp_path / RECORD_FILE).write_text(json.dumps(saved))
    assert scheduler.reusable(tmp_path, ["method=bp"], CODE) is not None
    assert scheduler.reusable(tmp_path, ["method=bp"], {**CODE, "commit": "another"}) is None
    assert scheduler.reusable(tmp_path, ["method=bp"], {**CODE, "dirty": True, "diff_sha": "1f"}) is None
    assert scheduler.reusable(tmp_path, ["method=neuroflux"], CODE) is None
    del saved["provenance"]  # a record from before provenance: never reused
    (tmp_path / RECORD_FILE).write_text(json.dumps(saved))
    assert scheduler.reusable(tmp_path, ["method=bp"], CODE) is None
    assert not provenance.same_code({"commit": None}, {"commit": None})
    identity = provenance.code_identity()
    assert identity["source"] == "git" and len(identity["commit"]) == 40


def test_code_identity_covers_the_code_runs_import_and_nothing_else(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    (tmp_path / "nf_lightning").mkdir()
    (tmp_path / "nf_lightning" / "a.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    clean = provenance.code_identity(tmp_path)
    assert clean["source"] == "git" and not clean["dirty"] and clean["diff_sha"] is None
    (tmp_path / "README.md").write_text("results and prose are not code\n")
    assert provenance.code_identity(tmp_path) == clean
    (tmp_path / "nf_lightning" / "a.py").write_text("x = 2\n")
    edited = provenance.code_identity(tmp_path)
    assert edited["dirty"] and edited["commit"] == clean["commit"] and not provenance.same_code(edited, clean)
    (tmp_path / "nf_lightning" / "b.py").write_text("y = 1\n")  # an untracked module is code too
    assert provenance.code_identity(tmp_path)["diff_sha"] != edited["diff_sha"]


# --------------------------------------------------------------------------- summaries and tables
def hand_made_records() -> list[dict]:
    bp = {0.05: [(40.0, 0.50), (80.0, 0.60), (120.0, 0.62)], 0.1: [(40.0, 0.40), (80.0, 0.55), (120.0, 0.58)]}
    records = [record("bp", lr, 0, history(points), test=0.60) for lr, points in bp.items()]
    records.append(record("bp", 0.05, 1, history([(40.0, 0.52), (80.0, 0.64), (120.0, 0.64)]), test=0.62))
    records.append(record("bp_ckpt", 0.05, 0, history([(60.0, 0.45), (160.0, 0.60)]), batch=[11], test=0.58))
    records.append(record("bp_ckpt", 0.05, 1, history([(60.0, 0.44), (170.0, 0.58)]), batch=[11], test=0.57))
    for seed, shift in ((0, 0.0), (1, 3.0)):
        records.append(record("neuroflux", 0.05, seed, [{**r, "seconds": r["seconds"] + shift} for r in nf_history()],
                              batch=[64, 128], exits=EXITS, test=0.61))  # fmt: skip
        records.append(record("scratch_exit", 0.05, seed, history([(10.0, 0.5), (25.0, 0.63)]), unit=1, test=0.63))
        records.append(record("depth_search", 0.05, seed, history([(5.0, 0.3), (9.0, 0.4)]), unit=0, test=0.4))
        records.append(record("depth_search", 0.05, seed, history([(8.0, 0.5), (20.0, 0.62)]), unit=1, test=0.6))
    return records


def test_summary_of_hand_made_runs() -> None:
    result = summary.summarize(hand_made_records(), METHODS, seeds=2, reused=["bp_lr0.1_seed0"])
    assert result["target"] == pytest.approx(0.62) and result["bp_best_val"]["mean"] == pytest.approx(0.63)
    bp, nf, scratch, depth = (result["methods"][m] for m in ("bp", "neuroflux", "scratch_exit", "depth_search"))
    assert bp["time_to_target"] == {"mean": 100.0, "lower_bound": False, "reached": 2, "n": 2}
    assert nf["time_to_target"] == {"mean": 32.5, "lower_bound": False, "reached": 2, "n": 2}
    assert nf["crossings"] == [{"seed": 0, "validation": 3, "seconds": 31.0}, {"seed": 1, "validation": 3,
                                                                                "seconds": 34.0}]  # fmt: skip
    assert scratch["time_to_target"]["mean"] == 25.0 and scratch["units"] == [1, 1]
    assert depth["time_to_target"] == {"mean": 29.0, "lower_bound": False, "reached": 2, "n": 2}  # 9 s + 20 s
    assert depth["crossed_units"] == [1, 1] and [d["unit"] for d in depth["by_depth"]] == [0, 1]
    speed = result["speedups"]
    assert speed["bp"]["ratio_of_means"] == {"value": pytest.approx(100 / 32.5), "bound": "="}
    assert [s["value"] for s in speed["bp"]["per_seed"]] == [pytest.approx(120 / 31), pytest.approx(80 / 34)]
    assert speed["scratch_exit"]["ratio_of_means"]["value"] == pytest.approx(25 / 32.5)  # NeuroFlux slower
    assert speed["depth_search"]["per_seed"][0]["value"] == pytest.approx(29 / 31)
    assert speed["bp_ckpt"]["ratio_of_means"]["bound"] == ">"
    assert result["reused"] == ["bp_lr0.1_seed0"] and result["commits"] == ["c0ffee"] and result["dirty_runs"] == []
    assert [r["key"] for r in result["runs"] if r["reused"]] == ["bp_lr0.1_seed0"]
    assert result["test_images"] == [10_000] and result["exits"]["unit"] == 1


def test_the_head_start_compares_the_deployed_units_block_with_scratch_at_the_same_accuracy() -> None:
    records = hand_made_records()
    for r in records:
        if r["spec"]["method"] == "neuroflux":
            r["results"]["polish"] = {"unit": 1, "epochs": 2, "batch_size": 32, "val_before": 0.62, "val_after": 0.65,
                                      "kept": True, "seconds": 10.0}  # fmt: skip
    result = summary.summarize(records, METHODS, seeds=2)
    # unit 1's block ended at 31 s (34 s) at 62 %; scratch's unit 1 first reached 62 % at 25 s
    assert result["head_start"] == [
        {"seed": 0, "unit": 1, "ready_seconds": 31.0, "val": 0.62, "scratch_seconds": 25.0},
        {"seed": 1, "unit": 1, "ready_seconds": 34.0, "val": 0.62, "scratch_seconds": 25.0},
    ]
    assert "seed 1: unit 1 at 34 s with 62.0 %, scratch at 25 s" in report.markdown_table(benchmark_summary(result))
    assert summary.summarize(hand_made_records(), METHODS, seeds=2)["head_start"] == []  # no polish, nothing to say


def benchmark_summary(results: dict | None = None) -> dict:
    settings = {"preset": "test", "model": "vgg11", "width": 0.25, "data": "tiny_imagenet", "train_subset": 0,
                "val_subset": 0, "test_subset": 0, "seeds": 2, "lrs": [0.05, 0.1], "bp_epochs": 3, "nf_epochs": 2,
                "jobs": 2}  # fmt: skip
    return {
        "preset": "test", "settings": settings, "machine": {"cpus": 2},
        "budget": {"bytes": 10_000_000, "text": "10.0 MB", "rule": "given"},
        "provenance": {"code": CODE},
        "results": results or summary.summarize(hand_made_records(), METHODS, seeds=2),
        "overhead": {"bp": {"bare_step_seconds": 0.01}},
        "throughput": {"rows": [{"batch_size": 1, "speedup": 4.0}, {"batch_size": 64, "speedup": 2.5}]},
        "crossing_tests": [{"seed": 0, "validation": 3, "seconds": 31.0, "unit": 1, "accuracy": 0.62, "test_acc": 0.6}],
    }  # fmt: skip


def test_table_says_what_was_scored_where_the_code_came_from_and_the_speedups() -> None:
    table = report.markdown_table(benchmark_summary())
    assert "test: 10,000 images of its official validation images" in table and "all 10,000" not in table
    assert "| BP | 8 | 0.05 | 1/2 | 61.0 ± 1.4 |" in table and "| scratch exit (unit 1, 1) |" in table
    assert "| depth search (crossed at unit 1, 1) |" in table and "Code: c0ffee; 13 run(s) timed" in table
    assert "NeuroFlux vs BP: 3.08x (ratio of mean times to target; seed 0 3.87x, seed 1 2.35x" in table
    assert "NeuroFlux vs scratch exit: 0.77x" in table
    assert "seed 0: exit 1 at 31 s, validation 62.0 %, test 60.0 %" in table
    dirty = benchmark_summary()
    dirty["provenance"]["code"] = {**CODE, "dirty": True}
    assert "NOT one clean commit" in report.markdown_table(dirty)
    records = hand_made_records()
    records[0]["provenance"]["code"] = {**CODE, "dirty": True, "diff_sha": "1f"}  # one run of other code
    mixed = benchmark_summary(summary.summarize(records, METHODS, seeds=2))
    assert mixed["results"]["dirty_runs"] == ["bp_lr0.05_seed0"] and "NOT one clean commit" in report.markdown_table(mixed)


def test_a_neuroflux_that_never_reached_the_target_gets_no_speed_up() -> None:
    s = benchmark_summary()
    s["results"]["methods"]["neuroflux"]["time_to_target"] = {"mean": 90.0, "lower_bound": True, "reached": 0, "n": 2}
    assert "reached the target in none of its seeds" in report.markdown_table(s)


def test_readme_section_opens_with_losses_and_refuses_old_summaries(tmp_path: Path) -> None:
    paths = {name: tmp_path / f"{name}.json" for name in ("cifar", "tin")}
    paths["cifar"].write_text(json.dumps(benchmark_summary()))
    tin = benchmark_summary()
    tin["results"]["speedups"]["bp"]["ratio_of_means"] = {"value": 0.5, "bound": "="}  # NeuroFlux slower than BP
    paths["tin"].write_text(json.dumps(tin))
    target = tmp_path / "README.md"
    target.write_text(f"# Project\n\n{report.README_BEGIN}\nold table\n{report.README_END}\n\n## Next\n")
    readme.update_readme(paths, target, tmp_path)
    text = target.read_text()
    assert "old table" not in text and text.endswith("\n## Next\n") and text.count(report.README_BEGIN) == 1
    first = text.split(report.README_BEGIN)[1].splitlines()[3]
    assert first.startswith("Against a smaller network trained by BP: NeuroFlux loses on cifar against scratch "
                            "exit: 0.77x as fast to the target (slower), test -2.0 points; on cifar against depth "
                            "search: 0.89x")  # losses first, the smaller networks in the first sentence
    assert "Against the whole network: NeuroFlux loses on tin against BP: 0.50x as fast to the target (slower)" \
        in first and first.index("on tin against BP:") < first.index("while it wins on cifar against BP: 3.08x")
    readme.update_readme(paths, target, tmp_path)
    assert target.read_text() == text  # regenerating is idempotent
    tin["results"]["speedups"]["bp"]["ratio_of_means"] = {"value": 2.8, "bound": "<"}  # a NeuroFlux seed missed
    for method in ("bp_ckpt", "depth_search"):  # a summary of fewer methods compares only those it ran
        del tin["results"]["methods"][method], tin["results"]["speedups"][method]
    paths["tin"].write_text(json.dumps(tin))
    readme.update_readme(paths, target, tmp_path)
    first = target.read_text().split(report.README_BEGIN)[1].splitlines()[3]
    assert "NeuroFlux loses on tin against BP: <2.80x as fast to the target (at most: NeuroFlux missed the target " \
        "in a seed)" in first and "while it wins on cifar" in first
    assert "on tin against depth search" not in first and "on tin against BP + checkpointing" not in first
    paths["tin"].write_text(json.dumps(benchmark_summary()))
    old = benchmark_summary()
    del old["provenance"]
    paths["tin"].write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="previous benchmark"):
        readme.update_readme(paths, target, tmp_path)
    target.write_text("# no markers\n")
    paths["tin"].write_text(json.dumps(benchmark_summary()))
    with pytest.raises(SystemExit, match="compare:begin"):
        readme.update_readme(paths, target, tmp_path)
    target.write_text(f"{report.README_BEGIN}\n{report.README_END}\n")
    paths["tin"].unlink()  # a data set not yet run: named as such, and left out of every sentence
    readme.update_readme(paths, target, tmp_path)
    text = target.read_text()
    assert "**tin: not yet measured** by this benchmark (no `tin.json`" in text and "on tin against" not in text
    assert "on cifar against scratch exit" in text
    paths["cifar"].unlink()
    with pytest.raises(SystemExit, match="no summary at"):
        readme.update_readme(paths, target, tmp_path)


def test_aux_head_flops_are_counted_not_guessed() -> None:
    profile = {e["unit"]: e for e in unit_profile("vgg11", width_mult=0.25)}
    first = profile[0]  # VGG-11's first unit: 16 channels, pooled to 16x16; adaptive head 8 filters, classic 256
    c, h, w = first["channels"], first["height"], first["width"]
    assert (c, h, w) == (16, 16, 16) and first["activation_elements"] == c * h * w

    def conv_and_linear(filters: int) -> int:  # 3x3 conv at the unit's resolution, 2x2 pool, Linear to 10 classes
        return 2 * (9 * c * filters * h * w + filters * 4 * 10)

    assert first["aux_flops_adaptive"] == conv_and_linear(8) and first["aux_flops_classic"] == conv_and_linear(256)
    assert profile[max(profile)]["aux_flops_adaptive"] is None  # the last unit's exit is the model's head


def test_methods_can_be_chosen_but_bp_sets_the_target() -> None:
    settings = settings_of(parse_args(["--preset", "quick", "--methods", "bp", "neuroflux", "--bp-epochs", "30"], REPO))
    assert settings["methods"] == ["bp", "neuroflux"] and settings["bp_epochs"] == 30
    assert settings_of(parse_args(["--classic-ll"], REPO))["methods"] == [*METHODS, "classic_ll"]
    with pytest.raises(SystemExit, match="must include bp"):
        settings_of(parse_args(["--methods", "neuroflux"], REPO))
    with pytest.raises(SystemExit, match="must include neuroflux"):
        settings_of(parse_args(["--methods", "bp", "scratch_exit"], REPO))
    from nf_lightning.lightning.strategy import NeuroFluxStrategy

    assert neuroflux_metering()["sample_every"] == NeuroFluxStrategy().options.meter_sample_every


def test_nothing_below_the_benchmark_imports_it() -> None:
    import ast

    package = REPO / "nf_lightning"
    for path in package.rglob("*.py"):
        if path.is_relative_to(package / "benchmark"):
            continue
        names = {n.module or "" for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
        names |= {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names}
        assert not {n for n in names if n.startswith("nf_lightning.benchmark")}, path
    scripts = {p.stem for p in (REPO / "experiments").glob("*.py")}
    for path in (REPO / "tests").glob("*.py"):  # tests import no experiment script
        nodes = list(ast.walk(ast.parse(path.read_text())))
        names = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
        assert not {n for n in names if n.split(".")[0] in scripts}, path


def test_the_probes_test_pass_is_off_the_runs_clock(tmp_path: Path, shared_datasets_dir: Path,
                                                    data_cache_dir: Path) -> None:  # fmt: skip
    """The probe scores the 10,000 test images inside ``fit``; a polish timed after it must not count that."""
    import time

    import lightning.pytorch as pl

    from nf_lightning import data
    from nf_lightning.benchmark.presets import PROBE_FILE
    from nf_lightning.benchmark.probe import BenchmarkProbe
    from nf_lightning.lightning.classifier import ClassifierModule
    from nf_lightning.lightning.history import ValidationHistory

    class SetupClock(pl.Callback):  # started with the history's clock, never stopped
        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            self.start = time.perf_counter()

    dm = data.create("cifar10_folder", data_dir=shared_datasets_dir, train_subset=100, val_subset=50, seed=0)
    history, clock = ValidationHistory(), SetupClock()
    trainer = pl.Trainer(max_epochs=1, callbacks=[history, BenchmarkProbe(), clock], logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(ClassifierModule(exit_network("vgg11", num_classes=10, unit=0, width_mult=0.125), 10), datamodule=dm)
    stopped = (time.perf_counter() - clock.start) - history.elapsed
    probe = json.loads((tmp_path / PROBE_FILE).read_text())
    assert probe["test_off_clock"] and probe["test_images"] == 10_000
    assert stopped >= 0.9 * probe["test_seconds"] > 0.1  # the history's clock stood still through the test pass
