"""A pinned snapshot of one commit to run long benchmarks from, so later commits never mix into their runs.

``git archive`` leaves out nothing a run imports but one thing: the package's
configs, ``nf_lightning.conf``, are the top-level ``conf/`` mapped in by the
install. A snapshot imported through ``PYTHONPATH`` would therefore read the
checkout's configs with the snapshot's code. :func:`pin` copies ``conf/`` into
the snapshot's package, and :func:`~nf_lightning.benchmark.provenance.check_configs_match_code`
(called by every benchmark run) refuses a process whose configs and code come from different trees.

    python -m nf_lightning.benchmark.snapshot HEAD /tmp/nf_snap     # prints the environment to run with

Example:
    >>> pin("HEAD", Path("/tmp/nf_snap"))  # doctest: +SKIP
    '4f1e342...'
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from nf_lightning.benchmark.provenance import COMMIT_ENV, code_root


def pin(commit: str, dest: Path, repo: Path | None = None) -> str:
    """Extract ``commit`` of ``repo`` (this checkout) into ``dest`` with its configs inside the package; its full hash."""
    repo = repo or code_root()
    full = subprocess.run(["git", "-C", str(repo), "rev-parse", commit], capture_output=True, text=True, check=True)
    commit = full.stdout.strip()
    dest.mkdir(parents=True, exist_ok=False)
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    shutil.copytree(dest / "conf", dest / "nf_lightning" / "conf")
    return commit


if __name__ == "__main__":
    pinned = pin(sys.argv[1], Path(sys.argv[2]).resolve())
    print(f"cd {Path(sys.argv[2]).resolve()} && export PYTHONPATH=$PWD {COMMIT_ENV}={pinned}")
