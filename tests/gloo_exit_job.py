"""Two gloo ranks that exit straight after their last collective, as a DDP job's ranks do.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/gloo_exit_job.py open|closed

``open`` leaves the process group open at exit, as Lightning does for gloo: a rank
then sometimes aborts (``terminate called without an active exception``, exit code -6); how
often varies with the machine's state (from about one launch in three to one in twenty with
torch 2.14). ``closed`` registers :func:`nf_lightning.lightning.ddp.close_process_group` at
exit first, as every budgeted DDP strategy does. Only ``torch`` is imported in ``open`` mode,
so that nothing else delays the exit.
"""

from __future__ import annotations

import atexit
import sys

import torch
import torch.distributed as dist

if __name__ == "__main__":
    if sys.argv[1] == "closed":
        from nf_lightning.lightning.ddp import close_process_group

        atexit.register(close_process_group)
    dist.init_process_group("gloo")
    values = torch.ones(1000)
    for _ in range(5):
        dist.all_reduce(values)
