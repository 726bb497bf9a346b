"""Which code a run ran and how loaded the machine was meanwhile, so timings can be trusted or discounted.

A run's code is identified by the commit of the tree it imported
``nf_lightning`` from and a hash of that tree's uncommitted changes to tracked
files (``None`` when clean). A pinned snapshot (``git archive <commit> | tar -x``)
has no ``.git``: it gives its commit through ``NF_CODE_COMMIT``.

Example:
    >>> same_code({"commit": "abc", "diff_sha": None}, {"commit": "abc", "diff_sha": None, "source": "git"})
    True
    >>> same_code({"commit": "abc", "diff_sha": "1f"}, {"commit": "abc", "diff_sha": None})
    False
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

COMMIT_ENV = "NF_CODE_COMMIT"
CODE_PATHS = ("nf_lightning", "conf", "pyproject.toml")
"""What a run imports: the package, its configs (``conf/``, shipped as ``nf_lightning.conf``) and the project file."""


def code_root() -> Path:
    """The directory holding the ``nf_lightning`` package this process imported."""
    import nf_lightning

    return Path(nf_lightning.__file__).resolve().parent.parent


def check_configs_match_code() -> None:
    """Raise when ``nf_lightning.conf`` is imported from another tree than ``nf_lightning`` itself."""
    import nf_lightning.conf

    configs, root = Path(nf_lightning.conf.__file__).resolve().parent, code_root()
    if not configs.is_relative_to(root):
        raise RuntimeError(
            f"nf_lightning's code comes from {root} but its configs from {configs}: runs would mix two trees. "
            f"Make the snapshot with `python -m nf_lightning.benchmark.snapshot <commit> <dir>`, which puts the "
            f"configs inside the snapshot's package"
        )


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True)


def code_identity(root: Path | None = None) -> dict[str, Any]:
    """``commit``, ``dirty``, ``diff_sha`` and ``source`` of the code under ``root``.

    ``diff_sha`` hashes ``git diff HEAD`` and the untracked files git does not
    ignore, in the code a run imports (:data:`CODE_PATHS`; ``None`` when there
    are neither), so editing a README or writing results leaves it unchanged.

    ``source`` is ``"git"`` when ``root`` is the top of a git checkout,
    ``"env"`` when the commit comes from ``NF_CODE_COMMIT`` (a snapshot), and
    ``"unknown"`` otherwise (such runs are never reused).
    """
    check_configs_match_code()
    root = root or code_root()
    top = _git(root, "rev-parse", "--show-toplevel")
    if top.returncode == 0 and Path(top.stdout.decode().strip()).resolve() == root:
        commit = _git(root, "rev-parse", "HEAD").stdout.decode().strip()
        diff = _git(root, "diff", "HEAD", "--binary", "--", *CODE_PATHS).stdout
        untracked = _git(root, "ls-files", "--others", "--exclude-standard", "-z", "--", *CODE_PATHS).stdout
        for name in untracked.split(b"\0"):
            if name and (root / name.decode()).is_file():
                diff += name + b"\0" + (root / name.decode()).read_bytes()
        sha = hashlib.sha256(diff).hexdigest()[:16] if diff else None
        return {"commit": commit, "dirty": sha is not None, "diff_sha": sha, "source": "git"}
    commit = os.environ.get(COMMIT_ENV)
    return {"commit": commit, "dirty": False, "diff_sha": None, "source": "env" if commit else "unknown"}


def same_code(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two :func:`code_identity` values name the same code (an unknown commit matches nothing)."""
    if not a or not b or not a.get("commit"):
        return False
    return a["commit"] == b.get("commit") and a.get("diff_sha") == b.get("diff_sha")


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second.

    >>> utc_now().endswith("Z")
    True
    """
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds while it runs, in a daemon thread.

    Example:
        >>> with LoadSampler(every=60.0) as sampler:
        ...     pass
        >>> sorted(sampler.summary())
        ['cpus', 'end', 'max', 'mean', 'samples', 'start']
    """

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self.samples.append(os.getloadavg()[0])
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, Any]:
        """The 1-minute load average at the start and end, its mean and maximum over the samples, and the cores."""
        return {
            "start": self.samples[0], "end": self.samples[-1], "mean": sum(self.samples) / len(self.samples),
            "max": max(self.samples), "samples": len(self.samples), "cpus": os.cpu_count(),
        }  # fmt: skip


def run_provenance(sampler: LoadSampler, started_at: str, seconds: float) -> dict[str, Any]:
    """What a run's ``record.json`` says about where and when it ran."""
    return {"code": code_identity(), "started_at": started_at, "finished_at": utc_now(),
            "process_seconds": seconds, "load": sampler.summary(), "pid": os.getpid(),
            "clock": time.get_clock_info("perf_counter").implementation}  # fmt: skip
