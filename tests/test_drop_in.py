"""A Lightning project written the usual way runs unchanged under ``strategy="neuroflux"``.

The module below knows nothing of nf_lightning: a torchvision network,
torchmetrics, its own ``val_acc``, two param groups and a scheduler dict;
the Trainer carries ModelCheckpoint, EarlyStopping, LearningRateMonitor and
a CSVLogger. These tests train it for real and check what the user sees.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
import torchvision
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nf_lightning import NeuroFluxStrategy, decompose
from nf_lightning.core.train.run import BlockwiseRun


class TypicalProject(pl.LightningModule):
    """An image classifier as people write them (no nf_lightning import)."""

    def __init__(self, num_classes: int = 10, lr: float = 0.05, scheduler: str = "cosine") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=0.25)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.ndim <= 1]
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            momentum=0.9,
        )
        if self.hparams.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "val_flat"}}
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}


class FlatMetric(TypicalProject):
    """Also logs a metric that never improves, for ReduceLROnPlateau to watch."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_flat", 0.5)


class BypassingProject(TypicalProject):
    """Computes its validation outputs through the network's parts, not the network."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        features = self.net.features(x).mean((2, 3))
        self.log("val_acc", (self.net.classifier(features).argmax(1) == y).float().mean())


def data(n: int, seed: int) -> TensorDataset:
    """A learnable 10-class 32x32 task: each class is a bright square at its own place."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.3
    for i, label in enumerate(y.tolist()):
        row, col = divmod(label, 5)
        x[i, :, 4 + 12 * row : 12 + 12 * row, 2 + 6 * col : 6 + 6 * col] += 1.5
    return TensorDataset(x, y)


def loader(n: int, seed: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(data(n, seed), batch_size=32, shuffle=shuffle)


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(root: Path, strategy, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kwargs,
    )


BUDGET = "3MB"  # a few blocks for MobileNetV2 x0.25 at 32x32


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("typical")
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", monitor="val_acc", mode="max", save_last=True)
    callbacks = [checkpoint, EarlyStopping(monitor="val_acc", mode="max", patience=20), LearningRateMonitor()]
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=root / "cache")
    trainer = make_trainer(root, strategy, callbacks, logger=CSVLogger(root, name="logs"), max_epochs=50)
    module = TypicalProject()
    trainer.fit(module, loader(512, 0, shuffle=True), loader(256, 1))
    fitted = {"epochs": trainer.current_epoch, "finished": strategy.run.finished, "blocks": strategy.run.num_blocks,
              "planned_epochs": strategy.run.plan.total_epochs}
    tested = trainer.test(dataloaders=loader(256, 2), ckpt_path="best")  # rewinds the run to the best checkpoint
    return {"root": root, "trainer": trainer, "strategy": strategy, "checkpoint": checkpoint, "tested": tested,
            "fitted": fitted}


def metric_rows(root: Path) -> list[dict[str, str]]:
    (path,) = (root / "logs").glob("version_*/metrics.csv")
    with path.open() as file:
        return list(csv.DictReader(file))


def test_user_metrics_and_callbacks_work_and_neuroflux_ends_the_run(project: dict) -> None:
    fitted = project["fitted"]
    assert fitted["blocks"] >= 3
    assert fitted["finished"] and fitted["epochs"] == fitted["planned_epochs"] < 50  # NeuroFlux decided the length
    assert Path(project["checkpoint"].best_model_path).is_file()
    rows = metric_rows(project["root"])
    columns = set(rows[0])
    assert {"val_acc", "val_loss", "neuroflux/deploy_unit", "neuroflux/acc_exit_0"} <= columns
    assert any(column.startswith("lr-SGD") for column in columns)  # LearningRateMonitor saw the per-unit optimizers
    validations = [row for row in rows if row["val_acc"]]
    assert len(validations) == fitted["planned_epochs"]


def test_user_validation_runs_on_the_deployable_exit(project: dict) -> None:
    """The user's val_acc is the accuracy NeuroFlux measured for the exit it deployed in that pass
    (scored in the same pass, or at its block's last epoch, after which it is frozen)."""
    latest: dict[int, float] = {}
    compared = 0
    for row in metric_rows(project["root"]):
        for key, value in row.items():
            if key.startswith("neuroflux/acc_exit_") and value:
                latest[int(key.rsplit("_", 1)[1])] = float(value)
        if row["val_acc"]:
            deployed = int(float(row["neuroflux/deploy_unit"]))
            assert float(row["val_acc"]) == pytest.approx(latest[deployed], abs=1e-6), (row, deployed)
            compared += 1
    assert compared == project["fitted"]["planned_epochs"]


def exit_accuracy_from_checkpoint(path: str) -> tuple[float, int, float]:
    """Accuracy of the checkpoint's selected exit and of the full network, computed here from scratch."""
    checkpoint = torch.load(path, weights_only=False)
    module = TypicalProject()
    module.load_state_dict(checkpoint["state_dict"])
    run = BlockwiseRun.from_state(decompose(module.net), checkpoint["neuroflux"])
    exit_model, full = run.exit_model(), module.net.eval()
    x, y = data(256, 2).tensors
    with torch.no_grad():
        exit_acc = (exit_model(x).argmax(1) == y).float().mean().item()
        full_acc = (full(x).argmax(1) == y).float().mean().item()
    return exit_acc, run.deploy_unit, full_acc


def test_test_after_fit_reports_the_selected_exit(project: dict) -> None:
    exit_acc, unit, _ = exit_accuracy_from_checkpoint(project["checkpoint"].best_model_path)
    assert project["tested"][0]["test_acc"] == pytest.approx(exit_acc, abs=1e-6)
    assert unit < len(project["strategy"].run.units)


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import lightning.pytorch as pl
    from test_drop_in import TypicalProject, loader
    trainer = pl.Trainer(strategy="neuroflux", accelerator="cpu", logger=False, enable_progress_bar=False)
    result = trainer.test(TypicalProject(), dataloaders=loader(256, 2), ckpt_path={ckpt!r})
    full = pl.Trainer(strategy=__import__("nf_lightning").NeuroFluxStrategy(evaluate="full"), accelerator="cpu",
                      logger=False, enable_progress_bar=False)
    result_full = full.test(TypicalProject(), dataloaders=loader(256, 2), ckpt_path={ckpt!r})
    print(json.dumps({{"exit": result[0]["test_acc"], "full": result_full[0]["test_acc"]}}))
    """
)


def test_test_from_the_checkpoint_in_a_fresh_process(project: dict) -> None:
    best = project["checkpoint"].best_model_path
    script = FRESH_PROCESS.format(tests=str(Path(__file__).parent), ckpt=best)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reported = json.loads(done.stdout.strip().splitlines()[-1])
    exit_acc, _, full_acc = exit_accuracy_from_checkpoint(best)
    assert reported["exit"] == pytest.approx(exit_acc, abs=1e-6)
    assert reported["full"] == pytest.approx(full_acc, abs=1e-6)


def test_param_groups_keep_their_settings_per_unit(tmp_path: Path) -> None:
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    module = TypicalProject()
    trainer.fit(module, loader(64, 0), loader(64, 1))
    run = strategy.run
    for unit, optimizer in zip(run.active_units, run.optim.optimizers):
        decay, no_decay = optimizer.param_groups
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
        unit_params = {id(p) for p in run.units[unit].parameters()}
        exit_params = {id(p) for p in run.exits[unit].parameters()}
        assert {id(p) for p in no_decay["params"]} == {id(p) for p in run.units[unit].parameters() if p.ndim <= 1}
        # the exit head joins the group holding most of the unit's own parameters
        assert {id(p) for p in decay["params"]} == {
            id(p) for p in run.units[unit].parameters() if p.ndim > 1
        } | exit_params - unit_params


def test_plateau_scheduler_lowers_the_learning_rate(tmp_path: Path) -> None:
    strategy = NeuroFluxStrategy(memory_budget="300MB", epochs_per_block=3, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, max_epochs=3,
                           limit_train_batches=2)
    module = FlatMetric(scheduler="plateau", lr=0.04)
    trainer.fit(module, loader(64, 0), loader(64, 1))
    run = strategy.run
    assert run.num_blocks == 1
    # the block's rate is the recipe's scaled from the loader's batch (32) to the block's; val_flat never
    # improves, so patience 0 halves it after epochs 1 and 2
    expected = 0.04 * run.batch_size / 32 * 0.25
    assert [group["lr"] for group in run.optim.optimizers[0].param_groups] == pytest.approx([expected, expected])


def test_bf16_mixed_precision_trains(tmp_path: Path) -> None:
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, precision="bf16-mixed",
                           limit_train_batches=2, limit_val_batches=2)
    trainer.fit(TypicalProject(), loader(128, 0), loader(64, 1))
    assert strategy.run.finished
    losses = [v for k, v in trainer.callback_metrics.items() if k.startswith("neuroflux/loss_unit_")]
    assert losses and all(torch.isfinite(v) for v in losses)


class AdamWProject(TypicalProject):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)


def test_an_adamw_recipe_trains_every_unit_with_adamw(tmp_path: Path) -> None:
    """AdamW's param groups hold a key its constructor does not take (decoupled_weight_decay)."""
    strategy = NeuroFluxStrategy(memory_budget="8MB", epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, max_epochs=2,
                           limit_train_batches=2, limit_val_batches=2)
    with pytest.warns(UserWarning, match="max_epochs=2 ends the run"):
        trainer.fit(AdamWProject(), loader(128, 0), loader(64, 1))
    optimizers = strategy.run.optim.optimizers
    assert optimizers and all(type(o) is torch.optim.AdamW and o.defaults["weight_decay"] == 0.05 for o in optimizers)


class RecordingSGD(torch.optim.SGD):
    """SGD that records, at every update in training, the largest gradient entry and the gradients' 2-norm.
    (Not while NeuroFlux profiles the recipe's step on fake tensors, which have no values.)"""

    seen: list[tuple[float, float]] = []
    recording = False

    def step(self, closure=None):
        if RecordingSGD.recording:
            flat = torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"] if p.grad is not None])
            RecordingSGD.seen.append((flat.abs().max().item(), torch.linalg.vector_norm(flat).item()))
        return super().step(closure)


class ClippedProject(TypicalProject):
    def configure_optimizers(self):
        return RecordingSGD(self.parameters(), lr=0.05, momentum=0.9)

    def on_train_start(self) -> None:
        RecordingSGD.recording = True

    def on_train_end(self) -> None:
        RecordingSGD.recording = False


@pytest.mark.parametrize(("algorithm", "limit"), [("norm", 1e-3), ("value", 1e-4)])
def test_the_trainers_gradient_clipping_clips_every_unit_step(algorithm: str, limit: float, tmp_path: Path) -> None:
    def fit(clip: float | None) -> tuple[pl.Trainer, list[tuple[float, float]]]:
        RecordingSGD.seen = []
        strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / f"cache{clip}")
        trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, max_epochs=2,
                               limit_train_batches=3, limit_val_batches=2, gradient_clip_val=clip,
                               gradient_clip_algorithm=algorithm)
        with pytest.warns(UserWarning, match="max_epochs=2 ends the run"):
            trainer.fit(ClippedProject(), loader(128, 0), loader(64, 1))
        return trainer, RecordingSGD.seen

    position = 0 if algorithm == "value" else 1
    _, unclipped = fit(None)
    assert max(seen[position] for seen in unclipped) > 10 * limit  # so the clipped run's bound is not vacuous
    trainer, clipped = fit(limit)
    assert clipped and max(seen[position] for seen in clipped) <= limit * (1 + 1e-5)
    assert trainer.gradient_clip_val == limit  # the user's Trainer as it was


@pytest.mark.parametrize(
    ("option", "error"),
    [({"gradient_clip_val": 0.0}, "gradient_clip_val must be None or > 0"),
     ({"gradient_clip_algorithm": "max"}, r"gradient_clip_algorithm must be one of \('norm', 'value'\)")],
)
def test_bad_gradient_clipping_options_are_refused(option: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        NeuroFluxStrategy(memory_budget=BUDGET, **option)


def test_gradient_accumulation_is_refused_with_what_to_do(tmp_path: Path) -> None:
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, accumulate_grad_batches=4)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=4\) does not apply to NeuroFlux.*batch_limit"):
        trainer.fit(TypicalProject(), loader(64, 0), loader(64, 1))


class DictBatchProject(TypicalProject):
    """Its loaders yield {"image": ..., "label": ...} batches."""

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch["image"], batch["label"]), batch_idx)

    def test_step(self, batch, batch_idx):
        return super().test_step((batch["image"], batch["label"]), batch_idx)


def dict_loader(n: int, seed: int, shuffle: bool = False) -> DataLoader:
    def collate(samples: list) -> dict[str, torch.Tensor]:
        return {"image": torch.stack([x for x, _ in samples]), "label": torch.stack([y for _, y in samples])}

    return DataLoader(data(n, seed), batch_size=32, shuffle=shuffle, collate_fn=collate)


def test_dict_batches_train_every_block_and_test_the_selected_exit(tmp_path: Path) -> None:
    """Block 1's cache is written from the user's own loader of dicts (it read the dict's keys as the batch)."""
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, max_epochs=3)
    module = DictBatchProject()
    with pytest.warns(UserWarning, match="max_epochs=3 ends the run"):
        trainer.fit(module, dict_loader(256, 0, shuffle=True), dict_loader(64, 1))
    assert strategy.run.active_block >= 2 and (tmp_path / "cache" / "block1-train").is_dir()
    assert_test_reports_the_selected_exit(trainer, module, strategy, dict_loader(64, 2))


class NormalizingProject(TypicalProject):
    """Its forward normalizes the inputs before the network."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) / 0.25)


class Uint8Project(TypicalProject):
    """Its loaders give uint8 images, channels last; its forward scales, transposes and normalizes them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25)


def uint8_loader(n: int, seed: int, shuffle: bool = False) -> DataLoader:
    """``data(n, seed)`` as uint8 images of shape (32, 32, 3)."""
    x, y = data(n, seed).tensors
    images = ((x.clamp(-1, 3) + 1) * 63).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return DataLoader(TensorDataset(images, y), batch_size=32, shuffle=shuffle)


@pytest.mark.parametrize("project", [NormalizingProject, Uint8Project])
def test_a_forward_that_prepares_its_inputs_trains_the_network_on_what_it_hands_it(project, tmp_path: Path) -> None:
    """NeuroFlux trains the units on what the module's forward hands the network. It trained them on the raw
    batch: the normalizing module then validated its exit at chance after fit while the run had scored it
    on raw inputs, and the uint8 one did not have the network's shape. Now: planned for (3, 32, 32), block 0
    trained and cached from prepared inputs, and ``validate`` after fit reports the run's own score of the exit."""
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache",
                                 cache_dtype="float32")  # fmt: skip
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, max_epochs=3)
    module, batches = project(), uint8_loader if project is Uint8Project else loader
    with pytest.warns(UserWarning, match="max_epochs=3 ends the run"):
        trainer.fit(module, batches(256, 0, shuffle=True), batches(64, 1))
    run = strategy.run
    assert run.plan.input_shape == (3, 32, 32) and run.active_block >= 2
    (validated,) = trainer.validate(module, dataloaders=batches(64, 1), verbose=False)
    assert validated["val_acc"] == pytest.approx(run.records[run.deploy_unit].accuracy, abs=1e-6)
    assert validated["val_acc"] > 0.2  # chance is 0.1


def test_a_forward_that_hands_on_its_inputs_adds_nothing_to_a_step(tmp_path: Path) -> None:
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, max_epochs=1,
                           limit_train_batches=1, limit_val_batches=1)  # fmt: skip
    with pytest.warns(UserWarning, match="max_epochs=1 ends the run"):
        trainer.fit(TypicalProject(), loader(64, 0), loader(64, 1))
    assert strategy.run.sources.inputs is None


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_a_precision_that_converts_the_weights_is_refused_with_what_works(precision: str, tmp_path: Path) -> None:
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, precision=precision)
    with pytest.raises(ValueError, match=rf"precision='{precision}'\) converts the network's weights.*'bf16-mixed'"):
        trainer.fit(TypicalProject(), loader(64, 0), loader(64, 1))


class CompiledProject(TypicalProject):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(self.net)


def test_a_torch_compiled_network_trains_and_tests_its_selected_exit(tmp_path: Path) -> None:
    """NeuroFlux trains the module torch.compile wrapped; the user's steps still call the compiled wrapper."""
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, max_epochs=2,
                           limit_train_batches=2)
    module = CompiledProject()
    with pytest.warns(UserWarning, match="max_epochs=2 ends the run"):
        trainer.fit(module, loader(128, 0), loader(64, 1))
    assert decompose(module).network is module.net._orig_mod
    assert_test_reports_the_selected_exit(trainer, module, strategy, loader(64, 2))


def test_fit_only_settings_do_not_stop_a_test_from_a_checkpoint(project: dict, tmp_path: Path) -> None:
    """accumulate_grad_batches concerns training alone: a Trainer that carries it still tests NeuroFlux's exit."""
    strategy = NeuroFluxStrategy(memory_budget=BUDGET)
    trainer = make_trainer(tmp_path, strategy, logger=False, accumulate_grad_batches=4)
    (tested,) = trainer.test(TypicalProject(), loader(256, 2), ckpt_path=project["checkpoint"].best_model_path,
                             verbose=False)  # fmt: skip
    assert tested["test_acc"] == pytest.approx(project["tested"][0]["test_acc"], abs=1e-6)


def test_the_learning_rate_finder_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from lightning.pytorch.tuner import Tuner

    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"LearningRateFinder with NeuroFluxStrategy: .*Lightning's default strategy"):
        Tuner(trainer).lr_find(TypicalProject(), loader(64, 0), loader(64, 1), num_training=5)


@pytest.mark.parametrize(
    ("callback", "why"),
    [("BatchSizeFinder", "largest batch its memory budget allows"), ("GradientAccumulationScheduler", "once per")],
)
def test_callbacks_that_tune_end_to_end_training_are_refused(callback: str, why: str, tmp_path: Path) -> None:
    import lightning.pytorch.callbacks as callbacks

    instance = getattr(callbacks, callback)(**({"scheduling": {0: 2}} if callback.startswith("Gradient") else {}))
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, [instance], logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=f"{callback} with NeuroFluxStrategy: .*{why}"):
        trainer.fit(TypicalProject(), loader(64, 0), loader(64, 1))


def test_max_epochs_bounds_the_run(tmp_path: Path) -> None:
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, max_epochs=1,
                           limit_train_batches=2, limit_val_batches=2)
    with pytest.warns(UserWarning, match="max_epochs=1 ends the run before NeuroFlux's plan"):
        trainer.fit(TypicalProject(), loader(128, 0), loader(64, 1))
    run = strategy.run
    assert trainer.current_epoch == 1 and not run.finished and run.num_blocks > 2


def assert_test_reports_the_selected_exit(trainer, module, strategy, test_loader: DataLoader) -> None:
    """``trainer.test`` after fit gives the accuracy of the exit NeuroFlux selected, computed here by hand
    (``test_loader`` serves ``data(64, 2)``)."""
    (tested,) = trainer.test(module, dataloaders=test_loader, verbose=False)
    x, y = data(64, 2).tensors
    with torch.no_grad():
        by_hand = (strategy.run.exit_model().eval()(x).argmax(1) == y).float().mean().item()
    assert tested["test_acc"] == pytest.approx(by_hand, abs=1e-6)


def small_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig

    return torchvision.models.ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=10)


OTHER_FAMILIES = {  # beyond MobileNetV2: a conv classifier, channel shuffles, concatenating and LayerNorm blocks
    "squeezenet": lambda: torchvision.models.squeezenet1_1(num_classes=10),
    "shufflenet_v2": lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10),
    "densenet": lambda: torchvision.models.DenseNet(8, (2, 2), num_init_features=16, num_classes=10),
    "convnext": small_convnext,
    "cnn_with_mlp_head": lambda: nn.Sequential(  # as people write one by hand
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10),
    ),  # fmt: skip
}


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_other_networks_train_and_test_their_selected_exit(family: str, tmp_path: Path) -> None:
    module = TypicalProject()
    module.net = OTHER_FAMILIES[family]()
    before = [p.detach().clone() for p in decompose(module.net).units[0].parameters()]
    strategy = NeuroFluxStrategy(memory_budget="30MB", epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, max_epochs=2)
    trainer.fit(module, loader(128, 0, shuffle=True), loader(64, 1))
    assert any(not torch.equal(a, b) for a, b in zip(before, decompose(module.net).units[0].parameters()))
    assert_test_reports_the_selected_exit(trainer, module, strategy, loader(64, 2))


def test_a_validation_step_that_bypasses_the_network_gets_a_clear_error(tmp_path: Path) -> None:
    strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=1, cache_dir=tmp_path / "cache")
    trainer = make_trainer(tmp_path, strategy, logger=False, enable_checkpointing=False, limit_train_batches=1)
    with pytest.raises(RuntimeError, match="validation_step ran without calling the network NeuroFlux decomposed"):
        trainer.fit(BypassingProject(), loader(64, 0), loader(64, 1))


def test_the_removed_shims_are_gone() -> None:
    """CHANGELOG 0.2.0: the deprecated names of 0.1.0 were removed, not kept as aliases."""
    import nf_lightning
    from nf_lightning.lightning import strategy as strategy_module

    with pytest.raises(AttributeError):
        nf_lightning.ActivationCache  # noqa: B018
    with pytest.raises(AttributeError):
        strategy_module.rebatch  # noqa: B018
    strategy = NeuroFluxStrategy(memory_budget=BUDGET)
    assert not hasattr(strategy, "active_block") and not hasattr(strategy, "exit_modules")
