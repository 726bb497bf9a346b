"""Lightning's DDP without the ``DistributedDataParallel`` wrapper: the base of both budgeted DDP strategies.

NeuroFlux's and budgeted BP's steps average their gradients themselves (see
:mod:`nf_lightning.core.train.distributed`), at a point of the step the memory guard
can see, so the model is never wrapped. What both DDP strategies share lives
here: Lightning's launch, ranks and process group, and a collective timeout
short enough that a dead rank fails the job in minutes.

Example:
    >>> UnwrappedDDPStrategy(timeout=timedelta(minutes=1))._timeout
    datetime.timedelta(seconds=60)
"""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy

from nf_lightning.core.train.distributed import LOCAL, Collective, LocalCollective


def collective_for(strategy: Strategy) -> Collective | LocalCollective:
    """The ranks ``strategy`` trains with: :data:`~nf_lightning.core.train.distributed.LOCAL` for one process."""
    return Collective(strategy.root_device) if strategy.world_size > 1 else LOCAL


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

    def configure_ddp(self) -> None:
        """No ``DistributedDataParallel`` wrapper: the step averages its gradients itself."""
