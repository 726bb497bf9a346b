"""experiments/neuron_budget.py as a user runs it, in a process of its own: the accuracy grid covers every
norm and the byte budgets; the quick preset end to end writes rows and summaries where it is told.

Tests import nothing from ``experiments/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCRIPT = EXPERIMENTS / "neuron_budget.py"

LIST_TASKS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import neuron_budget
_, fine = neuron_budget.tasks(sys.argv[2], None, "accuracy", results=neuron_budget.Path(sys.argv[3]))
print(json.dumps([{k: t[k] for k in ("model", "policy", "budget", "norm", "seed", "out")} for t in fine]))
"""


def accuracy_tasks(preset: str, results: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", LIST_TASKS, str(EXPERIMENTS), preset, str(results)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_the_full_accuracy_grid_has_every_norm_and_the_byte_budgets(tmp_path: Path) -> None:
    runs = accuracy_tasks("full", tmp_path)
    cells = {(r["model"], r["policy"], r["budget"], r["norm"], r["seed"]) for r in runs}
    assert len(cells) == len(runs) == len({r["out"] for r in runs})  # no run twice, no row file shared
    assert all(Path(r["out"]).parent == tmp_path / "full" / "rows" for r in runs)
    for model in ("resnet18", "mobilenetv2"):
        for seed in (0, 1, 2):
            assert (model, "full", 1.0, "always", seed) in cells
            for policy in ("velocity", "random", "sparse_update"):
                for norm in ("always", "range", "frozen"):
                    assert all((model, policy, b, norm, seed) in cells for b in (0.1, 0.2, 0.3)), (policy, norm)
                in_bytes = {b for m, p, b, n, s in cells if (m, p, s) == (model, policy, seed) and isinstance(b, str)}
                assert len(in_bytes) == 2 and all((model, policy, b, "frozen", seed) in cells for b in in_bytes)
    assert len(runs) == 2 * 3 * (1 + 3 * 3 * 3 + 3 * 2)


def test_the_preset_nearer_the_paper_pretrains_on_more_images_and_fine_tunes_the_same_way(tmp_path: Path) -> None:
    runs = accuracy_tasks("more_pretraining", tmp_path)
    cells = {(r["model"], r["policy"], r["budget"], r["norm"], r["seed"]) for r in runs}
    cells_per_model = [("full", 1.0)] + [(p, b) for p in ("velocity", "random", "sparse_update") for b in (0.1, 0.3)]
    expected = {(m, p, b, "always", s) for m in ("resnet18", "mobilenetv2") for s in (0, 1, 2)
                for p, b in cells_per_model}
    assert cells == expected and len(runs) == len(expected)
    assert all(Path(r["out"]).parent == tmp_path / "more_pretraining" / "rows" for r in runs)


README_PARAGRAPH = """
import json, sys
sys.path.insert(0, sys.argv[1])
import neuron_budget
print(neuron_budget.readme_paragraph(json.loads(open(sys.argv[2]).read())))
"""


def test_the_readme_paragraph_is_what_the_committed_summary_gives_with_the_byte_budgets() -> None:
    summary_path = EXPERIMENTS / "results" / "neuron_budget" / "full" / "summary.json"
    done = subprocess.run([sys.executable, "-c", README_PARAGRAPH, str(EXPERIMENTS), str(summary_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    paragraph = done.stdout.strip()
    assert paragraph in (EXPERIMENTS.parent / "README.md").read_text()  # regenerated after the summary changed
    summary = json.loads(summary_path.read_text())
    for model in ("mobilenetv2", "resnet18"):
        rows = [r for r in summary["accuracy"] if r["model"] == model and r["budget"] in ("48MB", "8MB")]
        best = max(rows, key=lambda r: r["test_acc_mean"])
        assert f"{model} at {best['budget']}: {best['policy']} {100 * best['test_acc_mean']:.1f} %" in paragraph


SUMMARIZE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import neuron_budget
from pathlib import Path
summary = neuron_budget.summarize("quick", results=Path(sys.argv[2]), work=Path(sys.argv[2]) / "work")
print(json.dumps(summary["rows_by_commit"]))
"""


def test_the_summary_counts_its_rows_by_the_commit_that_ran_them(tmp_path: Path) -> None:
    rows = tmp_path / "quick" / "rows"
    rows.mkdir(parents=True)
    row = {"kind": "accuracy", "model": "resnet18", "width": 0.125, "policy": "random", "budget": 0.1, "norm": "always",
           "step_seconds": 0.1, "steps_timed": 3, "train_seconds": 1.0, "updated_fraction": [0.1], "test_acc": 0.5}
    for seed, code in enumerate([{"commit": "a" * 40}, {"commit": "a" * 40}, None]):
        (rows / f"acc_resnet18_w0.125_random_0.1_s{seed}.json").write_text(json.dumps({**row, "seed": seed, "code": code}))
    done = subprocess.run([sys.executable, "-c", SUMMARIZE, str(EXPERIMENTS), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"a" * 40: 2, "unrecorded": 1}
    assert f"- rows by code commit: `{'a' * 10}` 2, `unrecorded` 1" in (tmp_path / "quick" / "summary.md").read_text()


@pytest.mark.slow
def test_the_quick_preset_writes_its_rows_and_summary_where_it_is_told(tmp_path: Path,
                                                                        shared_datasets_dir: Path) -> None:
    results, work = tmp_path / "results", tmp_path / "work"
    committed = EXPERIMENTS / "results" / "neuron_budget" / "quick"
    before = {path: path.stat().st_mtime_ns for path in committed.rglob("*")}
    argv = ["--preset", "quick", "--part", "accuracy", "--results", str(results), "--work", str(work),
            "--data-dir", str(shared_datasets_dir)]
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=1200,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = sorted((results / "quick" / "rows").glob("acc_*.json"))
    assert all(json.loads(row.read_text())["code"]["commit"] for row in rows)  # each run records its commit
    assert len(rows) == len(accuracy_tasks("quick", results)) == 2 * (1 + 3 * 2 * 2 + 3 * 2)
    summary = json.loads((results / "quick" / "summary.json").read_text())
    table = summary["accuracy"]
    assert {r["norm"] for r in table} == {"always", "frozen"}
    in_bytes = [r for r in table if isinstance(r["budget"], str)]
    assert len(in_bytes) == 2 * 3 * 2 and all(r["norm"] == "frozen" for r in in_bytes)
    assert all(0.0 <= r["test_acc_mean"] <= 1.0 and 0.0 < r["updated_fraction_mean"] <= 1.0 for r in table)
    text = (results / "quick" / "summary.md").read_text()
    assert "| velocity | 4MB | frozen |" in text and "| velocity | 10% | frozen |" in text
    assert sorted(p.name for p in (work / "quick").glob("*.pt")) == ["mobilenetv2_w0.25.pt", "resnet18_w0.125.pt"]
    assert {path: path.stat().st_mtime_ns for path in committed.rglob("*")} == before  # the committed ones untouched


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:  # gone meanwhile
            continue
        if int(fields.get("PPid", "0")) == pid:
            found.add(int(status.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the process table from /proc")
def test_a_terminated_run_takes_its_worker_processes_with_it(tmp_path: Path, shared_datasets_dir: Path) -> None:
    import signal
    import time

    argv = ["--preset", "quick", "--part", "accuracy", "--jobs", "2", "--results", str(tmp_path / "results"),
            "--work", str(tmp_path / "work"), "--data-dir", str(shared_datasets_dir)]  # fmt: skip
    run = subprocess.Popen([sys.executable, str(SCRIPT), *argv], cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(workers := _children(run.pid)) < 2 and time.monotonic() < deadline:  # the pool's two workers
            time.sleep(0.2)
        assert len(workers) >= 2, "the pool's workers never started"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while (alive := {p for p in workers if Path(f"/proc/{p}").exists()}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"workers {sorted(alive)} outlived the terminated run"
    finally:
        run.kill()
