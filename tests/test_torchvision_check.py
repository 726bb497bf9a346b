"""experiments/torchvision_check.py: its acceptance checks, its summary, and its row machinery on a tiny run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # experiments/ is scripts, not a package

import torchvision_check as tc  # noqa: E402


def bp_result(val: float, test: float, model: str = "mobilenet_v2", data: str = "cifar10") -> dict[str, Any]:
    row = {"model": model, "data": data, "method": "bp", "name": f"{model} / {data} / BP", "epochs": 3}
    return {"name": row["name"], "row": row, "seed": 0, "seconds": 10.0, "test_seconds": 1.0, "num_classes": 10,
            "chance": 0.1, "sizes": {"train": 100, "val": 50, "test": 200}, "test": test, "final_val": val,
            "val_curve": [val]}


def nf_result(exits: dict[str, float], test: float, chance: float = 0.1, model: str = "mobilenet_v2",
              data: str = "cifar10") -> dict[str, Any]:
    row = {"model": model, "data": data, "method": "neuroflux", "name": f"{model} / {data} / NeuroFlux",
           "budget": "30MB", "options": {"epochs_per_block": 2, "block_patience": 2}}
    best = max(exits, key=exits.get)
    return {"name": row["name"], "row": row, "seed": 0, "seconds": 20.0, "test_seconds": 1.0,
            "num_classes": round(1 / chance), "chance": chance, "sizes": {"train": 100, "val": 50, "test": 200},
            "test": test, "exit_val": exits, "best_val": exits[best], "selected_unit": int(best),
            "num_units": len(exits), "test_exit_model": test, "val_curve": [exits[best]],
            "blocks": [{"units": [0, 1], "batch_size": 64, "epochs": 2, "horizon": 2, "reason": "horizon"}]}


def test_checks_flag_exits_below_twice_chance_and_measure_the_gap_on_test() -> None:
    bp = bp_result(val=0.60, test=0.58)
    nf = nf_result({"0": 0.35, "1": 0.19, "2": 0.56, "3": 0.20}, test=0.55)
    c = tc.checks(bp, nf)
    assert c["twice_chance"] == pytest.approx(0.2)
    assert c["exits_below_twice_chance"] == [1]  # 0.20 is not below twice chance
    assert (c["worst_exit_unit"], c["worst_exit_val"]) == (1, 0.19)
    assert c["every_exit_above_twice_chance"] is False
    assert c["gap_test_points"] == pytest.approx(3.0)  # BP minus NeuroFlux, in points
    assert c["gap_val_points"] == pytest.approx(4.0)
    assert c["best_exit_within_3_points"] is True  # exactly 3 points passes

    worse = tc.checks(bp, nf_result({"0": 0.5, "1": 0.57}, test=0.549))
    assert worse["every_exit_above_twice_chance"] is True and worse["exits_below_twice_chance"] == []
    assert worse["gap_test_points"] == pytest.approx(3.1)
    assert worse["best_exit_within_3_points"] is False

    better = tc.checks(bp, nf_result({"0": 0.62}, test=0.61))  # NeuroFlux above BP: negative gaps
    assert better["gap_test_points"] == pytest.approx(-3.0) and better["gap_val_points"] == pytest.approx(-2.0)
    assert better["best_exit_within_3_points"] is True

    hundred = tc.checks(bp_result(0.2, 0.2), nf_result({"0": 0.019, "1": 0.021}, test=0.19, chance=0.01))
    assert hundred["exits_below_twice_chance"] == [0] and hundred["twice_chance"] == pytest.approx(0.02)


def test_summary_pairs_rows_checks_each_pair_and_reports_failures() -> None:
    results = [
        bp_result(0.6, 0.6),
        nf_result({"0": 0.3, "1": 0.59}, test=0.59),
        bp_result(0.3, 0.3, data="tiny_imagenet100"),
        {"name": "mobilenet_v2 / tiny_imagenet100 / NeuroFlux", "error": "ValueError: boom",
         "row": {"model": "mobilenet_v2", "data": "tiny_imagenet100", "method": "neuroflux"}},
    ]
    summary = tc.summarize(results, "default", tc.PRESETS["default"], seed=0)
    assert [(p["model"], p["data"]) for p in summary["pairs"]] == [("mobilenet_v2", "cifar10"),
                                                                    ("mobilenet_v2", "tiny_imagenet100")]
    assert summary["pairs"][0]["checks"]["best_exit_within_3_points"] is True
    assert summary["pairs"][1]["checks"] is None
    assert summary["acceptance"] == {"pairs_complete": 1, "pairs": 2, "every_exit_above_twice_chance": True,
                                     "best_exit_within_3_points": True}
    json.dumps(summary)
    table = tc.markdown(summary)
    assert "ValueError: boom" in table and "| mobilenet_v2 | cifar10 (100/50/200, 10) | 60.0 | 60.0 |" in table


def test_default_rows_pair_bp_and_neuroflux_on_the_same_subsets() -> None:
    rows = tc.make_rows(tc.PRESETS["default"])
    assert len(rows) == len(tc.MODELS) * len(tc.DATASETS) * 2 and len({tc.row_key(r) for r in rows}) == len(rows)
    for bp, nf in zip(rows[::2], rows[1::2]):
        assert (bp["method"], nf["method"]) == ("bp", "neuroflux")
        shared = ("model", "data", "dataset", "arch", "width_mult", "train", "val")
        assert {k: bp[k] for k in shared} == {k: nf[k] for k in shared}
        assert bp["epochs"] == tc.PRESETS["default"]["bp_epochs"]
        assert nf["options"] == {"epochs_per_block": tc.PRESETS["default"]["epochs_per_block"], "block_patience": 2}
        assert nf["polish_epochs"] == tc.PRESETS["default"]["polish_epochs"] > 0


def test_module_has_no_scheduler_without_max_epochs_and_cosine_with_it() -> None:
    plain = tc.TorchvisionClassifier("mobilenet_v2", 10, width_mult=0.5).configure_optimizers()
    assert plain.defaults["nesterov"] and plain.defaults["momentum"] == 0.9 and plain.defaults["weight_decay"] == 5e-4
    assert plain.defaults["lr"] == 0.05
    cosine = tc.TorchvisionClassifier("resnet18", 100, max_epochs=7).configure_optimizers()
    assert cosine["lr_scheduler"]["scheduler"].T_max == 7 and cosine["lr_scheduler"]["interval"] == "epoch"


def test_rows_run_in_subprocesses_save_results_and_resume(
    shared_datasets_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {"model": "mobilenet_v2", "data": "cifar10", **tc.MODELS["mobilenet_v2"], **tc.DATASETS["cifar10"],
            "train": 200, "val": 100, "test_subset": 300}
    rows = [
        {**base, "method": "bp", "name": "mobilenet_v2 / cifar10 / BP", "epochs": 1},
        {**base, "method": "neuroflux", "name": "mobilenet_v2 / cifar10 / NeuroFlux",
         "options": {"epochs_per_block": 1, "block_patience": 2}, "polish_epochs": 1},
    ]
    root = tmp_path / "results"
    results = tc.run_rows(rows, root, tmp_path / "work", str(shared_datasets_dir), seed=0, parallel=2)
    assert all("error" not in r for r in results), [r.get("error") for r in results]
    bp, nf = results
    assert bp["sizes"] == nf["sizes"] == {"train": 200, "val": 100, "test": 300}
    assert len(bp["val_curve"]) == 1 and bp["final_val"] == bp["val_curve"][-1]
    assert 0.0 <= bp["test"] <= 1.0 and bp["chance"] == pytest.approx(0.1)
    assert len(nf["exit_val"]) == nf["num_units"] == 17 and nf["best_val"] == max(nf["exit_val"].values())
    assert nf["exit_val"][str(nf["selected_unit"])] == nf["best_val"]
    assert nf["test_blockwise"] == pytest.approx(nf["test_exit_model"], abs=1e-6)  # trainer.test scores the exit
    polish = nf["polish"]  # then the exit was polished end to end under the row's budget
    assert polish["epochs"] == 1 and polish["measured_peak_bytes"] <= 30_000_000
    assert nf["seconds"] == pytest.approx(nf["seconds_blockwise"] + polish["seconds"], abs=0.2)
    if polish["kept"]:
        assert nf["best_val"] >= polish["val_after"]
    else:
        assert nf["test"] == nf["test_blockwise"]
    assert len(nf["blocks"]) >= 2 and all(b["epochs"] == 1 for b in nf["blocks"])
    assert sorted(p.name for p in (root / "rows").iterdir()) == sorted(f"{tc.row_key(r)}.json" for r in rows)

    def must_not_run(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("a saved row was trained again")

    monkeypatch.setattr(tc, "run_row", must_not_run)
    again = tc.run_rows(rows, root, tmp_path / "work", str(shared_datasets_dir), seed=0, parallel=2)
    assert again == results
    summary = tc.summarize(again, "test", tc.PRESETS["quick"], seed=0)
    assert "Polish of the deployed exit (1 epochs" in tc.markdown(summary)
    assert summary["pairs"][0]["checks"]["gap_test_points"] == pytest.approx(100 * (bp["test"] - nf["test"]), abs=0.01)


def test_exit_throughput_times_the_deployed_exit_against_the_full_network() -> None:
    result = nf_result({"0": 0.3, "1": 0.4, "2": 0.5}, test=0.5)
    result["row"].update(arch="mobilenet_v2", width_mult=0.5, dataset="cifar10_folder")
    throughput = tc.exit_throughput(result, repeats=3)
    assert throughput["unit"] == 2 and [r["batch_size"] for r in throughput["rows"]] == [1, 64]
    assert throughput["rows"][1]["speedup"] > 1.5  # 3 of MobileNetV2's 17 units: far fewer operations
    assert "inference against the full model: " in tc._speed(throughput)
