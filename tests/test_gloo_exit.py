"""The cause of the ``nf-train`` DDP flake, forced: a gloo process group left open when rank 0 exits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).parent / "gloo_exit_job.py"


@pytest.mark.slow
def test_a_gloo_group_left_open_aborts_rank_0_at_exit_and_a_closed_one_never_does() -> None:
    """The cause of the ``nf-train`` DDP flake (rank 0 exit code -6), forced: see ``gloo_exit_job.py``.

    Measured with torch 2.14.1: 6 of 10 and 7 of 20 launches aborted with the group open, none of 10
    with it closed. 16 open launches all passing by chance is about one in 1,000 at a third each. If a
    torch release stops the abort, the first assertion says so, and the close at exit can go.
    """

    def launches(mode: str, n: int) -> list[subprocess.CompletedProcess]:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   str(JOB), mode]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return [subprocess.run(command, capture_output=True, text=True, timeout=120, env=env) for _ in range(n)]

    opened = [d for d in launches("open", 16) if d.returncode != 0]
    assert opened, "no launch aborted with the group left open: the abort this guards against is gone"
    assert all("terminate called without an active exception" in d.stderr for d in opened), opened[0].stderr[-2000:]
    closed = launches("closed", 6)
    assert [d.returncode for d in closed] == [0] * 6, next(d.stderr[-2000:] for d in closed if d.returncode)
