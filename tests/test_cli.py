"""The Hydra apps: config composition, bad input, and real end-to-end runs on CIFAR-10."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, InstantiationException

from nf_lightning.cli import common
from nf_lightning.cli.common import compose_config
from nf_lightning.cli.plan import plan_report
from nf_lightning.cli.train import run
from nf_lightning.lightning import history

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
RESULT_KEYS = {
    "method", "model", "data", "budget", "budget_bytes", "epochs", "could_run", "batch_sizes", "train_seconds",
    "validation_seconds", "measured_peak_bytes", "history", "final_accuracy",
}
LOCAL_LEARNING_KEYS = {"plan", "exit_accuracies", "exit", "cache_bytes", "dataset_bytes"}


@pytest.fixture
def cifar(shared_datasets_dir: Path, data_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the data modules at the real CIFAR-10 copy and the session's decode cache."""
    monkeypatch.setenv("NF_DATA_DIR", str(shared_datasets_dir))
    monkeypatch.setenv("NF_CACHE_DIR", str(data_cache_dir))
    return shared_datasets_dir


def test_docstring_examples() -> None:
    assert doctest.testmod(common).failed == 0
    assert doctest.testmod(history).failed == 0


@pytest.mark.parametrize("method", ["bp", "classic_ll", "neuroflux"])
@pytest.mark.parametrize("model", ["vgg11", "vgg16", "vgg19", "resnet18", "mobilenetv2", "torchvision"])
def test_every_method_and_model_composes(method: str, model: str) -> None:
    cfg = compose_config("train", [f"method={method}", f"model={model}", "data=cifar10", "budget=100MB"])
    assert cfg.method.name == method and cfg.budget == "100MB"
    assert cfg.model.name == (model if model != "torchvision" else "resnet18")
    strategy = cfg.trainer.strategy
    if method == "bp":  # plain Lightning training, its batch sized by a hook, its steps held by the same guard
        assert strategy._target_.endswith("BudgetedBackpropStrategy") and strategy.memory_budget == "100MB"
        assert cfg.method.before_fit._target_.endswith("fit_backprop_to_budget")
    else:
        assert strategy._target_.endswith("NeuroFluxStrategy") and strategy.memory_budget == "100MB"
        assert strategy.get("single_block", False) == (method == "classic_ll") and "early_exit" in cfg.callbacks


def test_quickstart_is_small() -> None:
    cfg = compose_config("train", ["experiment=quickstart"])
    assert cfg.model.name == "vgg11" and cfg.model.width_mult < 1 and cfg.data.train_subset <= 10_000


def test_unknown_model_lists_known(tmp_path: Path, cifar: Path) -> None:
    cfg = compose_config("train", ["model=vgg11", "model.name=vgg13"])
    with pytest.raises(InstantiationException, match="vgg16"):
        run(cfg, tmp_path)


def test_unknown_method_lists_the_method_configs() -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("train", ["method=sgd"])
    assert all(name in str(error.value) for name in ("bp", "classic_ll", "neuroflux"))


@pytest.mark.parametrize("method", ["bp", "classic_ll", "neuroflux"])
def test_each_method_trains_on_real_cifar10(method: str, tmp_path: Path, cifar: Path) -> None:
    # classic LL needs far more memory (batch 64 at 100MB) than NeuroFlux, which gets 3 blocks at 5MB
    budget = "100MB" if method == "classic_ll" else "5MB"
    # a callback is configuration only: Lightning's learning-rate monitor, added from the command line
    extra = ["+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor"]
    results = run(compose_config("train", [*TINY, f"method={method}", f"budget={budget}", *extra]), tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(results, default=str))
    local_learning = method != "bp"
    assert RESULT_KEYS <= set(written) and (LOCAL_LEARNING_KEYS <= set(written)) == local_learning
    assert written["method"] == method and written["could_run"]
    assert written["final_accuracy"] > 0.12  # 10 classes: chance is 0.10
    assert 0 < written["validation_seconds"] < written["train_seconds"]
    assert written["history"] and all("val/acc" in record for record in written["history"])  # the user's own step
    assert written["batch_sizes"] and all(b >= 1 for b in written["batch_sizes"])
    assert 0 < written["measured_peak_bytes"]
    (metrics,) = (tmp_path / "logs").glob("version_*/metrics.csv")
    assert "lr-SGD" in metrics.read_text().splitlines()[0]  # the added callback logged
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # what `nf-train resume=` continues from
    if local_learning:
        assert written["measured_peak_bytes"] <= written["budget_bytes"]
        assert written["plan"]["blocks"] and written["exit"]
        assert written["final_accuracy"] == max(written["exit_accuracies"].values())
        last = written["history"][-1]
        assert last["block"] == len(written["plan"]["blocks"]) - 1
        assert f"neuroflux/acc_exit_{written['exit']['unit']}" in last
    else:
        assert written["final_accuracy"] == written["history"][-1]["val/acc"]
    if method == "neuroflux":
        assert len(written["plan"]["blocks"]) > 1 and written["cache_bytes"] > 0
        assert written["dataset_bytes"] == 1200 * 3 * 32 * 32


def test_a_torchvision_network_by_name_trains_and_plans(tmp_path: Path, cifar: Path) -> None:
    """`model=torchvision model.name=...`: torchvision's own network, composed like the zoo's."""
    shufflenet = ["model=torchvision", "model.name=shufflenet_v2_x0_5", *TINY[2:]]
    cfg = compose_config("train", [*shufflenet, "method=neuroflux", "budget=20MB"])
    written = run(cfg, tmp_path)
    assert written["could_run"] and written["model"]["name"] == "shufflenet_v2_x0_5"
    assert written["plan"]["blocks"] and written["measured_peak_bytes"] <= written["budget_bytes"]
    report = plan_report(compose_config("plan", ["model=torchvision", "model.name=squeezenet1_1", "batch_limit=8"]))
    assert report["model"] == "squeezenet1_1" and report["width_mult"] is None
    assert report["neuroflux"]["blocks"]


def test_infeasible_budget_is_recorded_not_crashed(tmp_path: Path, cifar: Path) -> None:
    results = run(compose_config("train", [*TINY, "method=bp", "budget=100kB"]), tmp_path)
    assert not results["could_run"]
    assert "smallest feasible budget" in results["reason"]
    assert json.loads((tmp_path / "results.json").read_text())["could_run"] is False


def test_plan_report_and_tiny_budget() -> None:
    vgg16 = ["model=vgg16", "model.width_mult=0.25", "batch_limit=8"]  # profiled at batches 2, 4 and 8
    report = plan_report(compose_config("plan", [*vgg16, "budget=50MB"]))
    assert report["neuroflux"]["could_run"] and report["bp"]["could_run"]
    blocks = report["neuroflux"]["blocks"]
    assert [u for b in blocks for u in b["units"]] == list(range(13))
    assert all(b["predicted_peak"] <= report["budget_bytes"] for b in blocks)
    tiny = plan_report(compose_config("plan", [*vgg16, "budget=1MB"]))
    assert not tiny["neuroflux"]["could_run"] and "smallest feasible budget" in tiny["neuroflux"]["reason"]
    assert not tiny["bp"]["could_run"]


def _cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent
    return subprocess.run(
        [str(exe / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_nf_plan_json_from_another_directory(tmp_path: Path, cifar: Path) -> None:
    vgg11 = ["nf-plan", "model=vgg11", "model.width_mult=0.125", "batch_limit=8"]
    done = _cli([*vgg11, "budget=50MB", "output=json"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["model"] == "vgg11" and report["neuroflux"]["blocks"]
    failed = _cli([*vgg11, "budget=100kB"], tmp_path)
    assert "NeuroFlux cannot run: budget 100.0 kB is below the smallest feasible budget" in failed.stdout


def test_nf_train_single_infeasible_run_exits_2(tmp_path: Path, cifar: Path) -> None:
    done = _cli(["nf-train", *TINY, "method=bp", "budget=10kB", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["could_run"] is False


def test_nf_train_multirun_writes_one_result_per_run(tmp_path: Path, cifar: Path) -> None:
    done = _cli(
        ["nf-train", "-m", *TINY, "data.train_subset=200", "data.val_subset=100", "epochs=1", "method=bp,neuroflux",
         "budget=8MB,10kB", f"hydra.sweep.dir={tmp_path}/sweep"],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/results.json"))
    results = [json.loads(p.read_text()) for p in runs]
    assert sorted((r["method"], r["budget"], r["could_run"]) for r in results) == [
        ("bp", "10kB", False), ("bp", "8MB", True), ("neuroflux", "10kB", False), ("neuroflux", "8MB", True)
    ]
    for path, result in zip(runs, results):  # each run wrote its logs and export into its own directory
        if result["could_run"]:
            assert list((path.parent / "logs").glob("version_*/metrics.csv"))
            assert (path.parent / "export" / "exit.json").is_file() == (result["method"] == "neuroflux")


def test_train_seconds_is_one_clock_that_the_probes_test_pass_does_not_run_on(tmp_path: Path, cifar: Path) -> None:
    """For every method: the profiling before ``fit`` plus the history's clock, which the benchmark's probe stops
    while it scores the test split after the last validation (BP runs counted that pass until it was one clock)."""
    from nf_lightning.benchmark.presets import PROBE_FILE

    probe = "+callbacks.probe._target_=nf_lightning.benchmark.probe.BenchmarkProbe"
    results = run(compose_config("train", [*TINY, "method=bp", "epochs=1", probe]), tmp_path)
    tested = json.loads((tmp_path / PROBE_FILE).read_text())
    last_validation = results["before_fit_seconds"] + results["history"][-1]["seconds"]
    assert tested["test_images"] == 10_000 and tested["test_seconds"] > 0.2
    assert 0 <= results["train_seconds"] - last_validation < 0.5 * tested["test_seconds"]


def test_a_killed_nf_train_run_resumes_with_one_command(tmp_path: Path, cifar: Path) -> None:
    """SIGKILL at the start of epoch 2 (after epoch 1's checkpoint), then `nf-train resume=<run dir>`."""
    run_dir = tmp_path / "run"
    env_tests = {"PYTHONPATH": str(Path(__file__).parent)}
    args = ["nf-train", *TINY, "data.train_subset=300", "data.val_subset=100", "epochs=3",
            f"hydra.run.dir={run_dir}", "+callbacks.kill._target_=fault_injection.KillAtEpochStart",
            "+callbacks.kill.epoch=2"]
    killed = _cli(args, tmp_path, env_tests)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "results.json").exists()
    # the saved config kills at epoch 2 too: resuming must not start at epoch 2 again, so drop the killer
    config = (run_dir / "config.yaml").read_text().replace("fault_injection.KillAtEpochStart", "lightning.pytorch.Callback")
    (run_dir / "config.yaml").write_text(config.replace("  kill:\n    _target_: lightning.pytorch.Callback\n    epoch: 2\n", ""))
    resumed = _cli(["nf-train", f"resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    epochs = [record["epoch"] for record in results["history"]]
    assert epochs == list(range(len(epochs))) and epochs[:2] == [0, 1] and len(epochs) > 2  # both parts, once each
    assert results["resumed_from"].endswith("last.ckpt")
    assert results["train_seconds"] >= results["history"][-1]["seconds"] > results["history"][1]["seconds"]
    assert not list(tmp_path.glob("outputs"))  # no stray run directory
