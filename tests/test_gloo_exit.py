"""The cause of the ``nf-train`` DDP flake, forced: a gloo process group left open when the ranks exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).parent / "gloo_exit_job.py"
SIGNATURE = "terminate called without an active exception"


def _launch(mode: str) -> subprocess.CompletedProcess:
    """One two-rank ``torchrun`` launch of ``gloo_exit_job.py``; it fails if either rank does.

    ``--standalone`` binds its own rendezvous port and keeps it: a probed free port could be taken before
    the ranks bind it (``test_distributed.py``, ``test_a_probed_master_port_can_be_taken_before_torchrun_binds_it``).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(JOB), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow
def test_a_gloo_group_left_open_aborts_a_rank_at_exit_and_a_closed_one_never_does() -> None:
    """The cause of the ``nf-train`` DDP flake (a rank's exit code -6), forced: see ``gloo_exit_job.py``.

    The abort is a race whose rate varies with the machine's state (torch 2.14.1: 6 of 10 launches
    once, 1 of 10 on 2026-12-07), so the open group is launched until a rank aborts, up to 100
    launches: none in 100 at one in twenty is about one in 170. If a torch release stops the abort,
    the first assertion says so, and the close at exit can go. Then 30 launches with the group
    closed must all exit cleanly.
    """
    for launches in range(1, 101):
        opened = _launch("open")
        if opened.returncode != 0:
            break
    assert opened.returncode != 0, "no rank aborted in 100 launches with the group left open: the abort is gone"
    assert SIGNATURE in opened.stderr, opened.stderr[-2000:]
    for _ in range(30):
        closed = _launch("closed")
        assert closed.returncode == 0, f"after {launches} open launch(es): {closed.stderr[-2000:]}"
