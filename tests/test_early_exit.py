"""EarlyExitSelector in real Trainer runs with NeuroFluxStrategy on CPU, and nf-throughput."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from nf_lightning import EarlyExitSelector, NeuroFluxStrategy, decompose, models
from nf_lightning.cli import throughput as nf_throughput
from nf_lightning.core.exits.aux_heads import build_aux_heads
from nf_lightning.core.exits.selection import ExitModel, ExitRecord, exit_parameters, export_program
from nf_lightning.lightning import early_exit
from nf_lightning.testing.demo import PlainClassifier, loaders, tight_strategy, trainer

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    """Tiny models train as fast on one thread, and other work on a shared CPU cannot stall it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Fit:
    root: Path
    trainer: pl.Trainer
    strategy: NeuroFluxStrategy
    selector: EarlyExitSelector
    module: PlainClassifier
    val: tuple[Tensor, Tensor]


def fit(root: Path, selector: EarlyExitSelector, ckpt_path: Path | None = None) -> Fit:
    """PlainClassifier trained one unit per block (rho 0: four blocks) with ``selector``."""
    torch.manual_seed(0)
    train, val = loaders()
    strategy = tight_strategy(root, rho=0.0, cache_dtype="float32")
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
    t = trainer(root, strategy, callbacks=[selector, checkpoints])
    module = PlainClassifier()
    t.fit(module, train, val, ckpt_path=ckpt_path)
    return Fit(root, t, strategy, selector, module, val.dataset.tensors)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Fit:
    return fit(tmp_path_factory.mktemp("early_exit"), EarlyExitSelector())


def test_records_every_exit_with_its_accuracy_and_size(fitted: Fit) -> None:
    strategy, selector, metrics = fitted.strategy, fitted.selector, fitted.trainer.callback_metrics
    units = strategy.decomposition.units
    assert len(strategy.plan.blocks) == len(units) == 4
    assert [record.unit for record in selector.records] == [0, 1, 2, 3]
    for record in selector.records:
        # the metric of a unit was last logged at its block's last epoch: its final value
        assert record.accuracy == pytest.approx(float(metrics[f"neuroflux/acc_exit_{record.unit}"]), abs=1e-6)
        assert record.parameters == exit_parameters(units, strategy.run.exits, record.unit)
        assert float(metrics[f"exit/params_{record.unit}"]) == record.parameters
        assert float(metrics[f"exit/acc_{record.unit}"]) == pytest.approx(record.accuracy)
    assert selector.selected is not None
    assert selector.selected.accuracy == max(record.accuracy for record in selector.records)
    assert float(metrics["exit/best_unit"]) == selector.selected.unit
    assert float(metrics["exit/best_acc"]) == pytest.approx(selector.selected.accuracy)


def test_exports_summary_and_a_loadable_state_dict(fitted: Fit) -> None:
    export = fitted.root / "export"
    summary = json.loads((export / "exit.json").read_text())
    selected = fitted.selector.selected
    full_parameters = sum(p.numel() for p in fitted.module.parameters())
    assert summary == fitted.selector.summary
    assert ExitRecord(summary["unit"], summary["accuracy"], summary["parameters"]) == selected
    assert summary["full_parameters"] == full_parameters
    assert summary["compression"] == pytest.approx(full_parameters / selected.parameters)
    assert summary["full_accuracy"] == fitted.selector.records[-1].accuracy
    assert summary["exits"] == [record.to_dict() for record in fitted.selector.records]
    assert (summary["input_shape"], summary["num_classes"]) == ([3, 16, 16], 10)
    assert summary["files"] == {"state_dict": "exit_model.pt", "program": "exit_model.pt2"}

    # the state dict fits the same architecture built afresh
    parts = decompose(PlainClassifier())
    rebuilt = ExitModel(parts.units, [*build_aux_heads(parts.units, 10, SHAPE), parts.head], selected.unit)
    rebuilt.load_state_dict(torch.load(export / "exit_model.pt", weights_only=True))
    x = fitted.val[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), fitted.selector.exit_model(x))


PORTABLE_CHECK = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoNfLightning(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "nf_lightning":
                raise ImportError("running the exported exit must not need nf_lightning")
            return None

    sys.meta_path.insert(0, NoNfLightning())
    import torch

    program_path, data_path = sys.argv[1:]
    data = torch.load(data_path, weights_only=True)
    model = torch.export.load(program_path).module()
    with torch.inference_mode():
        logits = model(data["x"])
    assert "nf_lightning" not in sys.modules
    print(json.dumps({
        "same_predictions": torch.equal(logits.argmax(1), data["predictions"]),
        "max_logit_difference": (logits - data["logits"]).abs().max().item(),
        "accuracy": (logits.argmax(1) == data["y"]).double().mean().item(),
    }))
    """
)


def test_exported_program_runs_without_nf_lightning(fitted: Fit) -> None:
    x, y = fitted.val
    with torch.no_grad():
        logits = fitted.selector.exit_model(x)
    data = fitted.root / "validation.pt"
    torch.save({"x": x, "y": y, "logits": logits, "predictions": logits.argmax(1)}, data)
    program = fitted.root / "export" / "exit_model.pt2"
    done = subprocess.run(
        [sys.executable, "-I", "-c", PORTABLE_CHECK, str(program), str(data)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=fitted.root,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["same_predictions"]
    assert result["max_logit_difference"] < 1e-5
    # measured by the strategy on cached activations, recomputed from the raw inputs
    assert result["accuracy"] == pytest.approx(fitted.selector.selected.accuracy, abs=1e-6)


def test_resume_keeps_the_exits_recorded_before(fitted: Fit, tmp_path: Path) -> None:
    end_of_block_1 = sum(fitted.strategy.plan.epochs_per_block[:2]) - 1
    (checkpoint,) = (fitted.root / "ckpt").glob(f"epoch={end_of_block_1}-*.ckpt")
    resumed = fit(tmp_path, EarlyExitSelector(), ckpt_path=checkpoint)
    assert resumed.trainer.current_epoch == fitted.strategy.plan.total_epochs
    before, after = fitted.selector.records, resumed.selector.records
    assert [record.unit for record in after] == [0, 1, 2, 3]
    assert after[:2] == before[:2]  # restored from the checkpoint: blocks 0 and 1 never ran again


@pytest.mark.parametrize("patience", [1, 2])
def test_depth_patience_stops_once_the_best_exit_stops_changing(tmp_path: Path, patience: int) -> None:
    # tolerance 1 admits every exit, so the smallest (unit 0) stays selected whatever
    # the accuracies: every block after the first leaves the selection unchanged
    selector = EarlyExitSelector(tolerance=1.0, depth_patience=patience, export=False)
    run = fit(tmp_path, selector)
    plan = run.strategy.plan
    assert run.trainer.current_epoch == sum(plan.epochs_per_block[: patience + 1]) < plan.total_epochs
    assert [record.unit for record in selector.records] == list(range(patience + 1))
    assert selector.selected.unit == 0
    assert selector.stale_blocks == patience
    assert run.strategy.run.validation.tolerance == 0.0  # the selector's own tolerance did not become the run's
    assert selector.summary["tolerance"] == 1.0
    assert not (tmp_path / "export").exists()


def test_needs_the_neuroflux_strategy(tmp_path: Path) -> None:
    train, val = loaders()
    t = trainer(tmp_path, "auto", max_epochs=1, callbacks=[EarlyExitSelector()])
    with pytest.raises(TypeError, match="needs NeuroFluxStrategy"):
        t.fit(PlainClassifier(), train, val)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"tolerance": 5.0}, "0.01 = one percentage point"), ({"depth_patience": 0}, "depth_patience")],
)
def test_argument_errors(kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        EarlyExitSelector(**kwargs)


def test_nf_throughput_reads_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The files nf-train writes: results.json, export/ and a Lightning checkpoint."""
    shape = [3, 32, 32]
    net = models.create("vgg11", num_classes=10, width_mult=0.125)
    parts = decompose(net)
    heads = [*build_aux_heads(parts.units, 10, tuple(shape)), parts.head]
    (tmp_path / "export").mkdir()
    export_program(ExitModel(parts.units, heads, 1), shape, tmp_path / "export" / early_exit.PROGRAM_FILE)
    summary = {
        "unit": 1,
        "num_units": len(parts.units),
        "parameters": exit_parameters(parts.units, heads, 1),
        "full_parameters": exit_parameters(parts.units, heads, len(parts.units) - 1),
        "input_shape": shape,
        "num_classes": 10,
    }
    (tmp_path / "export" / early_exit.SUMMARY_FILE).write_text(json.dumps(summary))
    results = {"method": "neuroflux", "model": {"name": "vgg11", "width_mult": 0.125}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    checkpoints = tmp_path / "logs" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    lightning_checkpoint = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}
    torch.save(lightning_checkpoint, checkpoints / "epoch=3-step=9.ckpt")

    full, checkpoint = nf_throughput.build_full_model(tmp_path, results, summary)
    assert checkpoint == checkpoints / "epoch=3-step=9.ckpt"
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, net.state_dict()[name]), name

    nf_throughput.main([str(tmp_path), "--batch-sizes", "1", "8", "--warmup", "1", "--repeats", "3", "--threads", "1"])
    printed = capsys.readouterr().out.splitlines()
    assert "exit after unit 1 of 8" in printed[0] and "weights of epoch=3-step=9.ckpt" in printed[0]
    assert [line.split()[0] for line in printed[2:]] == ["1", "8"]


def test_nf_throughput_explains_a_run_without_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"method": "bp", "model": {"name": "vgg11", "width_mult": 1.0}}))
    with pytest.raises(SystemExit, match="1"):
        nf_throughput.main([str(tmp_path)])
    error = capsys.readouterr().err
    assert "no exported exit model" in error and "'bp'" in error


def test_docstring_examples() -> None:
    assert doctest.testmod(early_exit).failed == 0
    assert doctest.testmod(nf_throughput).failed == 0
