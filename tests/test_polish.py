"""End-to-end polish of the deployed exit: real NeuroFlux runs on CIFAR-10, then budgeted BP on the exit."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nf_lightning import NeuroFluxStrategy, data, models
from nf_lightning.cli.common import compose_config
from nf_lightning.cli.train import POLISHED_PROGRAM_FILE, POLISHED_STATE_FILE, resume, run
from nf_lightning.core.memory.budget import MemoryBudget
from nf_lightning.core.plan.partitioner import BudgetTooSmall
from nf_lightning.lightning.classifier import ClassifierModule
from nf_lightning.lightning.polish import FrozenBatchNormStatistics, polish_exit

RECIPE = {"reference_batch": 128, "momentum": 0.9, "weight_decay": 5e-4}  # the polish takes the whole recipe
BUDGET = 6_000_000
CPU = {"accelerator": "cpu", "enable_progress_bar": False}
TINY = ["model=vgg11", "model.width_mult=0.125", "data.train_subset=1000", "data.val_subset=200", "epochs=2",
        "batch_limit=64", "trainer.enable_progress_bar=false"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(shared_datasets_dir: Path, data_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A NeuroFlux run of a narrow VGG-11 on 1,000 CIFAR-10 images: its deployed exit and data."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NF_CACHE_DIR", str(data_cache_dir))
        pl.seed_everything(0)
        dm = data.create("cifar10_folder", data_dir=shared_datasets_dir, train_subset=1000, val_subset=300, seed=0)
        dm.prepare_data()
        dm.setup("fit")
        net = models.create("vgg11", num_classes=10, width_mult=0.125)
        strategy = NeuroFluxStrategy(memory_budget=BUDGET, epochs_per_block=2, batch_limit=64,
                                     cache_dir=tmp_path_factory.mktemp("cache"))  # fmt: skip
        trainer = pl.Trainer(strategy=strategy, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                             default_root_dir=tmp_path_factory.mktemp("run"))  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(ClassifierModule(net, 10), datamodule=dm)
        return strategy.run.exit_model(), dm


def _accuracy(model: torch.nn.Module, dm: data.ImageDataModule) -> float:
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(1) == y).float() for x, y in dm.val_dataloader()]
    return float(torch.cat(hits).mean())


def test_polish_improves_the_exit_within_the_budget_and_leaves_the_input_alone(trained: tuple) -> None:
    exit_model, dm = trained
    before = {k: v.clone() for k, v in exit_model.state_dict().items()}
    batch_before = dm.batch_size
    polished, report = polish_exit(exit_model, dm, MemoryBudget.parse(BUDGET), **RECIPE, epochs=3, lr=0.05,
                                   trainer_options={"accelerator": "cpu", "enable_progress_bar": False})  # fmt: skip
    assert report.kept and report.val_after > report.val_before  # 3 epochs of BP on a 2-epoch exit gain
    assert report.val_after == pytest.approx(_accuracy(polished, dm))
    assert report.val_before == pytest.approx(_accuracy(exit_model, dm))
    assert 1 <= report.batch_size <= 256 and report.lr == pytest.approx(0.05 * report.batch_size / 128)
    assert report.measured_peak_bytes is not None and report.measured_peak_bytes <= BUDGET
    assert report.predicted_peak_bytes <= BUDGET
    assert all(torch.equal(v, exit_model.state_dict()[k]) for k, v in before.items())  # the input is untouched
    assert dm.batch_size == batch_before  # the loader's batch size is restored


def test_a_polish_that_loses_accuracy_returns_the_exit_unchanged(trained: tuple) -> None:
    exit_model, dm = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept, report = polish_exit(exit_model, dm, MemoryBudget.parse(BUDGET), **RECIPE, epochs=1, lr=1e4,  # diverges
                                   trainer_options={"accelerator": "cpu", "enable_progress_bar": False})  # fmt: skip
    assert not report.kept and report.val_after < report.val_before
    assert all(torch.equal(v, exit_model.state_dict()[k]) for k, v in kept.state_dict().items())


def _norms(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_batchnorm_statistics_stay_through_training_and_validation(tmp_path: Path, frozen: bool) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,)))
    net = models.create("vgg11", num_classes=10, width_mult=0.125)
    before = _norms(net)
    conv = next(k for k, v in net.state_dict().items() if v.dim() == 4)
    conv_before = net.state_dict()[conv].clone()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[FrozenBatchNormStatistics()] if frozen else [])  # fmt: skip
    trainer.fit(ClassifierModule(net, 10), DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    after = _norms(net)
    assert before and all(torch.equal(before[k], after[k]) for k in before) == frozen  # validation ran in between
    assert not torch.equal(net.state_dict()[conv], conv_before)  # the weights trained either way


def test_a_polish_reports_its_warm_up_and_batchnorm_settings(trained: tuple) -> None:
    exit_model, dm = trained
    _, report = polish_exit(exit_model, dm, MemoryBudget.parse(BUDGET), **RECIPE, epochs=1, lr=0.05, warmup=0.3,
                            batchnorm="frozen", trainer_options={"accelerator": "cpu", "enable_progress_bar": False})
    assert (report.batchnorm, report.warmup, report.epochs) == ("frozen", 0.3, 1)


class TrainedState(pl.Callback):
    """The trained network's state at the end of fit, whether or not the polish keeps it."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = {k: v.clone() for k, v in pl_module.net.state_dict().items()}


def test_a_polish_with_frozen_units_keeps_them_as_they_were_and_fits_a_larger_batch(trained: tuple) -> None:
    exit_model, dm = trained
    reports, states = [], []
    for freeze in (0, 1):
        seen = TrainedState()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            polished, report = polish_exit(exit_model, dm, MemoryBudget.parse(BUDGET), **RECIPE, epochs=1, lr=0.05,
                                           freeze_units=freeze, callbacks=[seen], trainer_options=CPU)  # fmt: skip
        assert not [w for w in caught if "in eval mode" in str(w.message)]  # frozen on purpose: no warning
        reports.append(report)
        states.append(seen.state)
        assert all(p.requires_grad for p in polished.parameters())  # it comes back trainable, as it came
    original = exit_model.state_dict()
    for freeze, state in enumerate(states):
        unit0 = [k for k in state if k.startswith("units.0.")]
        later = [k for k in state if k.startswith("units.1.") and k.endswith("weight")]
        assert unit0 and later
        assert all(torch.equal(state[k], original[k]) for k in unit0) == bool(freeze)  # weights and statistics
        assert not any(torch.equal(state[k], original[k]) for k in later)  # the rest trained either way
    assert reports[1].freeze_units == 1 and reports[1].batch_size > reports[0].batch_size  # no activations kept
    assert reports[1].measured_peak_bytes <= BUDGET


def test_a_polish_gives_back_the_trainable_flags_its_exit_came_with(trained: tuple) -> None:
    exit_model, dm = trained
    mine = copy.deepcopy(exit_model)
    mine.units[1].requires_grad_(False)  # the user's own choice, which the polish must not undo
    polished, report = polish_exit(mine, dm, MemoryBudget.parse(BUDGET), **RECIPE, epochs=3, lr=0.05, freeze_units=1,
                                   trainer_options=CPU)  # fmt: skip
    assert report.kept  # the trained copy came back (as in the first test: 3 epochs gain)
    flags = {name.split(".")[1]: p.requires_grad for name, p in polished.named_parameters() if name.startswith("units")}
    assert [unit for unit, trainable in flags.items() if not trainable] == ["1"]  # unit 0 thawed, unit 1 as it was


def test_polish_refuses_freeze_units_it_cannot_apply(trained: tuple) -> None:
    exit_model, dm = trained
    for bad, message in ((-1, "non-negative integer"), (True, "non-negative integer"),
                         (len(exit_model.units) + 1, f"has {len(exit_model.units)} units")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            polish_exit(exit_model, dm, MemoryBudget.parse(BUDGET), **RECIPE, epochs=1, lr=0.05, freeze_units=bad)
    plain = torch.nn.Sequential(*exit_model.units, exit_model.head)
    with pytest.raises(ValueError, match="has no `units` sequence"):
        polish_exit(plain, dm, MemoryBudget.parse(BUDGET), **RECIPE, epochs=1, lr=0.05, freeze_units=1)


class FirstBatches(pl.Callback):
    """The images of each epoch's first training batch, and the datamodule's ``augment`` at every batch."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        self.augment: set[bool] = set()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: tuple, index: int
    ) -> None:
        self.augment.add(trainer.datamodule.augment)
        if index == 0:
            self.images.append(batch[0].clone())


@pytest.mark.parametrize("augment", [False, True])
def test_a_polish_without_augmentation_trains_on_the_images_the_cache_held(trained: tuple, augment: bool) -> None:
    exit_model, dm = trained
    clean = torch.stack([image for image, _ in dm.train_dataset(augment=False)])
    seen = FirstBatches()
    _, report = polish_exit(exit_model, dm, MemoryBudget.parse(BUDGET), **RECIPE, epochs=1, lr=0.05, augment=augment,
                            callbacks=[seen], trainer_options={"accelerator": "cpu", "enable_progress_bar": False})
    batch = seen.images[0]
    matches = [(clean == image).flatten(1).all(1).any().item() for image in batch]  # an exact un-augmented image
    assert report.augment is augment and seen.augment == {augment} and dm.augment is True  # restored after
    assert all(matches) if not augment else not all(matches)
    with pytest.raises(ValueError, match="augment=False needs a datamodule with an `augment` attribute"):
        polish_exit(exit_model, object(), MemoryBudget.parse(BUDGET), **RECIPE, epochs=1, lr=0.05, augment=False)


def test_polish_refuses_a_budget_below_one_sample_and_bad_epochs(trained: tuple) -> None:
    exit_model, dm = trained
    with pytest.raises(BudgetTooSmall, match="deployed exit"):
        polish_exit(exit_model, dm, MemoryBudget.parse(10_000), **RECIPE, epochs=1, lr=0.05)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        polish_exit(exit_model, dm, MemoryBudget.parse(BUDGET), **RECIPE, epochs=0, lr=0.05)
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        polish_exit(exit_model, dm, MemoryBudget.parse(BUDGET), **RECIPE, epochs=1, lr=0.05, batchnorm="fixed")


def test_nf_train_polishes_and_exports_the_exit(tmp_path: Path, shared_datasets_dir: Path, data_cache_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("NF_DATA_DIR", str(shared_datasets_dir))
    monkeypatch.setenv("NF_CACHE_DIR", str(data_cache_dir))
    settings = ["polish.lr=0.02", "polish.warmup=0.25", "polish.batchnorm=frozen", "polish.freeze_units=1"]
    results = run(compose_config("train", [*TINY, "method=neuroflux", "budget=5MB", "polish_epochs=2", *settings]),
                  tmp_path)  # fmt: skip
    polish = json.loads((tmp_path / "results.json").read_text())["polish"]
    assert polish["unit"] == results["exit"]["unit"] and polish["epochs"] == 2
    assert (polish["warmup"], polish["batchnorm"], polish["freeze_units"]) == (0.25, "frozen", 1)
    assert polish["lr"] == pytest.approx(0.02 * polish["batch_size"] / 128)
    assert polish["measured_peak_bytes"] <= results["budget_bytes"]
    polish_records = results["history"][-2:]  # the polish's validations, on the run's clock, after the blocks'
    assert all(r["block"] is None and "val/acc" in r for r in polish_records)
    assert polish_records[0]["seconds"] > results["history"][-3]["seconds"]
    best = polish["val_after"] if polish["kept"] else max(results["exit_accuracies"].values())
    assert results["final_accuracy"] == best
    program = torch.export.load(str(tmp_path / "export" / POLISHED_PROGRAM_FILE)).module()
    state = torch.load(tmp_path / "export" / POLISHED_STATE_FILE)
    assert program(torch.zeros(3, 3, 32, 32)).shape == (3, 10) and state
    # a run killed during its polish resumes from the block-wise run's last checkpoint and polishes again
    (tmp_path / "export" / POLISHED_STATE_FILE).unlink()
    again = resume(tmp_path)
    assert again["polish"]["unit"] == polish["unit"] and (tmp_path / "export" / POLISHED_STATE_FILE).is_file()
    assert again["exit"]["unit"] == results["exit"]["unit"]  # the same exit, restored, not retrained


def test_nf_train_refuses_polish_it_cannot_do_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="polish_epochs needs distributed=single"):
        run(compose_config("train", [*TINY, "method=neuroflux", "polish_epochs=1", "distributed=ddp"]), tmp_path)
    with pytest.raises(ValueError, match="polish_epochs needs the early_exit callback"):
        run(compose_config("train", [*TINY, "method=neuroflux", "polish_epochs=1", "~callbacks.early_exit"]), tmp_path)
    for bad, message in (("polish.batchnorm=fixed", "batchnorm must be one of"), ("polish.warmup=1.5", "lr_warmup"),
                         ("polish.lr=0", "lr must be positive"),
                         ("polish.freeze_units=-1", "freeze_units must be a non-negative")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            run(compose_config("train", [*TINY, "method=neuroflux", "polish_epochs=1", bad]), tmp_path)
    assert not (tmp_path / "config.yaml").exists()  # refused before anything ran or was written


def test_bp_ignores_polish_epochs() -> None:
    assert compose_config("train", ["method=bp", "polish_epochs=3"]).method.get("polish_epochs") is None
    assert compose_config("train", ["method=classic_ll", "polish_epochs=3"]).method.polish_epochs == 3
