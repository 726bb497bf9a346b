"""nf_lightning.benchmark's torchvision check: 32 px stems, rows over a rate grid and seeds with a scratch exit,
its checks and table, and a tiny real run that resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from nf_lightning.benchmark import tv_report, tv_rows
from nf_lightning.benchmark.tv_models import TorchvisionClassifier, torchvision_network

PRESET = {**tv_rows.PRESETS["quick"], "lrs": [0.05, 0.1], "seeds": 2}


def result(method: str, lr: float, seed: int, test: float, val: float, *, unit: int | None = None,
           exits: dict[str, float] | None = None, chance: float = 0.1, data: str = "cifar10") -> dict[str, Any]:  # fmt: skip
    row = tv_rows.make_row(PRESET, "mobilenet_v2", data, method, lr, seed, unit)
    out = {"name": row["name"], "row": row, "test": test, "final_val": val, "best_val": val, "seconds": 10.0,
           "chance": chance}  # fmt: skip
    if exits is not None:
        out.update(exit_val=exits, selected_unit=int(max(exits, key=exits.get)))
    return out


def test_32px_stems_keep_the_resolution_and_decompose() -> None:
    from nf_lightning.core.network.decompose import decompose

    resnet = torchvision_network("resnet18", 10, cifar_stem=True)
    assert resnet.conv1.stride == (1, 1) and resnet.conv1.kernel_size == (3, 3)
    assert isinstance(resnet.maxpool, torch.nn.Identity)
    assert torchvision_network("resnet18", 10, cifar_stem=False).conv1.stride == (2, 2)
    mobile = torchvision_network("mobilenet_v2", 10, width_mult=0.5, cifar_stem=True)
    assert mobile.features[0][0].stride == (1, 1)
    units = decompose(mobile).units
    h = torch.zeros(1, 3, 32, 32)
    h = units[0](h)
    assert h.shape[-1] == 32  # the first unit keeps 32 px (ImageNet's stem halves it)
    assert mobile(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="no width_mult"):
        torchvision_network("resnet18", 10, width_mult=0.5)


def test_module_has_no_scheduler_without_max_epochs_and_cosine_with_it() -> None:
    net = torchvision_network("mobilenet_v2", 10, 0.5)
    plain = TorchvisionClassifier(net, 10).configure_optimizers()
    assert plain.defaults["nesterov"] and plain.defaults["momentum"] == 0.9 and plain.defaults["weight_decay"] == 5e-4
    cosine = TorchvisionClassifier(net, 10, max_epochs=7).configure_optimizers()
    assert cosine["lr_scheduler"]["scheduler"].T_max == 7


def test_rows_grid_then_seeds_and_scratch_exits_on_neurofluxs_exit_of_each_seed() -> None:
    preset = {**PRESET, "models": ["mobilenet_v2"], "datasets": ["cifar10"]}
    grid = tv_rows.grid_rows(preset)
    assert [(r["method"], r["lr"], r["seed"]) for r in grid] == [
        ("bp", 0.05, 0), ("neuroflux", 0.05, 0), ("bp", 0.1, 0), ("neuroflux", 0.1, 0)]  # fmt: skip
    assert all(r["cifar_stem"] and r["train"] == 400 for r in grid)
    done = [result("bp", 0.05, 0, 0.5, 0.50), result("bp", 0.1, 0, 0.5, 0.55),
            result("neuroflux", 0.05, 0, 0.5, 0.60, exits={"0": 0.3, "3": 0.6}),
            result("neuroflux", 0.1, 0, 0.5, 0.40, exits={"0": 0.3, "5": 0.4})]  # fmt: skip
    first = tv_rows.later_rows(preset, done, phase=1)
    assert [(r["method"], r["lr"], r["seed"], r.get("unit")) for r in first] == [
        ("bp", 0.1, 1, None), ("neuroflux", 0.05, 1, None),
        ("scratch_exit", 0.05, 0, 3), ("scratch_exit", 0.1, 0, 3)]  # NeuroFlux's exit at its best rate  # fmt: skip
    done += [result("neuroflux", 0.05, 1, 0.5, 0.6, exits={"2": 0.6}), result("scratch_exit", 0.1, 0, 0.6, 0.7, unit=3),
             result("scratch_exit", 0.05, 0, 0.6, 0.6, unit=3)]  # fmt: skip
    assert [(r["lr"], r["seed"], r["unit"]) for r in tv_rows.later_rows(preset, done, phase=2)] == [(0.1, 1, 2)]


def test_checks_and_summary_over_seeds_at_each_methods_rate() -> None:
    preset = {**PRESET, "models": ["mobilenet_v2"], "datasets": ["cifar10", "tiny_imagenet100"]}
    results = [
        result("bp", 0.05, 0, 0.60, 0.60), result("bp", 0.05, 1, 0.56, 0.60),
        result("neuroflux", 0.05, 0, 0.55, 0.60, exits={"0": 0.19, "1": 0.60}),
        result("neuroflux", 0.05, 1, 0.57, 0.60, exits={"0": 0.25, "1": 0.60}),
        result("scratch_exit", 0.05, 0, 0.60, 0.62, unit=1), result("scratch_exit", 0.05, 1, 0.62, 0.62, unit=1),
        {"name": "tin", "row": tv_rows.make_row(PRESET, "mobilenet_v2", "tiny_imagenet100", "bp", 0.05, 0),
         "error": "ValueError: boom"},
    ]  # fmt: skip
    summary = tv_report.summarize(results, "test", preset)
    cifar, tin = summary["pairs"]
    c = cifar["checks"]
    assert c["gap_test_points"] == pytest.approx(2.0) and c["best_exit_within_3_points"] is True
    assert c["exits_below_twice_chance"] == [0] and c["every_exit_above_twice_chance"] is False
    assert cifar["scratch_gap_test_points"] == pytest.approx(5.0)  # the scratch exit beats NeuroFlux
    assert cifar["methods"]["neuroflux"]["units"] == [1, 1] and tin["checks"] is None
    assert summary["acceptance"]["pairs_complete"] == 1
    table = tv_report.markdown(summary)
    assert "| mobilenet_v2 | cifar10 | 0.05 | 58.0 ± 2.8 |" in table and "ValueError: boom" in table
    assert "+2.0 | 5.0 | NO | yes |" in table and "32 px stem" in table


def test_a_tiny_check_runs_every_method_in_subprocesses_and_resumes(shared_datasets_dir: Path, tmp_path: Path) -> None:
    preset = {**tv_rows.PRESETS["quick"], "subset_scale": 0.05, "bp_epochs": 1, "epochs_per_block": 1,
              "models": ["mobilenet_v2"], "datasets": ["cifar10"]}  # fmt: skip
    root, work = tmp_path / "results", tmp_path / "work"
    results, reused = tv_rows.run_check(preset, root, work, str(shared_datasets_dir), parallel=2, test_subset=300)
    assert all("error" not in r for r in results), [r.get("error") for r in results]
    bp, nf, scratch = results
    assert [r["row"]["method"] for r in results] == ["bp", "neuroflux", "scratch_exit"] and reused == []
    assert scratch["row"]["unit"] == nf["selected_unit"]  # the exit NeuroFlux deployed, trained from scratch
    assert scratch["parameters"] == nf["exit_parameters"][str(nf["selected_unit"])]
    assert bp["sizes"] == nf["sizes"] == {"train": 200, "val": 50, "test": 300}
    assert nf["test_blockwise"] == pytest.approx(nf["test_exit_model"], abs=1e-6)
    assert nf["polish"]["measured_peak_bytes"] <= 30_000_000
    for r in results:
        assert len(r["provenance"]["code"]["commit"]) == 40 and r["provenance"]["load"]["samples"] >= 2
    again, reused = tv_rows.run_check(preset, root, work, str(shared_datasets_dir), parallel=2, test_subset=300)
    assert again == results and sorted(reused) == sorted(r["name"] for r in results)
    saved = root / "rows" / f"{tv_rows.row_key(bp['row'])}.json"
    other = json.loads(saved.read_text())
    other["provenance"]["code"]["commit"] = "0" * 40  # another commit's row is trained again
    saved.write_text(json.dumps(other))
    _, reused = tv_rows.run_check(preset, root, work, str(shared_datasets_dir), parallel=2, test_subset=300)
    assert bp["name"] not in reused and len(reused) == 2
