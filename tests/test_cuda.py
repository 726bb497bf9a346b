"""The CUDA path: the allocator capped at the budget, real-step profiling, a run held to the budget.

Skipped without a GPU. One short command runs them where there is one:
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_allocator_refuses_past_the_budget() -> None:
    from nf_lightning.core.train.run import cap_cuda_allocator

    device = torch.device("cuda", 0)
    fraction = cap_cuda_allocator(device, 256 * 2**20)
    try:
        assert fraction is not None and 0 < fraction < 1
        small = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
        del small
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


def test_real_step_profiling_covers_the_plans_range() -> None:
    from nf_lightning.core.memory.profiler import profile_unit

    unit = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
    aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model = profile_unit(unit, aux, (3, 32, 32), batch_sizes=(2, 4, 8, 16, 32, 64, 128, 256), device="cuda")
    assert [b for b, _ in model.samples][-1] == 256
    assert model.rel_error < 0.1


def test_a_cuda_run_holds_every_metered_step_to_the_budget(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from nf_lightning import NeuroFluxStrategy
    from nf_lightning.testing.demo import PlainClassifier, loaders

    train, val = loaders()
    strategy = NeuroFluxStrategy(memory_budget="2MB", epochs_per_block=1, batch_limit=64, cache_dir=tmp_path / "c",
                                 meter_full_steps=10**6)
    trainer = pl.Trainer(strategy=strategy, accelerator="gpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(PlainClassifier(), train, val)
    guard = strategy.run.step.guard
    assert strategy.run.finished and guard.metered_steps > 0
    assert guard.peak <= strategy.run.plan.budget and not guard.violations
    torch.cuda.set_per_process_memory_fraction(1.0, 0)


def test_the_velocity_probe_keeps_its_rows_in_host_memory_and_gives_the_same_velocity() -> None:
    """Off the device on CUDA means host memory: the device holds none of the selected rows' copy, and the
    velocities equal those of the copy kept on the device."""
    from nf_lightning.testing.probes import paired_probes

    net, training, on, off, epochs = paired_probes(torch.device("cuda", 0))
    assert len(epochs) == 2 and all(torch.allclose(a[n], b[n], atol=1e-6) for a, b in epochs for n in a)
    moved = [k.tensor for k in off.snapshot if k.off_device]
    assert moved and all(t.device.type == "cpu" for t in moved) and off.off_device_bytes > 0
    assert all(t.device.type == "cuda" for t in off.tensors())
    training.release()


def test_batch_throughput_times_the_benchmarks_networks_on_the_gpu(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "experiments" / "batch_throughput.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cuda", "--models", "vgg11", "--batches", "8",
                           "256", "--steps", "5", "--warmup", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "cuda" and all(min(r["per_sample_seconds"]) > 0 for r in summary["rows"])
