"""The cause of the ``nf-train`` DDP flake, forced: a gloo process group left open when the ranks exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).parent / "gloo_exit_job.py"
SIGNATURE = "terminate called without an active exception"


def _launch(mode: str) -> list[subprocess.CompletedProcess]:
    """Both ranks of one ``gloo_exit_job.py`` launch, started as Lightning's DDP launcher starts them."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2"}  # fmt: skip
    ranks = [subprocess.Popen([sys.executable, str(JOB), mode], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]  # fmt: skip
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    return [subprocess.CompletedProcess(rank.args, rank.returncode, *out) for rank, out in zip(ranks, outputs)]


@pytest.mark.slow
def test_a_gloo_group_left_open_aborts_a_rank_at_exit_and_a_closed_one_never_does() -> None:
    """The cause of the ``nf-train`` DDP flake (a rank's exit code -6), forced: see ``gloo_exit_job.py``.

    The abort is a race whose rate varies with the machine's state (torch 2.14.1: 6 of 10 launches
    once, 3 of 30 on 2026-12-07), so the open group is launched until a rank aborts, up to 100
    launches: none in 100 at one in twenty is about one in 170. If a torch release stops the abort,
    the first assertion says so, and the close at exit can go. Then 30 launches with the group
    closed must all exit cleanly.
    """
    for launches in range(1, 101):
        aborted = [rank for rank in _launch("open") if rank.returncode != 0]
        if aborted:
            break
    assert aborted, "no rank aborted in 100 launches with the group left open: the abort this guards against is gone"
    assert all(SIGNATURE in rank.stderr for rank in aborted), aborted[0].stderr[-2000:]
    for _ in range(30):
        failed = [rank for rank in _launch("closed") if rank.returncode != 0]
        assert not failed, f"after {launches} open launch(es): {failed[0].stderr[-2000:]}"
