"""``experiments/compare.py``'s command line: run the benchmark, write its summary, or regenerate the README.

Example:
    >>> args = parse_args(["--preset", "tiny_imagenet"], repo=Path("."))
    >>> args.data, args.lrs, args.out.as_posix()
    ('tiny_imagenet', [0.05, 0.1], 'experiments/results/compare/tiny_imagenet')
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nf_lightning.benchmark import measure as measures
from nf_lightning.benchmark.figure import figure12
from nf_lightning.benchmark.presets import BUDGET_BATCH, LOCAL, METHODS, PRESETS
from nf_lightning.benchmark.provenance import code_identity, utc_now

README_SUMMARIES = {"CIFAR-10": "default", "Tiny ImageNet-100": "tiny_imagenet",
                   "Tiny ImageNet-100 with BP trained 60 epochs": "tiny_imagenet_bp60_depth"}
"""The README section's data sets and their results directories (``experiments/results/compare/<name>``);
the third is Tiny ImageNet-100 with BP given twice the preset's epochs, so its target comes from a BP that
plateaued, and the depth search in the same invocation."""


def neuroflux_metering() -> dict[str, int]:
    """How often NeuroFlux meters its steps by default (:class:`~nf_lightning.core.options.NeuroFluxOptions`'
    ``meter_full_steps``/``meter_sample_every``)."""
    from nf_lightning.core.options import NeuroFluxOptions

    defaults = NeuroFluxOptions()
    return {"full_steps": defaults.meter_full_steps, "sample_every": defaults.meter_sample_every}


def parse_args(argv: Sequence[str] | None, repo: Path) -> argparse.Namespace:
    """The command line, with the preset's values for every option not given; results under ``repo``."""
    parser = argparse.ArgumentParser(description="NeuroFlux against BP, BP-ckpt, a scratch-trained exit and a "
                                     "depth search under one memory budget (see experiments/README.md)")  # fmt: skip
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--model", default="vgg11", help="a conf/model entry")
    parser.add_argument("--width", type=float, default=0.25, help="model.width_mult")
    parser.add_argument("--data", help="a conf/data entry (data_dir from $NF_DATA_DIR)")
    parser.add_argument("--train-subset", type=int, help="class-balanced training images (0: the whole split)")
    parser.add_argument("--val-subset", type=int, help="class-balanced validation images (0: the whole split)")
    parser.add_argument("--test-subset", type=int, help="test images scored, every k-th (0: the whole test split)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the subsets, the same for every run")
    parser.add_argument("--budget", help=f"memory budget (default: the smallest at which BP trains at batch {BUDGET_BATCH})")
    parser.add_argument("--batch-limit", type=int, default=256)
    parser.add_argument("--bp-epochs", type=int, help="epochs of every BP-trained network (cosine over them)")
    parser.add_argument("--nf-epochs", type=int, help="NeuroFlux's epochs per block (its strategy's schedule)")
    parser.add_argument("--polish-epochs", type=int, help="local learning: epochs of BP on the deployed exit (0: none)")
    parser.add_argument("--lrs", type=float, nargs="+", help="learning-rate grid at batch 128, the same for every method")
    parser.add_argument("--seeds", type=int, help="seeds per method (the grid runs on seed 0)")
    parser.add_argument("--rate", nargs="+", action="extend", default=[], metavar="METHOD=LR",
                        help="train METHOD at this one rate (at batch 128) instead of the grid")
    parser.add_argument("--classic-ll", action="store_true", help="also run classic local learning")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, "classic_ll"],
                        help=f"the methods to run (default: {', '.join(METHODS)}); bp must be one, it sets the target")
    parser.add_argument("--meter-every-step", action="store_true",
                        help="meter every step of every method (default: NeuroFlux's schedule for every method)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--bare-steps", type=int, default=20, help="timed steps of each bare loop")
    parser.add_argument("--throughput-repeats", type=int, default=50)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="more nf-train overrides, for every run")
    parser.add_argument("--local-set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="more nf-train overrides for NeuroFlux's runs only (an ablation's lever); their run "
                        "directories are tagged, so BP's runs of the same code in the same --work are reused")  # fmt: skip
    parser.add_argument("--scratch-set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="more nf-train overrides for the scratch-trained exits only (scratch_exit's tries, e.g. "
                        "epochs=40; the depth search's exits follow the same recipe), tagged as --local-set's")  # fmt: skip
    parser.add_argument("--out", type=Path, help="results directory (default experiments/results/compare/<preset>)")
    parser.add_argument("--work", type=Path, help="run directories (default experiments/out/compare/<preset>)")
    parser.add_argument("--readme", action="store_true",
                        help="only regenerate README.md's benchmark section from the committed summaries of "
                        "README_SUMMARIES (CIFAR-10; Tiny ImageNet-100, also with BP at 60 epochs)")  # fmt: skip
    parser.add_argument("--ablation", type=Path, metavar="DIR",
                        help="only write DIR/ablation.md, one row per lever, from the summaries in DIR's folders")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or repo / "experiments" / "results" / "compare" / args.preset
    args.work = args.work or repo / "experiments" / "out" / "compare" / args.preset
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every run and the summary read, from the parsed command line."""
    methods = list(args.methods or METHODS)
    if args.classic_ll and "classic_ll" not in methods:
        methods.append("classic_ll")
    if "bp" not in methods:
        raise SystemExit("--methods must include bp: BP's best validation accuracy sets the target")
    if "scratch_exit" in methods and "neuroflux" not in methods:
        raise SystemExit("scratch_exit trains the exit NeuroFlux deployed: --methods must include neuroflux")
    keys = ("preset", "model", "width", "data", "train_subset", "val_subset", "test_subset", "data_seed",
            "batch_limit", "bp_epochs", "nf_epochs", "polish_epochs", "lrs", "seeds", "jobs", "threads", "set",
            "local_set", "scratch_set")  # fmt: skip
    meter = {"full_steps": 0, "sample_every": 1} if args.meter_every_step else neuroflux_metering()
    pinned = {m: float(lr) for m, lr in (item.split("=", 1) for item in args.rate)}
    if set(pinned) - set(methods):
        raise SystemExit(f"--rate names methods not run: {sorted(set(pinned) - set(methods))}")
    return {**{k: getattr(args, k) for k in keys}, "methods": methods, "meter": meter,
            "meter_every_step": args.meter_every_step, "pinned": pinned}  # fmt: skip


def measure(settings: Mapping[str, Any], results: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Bare-loop step times, the exit's inference throughput and the test at NeuroFlux's crossing (after the runs)."""
    out: dict[str, Any] = {"overhead": {}, "throughput": None, "crossing_tests": None}
    for method, stat in results["methods"].items():
        run = next((r for r in results["runs"] if r["method"] == method and r["status"] == "ok"
                    and r["lr"] == results["lrs"].get(method)), None)  # fmt: skip
        if method == "depth_search" or run is None:
            continue
        try:
            out["overhead"][method] = measures.bare_step_seconds(settings, method, run, steps=args.bare_steps)
        except Exception as error:  # a measurement must not lose the benchmark
            out["overhead"][method] = {"error": repr(error)}
    if results.get("exits"):
        try:
            aux = next((r["aux_policy"] for r in results["runs"] if r["method"] == "neuroflux" and r.get("aux_policy")),
                       "adaptive")  # the heads NeuroFlux's runs had (the exits are NeuroFlux's)  # fmt: skip
            out["throughput"] = measures.exit_throughput(settings, results["exits"]["unit"], args.throughput_repeats,
                                                         aux)  # fmt: skip
        except Exception as error:
            out["throughput"] = {"error": repr(error)}
    if any(m in LOCAL for m in results["methods"]) and results["target"] is not None:
        out["crossing_tests"] = measures.crossing_tests(results, args.work)
    return out


def main(argv: Sequence[str] | None, repo: Path) -> dict[str, Any]:
    """Run the benchmark (or regenerate the README); write and print the summary; return it."""
    import torch

    from nf_lightning.benchmark.report import markdown_table
    from nf_lightning.benchmark.scheduler import run_all
    from nf_lightning.benchmark.summary import summarize
    from nf_lightning.core.memory.budget import format_bytes, parse_bytes

    args = parse_args(argv, repo)
    if args.readme:
        from nf_lightning.benchmark.readme import update_readme

        paths = {data: repo / "experiments" / "results" / "compare" / preset / "summary.json"
                 for data, preset in README_SUMMARIES.items()}  # fmt: skip
        update_readme(paths, repo / "README.md", repo)
        return {}
    if args.ablation:
        from nf_lightning.benchmark.ablation import write_ablation

        print(f"[compare] wrote {write_ablation(args.ablation.resolve(), repo.resolve())}")
        return {}
    start, started_at, load_at_start = time.perf_counter(), utc_now(), list(os.getloadavg())
    settings = settings_of(args)
    torch.set_num_threads(args.threads)
    if args.budget:
        budget, rule, budget_bytes = args.budget, "given", parse_bytes(args.budget)
    else:
        budget_bytes = measures.tightest_bp_budget(settings)
        budget, rule = str(budget_bytes), f"the smallest at which BP trains at batch {BUDGET_BATCH}"
    print(f"[compare] budget {format_bytes(budget_bytes)} ({budget_bytes:,} bytes): {rule}")
    args.work.mkdir(parents=True, exist_ok=True)
    measures.prepare_data(settings)
    records, reused = run_all(settings, budget, args.work, measures.unit_count(settings))
    results = summarize(records, settings["methods"], settings["seeds"], reused)
    summary: dict[str, Any] = {
        "preset": args.preset,
        "settings": settings,
        "budget": {"bytes": budget_bytes, "text": format_bytes(budget_bytes), "rule": rule},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "parallel_jobs": settings["jobs"],
                    "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg())},
        "provenance": {"code": code_identity(), "started_at": started_at, "work": str(args.work)},
        "results": results,
    }  # fmt: skip
    summary.update(measure(settings, results, args))
    summary["seconds"] = time.perf_counter() - start
    write_outputs(summary, args.out)
    print(f"\n{markdown_table(summary)}\n")
    print(f"[compare] {summary['seconds']:.0f} s in all -> {args.out / 'summary.json'}")
    return summary


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    """``summary.json``, ``summary.md`` and ``figure12.png`` into ``out``."""
    from nf_lightning.benchmark.report import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    summary["files"] = ["summary.json", "summary.md", "figure12.png"]
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(out / "summary.json")
    (out / "summary.md").write_text(f"# Benchmark ({summary['preset']} preset)\n\n{markdown_table(summary)}\n")
    figure12(summary, out / "figure12.png")
