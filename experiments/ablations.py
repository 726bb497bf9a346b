"""What two NeuroFlux choices cost or save, measured side by side on real CIFAR-10.

* the activation cache's augmentation policy: cached (later blocks see the
  un-augmented training set) against ``cache=False`` (every batch runs through the
  frozen blocks, so every block sees augmented data);
* ``depth_patience``: stop training deeper blocks once the best exit stops improving.

BP at the same budget and schedule length runs alongside as the reference.

    NF_DATA_DIR=../shared/datasets python experiments/ablations.py            # quickstart scale
    python experiments/ablations.py --overrides data.train_subset=10000 epochs=3

Writes every run's results.json under ``--out`` and prints one table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nf_lightning.cli.common import compose_config
from nf_lightning.cli.train import run

VARIANTS: dict[str, list[str]] = {
    "bp": ["method=bp"],
    "neuroflux (cache)": ["method=neuroflux"],
    "neuroflux (no cache, augmented)": ["method=neuroflux", "method.cache=false"],
    "neuroflux (depth_patience=2)": ["method=neuroflux", "exit.depth_patience=2"],
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/out/ablations"))
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    rows = []
    for name, overrides in VARIANTS.items():
        cfg = compose_config(
            "train", ["experiment=quickstart", "trainer.enable_progress_bar=false", *overrides, *args.overrides]
        )
        out = args.out / name.split(" ")[0] / "_".join(o.replace("=", "-") for o in overrides)
        results = run(cfg, out)
        exit_info = results.get("exit") or {}
        rows.append(
            {
                "variant": name,
                "accuracy": results.get("final_accuracy"),
                "train_seconds": results.get("train_seconds"),
                "epochs_trained": len(results.get("history", [])),
                "exit_unit": exit_info.get("unit"),
                "compression": exit_info.get("compression"),
                "cache_mb": results.get("cache_bytes", 0) / 1e6,
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablations.json").write_text(json.dumps(rows, indent=2))
    print(f"{'variant':<34}{'accuracy':>9}{'seconds':>9}{'epochs':>8}{'exit':>6}{'smaller':>9}{'cache MB':>10}")
    for r in rows:
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        secs = f"{r['train_seconds']:.1f}" if r["train_seconds"] is not None else "-"
        smaller = f"{r['compression']:.1f}x" if r["compression"] else "-"
        print(
            f"{r['variant']:<34}{acc:>9}{secs:>9}{r['epochs_trained']:>8}{str(r['exit_unit']):>6}{smaller:>9}"
            f"{r['cache_mb']:>10.1f}"
        )
    return rows


if __name__ == "__main__":
    main()
