"""NeuroFluxStrategy in real Lightning Trainer runs on CPU."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from nf_lightning import NeuroFluxStrategy, decompose
from nf_lightning.core.plan.partitioner import BudgetTooSmall
from nf_lightning.lightning.hooks import NeuroFluxHooks
from nf_lightning.testing.demo import PlainClassifier, loaders, tight_strategy, trainer


def test_plain_module_trains_and_blocks_respect_budget(tmp_path: Path) -> None:
    module = PlainClassifier()
    train, val = loaders()
    strategy = tight_strategy(tmp_path)
    t = trainer(tmp_path, strategy, enable_checkpointing=False)
    t.fit(module, train, val)
    plan = strategy.plan
    assert len(plan.blocks) >= 2, plan.blocks
    assert set(strategy.run.step.peaks) == set(range(len(plan.blocks)))
    for block, peak in strategy.run.step.peaks.items():
        assert 0.3 * plan.budget < peak <= plan.budget, (block, peak, plan.budget)
    assert t.current_epoch == plan.total_epochs
    assert strategy.run.finished
    assert sorted(strategy.run.records) == list(range(len(plan.unit_models)))  # every exit was scored
    assert "val_acc" in t.callback_metrics  # the user's own metric, on the deployable exit
    # caches of every block but the last are on disk
    for block in range(len(plan.blocks) - 1):
        for split in ("train", "val"):
            assert (tmp_path / "cache" / f"block{block}-{split}" / "manifest.json").is_file()
    # the user's module is handed back unchanged in kind
    assert module.automatic_optimization
    # the strategy's hooks callback is in plain sight, once
    assert isinstance(t.callbacks[0], NeuroFluxHooks) and sum(isinstance(c, NeuroFluxHooks) for c in t.callbacks) == 1


def test_pooled_heads_train_and_resume_with_the_run(tmp_path: Path) -> None:
    train, val = loaders(n_train=64, n_val=32)
    strategy = tight_strategy(tmp_path, aux="pooled")
    t = trainer(tmp_path, strategy, max_epochs=1, enable_checkpointing=False)
    t.fit(PlainClassifier(), train, val)
    heads = strategy.run.exits[:-1]
    assert strategy.plan.aux_policy == "pooled" and any(isinstance(h[0], torch.nn.AdaptiveAvgPool2d) for h in heads)
    t.save_checkpoint(tmp_path / "one_epoch.ckpt")
    resumed = tight_strategy(tmp_path, aux="pooled")
    again = trainer(tmp_path, resumed, max_epochs=2, enable_checkpointing=False)
    again.fit(PlainClassifier(), train, val, ckpt_path=tmp_path / "one_epoch.ckpt")
    assert again.current_epoch == 2 and [type(h[0]) for h in resumed.run.exits[:-1]] == [type(h[0]) for h in heads]


def test_a_listed_hooks_callback_is_used_as_is(tmp_path: Path) -> None:
    hooks = NeuroFluxHooks()
    train, val = loaders(n_train=64, n_val=32)
    t = trainer(tmp_path, tight_strategy(tmp_path), callbacks=[hooks], enable_checkpointing=False, max_epochs=1)
    t.fit(PlainClassifier(), train, val)
    assert [c for c in t.callbacks if isinstance(c, NeuroFluxHooks)] == [hooks]


def test_registered_name_resolves(tmp_path: Path) -> None:
    t = trainer(tmp_path, "neuroflux", max_epochs=1)
    assert isinstance(t.strategy, NeuroFluxStrategy)
    assert t.strategy.root_device == torch.device("cpu")


def test_budget_too_small_names_minimum(tmp_path: Path) -> None:
    train, val = loaders()
    t = trainer(tmp_path, NeuroFluxStrategy(memory_budget=1000), enable_checkpointing=False)
    with pytest.raises(BudgetTooSmall, match=r"smallest feasible budget .* needed by unit \d"):
        t.fit(PlainClassifier(), train, val)


def test_resume_reuses_verified_cache_and_rebuilds_corrupt_one(tmp_path: Path) -> None:
    train, val = loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, every_n_epochs=1)
    strategy = tight_strategy(tmp_path, rho=0.0)  # one block per distinct batch size
    t = trainer(tmp_path, strategy, callbacks=[ckpt])
    t.fit(PlainClassifier(), train, val)
    n_blocks = len(strategy.plan.blocks)
    assert n_blocks >= 3
    cache_file = tmp_path / "cache" / "block0-train" / "activations.npy"
    first_epoch_of_block2 = sum(strategy.plan.epochs_per_block[:2])
    resume_from = tmp_path / "ckpt" / f"epoch={first_epoch_of_block2 - 1}-step={_step_of(tmp_path, first_epoch_of_block2 - 1)}.ckpt"
    before = (tmp_path / "cache" / "block1-train" / "manifest.json").stat().st_mtime_ns

    # corrupt block 0's cache: block 1's is intact and is what block 2 needs
    data = bytearray(cache_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cache_file.write_bytes(bytes(data))

    strategy2 = tight_strategy(tmp_path, rho=0.0)
    t2 = trainer(tmp_path, strategy2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")])
    t2.fit(PlainClassifier(), train, val, ckpt_path=resume_from)
    assert t2.current_epoch == strategy2.plan.total_epochs
    assert (tmp_path / "cache" / "block1-train" / "manifest.json").stat().st_mtime_ns == before  # reused

    # now corrupt the cache block 2 reads: resuming rebuilds it with a warning
    target = tmp_path / "cache" / "block1-train" / "activations.npy"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    strategy3 = tight_strategy(tmp_path, rho=0.0)
    t3 = trainer(tmp_path, strategy3, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt3")])
    with pytest.warns(UserWarning, match="failed verification"):
        t3.fit(PlainClassifier(), train, val, ckpt_path=resume_from)
    assert (tmp_path / "cache" / "block1-train" / "manifest.json").stat().st_mtime_ns != before


def _step_of(tmp_path: Path, epoch: int) -> int:
    matches = list((tmp_path / "ckpt").glob(f"epoch={epoch}-step=*.ckpt"))
    assert len(matches) == 1, matches
    return int(matches[0].stem.split("step=")[1])


def test_bp_infeasible_budget_trains_under_neuroflux(tmp_path: Path) -> None:
    from nf_lightning.core.exits.aux_heads import build_aux_heads
    from nf_lightning.core.plan.partitioner import minimum_budget
    from nf_lightning.core.memory.profiler import profile_backprop, profile_units
    from nf_lightning.core.network.smallest_batch import smallest_batch, smallest_batches

    module = PlainClassifier(width=16)
    shape = (3, 16, 16)
    parts = decompose(module.net)
    aux = build_aux_heads(parts.units, 10, shape)
    smallest = smallest_batches(parts.units, [*aux, parts.head])
    nf_minimum = minimum_budget(profile_units(parts.units, list(aux), parts.head, shape), smallest)
    bp_minimum = profile_backprop(module.net, shape).predict(smallest_batch(module.net))
    assert nf_minimum < bp_minimum
    budget = int(nf_minimum + 0.9 * (bp_minimum - nf_minimum))  # BP cannot run even its smallest batch
    pl.seed_everything(0)
    train, val = loaders()
    t = trainer(tmp_path, tight_strategy(tmp_path, memory_budget=budget), enable_checkpointing=False)
    t.fit(module, train, val)
    assert max(t.strategy.run.step.peaks.values()) <= budget < bp_minimum
    assert t.callback_metrics["val_acc"] > 0.15  # above chance (0.1) on a learnable task


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import lightning.pytorch as pl
    from nf_lightning.testing.demo import PlainClassifier, loaders, trainer, tight_strategy
    from lightning.pytorch.callbacks import ModelCheckpoint
    from pathlib import Path

    class KillInBlock(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.strategy.run.active_block == 1 and batch_idx == 2 and {kill}:
                os.kill(os.getpid(), signal.SIGKILL)

    tmp = Path({tmp!r})
    train, val = loaders()
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True, every_n_epochs=1)
    t = trainer(tmp, tight_strategy(tmp), callbacks=[ckpt, KillInBlock()])
    last = tmp / "ckpt" / "last.ckpt"
    t.fit(PlainClassifier(), train, val, ckpt_path=str(last) if last.exists() else None)
    print("FINISHED", t.current_epoch, t.strategy.plan.total_epochs)
    """
)


def test_sigkill_in_second_block_then_resume(tmp_path: Path) -> None:
    tests = str(Path(__file__).parent)

    def run(kill: bool) -> subprocess.CompletedProcess:
        script = KILL_SCRIPT.format(tests=tests, tmp=str(tmp_path), kill=kill)
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)

    killed = run(kill=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    resumed = run(kill=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = [line for line in resumed.stdout.splitlines() if line.startswith("FINISHED")]
    assert done and done[0].split()[1] == done[0].split()[2]


def test_without_cache_blocks_train_through_frozen_prefix(tmp_path: Path) -> None:
    pl.seed_everything(0)
    train, val = loaders()
    strategy = tight_strategy(tmp_path, cache=False, epochs_per_block=2)
    t = trainer(tmp_path, strategy, enable_checkpointing=False)
    t.fit(PlainClassifier(), train, val)
    assert len(strategy.plan.blocks) >= 2
    assert not (tmp_path / "cache").exists()
    assert t.current_epoch == strategy.plan.total_epochs
    assert t.callback_metrics["val_acc"] > 0.15


def test_the_logged_batch_size_is_the_blocks_even_on_an_epochs_last_batch(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    train, val = loaders(n_train=101, n_val=32)  # 101 images: every block's last batch is smaller than its own
    strategy = tight_strategy(tmp_path)
    t = trainer(tmp_path, strategy, max_epochs=2, enable_checkpointing=False, log_every_n_steps=1,
                logger=CSVLogger(tmp_path, name="logs"))
    t.fit(PlainClassifier(), train, val)
    planned = {float(strategy.run.batch_size_of(block)) for block in range(2)}
    assert all(101 % batch for batch in planned), planned
    (metrics,) = (tmp_path / "logs").glob("version_*/metrics.csv")
    rows = csv.DictReader(metrics.open())
    logged = [float(row["neuroflux/batch_size"]) for row in rows if row["neuroflux/batch_size"]]
    assert len(logged) == sum(-(-101 // int(batch)) for batch in planned)  # every step of the two blocks
    assert set(logged) == planned


def test_the_trainers_global_step_after_fit_counts_the_unit_steps_taken(tmp_path: Path) -> None:
    class LastStep(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.step = trainer.global_step  # inside fit, where NeuroFlux runs the module manually

    train, val = loaders(n_train=64, n_val=32)
    last = LastStep()
    t = trainer(tmp_path, tight_strategy(tmp_path), max_epochs=2, callbacks=[last], enable_checkpointing=False)
    module = PlainClassifier()
    t.fit(module, train, val)
    assert module.automatic_optimization and last.step > 0
    assert t.global_step == last.step
    t.save_checkpoint(tmp_path / "after_fit.ckpt")
    assert torch.load(tmp_path / "after_fit.ckpt", weights_only=False)["global_step"] == last.step


def test_at_the_smallest_budget_every_block_trains_at_a_batch_batchnorm_accepts(tmp_path: Path) -> None:
    train, val = loaders(n_train=64, n_val=32)
    with pytest.raises(BudgetTooSmall, match=r"\(batch 2\)") as raised:  # every unit holds BatchNorm
        trainer(tmp_path, tight_strategy(tmp_path, memory_budget=1000), max_epochs=1).fit(PlainClassifier(), train, val)
    strategy = tight_strategy(tmp_path / "fits", memory_budget=raised.value.minimum_bytes)
    t = trainer(tmp_path / "fits", strategy, max_epochs=20, enable_checkpointing=False)
    t.fit(PlainClassifier(), train, val)
    assert min(block.batch_size for block in strategy.plan.blocks) == 2
    assert set(strategy.run.step.peaks) == set(range(strategy.run.num_blocks))  # no block skipped all its batches
