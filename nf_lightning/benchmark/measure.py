"""What the benchmark measures outside its runs: the budget, bare loops, inference speed, test at the crossing.

Everything here runs in the benchmark's own process, alone (before or after the runs).

Example:
    >>> settings = {"model": "vgg11", "width": 0.25, "data": "cifar10_folder", "lrs": [0.05], "threads": 1}
    >>> unit_count(settings)
    8
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nf_lightning.benchmark.plan import RunSpec, run_overrides
from nf_lightning.benchmark.presets import BP_LIKE, BUDGET_BATCH


def _network(settings: Mapping[str, Any]) -> torch.nn.Module:
    from nf_lightning import models

    return models.create(settings["model"], num_classes=_classes(settings), width_mult=settings["width"])


def _input_shape(settings: Mapping[str, Any]) -> tuple[int, ...]:
    from nf_lightning.data import KNOWN_DATASETS

    return tuple(KNOWN_DATASETS[settings["data"]].input_shape)


def _classes(settings: Mapping[str, Any]) -> int:
    from nf_lightning.data import KNOWN_DATASETS

    return KNOWN_DATASETS[settings["data"]].num_classes


def unit_count(settings: Mapping[str, Any]) -> int:
    """How many units NeuroFlux decomposes the benchmark's network into (the depths a depth search may try)."""
    from nf_lightning.core.network.decompose import decompose

    return len(decompose(_network(settings)).units)


def _cfg(settings: Mapping[str, Any]) -> Any:
    from nf_lightning.cli.common import compose_config

    return compose_config("train", run_overrides(RunSpec("bp", settings["lrs"][0], 0), {"set": [], **settings}, "1GB"))


def tightest_bp_budget(settings: Mapping[str, Any], batch: int = BUDGET_BATCH) -> int:
    """Bytes of the smallest budget at which plain BP trains at ``batch``: its step's peak, as nf-train measures it."""
    from hydra.utils import instantiate

    from nf_lightning.data import KNOWN_DATASETS
    from nf_lightning.lightning.backprop_batch import backprop_step_peak

    cfg = _cfg(settings)
    data = KNOWN_DATASETS[cfg.data.name]
    net = instantiate(cfg.model, num_classes=data.num_classes)
    module = instantiate(cfg.module, net=net, num_classes=data.num_classes)
    return backprop_step_peak(module, tuple(data.input_shape), batch)


def prepare_data(settings: Mapping[str, Any]) -> None:
    """Decode the data set once, here, so parallel runs neither race to decode it nor time the decoding."""
    from hydra.utils import instantiate

    instantiate(_cfg(settings).data).prepare_data()


def _sgd(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """ClassifierModule's optimizer with nf-train's recipe (the rate does not change a step's cost)."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)


def median_seconds(step: Callable[[], None], steps: int, warmup: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``step`` over ``steps`` calls after ``warmup``; ``sync`` waits for the device
    (``torch.cuda.synchronize`` on a GPU)."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bp_step(
    model: torch.nn.Module, batch: int, shape: Sequence[int], classes: int = 10, device: str | torch.device = "cpu"
) -> Callable[[], None]:
    """One SGD step of ``model`` (nf-train's recipe) on a fixed random batch on ``device``, as a callable."""
    import torch.nn.functional as F

    optimizer = _sgd(model.parameters())
    x, y = torch.randn(batch, *shape, device=device), torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bare_step_seconds(
    settings: Mapping[str, Any], method: str, run: Mapping[str, Any], steps: int = 20, warmup: int = 3
) -> dict[str, Any]:
    """Median seconds of one optimizer step of ``method`` in a bare PyTorch loop: no Lightning, no meter, no loader.

    BP-trained methods: forward, backward, SGD step of the (checkpointed, or
    exit's) network at the batch of ``run`` (a summary row). Local learning:
    one batch through every unit of a block, each unit+exit taking its local
    step, at the block's batch; the mean over blocks weighted by their steps.
    """
    from nf_lightning.benchmark.baselines import exit_network
    from nf_lightning.core.exits.aux_heads import build_exits, unit_shapes
    from nf_lightning.core.network.checkpointing import CheckpointedNetwork
    from nf_lightning.core.network.decompose import decompose
    from nf_lightning.core.train.local_learning import LocalBlock

    torch.manual_seed(0)
    shape = _input_shape(settings)
    if method in BP_LIKE:
        net = _network(settings)
        if run.get("unit") is not None:
            net = exit_network(settings["model"], _classes(settings), run["unit"], settings["width"], shape,
                               aux=run.get("aux_policy") or "adaptive")  # fmt: skip
        model = (CheckpointedNetwork(net) if method == "bp_ckpt" else net).train()
        (batch,) = run["batch_sizes"]
        seconds = median_seconds(bp_step(model, batch, shape), steps, warmup)
        return {"bare_step_seconds": seconds, "blocks": [{"batch": batch, "seconds": seconds}]}
    parts = decompose(_network(settings).train())
    exits = build_exits(parts, shape, run.get("aux_policy") or ("classic" if method == "classic_ll" else "adaptive"))
    shapes = [shape, *unit_shapes(parts.units, shape)]
    blocks = []
    for block, batch, count in zip(run["plan_blocks"] or [], run["batch_sizes"], run["steps"] or []):
        units = list(block["units"])
        local = LocalBlock([parts.units[u] for u in units], [exits[u] for u in units],
                           [_sgd([*parts.units[u].parameters(), *exits[u].parameters()]) for u in units])  # fmt: skip
        local.train()
        x, y = torch.randn(batch, *shapes[units[0]]), torch.randint(0, 10, (batch,))

        def step(local: LocalBlock = local, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            h = x
            for index in range(len(local.units)):
                h, _ = local.unit_step(index, h, y)

        blocks.append({"units": units, "batch": batch, "steps": count, "seconds": median_seconds(step, steps, warmup)})
    total = sum(b["steps"] for b in blocks)
    mean = sum(b["steps"] * b["seconds"] for b in blocks) / total if total else None
    return {"bare_step_seconds": mean, "blocks": blocks}


def exit_throughput(settings: Mapping[str, Any], unit: int, repeats: int, aux: str = "adaptive") -> dict[str, Any]:
    """Inference speed of the exit ``unit`` (heads of policy ``aux``) against the full network, batch 1 and 64,
    ``settings['threads']`` threads.

    Speed depends on the operations, not on the weights, so the architecture is built afresh.
    """
    from nf_lightning.benchmark.baselines import exit_network
    from nf_lightning.core.exits.throughput import compare_throughput

    shape = _input_shape(settings)
    net = _network(settings).eval()
    exit_model = exit_network(settings["model"], _classes(settings), unit, settings["width"], shape, aux=aux).eval()
    rows = compare_throughput(exit_model, net, shape, batch_sizes=(1, 64), warmup=5, repeats=repeats,
                              num_threads=settings["threads"])  # fmt: skip
    return {"unit": unit, "rows": rows}


def crossing_tests(results: Mapping[str, Any], work: Path) -> list[dict[str, Any]]:
    """Test accuracy of NeuroFlux's deployable model at each seed's crossing, from its snapshot (after the runs)."""
    from nf_lightning.benchmark.probe import snapshot_test_accuracy

    out = []
    runs = {(r["method"], r["lr"], r["seed"]): r for r in results["runs"] if r["status"] == "ok"}
    for crossed in (results["methods"].get("neuroflux") or {}).get("crossings") or []:
        run = runs[("neuroflux", results["lrs"]["neuroflux"], crossed["seed"])]
        entry = None
        if crossed["validation"] is not None:
            entry = snapshot_test_accuracy(work / "runs" / run["key"], crossed["validation"], run["test_images"])
        out.append({**crossed, **(entry or {})})
    return out
