"""``experiments/compare.py`` and its machinery on real data: a tiny benchmark with every baseline, resumed
(reusing only runs of the same code), and the README refused from the previous benchmark's summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nf_lightning.benchmark.cli import main
from nf_lightning.benchmark.presets import METHODS, RECORD_FILE

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_readme_section_is_what_the_script_generates_from_the_committed_summaries() -> None:
    before = (REPO / "README.md").read_text()
    done = subprocess.run([sys.executable, "experiments/compare.py", "--readme"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    after = (REPO / "README.md").read_text()
    (REPO / "README.md").write_text(before)
    assert done.returncode == 0, done.stderr + done.stdout
    assert after == before  # nobody edited the section by hand, and no summary changed without regenerating it


@pytest.fixture
def cifar(shared_datasets_dir: Path, data_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NF_DATA_DIR", str(shared_datasets_dir))
    monkeypatch.setenv("NF_CACHE_DIR", str(data_cache_dir))
    return shared_datasets_dir


def _tiny_benchmark(tmp_path: Path, methods: list[str]) -> tuple[list[str], dict, dict, float]:
    """A tiny benchmark of ``methods``: its argv, what main returned, the runs it wrote by key, each checked
    for what every run carries (its code, when it ran, the load meanwhile; held to the budget), and the target."""
    argv = [
        "--preset", "quick", "--width", "0.125", "--train-subset", "200", "--val-subset", "100",
        "--test-subset", "200", "--bp-epochs", "1", "--nf-epochs", "1", "--polish-epochs", "1", "--batch-limit", "64",
        "--bare-steps", "2", "--throughput-repeats", "2", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
        "--methods", *methods,
    ]  # fmt: skip
    first = main(argv, REPO)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    results, budget = written["results"], written["budget"]
    assert budget["rule"].startswith("the smallest at which BP trains at batch 8")
    assert results["lrs"] == {m: 0.05 for m in methods} and results["reused"] == []
    runs = {r["key"]: r for r in results["runs"]}
    assert {r["method"] for r in runs.values()} == set(methods) and all(r["status"] == "ok" for r in runs.values())
    for run in runs.values():
        code = run["provenance"]["code"]
        assert len(code["commit"]) == 40 and code["source"] == "git" and run["provenance"]["started_at"]
        assert run["provenance"]["load"]["samples"] >= 2 and run["provenance"]["process_seconds"] > 0
        assert run["measured_peak_bytes"] <= budget["bytes"] and run["test_images"] == 200
    nf = runs["neuroflux_lr0.05_seed0"]
    index = json.loads((tmp_path / "w" / "runs" / nf["key"] / "snapshots" / "index.json").read_text())
    assert index["validations"] == len(nf["curve"]) and index["saved"]  # one count per history record
    assert [c["seed"] for c in written["crossing_tests"]] == [0]
    assert (tmp_path / "out" / "figure12.png").stat().st_size > 0
    return argv, first, runs, results["target"]


def test_tiny_benchmark_end_to_end_then_resumed(tmp_path: Path, cifar: Path, capsys: pytest.CaptureFixture) -> None:
    """BP, NeuroFlux, the deployed exit trained from scratch and the depth search; a rerun reuses every run but
    one recorded by other code. (BP with checkpointing too: the slow variant.)"""
    argv, first, runs, target = _tiny_benchmark(tmp_path, ["bp", "neuroflux", "scratch_exit", "depth_search"])
    nf = runs["neuroflux_lr0.05_seed0"]
    scratch = next(r for r in runs.values() if r["method"] == "scratch_exit")
    assert scratch["unit"] == nf["deployed_unit"] and scratch["batch_sizes"][0] >= 8  # a smaller net fits more
    assert scratch["parameters"] == next(e["parameters"] for e in nf["exits"] if e["unit"] == scratch["unit"])
    depths = sorted((r for r in runs.values() if r["method"] == "depth_search"), key=lambda r: r["unit"])
    assert [r["unit"] for r in depths] == list(range(len(depths)))  # one depth after another
    assert all(r["time_to_target"] is None for r in depths[:-1])  # each missed before the next ran
    assert depths[-1]["time_to_target"] is not None or len(depths) == 8
    for run in depths:  # stopped at its first crossing, else trained BP's one epoch
        accuracies = [a for _, a in run["curve"]]
        if run["time_to_target"] is None:
            assert len(accuracies) == 1
        else:
            assert accuracies[-1] >= target - 1e-6 > max(accuracies[:-1], default=0.0)
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "test: 200 images of its test split" in table and "| scratch exit (unit" in table
    # rerun: every run is reused, but the one recorded by other code is trained again
    tampered = tmp_path / "w" / "runs" / scratch["key"] / RECORD_FILE
    saved = json.loads(tampered.read_text())
    saved["provenance"]["code"]["commit"] = "0" * 40
    tampered.write_text(json.dumps(saved))
    capsys.readouterr()
    again = main(argv, REPO)
    assert sorted(again["results"]["reused"]) == sorted(k for k in runs if k != scratch["key"])
    assert f"started {scratch['key']}" in capsys.readouterr().out
    assert json.loads(tampered.read_text())["provenance"]["code"]["commit"] == first["provenance"]["code"]["commit"]
    assert [r["key"] for r in again["results"]["runs"] if not r["reused"]] == [scratch["key"]]


@pytest.mark.slow
def test_tiny_benchmark_end_to_end_with_every_baseline(tmp_path: Path, cifar: Path) -> None:
    """Every method the benchmark compares, BP with checkpointing included, in one invocation."""
    _, _, runs, _ = _tiny_benchmark(tmp_path, list(METHODS))
    assert runs["bp_ckpt_lr0.05_seed0"]["status"] == "ok"


# a lever's summary is never rewritten (the benchmark's own summaries are, whenever it runs again)
LEVER_SUMMARY = "experiments/results/compare/levers_tiny_imagenet/default_3seeds/summary.json"


def test_the_ablation_table_puts_each_levers_summary_in_one_row_and_counts_the_tries(tmp_path: Path) -> None:
    committed = json.loads((REPO / LEVER_SUMMARY).read_text())
    levers = {"a_default": ([], []), "b_polish": (["polish.lr=0.02"], []), "c_scratch40": ([], ["epochs=40"])}
    for hour, (name, (local, scratch)) in enumerate(levers.items()):
        summary = json.loads(json.dumps(committed))
        summary["settings"].update(local_set=local, scratch_set=scratch)
        summary["provenance"]["started_at"] = f"2026-12-07T0{3 - hour}:00:00Z"  # listed oldest first: c, b, a
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    done = subprocess.run([sys.executable, "experiments/compare.py", "--ablation", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "ablation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| scratch_exit `epochs=40`", "| NeuroFlux `polish.lr=0.02`",
                                                     "| none (the defaults)"]  # fmt: skip
    # the committed TIN row: 3 seeds, 96 s against scratch_exit's 127 s, 1.32x (1.45x, 1.35x, 1.16x), 4.36x BP
    assert rows[1].split(" | ")[1:5] == ["3", "24.7", "96", "4, 2, 3"]
    assert "| 1.32x; 1.45x, 1.35x, 1.16x | 4.36x | 0.05 / 0.05 |" in rows[1]
    assert rows[1].split(" | ")[-2] == committed["results"]["commits"][0][:7]  # the code each row ran
    # every method pinned to one rate: NeuroFlux tried its 2 overrides, scratch_exit its 2
    assert "Configurations tried: NeuroFlux 2, scratch_exit 2" in table
