"""NeuroFlux on 2 CPU processes with gloo: ranks in lock step, per-rank caches, a plan mismatch is an error.

The jobs are in ``tests/ddp_jobs.py``, launched with ``torchrun`` in a subprocess (Lightning's own
launcher re-runs the command line, which inside pytest would re-run the suite).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).with_name("ddp_jobs.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(job: str, out: Path, timeout: int = 300) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(JOBS), job, str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists() else {}
             for r in range(2)]  # fmt: skip
    return done, ranks


def test_two_ranks_stay_identical_through_every_block_and_cache_their_own_shards(tmp_path: Path) -> None:
    done, (r0, r1) = torchrun("core", tmp_path)
    assert done.returncode == 0, (r0.get("trace"), r1.get("trace"), done.stderr[-3000:])
    assert len(r0["blocks"]) >= 2 and r0["blocks"] == r1["blocks"]
    # parameters and BatchNorm statistics identical on both ranks after every epoch (they started apart)
    assert len(r0["digests"]) >= 4 and r0["digests"] == r1["digests"]
    assert r0["accuracies"] == r1["accuracies"] and r0["run_id"] == r1["run_id"]
    # each rank cached its own half of the 240 training and 96 validation images, in its own directory
    assert r0["cache_dir"] != r1["cache_dir"] and r0["cache_dir"].endswith("rank0-of-2")
    for rank in (r0, r1):
        assert rank["train_samples"] == 120
        assert {k: v for k, v in rank["caches"].items() if k.startswith("block0")} == {
            "block0-train": 120, "block0-val": 48}  # fmt: skip


def test_a_step_over_the_budget_on_one_rank_is_dropped_and_retried_on_every_rank(tmp_path: Path) -> None:
    done, (r0, r1) = torchrun("core_shrink", tmp_path)
    assert done.returncode == 0, (r0.get("trace"), r1.get("trace"), done.stderr[-3000:])
    assert r1["failed"] and "forward/backward" in r1["failed"]  # rank 1's own overruns
    assert r0["shrinks"] == r1["shrinks"] and r0["shrinks"]  # rank 0 shrank with it, to the same batch
    assert len(r0["failed"]) == len(r1["failed"])  # rank 0 dropped each of those steps too (no update on one rank)
    assert r0["digests"] == r1["digests"]


def test_ranks_with_different_plans_fail_clearly_instead_of_hanging(tmp_path: Path) -> None:
    done, (r0, r1) = torchrun("core_mismatch", tmp_path, timeout=240)
    assert done.returncode != 0
    for rank in (r0, r1):
        assert rank["error"].startswith("PlanMismatch: the ranks disagree on the plan: ranks [0] vs [1]")
