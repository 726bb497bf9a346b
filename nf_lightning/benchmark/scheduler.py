"""Running the planned runs, ``jobs`` at a time, each in its own subprocess, and reusing finished ones.

A run is reused only when its ``record.json`` has the same ``nf-train``
overrides and was made by the same code (:func:`~nf_lightning.benchmark.provenance.same_code`:
the same commit and the same uncommitted changes) as this invocation; any other
run directory is trained again. A run that fails is recorded (with the tail of
its log) and the benchmark goes on.

Example:
    >>> records, reused = run_all(settings, "9760000", Path("experiments/out/compare/quick"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nf_lightning.benchmark.plan import RunSpec, local_tag, planned_runs, run_overrides
from nf_lightning.benchmark.presets import LOG_FILE, RECORD_FILE, SPEC_FILE
from nf_lightning.benchmark.provenance import code_identity, code_root, same_code
from nf_lightning.benchmark.summary import known_from, run_row


def reusable(directory: Path, overrides: list[str], code: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's record if it finished with the same ``overrides`` from the same ``code``, else ``None``."""
    path = directory / RECORD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record["spec"]["overrides"] != overrides:
        return None
    return record if same_code((record.get("provenance") or {}).get("code"), code) else None


def run_all(
    settings: Mapping[str, Any], budget: str, work: Path, units: int, log: Callable[[str], Any] = print
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train every planned run; return their records (in plan order) and the keys of the runs reused.

    ``units`` is the network's number of units (the depths ``depth_search`` may try).
    """
    methods, jobs, code = settings["methods"], settings["jobs"], code_identity()
    records: dict[str, dict[str, Any]] = {}
    reused: list[str] = []
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    checked: set[str] = set()  # runs already looked at for reuse: each is read once
    changed = True
    while True:
        if changed:  # plan again only when a run finished or was reused: the loop stays light on the clock
            known = known_from(list(records.values()), settings)
            planned = planned_runs(methods, settings["lrs"], settings["seeds"], known, units, settings.get("pinned"),
                                   local_tag(settings.get("local_set") or []),
                                   local_tag(settings.get("scratch_set") or []))  # fmt: skip
            changed = False
        pending = [s for s in planned if s.key not in records and s.key not in running]
        found = {s.key: reusable(work / "runs" / s.key, run_overrides(s, settings, budget, known.target), code)
                 for s in pending if s.key not in checked}  # fmt: skip
        checked |= set(found)
        found = {k: r for k, r in found.items() if r is not None}
        if found:
            for key, record in found.items():
                log(f"[compare] reusing {key} (same overrides, same code)")
                records[key] = record
            reused += list(found)
            changed = True  # what they decided may plan more runs
            continue
        if not running and not pending:
            return [records[s.key] for s in planned], reused
        while pending and len(running) < jobs:
            spec = pending.pop(0)
            overrides = run_overrides(spec, settings, budget, known.target)
            running[spec.key] = (_start(spec, overrides, settings, work), time.perf_counter())
            log(f"[compare] started {spec.key}")
        time.sleep(1.0)
        for key, (process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[key]
            records[key] = _finished(process.returncode, work / "runs" / key)
            changed = True
            log(f"[compare] finished {key}: {run_row(records[key])['status']} in {time.perf_counter() - started:.0f} s")


def _payload(spec: RunSpec, overrides: list[str]) -> dict[str, Any]:
    return {"key": spec.key, "method": spec.method, "lr": spec.lr, "seed": spec.seed, "unit": spec.unit,
            "overrides": overrides}  # fmt: skip


def _start(spec: RunSpec, overrides: list[str], settings: Mapping[str, Any], work: Path) -> subprocess.Popen:
    directory = work / "runs" / spec.key
    if directory.exists():
        shutil.rmtree(directory)  # a killed, stale or other code's run starts over
    directory.mkdir(parents=True)
    payload = {**_payload(spec, overrides), "threads": settings["threads"], "out": str(directory)}
    (directory / SPEC_FILE).write_text(json.dumps(payload, indent=2))
    threads = str(settings["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    with (directory / LOG_FILE).open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "nf_lightning.benchmark.worker", str(directory / SPEC_FILE)],
            stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=code_root(),
        )  # fmt: skip  (cwd first on the worker's path: it imports the nf_lightning this process did)


def _finished(returncode: int, directory: Path) -> dict[str, Any]:
    path = directory / RECORD_FILE
    if returncode == 0 and path.is_file():
        return json.loads(path.read_text())
    log_tail = (directory / LOG_FILE).read_text()[-3000:] if (directory / LOG_FILE).is_file() else ""
    payload = json.loads((directory / SPEC_FILE).read_text())
    return {"spec": payload, "status": "failed", "error": f"exit status {returncode}: {log_tail}"}
