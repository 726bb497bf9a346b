"""What a block-wise run needs from the other ranks when it trains on several processes.

Every rank trains the same blocks on its own shard of the data. Each unit
steps right after its own backward pass (Algorithm 2), so its gradients are
averaged across ranks there, unit by unit, before its optimizer steps: one
in-place all-reduce per gradient tensor, so no flat buffer and never more than
one unit's gradients alive, as the memory plan assumes (gloo has no average
reduction, so it is a sum divided by the world size). Whether a step fits the
budget is agreed on by all ranks before any of them updates: if one rank's
step did not fit, every rank drops it and retries on smaller pieces, so the
ranks stay in lock step and the parameters identical. BatchNorm running
statistics are averaged before every validation and cache write, validation
counts are summed, and the plan is checked to be the same everywhere.

:class:`Collective` does it over ``torch.distributed``; :data:`LOCAL` is the
one-process stand-in, which does nothing.

Example:
    >>> LOCAL.world_size, LOCAL.agree(failed=False)
    (1, False)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, Sampler

from nf_lightning.core.memory.meter import MemoryLimitExceeded


class PeerStepFailed(MemoryLimitExceeded):
    """Another rank's step did not fit the budget, so this rank drops its own and retries with it."""


class PlanMismatch(RuntimeError):
    """The ranks made different plans (different models, budgets or data): they cannot train together."""


class Collective:
    """The ranks of the default ``torch.distributed`` process group, as a block-wise run uses them.

    Args:
        device: where this rank's tensors live (gloo reduces CPU tensors, NCCL CUDA ones).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Collective needs an initialized torch.distributed process group")
        self.device = torch.device(device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def agree(self, failed: bool) -> bool:
        """Whether any rank's step failed (every rank calls this once per unit step, failed or not)."""
        flag = torch.tensor([1.0 if failed else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def average_gradients(self, parameters: Iterable[Tensor]) -> None:
        """Average each gradient across ranks, in place (a parameter without one must lack it everywhere)."""
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)

    def average_buffers(self, modules: Iterable[nn.Module]) -> None:
        """BatchNorm running statistics (any floating buffer) averaged across ranks; integer buffers
        (batch counters) taken from rank 0."""
        for module in modules:
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                    buffer.div_(self.world_size)
                else:
                    dist.broadcast(buffer, src=0)

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over ranks (a new tensor; integer counts stay exact)."""
        total = values.detach().to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(values.device)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable), on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_modules(self, modules: Iterable[nn.Module]) -> None:
        """Every parameter and buffer of ``modules`` set to rank 0's, so all ranks start alike."""
        with torch.no_grad():
            for module in modules:
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, src=0)

    def check_same(self, value: Any, what: str) -> None:
        """Raise :class:`PlanMismatch` on every rank unless ``value`` (JSON-able) is the same on all of them."""
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        digests: list[str | None] = [None] * self.world_size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            groups: dict[str, list[int]] = {}
            for rank, d in enumerate(digests):
                groups.setdefault(str(d), []).append(rank)
            raise PlanMismatch(
                f"the ranks disagree on the {what}: ranks {' vs '.join(str(r) for r in groups.values())} made "
                "different ones (a different model, budget, batch limit or data on some rank); every rank must "
                "be given the same settings"
            )


class LocalCollective:
    """One process: nothing to agree on, average or check."""

    rank = 0
    world_size = 1

    def agree(self, failed: bool) -> bool:
        return failed

    def average_gradients(self, parameters: Iterable[Tensor]) -> None:
        pass

    def average_buffers(self, modules: Iterable[nn.Module]) -> None:
        pass

    def sum(self, values: Tensor) -> Tensor:
        return values

    def check_same(self, value: Any, what: str) -> None:
        pass

    def broadcast_object(self, value: Any) -> Any:
        return value

    def broadcast_modules(self, modules: Iterable[nn.Module]) -> None:
        pass


LOCAL = LocalCollective()
"""The collective of a single process."""


def shard_sampler(dataset: Sized, collective: Collective | LocalCollective, shuffle: bool) -> Sampler | None:
    """This rank's shard of ``dataset`` in order (``DistributedSampler``, padded to equal shards), None alone.

    >>> shard_sampler(range(10), LOCAL, shuffle=False) is None
    True
    """
    if collective.world_size == 1:
        return None
    return DistributedSampler(dataset, num_replicas=collective.world_size, rank=collective.rank, shuffle=shuffle)
