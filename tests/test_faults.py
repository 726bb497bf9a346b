"""The fault matrix: SIGKILL at fixed points of a NeuroFlux run, then resume from the last checkpoint.

Each case runs the crash drill (:mod:`nf_lightning.testing.faults`) in a subprocess that patches one function to
kill the process at a fixed point (a call count, never a timer), then runs it
again, resuming from ``last.ckpt``. The resumed run must finish with the same
plan, recompute no cache that a checkpoint already vouched for, lose at most
the epoch the kill interrupted, and end within 2 points of an uninterrupted run
with the same seed. One case runs in the default suite; the rest are slow.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from nf_lightning.testing.faults import FAST, SLOW, job, killed_epoch, manifests, result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return result(job(tmp_path_factory.mktemp("clean"), "none"))


@pytest.mark.parametrize("fault", [*FAST, *(pytest.param(f, marks=pytest.mark.slow) for f in SLOW)])
def test_kill_and_resume(fault: str, tmp_path: Path, uninterrupted: dict) -> None:
    killed = job(tmp_path, fault)
    assert killed.returncode == -signal.SIGKILL, (killed.stdout[-1000:], killed.stderr[-3000:])
    kill_epoch = killed_epoch(killed)
    before = manifests(tmp_path)
    resumed = result(job(tmp_path, "none"))
    after = manifests(tmp_path)
    assert resumed["finished"] and resumed["export"]
    assert resumed["blocks"] == uninterrupted["blocks"]  # the same plan
    assert resumed["epochs"] == uninterrupted["epochs"]
    # work lost is bounded by the last checkpoint: at most the epoch the kill interrupted, and the one before
    # it when the kill hit that epoch's own checkpoint; an export after the last epoch redoes no epoch at all
    redone = kill_epoch - resumed["start_epoch"]
    assert redone == -1 if fault == "mid_export" else 0 <= redone <= (1 if fault == "mid_checkpoint" else 0)
    # a cache of a block the checkpoint had finished (2 epochs per block) is reused as it was, not rewritten
    vouched = {name for name in before if 2 * (int(name[len("block"):].split("-")[0]) + 1) <= resumed["start_epoch"]}
    assert all(after[name] == before[name] for name in vouched), (vouched, before, after)
    assert abs(resumed["best"] - uninterrupted["best"]) <= 0.02
