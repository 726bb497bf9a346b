"""The Hydra apps: config composition, bad input, and real end-to-end runs on CIFAR-10."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from nf_lightning.cli.common import CONF_DIR
from nf_lightning.cli.plan import plan_report
from nf_lightning.cli.train import run

TINY = [
    "model=vgg11",
    "model.width_mult=0.125",
    "data.train_subset=1000",
    "data.val_subset=200",
    "epochs=2",
    "batch_limit=64",
    "budget=8MB",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture
def cifar(shared_datasets_dir: Path, data_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the data modules at the real CIFAR-10 copy and the session's decode cache."""
    monkeypatch.setenv("NF_DATA_DIR", str(shared_datasets_dir))
    monkeypatch.setenv("NF_CACHE_DIR", str(data_cache_dir))
    return shared_datasets_dir


def config(overrides: list[str], name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("method", ["bp", "classic_ll", "neuroflux"])
@pytest.mark.parametrize("model", ["vgg11", "vgg16", "vgg19", "resnet18", "mobilenetv2"])
def test_every_method_and_model_composes(method: str, model: str) -> None:
    cfg = config([f"method={method}", f"model={model}", "data=cifar10", "budget=100MB"])
    assert cfg.method.name == method and cfg.model.name == model and cfg.budget == "100MB"


def test_quickstart_is_small() -> None:
    cfg = config(["experiment=quickstart"])
    assert cfg.model.name == "vgg11" and cfg.model.width_mult < 1 and cfg.data.train_subset <= 10_000


def test_unknown_model_lists_known(tmp_path: Path, cifar: Path) -> None:
    cfg = config(["model=vgg11", "model.name=vgg13"])
    with pytest.raises(ValueError, match="vgg16"):
        run(cfg, tmp_path)


def test_unknown_method_is_rejected(tmp_path: Path) -> None:
    cfg = config(["method=bp", "method.name=sgd"])
    with pytest.raises(ValueError, match="bp.*classic_ll.*neuroflux"):
        run(cfg, tmp_path)


@pytest.mark.parametrize("method", ["bp", "classic_ll", "neuroflux"])
def test_each_method_trains_on_real_cifar10(
    method: str, tmp_path: Path, cifar: Path
) -> None:
    # classic LL needs far more memory (batch 64 at 100MB) than NeuroFlux, which gets 3 blocks at 5MB
    budget = "100MB" if method == "classic_ll" else "5MB"
    cfg = config([*TINY, f"method={method}", f"budget={budget}"])
    results = run(cfg, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["method"] == method and written["could_run"]
    assert written["final_accuracy"] > 0.12  # 10 classes: chance is 0.10
    assert written["history"] and written["train_seconds"] > 0
    assert results["batch_sizes"] and all(b >= 1 for b in results["batch_sizes"])
    assert 0 < written["measured_peak_bytes"]
    if method != "bp":
        assert written["measured_peak_bytes"] <= written["budget_bytes"]
        assert written["plan"]["blocks"] and written["exit"]
    if method == "neuroflux":
        assert len(written["plan"]["blocks"]) > 1 and written["cache_bytes"] > 0 and written["dataset_bytes"] == 1200 * 3 * 32 * 32


def test_infeasible_budget_is_recorded_not_crashed(
    tmp_path: Path, cifar: Path
) -> None:
    cfg = config([*TINY, "method=bp", "budget=100kB"])
    results = run(cfg, tmp_path)
    assert not results["could_run"]
    assert "smallest feasible budget" in results["reason"]
    assert json.loads((tmp_path / "results.json").read_text())["could_run"] is False


def test_plan_report_and_tiny_budget() -> None:
    report = plan_report(config(["model=vgg16", "model.width_mult=0.25", "budget=50MB"], name="plan"))
    assert report["neuroflux"]["could_run"] and report["bp"]["could_run"]
    blocks = report["neuroflux"]["blocks"]
    assert [u for b in blocks for u in b["units"]] == list(range(13))
    assert all(b["predicted_peak"] <= report["budget_bytes"] for b in blocks)
    tiny = plan_report(config(["model=vgg16", "model.width_mult=0.25", "budget=1MB"], name="plan"))
    assert not tiny["neuroflux"]["could_run"] and "smallest feasible budget" in tiny["neuroflux"]["reason"]
    assert not tiny["bp"]["could_run"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent
    return subprocess.run([str(exe / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_nf_plan_json_from_another_directory(tmp_path: Path, cifar: Path) -> None:
    done = _cli(["nf-plan", "model=vgg11", "model.width_mult=0.125", "budget=50MB", "output=json"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["model"] == "vgg11" and report["neuroflux"]["blocks"]
    failed = _cli(["nf-plan", "model=vgg11", "model.width_mult=0.125", "budget=100kB"], tmp_path)
    assert "NeuroFlux cannot run: budget 100.0 kB is below the smallest feasible budget" in failed.stdout


def test_nf_train_multirun_writes_one_result_per_run(
    tmp_path: Path, cifar: Path
) -> None:
    done = _cli(
        ["nf-train", "-m", *TINY, "data.train_subset=200", "data.val_subset=100", "epochs=1", "method=bp,neuroflux",
         "budget=8MB,10kB", f"hydra.sweep.dir={tmp_path}/sweep"],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert sorted((r["method"], r["budget"], r["could_run"]) for r in results) == [
        ("bp", "10kB", False), ("bp", "8MB", True), ("neuroflux", "10kB", False), ("neuroflux", "8MB", True)
    ]
