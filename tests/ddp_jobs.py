"""Jobs that ``tests/test_distributed.py`` runs on 2 CPU processes with gloo, through ``torchrun``.

    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_jobs.py <job> <out dir>

Each rank writes ``<out dir>/rank<r>.json`` with what it saw; a rank that fails writes its
error there instead and exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from test_strategy import PlainClassifier  # noqa: E402

from nf_lightning.core.decompose import decompose  # noqa: E402
from nf_lightning.core.distributed import Collective  # noqa: E402
from nf_lightning.core.run import BlockwiseRun, DataSources  # noqa: E402
from nf_lightning.core.schedule import BlockSchedule  # noqa: E402


def data(n: int = 240) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n + 96,), generator=g)
    x = torch.randn(n + 96, 3, 16, 16, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() / 5
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


def digest(run: BlockwiseRun) -> str:
    """Every parameter and buffer of every unit and exit."""
    h = hashlib.sha256()
    for module in [*run.units, *run.exits]:
        for tensor in module.state_dict().values():
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def core_run(out: Path, budget: int = 1_200_000, shrink_rank: int | None = None) -> dict:
    """A block-wise run of the core object on this rank's shard, without Lightning."""
    rank = dist.get_rank()
    torch.manual_seed(rank)  # different initial weights on purpose: create() must start every rank from rank 0's
    net = PlainClassifier().net
    train, val = data()
    train_loader = DataLoader(train, batch_size=32, sampler=DistributedSampler(train, shuffle=True, seed=0))
    val_loader = DataLoader(val, batch_size=32, sampler=DistributedSampler(val, shuffle=False))
    run = BlockwiseRun.create(
        decompose(net), lambda: (torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), []), (3, 16, 16),
        budget, epochs_per_block=2, batch_limit=64, cache_dir=out / "cache", collective=Collective(),
        schedule=BlockSchedule.from_epochs(2, patience=None), meter_sample_every=1,
    )  # fmt: skip
    if shrink_rank == rank:  # this rank alone finds its steps over the budget: every rank must drop them with it
        run.guard.budget = int(run.plan.blocks[0].predicted_peak * 0.6)
    run.attach_data(DataSources(train_loader, val_loader))
    run.start()
    digests, accuracies, epoch = [], [], 0
    while not run.finished:
        run.begin_epoch()
        loader = run.train_loader()
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        samples = 0
        for x, y in loader:
            run.train_batch(x, y)
            samples += len(y)
        run.begin_validation()
        for x, y in val_loader:
            run.validate_batch(x, y)
        accuracies.append(run.end_validation())
        digests.append(digest(run))
        run.end_epoch(epoch)
        epoch += 1
    run.release()
    caches = {
        p.parent.name: json.loads(p.read_text())["num_samples"] for p in sorted(run.cache_dir.glob("*/manifest.json"))
    }
    return {
        "digests": digests, "accuracies": [{str(k): v for k, v in a.items()} for a in accuracies],
        "blocks": [list(b.units) for b in run.plan.blocks], "cache_dir": str(run.cache_dir), "caches": caches,
        "shrinks": run.shrinks, "failed": [a.phase for a in run.guard.failed], "run_id": run.run_id,
        "train_samples": samples,
    }  # fmt: skip


def main() -> None:
    job, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    try:
        if job == "core":
            result = core_run(out)
        elif job == "core_shrink":
            result = core_run(out, shrink_rank=1)
        elif job == "core_mismatch":  # rank 1 is given another budget: another plan
            result = core_run(out, budget=1_200_000 if rank == 0 else 3_000_000)
        else:
            raise ValueError(f"unknown job {job}")
    except Exception as error:  # noqa: BLE001  (reported to the test, which decides)
        (out / f"rank{rank}.json").write_text(json.dumps({"error": f"{type(error).__name__}: {error}",
                                                          "trace": traceback.format_exc()}))  # fmt: skip
        sys.exit(1)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
