"""What a new user runs first, run as they run it: a fresh process in a temporary directory, the README's
commands and snippet as written, only ``import nf_lightning``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
README = (PROJECT / "README.md").read_text()
BIN = Path(sys.executable).parent
STRATEGIES = {
    "neuroflux": "NeuroFluxStrategy",
    "neuroflux_ddp": "NeuroFluxDDPStrategy",
    "budgeted_bp": "BudgetedBackpropStrategy",
    "budgeted_bp_ddp": "BudgetedBackpropDDPStrategy",
}


def fresh(args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``args`` in a new one-thread process started in ``cwd``."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})  # fmt: skip
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def quickstart_commands() -> list[str]:
    """The README's two quick-start commands, read the way ``.ci/run`` reads them."""
    done = fresh([sys.executable, str(PROJECT / ".ci" / "readme_commands.py"), str(PROJECT / "README.md")], PROJECT)
    return done.stdout.splitlines()


def python_block_after(heading: str) -> str:
    """The first ```python block after the line that starts with ``heading`` in the README."""
    match = re.search(rf"^{re.escape(heading)}.*?^```python\n(.*?)^```", README, re.S | re.M)
    assert match is not None, f"no python block after {heading!r} in the README"
    return match.group(1)


@pytest.mark.parametrize("order", ["nf_lightning first", "lightning first"])
def test_every_strategy_name_works_after_import_nf_lightning(order: str, tmp_path: Path) -> None:
    imports = ["import nf_lightning", "import lightning.pytorch as pl"]
    script = "\n".join([
        *(imports if order == "nf_lightning first" else imports[::-1]),
        "for name in " + repr(list(STRATEGIES)) + ":",
        "    print(name, type(pl.Trainer(strategy=name, accelerator='cpu', logger=False).strategy).__name__)",
    ])  # fmt: skip
    done = fresh([sys.executable, "-c", script], tmp_path)
    printed = dict(line.split() for line in done.stdout.splitlines() if line.split()[0] in STRATEGIES)
    assert printed == STRATEGIES


def test_the_quickstart_section_holds_the_install_command_and_the_test_command() -> None:
    install, tests = quickstart_commands()
    assert "pip install -e" in install and "nf-train experiment=quickstart" in install
    assert tests == ".venv/bin/python -m pytest"


@pytest.mark.parametrize("second", ["echo second-ran", "exit 3"])
def test_ci_runs_the_readme_commands_and_fails_with_them(second: str, tmp_path: Path) -> None:
    """``.ci/run`` against a README whose commands are replaced: it runs both in order, and fails with either."""
    shutil.copytree(PROJECT / ".ci", tmp_path / ".ci")
    readme = README.replace(quickstart_commands()[0], "echo first-ran").replace(quickstart_commands()[1], second)
    (tmp_path / "README.md").write_text(readme)
    done = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert "first-ran" in done.stdout
    if second.startswith("exit"):
        assert done.returncode == 3, done.stdout
    else:
        assert done.returncode == 0 and done.stdout.index("first-ran") < done.stdout.index("second-ran"), done


def test_ci_refuses_a_readme_without_two_quickstart_commands(tmp_path: Path) -> None:
    shutil.copytree(PROJECT / ".ci", tmp_path / ".ci")
    (tmp_path / "README.md").write_text(README.replace(quickstart_commands()[1], ""))
    done = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "found 1" in done.stderr


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory, shared_datasets_dir: Path, data_cache_dir: Path) -> Path:
    """The README's main command (after its install step) from a fresh directory: the run directory it wrote.
    (The session's decoded images, so the archive is not decoded again; ``.ci/run`` runs it from nothing.)"""
    install, _ = quickstart_commands()
    command = install.split("&&")[-1].replace("../shared/datasets", str(shared_datasets_dir))
    command = command.replace(".venv/bin/", f"{BIN}/")
    cwd = tmp_path_factory.mktemp("newcomer")
    fresh(["bash", "-c", command], cwd, NF_CACHE_DIR=str(data_cache_dir))
    (run,) = (cwd / "outputs").glob("*/*_neuroflux_vgg11_20MB")
    return run


def test_the_readme_main_command_trains_from_a_fresh_directory(quickstart_run: Path) -> None:
    results = json.loads((quickstart_run / "results.json").read_text())
    assert results["could_run"] and results["final_accuracy"] > 0.3  # chance is 0.1
    assert results["measured_peak_bytes"] <= 20_000_000 and len(results["batch_sizes"]) >= 2
    assert (quickstart_run / "export" / "polished_exit.pt2").is_file()


def test_nf_train_resumes_a_run_from_its_default_directory(quickstart_run: Path, shared_datasets_dir: Path,
                                                           data_cache_dir: Path) -> None:
    before = json.loads((quickstart_run / "results.json").read_text())
    fresh([str(BIN / "nf-train"), f"resume={quickstart_run}"], quickstart_run.parent,
          NF_DATA_DIR=str(shared_datasets_dir), NF_CACHE_DIR=str(data_cache_dir))  # fmt: skip
    after = json.loads((quickstart_run / "results.json").read_text())
    assert after["resumed_from"] == str(quickstart_run / "checkpoints" / "last.ckpt")
    assert after["plan"] == before["plan"] and after["exit"]["unit"] == before["exit"]["unit"]
    assert len(list(quickstart_run.parent.iterdir())) == 1  # no new run directory beside it


PREAMBLE = textwrap.dedent(
    """
    # What the README's snippet calls yours: a LightningModule with no nf_lightning in it, and a data module.
    import os
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from nf_lightning.data.cifar_folder import CIFAR10FolderDataModule
    from nf_lightning.models import create


    class MyClassifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = create("vgg11", num_classes=10, width_mult=0.25)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean())

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_acc", (self(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


    my_lightning_module = MyClassifier()
    dm = CIFAR10FolderDataModule(os.environ["NF_DATA_DIR"], batch_size=64, train_subset=600, val_subset=200)
    """
)
EPILOGUE = textwrap.dedent(
    """
    import csv, json
    from pathlib import Path
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as rows:  # an exit is scored once its unit trained
        scored = {k for r in csv.DictReader(rows) for k, v in r.items() if k.startswith("neuroflux/acc_exit_") and v}
    run = trainer.strategy.run
    if "report" in globals():  # the README's polish block ran after it
        print("POLISH", json.dumps({"peak": report.measured_peak_bytes, "batch": report.batch_size,
                                    "outputs": list(polished(torch.zeros(2, 3, 32, 32)).shape)}))
    print("RESULT", json.dumps({
        "strategy": type(trainer.strategy).__name__, "blocks": run.num_blocks, "units": len(run.units),
        "scored": sorted(int(k.rsplit("_", 1)[1]) for k in scored),
        "test_acc": float(trainer.callback_metrics["test_acc"]),
    }))
    """
)


@pytest.mark.parametrize("strategy", ["as written", 'strategy="neuroflux"'])
def test_the_readme_drop_in_snippet_trains_every_planned_block(
    strategy: str, tmp_path: Path, shared_datasets_dir: Path, data_cache_dir: Path
) -> None:
    snippet = python_block_after("## Use it in your own Lightning project")
    if strategy != "as written":
        snippet, replaced = re.subn(r"strategy=nf\.NeuroFluxStrategy\([^)]*\)", strategy, snippet)
        assert replaced == 1
    if strategy == "as written":  # then the README's polish of the exit it deployed
        snippet += python_block_after("**Polish the deployed exit.**")
    (tmp_path / "user.py").write_text(PREAMBLE + snippet + EPILOGUE)
    done = fresh([sys.executable, "user.py"], tmp_path, NF_DATA_DIR=str(shared_datasets_dir),
                 NF_CACHE_DIR=str(data_cache_dir))  # fmt: skip
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert result["strategy"] == "NeuroFluxStrategy"
    assert result["scored"] == list(range(result["units"])), result  # every planned block trained (its log says)
    if strategy == "as written":
        assert result["blocks"] >= 2, result  # the snippet's budget splits this network into blocks
    assert result["test_acc"] > 0.15, result  # the selected exit, tested from the best checkpoint
    assert "never trained" not in done.stderr
    if strategy == "as written":
        polish = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("POLISH"))[7:])
        assert polish["outputs"] == [2, 10] and polish["batch"] >= 1 and 0 < polish["peak"] <= 20_000_000, polish


def test_the_readme_configuration_snippets_build_their_trainers(tmp_path: Path) -> None:
    """The README's neuron-budget and DDP blocks, as written, after the imports its first block makes."""
    blocks = [python_block_after("**Budgeted neuron updates**"), python_block_after("### Several devices and machines")]
    script = "import lightning.pytorch as pl\nimport nf_lightning as nf\n" + "".join(blocks)
    script += "print('BUILT', type(trainer.strategy).__name__, trainer.world_size)\n"
    (tmp_path / "user.py").write_text(script)
    done = fresh([sys.executable, "user.py"], tmp_path)
    assert "BUILT NeuroFluxDDPStrategy 8" in done.stdout, done.stdout[-2000:]


def test_fit_without_validation_data_fails_at_once_saying_what_to_pass(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import lightning.pytorch as pl
        import nf_lightning
        from nf_lightning.testing.demo import PlainClassifier, loaders
        train, _ = loaders()
        pl.Trainer(strategy="neuroflux", accelerator="cpu", logger=False, max_epochs=1).fit(PlainClassifier(), train)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: NeuroFlux needs validation data") and "val_loader" in last, done.stderr[-2000:]
    assert "random_split" in last
    assert not (tmp_path / "neuroflux_cache").exists()  # nothing was profiled or cached first


def test_an_early_stopping_shorter_than_a_block_is_named_at_the_start_and_its_cut_at_the_end(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping

    from nf_lightning.testing.demo import PlainClassifier, loaders, tight_strategy, trainer

    pl.seed_everything(0)
    train, val = loaders()
    stopper = EarlyStopping(monitor="val_acc", mode="max", patience=1, min_delta=1.0)  # stops at the first check
    strategy = tight_strategy(tmp_path, epochs_per_block=3)
    t = trainer(tmp_path, strategy, callbacks=[stopper], enable_checkpointing=False)
    with pytest.warns(UserWarning) as caught:
        t.fit(PlainClassifier(), train, val)
    messages = [str(w.message) for w in caught]
    assert any("EarlyStopping(monitor='val_acc', patience=1) may end the run" in m for m in messages), messages
    ended = [m for m in messages if m.startswith("the run ended in block 0")]
    assert ended and "EarlyStopping(monitor='val_acc')" in ended[0] and "never trained" in ended[0], messages
    assert not strategy.run.finished and strategy.run.num_blocks >= 2


def test_an_early_stopping_as_long_as_a_block_gets_no_warning(tmp_path: Path) -> None:
    import warnings

    from lightning.pytorch.callbacks import EarlyStopping

    from nf_lightning.testing.demo import PlainClassifier, loaders, tight_strategy, trainer

    train, val = loaders()
    t = trainer(tmp_path, tight_strategy(tmp_path, epochs_per_block=2), max_epochs=1, enable_checkpointing=False,
                callbacks=[EarlyStopping(monitor="val_acc", mode="max", patience=2)])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(PlainClassifier(), train, val)
    assert not [w for w in caught if "may end the run" in str(w.message)]
    assert any("max_epochs=1" in str(w.message) and "never trained" in str(w.message) for w in caught)



def test_fit_with_validation_turned_off_fails_the_same_way(tmp_path: Path) -> None:
    from nf_lightning.testing.demo import PlainClassifier, loaders, tight_strategy, trainer

    train, val = loaders()
    t = trainer(tmp_path, tight_strategy(tmp_path), limit_val_batches=0, enable_checkpointing=False)
    with pytest.raises(ValueError, match="NeuroFlux needs validation data.*limit_val_batches above 0"):
        t.fit(PlainClassifier(), train, val)
    assert not (tmp_path / "cache").exists()


CLI_SCRIPT = textwrap.dedent(
    """
    # A user's LightningCLI script: their module and data module, nothing of nf_lightning.
    import json
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.cli import LightningCLI
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset


    def images(n: int, seed: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, 32, 32, generator=generator)
        return TensorDataset(x, torch.randint(0, 10, (n,), generator=generator))


    class MyDataModule(pl.LightningDataModule):
        def __init__(self, batch_size: int = 32):
            super().__init__()
            self.batch_size = batch_size

        def train_dataloader(self):
            return DataLoader(images(256, 0), batch_size=self.batch_size, shuffle=True)

        def val_dataloader(self):
            return DataLoader(images(64, 1), batch_size=64)


    class MyModule(pl.LightningModule):
        def __init__(self, lr: float = 0.05):
            super().__init__()
            self.lr = lr
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


    cli = LightningCLI(MyModule, MyDataModule)
    strategy, run = cli.trainer.strategy, cli.trainer.strategy.run
    print("RESULT", json.dumps({
        "strategy": type(strategy).__name__, "budget": strategy.budget.bytes,
        "epochs_per_block": strategy.options.epochs_per_block, "blocks": run.num_blocks,
        "epochs": [ended["epochs"] for ended in run.progress.ended_blocks],
        "log_dir": cli.trainer.log_dir,
    }))
    """
)


def test_the_readme_lightning_cli_command_and_its_saved_config_train_the_same_strategy(tmp_path: Path) -> None:
    """The README's LightningCLI command, as written (``python`` the test's interpreter), then its config.yaml."""
    match = re.search(r"^\*\*LightningCLI\.\*\*.*?^```bash\n(.*?)^```", README, re.S | re.M)
    assert match is not None, "no bash block after **LightningCLI.** in the README"
    command = match.group(1).replace("\\\n", " ").strip()
    assert command.startswith("python main.py fit ")
    (tmp_path / "main.py").write_text(CLI_SCRIPT)

    def trained(args: list[str]) -> dict:
        done = fresh([sys.executable, "main.py", *args], tmp_path)
        return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[7:])

    first = trained(command.split()[2:])
    assert first["strategy"] == "NeuroFluxStrategy" and first["budget"] == 20_000_000, first
    assert first["epochs_per_block"] == 4 and first["blocks"] >= 1, first
    assert len(first["epochs"]) == first["blocks"] and all(1 <= n <= 4 for n in first["epochs"]), first
    config = Path(first["log_dir"]) / "config.yaml"
    again = trained(["fit", "--config", str(config)])
    assert {k: again[k] for k in ("strategy", "budget", "epochs_per_block", "blocks")} == {
        k: first[k] for k in ("strategy", "budget", "epochs_per_block", "blocks")}
