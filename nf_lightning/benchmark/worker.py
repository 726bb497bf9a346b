"""One benchmark run in its own process: ``python -m nf_lightning.benchmark.worker <run>/spec.json``.

It trains the run as its spec says (``nf-train``'s ``run()``), scores the
deployed model on the test split, and writes ``record.json`` (its presence
means done) with the run's provenance: the code it imported (commit and a hash
of uncommitted changes), when it started and ended, and the load meanwhile.

Example:
    >>> worker(Path("experiments/out/compare/quick/runs/bp_lr0.05_seed0/spec.json"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from nf_lightning.benchmark.presets import PROBE_FILE, RECORD_FILE
from nf_lightning.benchmark.probe import score_test_split
from nf_lightning.benchmark.provenance import LoadSampler, run_provenance, utc_now


def worker(spec_path: Path) -> None:
    """Train one run as ``spec_path`` says, score it on the test split, write ``record.json``."""
    from nf_lightning.cli.common import compose_config
    from nf_lightning.cli.train import POLISHED_PROGRAM_FILE, run

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])
    started_at, start = utc_now(), time.perf_counter()
    with LoadSampler() as sampler:
        cfg = compose_config("train", spec["overrides"])
        run(cfg, out)
        results = json.loads((out / "results.json").read_text())
        probe = json.loads((out / PROBE_FILE).read_text()) if (out / PROBE_FILE).is_file() else None
        polish = results.get("polish")
        if probe is not None and polish is not None and polish["kept"]:  # the deployed model is the polished exit
            polished = torch.export.load(str(out / "export" / POLISHED_PROGRAM_FILE)).module()
            probe["blockwise_accuracy"] = probe["accuracy"]
            probe["accuracy"] = score_test_split(polished, cfg, probe["test_images"])
    shutil.rmtree(out / "cache", ignore_errors=True)  # the activation cache: large, and rebuilt by any rerun
    record = {"spec": spec, "status": "ok", "results": results, "probe": probe,
              "provenance": run_provenance(sampler, started_at, time.perf_counter() - start)}  # fmt: skip
    tmp = out / f"{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(out / RECORD_FILE)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
