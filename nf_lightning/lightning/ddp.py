"""Lightning's DDP without the ``DistributedDataParallel`` wrapper: the base of both budgeted DDP strategies.

NeuroFlux's and budgeted BP's steps average their gradients themselves (see
:mod:`nf_lightning.core.train.distributed`), at a point of the step the memory guard
can see, so the model is never wrapped. What both DDP strategies share lives
here: Lightning's launch, ranks and process group, a collective timeout short
enough that a dead rank fails the job in minutes, and a process group closed
before the interpreter exits.

Example:
    >>> UnwrappedDDPStrategy(timeout=timedelta(minutes=1))._timeout
    datetime.timedelta(seconds=60)
"""

from __future__ import annotations

import atexit
from datetime import timedelta

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy

from nf_lightning.core.train.distributed import LOCAL, Collective, LocalCollective


def collective_for(strategy: Strategy) -> Collective | LocalCollective:
    """The ranks ``strategy`` trains with: :data:`~nf_lightning.core.train.distributed.LOCAL` for one process."""
    return Collective(strategy.root_device) if strategy.world_size > 1 else LOCAL


def close_process_group() -> None:
    """Destroy the default process group if one is open; a no-op otherwise.

    Run at exit by every :class:`UnwrappedDDPStrategy`. Lightning closes the group at exit only
    for NCCL. A gloo group left open aborts a rank that exits straight after a collective while
    its peers still hold the group (``terminate called without an active exception``, exit
    code -6), in one such exit in three to one in twenty with torch 2.14, as the machine's load varies.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class UnwrappedDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that leaves the model unwrapped; the step averages gradients through :func:`collective_for`.

    Args:
        timeout: how long a collective waits for the other ranks; a dead rank fails the job
            after this long (gloo's own default is 30 minutes).
        process_group_backend, start_method, accelerator, parallel_devices, cluster_environment,
            checkpoint_io, precision_plugin: as Lightning's ``DDPStrategy``.
    """

    def __init__(
        self,
        *,
        timeout: timedelta = timedelta(minutes=5),
        process_group_backend: str | None = None,
        start_method: str = "popen",
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )

    def setup_distributed(self) -> None:
        """Lightning's set-up of ranks and process group, and :func:`close_process_group` at exit."""
        super().setup_distributed()
        atexit.unregister(close_process_group)  # once per process, however many fits
        atexit.register(close_process_group)

    def configure_ddp(self) -> None:
        """No ``DistributedDataParallel`` wrapper: the step averages its gradients itself."""
