"""A built wheel, installed (not editable) into a fresh venv, gives working ``nf-plan`` and ``nf-train``.

The wheel is built from a copy of the project (so the working tree gets no
``build/``), installed with ``--no-deps`` into a venv that sees this
environment's dependencies through a ``.pth`` file, and its apps run from a
directory outside the project: they must find their configs in the package.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("setuptools", minversion="77", reason="building without isolation uses this setuptools")

PROJECT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "nf_lightning", "conf")


def _check(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(the wheel, the venv's bin directory, the build log) of one build and install for this module."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        path = PROJECT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, source / name)
    build = _check(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
         str(source)],
        root,
    )
    (wheel,) = (root / "dist").glob("nf_lightning-*.whl")
    venv = root / "venv"
    _check([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], root)
    python = venv / "bin" / "python"
    _check([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], root)
    # the dependencies (torch, lightning, hydra, ...) from this environment, after the venv's own packages
    purelib = _check([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root)
    Path(purelib.stdout.strip(), "test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return wheel, venv / "bin", build.stdout + build.stderr


def test_wheel_holds_every_module_and_config_without_build_warnings(wheel_install: tuple[Path, Path, str]) -> None:
    wheel, _, log = wheel_install
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(PROJECT).as_posix() for p in (PROJECT / "nf_lightning").rglob("*.py")}
    configs = {
        "nf_lightning/conf/" + p.relative_to(PROJECT / "conf").as_posix()
        for p in (PROJECT / "conf").rglob("*")
        if p.suffix in (".yaml", ".py")
    }
    assert modules and configs and not (modules | configs) - names, (modules | configs) - names
    metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()
    for warning in ("BuildBackendWarning", "DeprecationWarning", "Package would be ignored"):
        assert warning not in log, log[log.find(warning) - 500 : log.find(warning) + 1500]


def test_installed_apps_find_their_configs(wheel_install: tuple[Path, Path, str], tmp_path: Path) -> None:
    _, bin_dir, _ = wheel_install
    where = _check([str(bin_dir / "python"), "-c", "import nf_lightning.conf as c; print(c.__file__)"], tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(bin_dir.parent)  # the installed copy, not the project's

    plan = [str(bin_dir / "nf-plan"), "model=vgg11", "model.width_mult=0.125", "budget=20MB", "batch_limit=8"]
    done = _check([*plan, "output=json"], tmp_path)
    report = json.loads(done.stdout)
    assert (report["model"], report["budget_bytes"]) == ("vgg11", 20_000_000)
    assert report["neuroflux"]["could_run"] and report["neuroflux"]["blocks"] and report["bp"]["could_run"]

    job = _check([str(bin_dir / "nf-train"), "--cfg", "job", "experiment=quickstart", "method=bp"], tmp_path)
    assert "name: bp" in job.stdout and "fit_backprop_to_budget" in job.stdout and "width_mult: 0.25" in job.stdout
    assert not list(tmp_path.iterdir())  # printing the config runs nothing and writes nothing


def test_installed_nf_train_writes_to_its_default_run_directory(
    wheel_install: tuple[Path, Path, str], tmp_path: Path, shared_datasets_dir: Path, data_cache_dir: Path
) -> None:
    """The wheel's ``nf-train`` from a fresh directory, no ``hydra.run.dir``: a short real run lands in ``outputs/``."""
    _, bin_dir, _ = wheel_install
    command = [str(bin_dir / "nf-train"), "experiment=quickstart", "data.train_subset=300", "data.val_subset=100",
               "epochs=1", "polish_epochs=0", "trainer.enable_progress_bar=false"]  # fmt: skip
    env = {**os.environ, "NF_DATA_DIR": str(shared_datasets_dir), "NF_CACHE_DIR": str(data_cache_dir),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = tmp_path.glob("outputs/*/*_neuroflux_vgg11_20MB/results.json")
    assert json.loads(results.read_text())["could_run"]
