"""Jobs that ``tests/test_distributed.py`` runs on 2 CPU processes with gloo, through ``torchrun``.

    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_jobs.py <job> <out dir>

Each rank writes ``<out dir>/rank<r>.json`` with what it saw; a rank that fails writes its
error there instead and exits non-zero.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from fault_injection import KillAtEpochStart  # noqa: E402
from nf_lightning.testing.demo import PlainClassifier, loaders  # noqa: E402

from nf_lightning import EarlyExitSelector  # noqa: E402
from nf_lightning.lightning.strategy import NeuroFluxDDPStrategy  # noqa: E402

from nf_lightning.core.network.decompose import decompose  # noqa: E402
from nf_lightning.core.train.distributed import Collective  # noqa: E402
from nf_lightning.core.train.run import BlockwiseRun, DataSources  # noqa: E402
from nf_lightning.core.options import NeuroFluxOptions  # noqa: E402


def data(n: int = 240) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n + 96,), generator=g)
    x = torch.randn(n + 96, 3, 16, 16, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() / 5
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


def module_digest(*modules: torch.nn.Module) -> str:
    """Every parameter and buffer of ``modules``, bit for bit."""
    h = hashlib.sha256()
    for module in modules:
        for tensor in module.state_dict().values():
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digest(run: BlockwiseRun) -> str:
    """Every parameter and buffer of every unit and exit."""
    return module_digest(*run.units, *run.exits)


def cache_samples(run: BlockwiseRun) -> dict[str, int]:
    """Samples in each of the run's committed caches, by name."""
    manifests = sorted(run.caches.directory.glob("*/manifest.json"))
    return {p.parent.name: json.loads(p.read_text())["num_samples"] for p in manifests}


def train_to_the_end(run: BlockwiseRun, val_loader: DataLoader) -> tuple[list[str], list[dict], int]:
    """Every epoch of every block, validated; the digest and exit accuracies after each validation, and the
    samples the last epoch trained on. The run's cache directory is released at the end."""
    digests, accuracies, epoch, samples = [], [], 0, 0
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
    return digests, accuracies, samples


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
        budget, NeuroFluxOptions(epochs_per_block=2, batch_limit=64, cache_dir=out / "cache", block_patience=None,
                                 meter_sample_every=1), collective=Collective(),
    )  # fmt: skip
    if shrink_rank == rank:  # this rank alone finds its steps over the budget: every rank must drop them with it
        run.step.guard.budget = int(run.plan.blocks[0].predicted_peak * 0.6)
    run.attach_data(DataSources(train_loader, val_loader))
    run.start()
    digests, accuracies, samples = train_to_the_end(run, val_loader)
    return {
        "digests": digests, "accuracies": [{str(k): v for k, v in a.items()} for a in accuracies],
        "blocks": [list(b.units) for b in run.plan.blocks], "cache_dir": str(run.caches.directory), "caches": cache_samples(run),
        "shrinks": run.step.shrinks, "failed": [a.phase for a in run.step.guard.failed], "run_id": run.run_id,
        "train_samples": samples,
    }  # fmt: skip


def lightning_run(out: Path, kill: int | None = None) -> dict:
    """An ordinary Lightning project under ``NeuroFluxDDPStrategy``: devices=2, resumed from last.ckpt if there."""
    rank = dist.get_rank()
    pl.seed_everything(rank)  # different initial weights on purpose
    train, val = loaders(n_train=240, n_val=96)
    strategy = NeuroFluxDDPStrategy(
        memory_budget="1.2MB", epochs_per_block=2, batch_limit=64, cache_dir=out / "cache", block_patience=None,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    last = out / "ckpt" / "last.ckpt"
    resumed = last.exists()
    callbacks = [ModelCheckpoint(dirpath=out / "ckpt", save_last=True), EarlyExitSelector(export_dir=out / "export")]
    if kill is not None and rank == 1:
        callbacks.append(KillAtEpochStart(kill))
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, default_root_dir=out, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip
    module = PlainClassifier()
    trainer.fit(module, train, val, ckpt_path=str(last) if resumed else None)
    run = strategy.run
    return {
        "digest": digest(run), "finished": run.finished, "resumed": resumed, "epochs": trainer.current_epoch,
        "blocks": [[list(b.units), run.batch_size_of(i)] for i, b in enumerate(run.plan.blocks)],
        "records": {str(u): r.accuracy for u, r in run.records.items()}, "deploy_unit": run.deploy_unit,
        "cache_dir": str(run.caches.directory), "caches": cache_samples(run), "world_size": trainer.world_size,
        "exported": (out / "export" / "exit.json").is_file(),
    }  # fmt: skip


def bp_run(out: Path) -> dict:
    """BP under ``BudgetedBackpropDDPStrategy``; rank 1's steps do not fit whole, so every rank cuts them."""
    from nf_lightning.lightning.backprop import BudgetedBackpropDDPStrategy

    rank = dist.get_rank()
    pl.seed_everything(rank)
    train, val = loaders(n_train=240, n_val=96)
    strategy = BudgetedBackpropDDPStrategy(memory_budget="50MB", meter_sample_every=1, timeout=timedelta(seconds=60))
    if rank == 1:
        strategy.guard.budget = 700_000  # a 32-sample step of PlainClassifier needs more; 8-sample pieces fit
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=2, default_root_dir=out,
                         logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         enable_checkpointing=False)  # fmt: skip
    module = PlainClassifier()
    trainer.fit(module, train, val)
    return {"digest": module_digest(module), "pieces": strategy.pieces, "failed": len(strategy.guard.failed),
            "steps": trainer.global_step, "violations": len(strategy.guard.violations)}  # fmt: skip


def classic_run(out: Path) -> dict:
    """Classic local learning (one block, classic heads, no cache) under ``NeuroFluxDDPStrategy``."""
    rank = dist.get_rank()
    pl.seed_everything(rank)
    train, val = loaders(n_train=240, n_val=96)
    strategy = NeuroFluxDDPStrategy(memory_budget="5MB", epochs_per_block=2, batch_limit=64, single_block=True,
                                    aux="classic", cache=False, block_patience=None)  # fmt: skip
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, default_root_dir=out, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         enable_checkpointing=False)  # fmt: skip
    trainer.fit(PlainClassifier(), train, val)
    run = strategy.run
    return {"digest": digest(run), "blocks": [list(b.units) for b in run.plan.blocks], "finished": run.finished}


def single_resume(out: Path) -> dict:
    """The 2-rank run's last checkpoint, resumed by one process with the single-device strategy."""
    import warnings

    from nf_lightning import NeuroFluxStrategy

    train, val = loaders(n_train=240, n_val=96)
    strategy = NeuroFluxStrategy(memory_budget="1.2MB", epochs_per_block=2, batch_limit=64, cache_dir=out / "cache",
                                 block_patience=None)  # fmt: skip
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, default_root_dir=out, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(PlainClassifier(), train, val, ckpt_path=str(out / "ckpt" / "last.ckpt"))
    run = strategy.run
    return {"finished": run.finished, "cache_dir": str(run.caches.directory), "caches": cache_samples(run),
            "blocks": [[list(b.units), run.batch_size_of(i)] for i, b in enumerate(run.plan.blocks)],
            "warnings": [str(w.message) for w in caught]}  # fmt: skip


def equivalence_run(out: Path, ranks: int) -> dict:
    """VGG-11 x0.125 on 2,000 real CIFAR-10 images through two blocks, global batch 64 on ``ranks`` processes
    (the seed from ``$EQ_SEED``).

    The plan is fixed (no profiling), so both runs train the same blocks on the same global batch with
    the same schedule: 64 samples per step in one process, or 32 on each of two.
    """
    from nf_lightning.core.plan.training_plan import Block, TrainingPlan
    from nf_lightning.core.exits.aux_heads import build_exits
    from nf_lightning.data import CIFAR10FolderDataModule
    from nf_lightning.models import create

    torch.manual_seed(int(os.environ.get("EQ_SEED", "0")))
    data = CIFAR10FolderDataModule(train_subset=2000, val_subset=1000, seed=0)
    train, val = data.train_dataset(augment=True), data.val_dataset()
    net = create("vgg11", num_classes=10, width_mult=0.125)
    parts = decompose(net)
    batch, sharded = 64 // ranks, ranks > 1
    train_loader = DataLoader(train, batch_size=batch, shuffle=not sharded,
                              sampler=DistributedSampler(train, shuffle=True, seed=0) if sharded else None)  # fmt: skip
    val_loader = DataLoader(val, batch_size=250, sampler=DistributedSampler(val, shuffle=False) if sharded else None)
    plan = TrainingPlan(budget=10**9, batch_limit=64, rho=0.4, aux_policy="adaptive", input_shape=(3, 32, 32),
                        unit_models=[], blocks=[Block((0, 1, 2), batch, 0), Block((3, 4, 5, 6, 7), batch, 0)],
                        epochs_per_block=[4, 4])  # fmt: skip
    recipe = lambda: (torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4), [])  # noqa: E731
    options = NeuroFluxOptions(cache_dir=out / f"cache{ranks}", lr_reference_batch=batch, block_patience=None)
    run = BlockwiseRun(parts, build_exits(parts, (3, 32, 32)), plan, recipe, options,
                       collective=Collective() if sharded else None)  # fmt: skip
    run.collective.broadcast_modules([*parts.units, *run.exits])
    run.attach_data(DataSources(train_loader, val_loader, train_unaugmented=data.train_dataset(augment=False)))
    run.start()
    digests, _, _ = train_to_the_end(run, val_loader)
    return {"records": {str(u): r.accuracy for u, r in run.records.items()}, "digests": digests,
            "best": max(r.accuracy for r in run.records.values())}  # fmt: skip


def exit_after_fit(out: Path) -> None:
    """Lightning opens the gloo process group itself (torchrun's environment); this job never closes it.

    After one step it runs the exit handlers registered so far and records whether the group is
    still open: a budgeted DDP strategy must have registered one that closes it (see
    ``tests/gloo_exit_job.py`` for what an open group does at exit).
    """
    from nf_lightning.lightning.backprop import BudgetedBackpropDDPStrategy

    train, val = loaders(n_train=64, n_val=32)
    trainer = pl.Trainer(strategy=BudgetedBackpropDDPStrategy(memory_budget="50MB"), accelerator="cpu",
                         devices=int(os.environ["WORLD_SIZE"]), max_steps=1, limit_val_batches=1,
                         default_root_dir=out, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, enable_checkpointing=False)  # fmt: skip
    trainer.fit(PlainClassifier(), train, val)
    rank, open_after_fit = trainer.global_rank, dist.is_initialized()
    atexit._run_exitfuncs()  # what the interpreter runs at exit
    (out / f"rank{rank}.json").write_text(json.dumps({"steps": trainer.global_step, "open_after_fit": open_after_fit,
                                                      "open_at_exit": dist.is_initialized()}))  # fmt: skip


def main() -> None:
    job, out = sys.argv[1], Path(sys.argv[2])
    if job == "exit_after_fit":
        exit_after_fit(out)
        return
    if job == "single_equivalence":
        (out / "single.json").write_text(json.dumps(equivalence_run(out, ranks=1)))
        return
    if job == "single_resume":
        (out / "single.json").write_text(json.dumps(single_resume(out)))
        return
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
        elif job == "equivalence":
            result = equivalence_run(out, ranks=2)
        elif job == "bp":
            result = bp_run(out)
        elif job == "classic":
            result = classic_run(out)
        elif job == "lightning":
            result = lightning_run(out)
        elif job == "lightning_kill":  # rank 1 dies at the start of epoch 3 (block 1's second epoch)
            result = lightning_run(out, kill=3)
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
