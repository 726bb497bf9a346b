"""A pinned snapshot runs its own code with its own configs, and a process that would mix two trees is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from nf_lightning.benchmark.snapshot import pin

PROJECT = Path(__file__).resolve().parents[1]
PROBE = (
    "import nf_lightning, nf_lightning.conf, json\n"
    "from nf_lightning.benchmark.provenance import code_identity\n"
    "print(json.dumps([nf_lightning.__file__, nf_lightning.conf.__file__, code_identity()]))"
)


def probe(snapshot: Path, commit: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(snapshot), "NF_CODE_COMMIT": commit}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=snapshot, capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def test_a_pinned_snapshot_imports_its_own_configs_and_records_its_commit(tmp_path: Path) -> None:
    snapshot = tmp_path / "snap"
    commit = pin("HEAD", snapshot, PROJECT)
    done = probe(snapshot, commit)
    assert done.returncode == 0, done.stderr[-2000:]
    code, configs, identity = __import__("json").loads(done.stdout)
    assert Path(code).is_relative_to(snapshot) and Path(configs).is_relative_to(snapshot)
    assert identity == {"commit": commit, "dirty": False, "diff_sha": None, "source": "env"}


def test_a_plain_archive_on_pythonpath_is_refused_for_mixing_trees(tmp_path: Path) -> None:
    snapshot = tmp_path / "snap"
    commit = pin("HEAD", snapshot, PROJECT)
    shutil.rmtree(snapshot / "nf_lightning" / "conf")  # what `git archive` alone gives
    done = probe(snapshot, commit)
    assert done.returncode != 0 and "runs would mix two trees" in done.stderr, done.stderr[-2000:]
