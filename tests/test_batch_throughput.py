"""experiments/batch_throughput.py as a user runs it, in a process of its own, on a narrow network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "batch_throughput.py"


def test_batch_throughput_times_every_network_a_benchmark_run_trains(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--models", "vgg11", "--width", "0.125", "--batches", "2", "8",
               "--gain-from", "2", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                          "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = [row["network"] for row in summary["rows"]]
    assert names == ["whole network", "exit 3", *(f"unit {u} (local)" for u in range(8))]  # VGG-11: 8 units
    assert summary["threads"] == 1 and summary["batches"] == [2, 8]
    assert all(len(row["per_sample_seconds"]) == 2 and min(row["per_sample_seconds"]) > 0 for row in summary["rows"])
    table = (tmp_path / "summary.md").read_text()
    assert "| vgg11 | whole network |" in table and "gain 2 -> 8" in table
    assert (tmp_path / "per_sample.png").stat().st_size > 10_000


def test_batch_throughput_needs_the_batches_its_gain_compares(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--batches", "4", "16", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "include --gain-from (8)" in done.stderr
    assert not (tmp_path / "summary.json").exists()
