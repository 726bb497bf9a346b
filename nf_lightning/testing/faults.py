"""A crash drill: a small NeuroFlux run killed by SIGKILL at a fixed point, then resumed from ``last.ckpt``.

Each fault patches one function so the process kills itself at a call count
(never a timer). ``tests/test_faults.py`` and ``experiments/fault_matrix.py``
run it; every patched name is looked up when this module is imported, so a
renamed or moved function fails at import (test collection), not in a slow
test nobody ran.

Example (one process per run, as a crash needs)::

    python -m nf_lightning.testing.faults mid_cache_write /tmp/drill   # killed
    python -m nf_lightning.testing.faults none /tmp/drill              # resumes, prints RESULT {...}
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from nf_lightning.core.cache import writer as cache_writer
from nf_lightning.core.exits import selection as exits
from nf_lightning.core.train import local_learning
from nf_lightning.core.train import run as core_run
from nf_lightning.lightning._internals import CHECKPOINT_WRITE
from nf_lightning.lightning.early_exit import EarlyExitSelector
from nf_lightning.testing.demo import PlainClassifier, loaders, tight_strategy, trainer

FAST = ["mid_cache_write"]
"""Faults the default test suite drills."""
SLOW = ["mid_step", "after_cache_commit", "mid_checkpoint", "mid_export"]
"""Faults only the slow suite (and the fault matrix) drills."""

# fault -> (owner, attribute) patched; checked here so a move fails at import
TARGETS: dict[str, tuple[Any, str]] = {
    "mid_step": (local_learning.LocalBlock, "unit_step"),
    "mid_cache_write": (cache_writer.ActivationCacheWriter, "write"),
    "after_cache_commit": (cache_writer.ActivationCacheWriter, "commit"),
    "mid_checkpoint": CHECKPOINT_WRITE,
    "mid_export": (exits, "export_program"),
}
for _owner, _name in TARGETS.values():
    if not callable(getattr(_owner, _name, None)):
        raise ImportError(f"the crash drill patches {getattr(_owner, '__name__', _owner)}.{_name}, which is gone")
if not callable(getattr(core_run.BlockwiseRun, "train_batch", None)):
    raise ImportError("the crash drill patches BlockwiseRun.train_batch, which is gone")


class _Killer:
    """Counts calls and SIGKILLs the process at the ``n``-th; remembers the epoch it died in."""

    def __init__(self, fault: str) -> None:
        self.fault, self.epoch, self.calls, self.block = fault, -1, 0, None

    def call(self, n: int) -> None:
        self.calls += 1
        if self.calls == n:
            print("KILLED", self.fault, self.epoch, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def _wrap(owner: Any, name: str, after: Callable[..., None], before: bool = False) -> None:
    """Replace ``owner.name`` by a function that calls ``after(*args)`` after (or before) the original."""
    original = getattr(owner, name)

    def patched(*args: Any, **kwargs: Any) -> Any:
        if before:
            after(*args)
        out = original(*args, **kwargs)
        if not before:
            after(*args, out=out)
        return out

    setattr(owner, name, patched)


def inject(fault: str, killer: _Killer) -> None:
    """Patch the function ``fault`` names so the process kills itself at its fixed point."""
    if fault == "mid_step":  # in block 1's third batch, unit 0 updated and unit 1 not
        _wrap(core_run.BlockwiseRun, "train_batch", lambda run, *_: setattr(killer, "block", run.active_block), True)
        _wrap(local_learning.LocalBlock, "unit_step",
              lambda _b, index, *_, out: killer.call(3) if index == 0 and killer.block == 1 else None)  # fmt: skip
    elif fault == "mid_cache_write":  # block 1's training cache half written
        _wrap(cache_writer.ActivationCacheWriter, "write",
              lambda w, *_, out: killer.call(2) if w.name == "block1-train" else None)  # fmt: skip
    elif fault == "after_cache_commit":  # block 1's caches committed, its epoch's checkpoint not yet written
        _wrap(cache_writer.ActivationCacheWriter, "commit",
              lambda w, out: killer.call(1) if w.name == "block1-val" else None)  # fmt: skip
    elif fault == "mid_checkpoint":  # while the checkpoint of epoch 2 is being saved
        _wrap(*CHECKPOINT_WRITE, lambda checkpoint, path: killer.call(1) if checkpoint.get("epoch") == 2
              and str(path).endswith("last.ckpt") else None, True)  # fmt: skip
    elif fault == "mid_export":  # after training, while the selected exit is exported
        _wrap(exits, "export_program", lambda *_: killer.call(1), True)
    elif fault != "none":
        raise ValueError(f"unknown fault {fault!r}; known: none, {', '.join(TARGETS)}")


class _EpochWatch(pl.Callback):
    def __init__(self, killer: _Killer) -> None:
        self.killer = killer

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.killer.epoch = trainer.current_epoch


def drill(tmp: Path, fault: str) -> dict[str, Any]:
    """Run (or resume, if ``tmp/ckpt/last.ckpt`` exists) the small job with ``fault`` injected; its outcome."""
    killer = _Killer(fault)
    inject(fault, killer)
    pl.seed_everything(0)
    train, val = loaders(n_train=512, n_val=256)
    strategy = tight_strategy(tmp, rho=0.0, epochs_per_block=2)
    checkpoint = ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True, every_n_epochs=1)
    t = trainer(tmp, strategy, callbacks=[checkpoint, _EpochWatch(killer), EarlyExitSelector(export_dir=tmp / "export")])
    last = tmp / "ckpt" / "last.ckpt"
    start_epoch = torch.load(last, weights_only=False)["epoch"] + 1 if last.exists() else 0
    t.fit(PlainClassifier(), train, val, ckpt_path=str(last) if last.exists() else None)
    run = strategy.run
    assert run is not None
    return {
        "start_epoch": start_epoch, "epochs": t.current_epoch, "finished": run.finished,
        "blocks": [[list(b.units), run.batch_size_of(i)] for i, b in enumerate(run.plan.blocks)],
        "best": max(r.accuracy for r in run.records.values()),
        "export": (tmp / "export" / "exit.json").is_file(),
    }  # fmt: skip


def job(tmp: Path, fault: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """:func:`drill` in a fresh one-thread process (a SIGKILL must not take the caller with it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nf_lightning.testing.faults", fault, str(tmp)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def result(done: subprocess.CompletedProcess) -> dict[str, Any]:
    """The outcome a finished :func:`job` printed; an AssertionError with its stderr if it failed."""
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.split(" ", 1)[1])


def killed_epoch(done: subprocess.CompletedProcess) -> int:
    """The epoch a killed :func:`job` died in."""
    return int(next(line for line in done.stdout.splitlines() if line.startswith("KILLED")).split()[2])


def manifests(tmp: Path) -> dict[str, int]:
    """Each cache's manifest modification time (ns): a rewritten cache gets a new one."""
    return {p.parent.name: p.stat().st_mtime_ns for p in (tmp / "cache").glob("*/manifest.json")}


if __name__ == "__main__":
    print("RESULT", json.dumps(drill(Path(sys.argv[2]), sys.argv[1])), flush=True)
