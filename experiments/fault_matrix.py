"""The crash drill of ``nf_lightning.testing.faults`` (what ``tests/test_faults.py`` runs) as a table: what each SIGKILL cost and how long recovery took.

Runs the drill's small NeuroFlux job (uninterrupted once, then killed
at each fixed injection point and resumed from ``last.ckpt``) and writes
``results/fault_matrix/summary.{json,md}``:

- **epochs redone**: epochs trained again, from the one the resumed run started with through the one
  the kill interrupted (0 when the kill came after the last epoch);
- **lost s**: wall time of the killed run plus the resumed run, minus the uninterrupted run's
  (work thrown away plus the restart: process start, restore, cache checks);
- whether the plan was the same, finished caches were reused unchanged, and the best exit's accuracy
  against the uninterrupted run's.

    python experiments/fault_matrix.py        # about 3 minutes on 2 cores
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from nf_lightning.testing.faults import FAST, SLOW, job, killed_epoch, manifests, result

OUT = Path(__file__).resolve().parent / "results" / "fault_matrix"


def timed(tmp: Path, fault: str) -> tuple[object, float]:
    start = time.perf_counter()
    done = job(tmp, fault)
    return done, time.perf_counter() - start


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        clean_done, clean_s = timed(Path(root) / "clean", "none")
        clean = result(clean_done)
        for fault in [*FAST, *SLOW]:
            tmp = Path(root) / fault
            killed, killed_s = timed(tmp, fault)
            kill_epoch = killed_epoch(killed)
            before = manifests(tmp)
            resumed_done, resumed_s = timed(tmp, "none")
            resumed = result(resumed_done)
            after = manifests(tmp)
            reused = sorted(n for n in before if after.get(n) == before[n])
            rows.append({
                "fault": fault,
                "killed_at_epoch": kill_epoch,
                "resumed_from_epoch": resumed["start_epoch"],
                "epochs_redone": max(kill_epoch - resumed["start_epoch"] + 1, 0),
                "lost_seconds": killed_s + resumed_s - clean_s,
                "killed_seconds": killed_s,
                "resumed_seconds": resumed_s,
                "same_plan": resumed["blocks"] == clean["blocks"],
                "caches_reused": reused,
                "caches_rewritten": sorted(n for n in after if before.get(n) not in (None, after[n])),
                "best_accuracy": resumed["best"],
                "finished": resumed["finished"] and resumed["export"],
            })
            print(json.dumps(rows[-1]), flush=True)
    summary = {"uninterrupted_seconds": clean_s, "uninterrupted_best": clean["best"], "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# Fault matrix (SIGKILL, then resume from last.ckpt); uninterrupted run {clean_s:.0f} s, "
        f"best exit {clean['best']:.3f}", "",
        "| fault | killed in epoch | resumed from epoch | epochs redone | lost s (killed + resumed - clean) | "
        "same plan | caches rewritten | best exit (clean) | finished |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['fault']} | {r['killed_at_epoch']} | {r['resumed_from_epoch']} | {r['epochs_redone']} | "
            f"{r['lost_seconds']:.0f} | {r['same_plan']} | {', '.join(r['caches_rewritten']) or 'none'} | "
            f"{r['best_accuracy']:.3f} ({clean['best']:.3f}) | {r['finished']} |"
        )
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
